"""align.evaluation: batched generation, answer statistics, judges, and pairwise win rates with intervals.

The three comparisons issue 16 asks for run end to end on a tiny GPT-2 trained for a few seconds on the builtin
instruction set (so that its answers are made of documentation words, end on their own about half the time, and
overlap the references a little), answering held-out prompts:
- the model against itself, sampled with another seed: a draw whose interval holds 0.5;
- its own answers padded with filler, judged by ROUGE-L recall (which rewards length): the raw win rate moves,
  the length-controlled one does not;
- its answers cut to three tokens, judged by ROUGE-L F1: a clear loss, the interval below 0.5.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from align.evaluation import (
    Answer,
    answer_statistics,
    compare_pairwise,
    distinct_n,
    eos_rate,
    generate_batched,
    length_controlled_win_rate,
    mean_length,
    per_prompt_wins,
    repetition,
    reward_model_scores,
    rouge_l_f1,
)
from align.evaluation.pairwise import bootstrap_interval

PROMPTS = 80  # held-out prompts in the comparisons
SAMPLES = 2  # samples per prompt when sampling
MAX_NEW_TOKENS = 32
# Common words of the documentation: appended to an answer, some of them extend its overlap with the reference.
FILLER_TEXT = "as described above in the documentation of the object the value of the attribute is used and so on"
FILLER = FILLER_TEXT.split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread; on a shared 2-core machine a second one costs up to 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world():
    """A tokenizer and a tiny GPT-2 trained for 100 steps on python-docs-instruct, held-out prompts with their
    reference completions, and a randomly initialised sequence-classification model as a stand-in reward model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.builtin import python_docs_instruct
    from align.models import train_tokenizer

    rows = python_docs_instruct()
    prompts, completions = rows["prompt"], rows["completion"]
    tokenizer = train_tokenizer(prompts + completions, 1024)
    eos = tokenizer.eos_token_id
    short = [i for i, p in enumerate(prompts) if len(tokenizer(p)["input_ids"]) <= 64]
    held_out = short[::4][:PROMPTS]
    assert len(held_out) == PROMPTS
    train = sorted(set(range(len(prompts))) - set(held_out))

    def config(**extra):
        return AutoConfig.for_model(
            "gpt2", vocab_size=len(tokenizer), n_layer=2, n_head=2, n_embd=32, n_positions=128,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **extra,
        )  # fmt: skip

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config())
    sequences = [(tokenizer(prompts[i] + completions[i])["input_ids"] + [eos])[-96:] for i in train]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(100):
        batch = [sequences[j] for j in torch.randint(len(sequences), (16,), generator=order)]
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), eos)
        labels = torch.full((len(batch), width), -100)
        for k, ids in enumerate(batch):
            input_ids[k, : len(ids)] = labels[k, : len(ids)] = torch.tensor(ids)
        policy(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    policy.eval()
    torch.manual_seed(1)
    reward_model = AutoModelForSequenceClassification.from_config(config(num_labels=1)).eval()
    return {
        "tokenizer": tokenizer,
        "policy": policy,
        "reward_model": reward_model,
        "prompts": [prompts[i] for i in held_out],
        "references": [completions[i] for i in held_out],
    }


@pytest.fixture(scope="module")
def sampled(world):
    """The policy's answers under two labels, sampled at temperature 1 with a seed each: same model, other answers."""
    return {
        label: generate_batched(
            world["policy"],
            world["tokenizer"],
            world["prompts"],
            max_new_tokens=MAX_NEW_TOKENS,
            temperature=1.0,
            num_samples=SAMPLES,
            batch_size=64,
            seed=seed,
        )
        for label, seed in (("candidate", 1), ("baseline", 2))
    }


def texts(answers: list[list[Answer]]) -> list[list[str]]:
    return [[a.text for a in per_prompt] for per_prompt in answers]


def lengths(answers: list[list[Answer]]) -> list[list[int]]:
    return [[a.tokens for a in per_prompt] for per_prompt in answers]


def rouge_scores(answer_texts: list[list[str]], references: list[str], measure: str = "fmeasure") -> list[list[float]]:
    """ROUGE-L per answer against its prompt's reference: F1 through align's judge, recall straight from rouge-score."""
    if measure == "fmeasure":
        return [
            rouge_l_f1(per_prompt, [ref] * len(per_prompt))
            for per_prompt, ref in zip(answer_texts, references, strict=True)
        ]
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        [getattr(scorer.score(ref, t)["rougeL"], measure) for t in per_prompt]
        for per_prompt, ref in zip(answer_texts, references, strict=True)
    ]


def rm_scores(world, answer_texts: list[list[str]]) -> list[list[float]]:
    flat_prompts = [p for p, per_prompt in zip(world["prompts"], answer_texts, strict=True) for _ in per_prompt]
    flat = reward_model_scores(
        world["reward_model"], world["tokenizer"], flat_prompts, [t for per_prompt in answer_texts for t in per_prompt]
    )
    return [flat[i : i + SAMPLES] for i in range(0, len(flat), SAMPLES)]


# --------------------------------------------------------------------------------------------------
# The three comparisons


@pytest.mark.slow
@pytest.mark.parametrize("judge", ["reward_model", "rouge_l"])
def test_a_model_against_itself_sampled_is_a_draw(world, sampled, judge):
    candidate, baseline = sampled["candidate"], sampled["baseline"]
    same = sum(
        c.text == b.text for cs, bs in zip(candidate, baseline, strict=True) for c, b in zip(cs, bs, strict=True)
    )
    assert same < 0.1 * PROMPTS * SAMPLES, "the two seeds must give different answers, or the test tests nothing"
    if judge == "reward_model":
        scores = {label: rm_scores(world, texts(answers)) for label, answers in sampled.items()}
    else:
        scores = {label: rouge_scores(texts(answers), world["references"]) for label, answers in sampled.items()}
    result = compare_pairwise(scores["candidate"], scores["baseline"], lengths(candidate), lengths(baseline))
    print(f"self-comparison ({judge}): {result}")
    wins = np.array(result.wins)
    assert np.mean(wins == 0.5) < 0.5, "mostly ties: the judge does not tell these answers apart"
    assert 0.4 <= result.win_rate <= 0.6
    assert result.win_rate_ci[0] < 0.5 < result.win_rate_ci[1]
    assert result.win_rate_ci[1] - result.win_rate_ci[0] < 0.3
    assert 0.35 <= result.lc_win_rate <= 0.65


@pytest.mark.slow
@pytest.mark.parametrize("candidate_seed", ["same_answers", "other_seed"])
def test_padding_moves_the_raw_win_rate_but_not_the_length_controlled_one(world, sampled, candidate_seed):
    """The candidate is the baseline's model made verbose: its answers (the very same ones, or another seed's) with
    filler text appended, a random number of words (none for some answers). The judge is ROUGE-L recall, a real
    metric that rewards length: appending words can never lower an answer's longest common subsequence with the
    reference, and common words often raise it."""
    tokenizer = world["tokenizer"]
    baseline = sampled["baseline"]
    source = baseline if candidate_seed == "same_answers" else sampled["candidate"]
    rng = np.random.default_rng(0)
    # Half the prompts keep their answers as they are, the other half get 1 to 57 filler words on each answer.
    words = [rng.integers(1, 3 * len(FILLER) + 1) if rng.random() < 0.5 else 0 for _ in source]
    padded = [
        [a.text + "".join(" " + FILLER[w % len(FILLER)] for w in range(n)) for a in per]
        for per, n in zip(source, words, strict=True)
    ]
    padded_lengths = [[len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in per] for per in padded]
    scores = rouge_scores(padded, world["references"], "recall")
    base_scores = rouge_scores(texts(baseline), world["references"], "recall")
    result = compare_pairwise(scores, base_scores, padded_lengths, lengths(baseline))
    print(f"padded ({candidate_seed}): {result}")
    assert result.win_rate > 0.65 and result.win_rate_ci[0] > 0.55, "the length-loving judge prefers the padding"
    assert result.length_coefficient > 0
    assert abs(result.lc_win_rate - 0.5) < 0.1
    assert abs(result.lc_win_rate - 0.5) < (result.win_rate - 0.5) / 2


@pytest.mark.slow
def test_answers_cut_to_three_tokens_lose_with_an_interval_below_half(world, sampled):
    tokenizer = world["tokenizer"]
    baseline = sampled["baseline"]
    cut = [[tokenizer.decode(a.token_ids[:3], skip_special_tokens=True) for a in per] for per in sampled["candidate"]]
    scores = rouge_scores(cut, world["references"])
    result = compare_pairwise(
        scores, rouge_scores(texts(baseline), world["references"]), [[3] * SAMPLES] * PROMPTS, lengths(baseline)
    )
    print(f"cut to three tokens: {result}")
    assert result.win_rate < 0.35
    assert result.win_rate_ci[1] < 0.5


@pytest.mark.slow
def test_answer_statistics_of_real_answers(sampled):
    flat = [a for per in sampled["baseline"] for a in per]
    stats = answer_statistics(flat)
    assert set(stats) == {"mean_length", "repetition", "distinct_2", "eos_rate"}
    assert 0 < stats["eos_rate"] < 1, "the trained policy ends some answers itself and runs out on others"
    assert all(a.tokens < MAX_NEW_TOKENS for a in flat if a.ended)
    assert all(a.tokens == MAX_NEW_TOKENS for a in flat if not a.ended)
    assert 1 <= stats["mean_length"] < MAX_NEW_TOKENS
    assert 0 <= stats["repetition"] < 0.2 and 0.3 < stats["distinct_2"] <= 1


# --------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.slow
def test_batched_greedy_answers_are_those_of_one_prompt_at_a_time(world):
    """Left padding changes nothing: the same greedy tokens as one prompt at a time, for prompts of very different
    lengths in one batch, plain and chat-rendered, and for a prompt that must lose its start to fit."""
    from align.models import ensure_chat_template

    tokenizer, policy = world["tokenizer"], world["policy"]
    plain = [world["prompts"][0], "The", world["prompts"][1] * 3, "Continue this passage: a list is"]
    batched = generate_batched(policy, tokenizer, plain, max_new_tokens=12, batch_size=4)
    alone = generate_batched(policy, tokenizer, plain, max_new_tokens=12, batch_size=1)
    assert [a[0].token_ids for a in batched] == [a[0].token_ids for a in alone]
    assert [a[0].prompt_truncated for a in batched] == [False, False, True, False]
    assert len({a[0].token_ids for a in batched}) > 1

    chat_tokenizer = copy.deepcopy(tokenizer)  # the module's tokenizer stays without a template
    ensure_chat_template(chat_tokenizer)
    chats = [[{"role": "user", "content": p}] for p in plain[:2]] + [plain[3]]
    batched = generate_batched(
        policy, chat_tokenizer, chats, max_new_tokens=8, batch_size=3, prompt_format="chat_template"
    )
    alone = generate_batched(
        policy, chat_tokenizer, chats, max_new_tokens=8, batch_size=1, prompt_format="chat_template"
    )
    assert [a[0].token_ids for a in batched] == [a[0].token_ids for a in alone]


@pytest.mark.slow
def test_sampling_is_seeded_and_leaves_the_callers_random_state_alone(world):
    tokenizer, policy, prompts = world["tokenizer"], world["policy"], world["prompts"][:6]
    settings = {"max_new_tokens": 10, "temperature": 1.0, "num_samples": 3, "batch_size": 8}
    torch.manual_seed(123)
    first = generate_batched(policy, tokenizer, prompts, seed=5, **settings)
    after = torch.rand(1)
    torch.manual_seed(123)
    again = generate_batched(policy, tokenizer, prompts, seed=5, **settings)
    assert first == again
    assert torch.equal(torch.rand(1), after), "generation must not move the caller's random state"
    other = generate_batched(policy, tokenizer, prompts, seed=6, **settings)
    assert first != other
    assert all(len(per) == 3 for per in first) and any(len({a.text for a in per}) > 1 for per in first)
    greedy = generate_batched(policy, tokenizer, prompts, max_new_tokens=10, num_samples=2)
    assert all(per[0] == per[1] for per in greedy), "greedy samples are one answer repeated"


@pytest.mark.slow
def test_generation_rejects_settings_it_cannot_honour(world):
    tokenizer, policy = world["tokenizer"], world["policy"]
    with pytest.raises(ValueError, match="no room for a prompt"):
        generate_batched(policy, tokenizer, ["x"], max_new_tokens=128)
    with pytest.raises(ValueError, match="'plain' takes string prompts"):
        generate_batched(policy, tokenizer, [[{"role": "user", "content": "x"}]], prompt_format="plain")
    with pytest.raises(ValueError, match="prompt 1 renders to no tokens"):
        generate_batched(policy, tokenizer, ["x", ""])
    with pytest.raises(ValueError, match="top_p"):
        generate_batched(policy, tokenizer, ["x"], temperature=1.0, top_p=0.0)


# --------------------------------------------------------------------------------------------------
# Statistics, judges and the pairwise arithmetic


def answer(tokens: int, ended: bool) -> Answer:
    return Answer(text="", token_ids=tuple(range(tokens)), ended=ended)


@pytest.mark.slow
def test_repetition_counts_repeated_four_grams():
    assert repetition([[1, 2, 3, 4, 5, 6, 7, 8]]) == 0.0
    # 1234 2341 3412 4123 1234: five 4-grams, four distinct.
    assert repetition([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(0.2)
    assert repetition([[7] * 20]) == pytest.approx(1 - 1 / 17), "one token stuttered: every 4-gram the same"
    # The mean over answers; answers shorter than four tokens hold no 4-gram and are left out.
    assert repetition([[1, 2, 3, 4, 1, 2, 3, 4], [1, 2, 3, 4, 5], [9, 9]]) == pytest.approx(0.1)
    assert repetition([[1, 2], []]) == 0.0


@pytest.mark.slow
def test_distinct_2_pools_bigrams_over_answers():
    assert distinct_n([[1, 2, 3], [1, 2, 4]]) == pytest.approx(3 / 4)  # 12 23 12 24
    assert distinct_n([[5, 5, 5, 5, 5]]) == pytest.approx(1 / 4)
    assert distinct_n([[1, 2, 3, 4]], n=1) == 1.0
    assert distinct_n([[1], []]) == 0.0


@pytest.mark.slow
def test_eos_rate_and_mean_length():
    answers = [answer(3, True), answer(32, False), answer(5, True), answer(32, False)]
    assert eos_rate(answers) == 0.5
    assert mean_length(answers) == 18.0
    assert eos_rate([]) == 0.0 and mean_length([]) == 0.0
    loop = Answer(text="", token_ids=(4, 5, 6) * 10, ended=False)
    stats = answer_statistics([loop])
    assert stats["repetition"] > 0.8 and stats["distinct_2"] < 0.15 and stats["eos_rate"] == 0.0


@pytest.mark.slow
def test_rouge_l_f1_is_the_lcs_f_measure():
    scores = rouge_l_f1(
        ["the cat on the mat", "the cat sat on the mat", "dogs bark", ""], ["the cat sat on the mat"] * 4
    )
    recall, precision = 5 / 6, 1.0  # LCS "the cat on the mat"
    assert scores[0] == pytest.approx(2 * recall * precision / (recall + precision))
    assert scores[1:] == [1.0, 0.0, 0.0]
    assert rouge_l_f1(["Objects, returned"], ["object return"]) == [1.0], "lowercased, punctuation dropped, stemmed"
    with pytest.raises(ValueError):
        rouge_l_f1(["a"], [])


@pytest.mark.slow
def test_reward_model_scores_batched_as_one_at_a_time(world):
    prompts = world["prompts"][:5]
    answers = ["", "a list", "The value of the object is returned." * 3, "x", "def f(): pass"]
    batched = reward_model_scores(world["reward_model"], world["tokenizer"], prompts, answers, batch_size=5)
    alone = reward_model_scores(world["reward_model"], world["tokenizer"], prompts, answers, batch_size=1)
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(np.round(batched, 6))) == 5

    from align.models import ensure_chat_template

    chat_tokenizer = copy.deepcopy(world["tokenizer"])
    ensure_chat_template(chat_tokenizer)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    batched = reward_model_scores(world["reward_model"], chat_tokenizer, chats, answers, batch_size=5)
    alone = reward_model_scores(world["reward_model"], chat_tokenizer, chats, answers, batch_size=1)
    assert batched == pytest.approx(alone, abs=1e-5)
    with pytest.raises(ValueError, match="5 prompts but 4 answers"):
        reward_model_scores(world["reward_model"], world["tokenizer"], prompts, answers[:4])


@pytest.mark.slow
def test_per_prompt_wins_average_over_sample_pairs_and_count_ties_half():
    wins = per_prompt_wins([[2.0], [1.0, 3.0], [1.0]], [[1.0], [2.0, 2.0], [1.0 + 1e-9]])
    assert wins.tolist() == [1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="2 prompts for the candidate but 1"):
        per_prompt_wins([[1.0], [1.0]], [[1.0]])


@pytest.mark.slow
def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(0).random(50)
    low, high = bootstrap_interval(values, seed=3)
    assert low < values.mean() < high
    assert (low, high) == bootstrap_interval(values, seed=3)
    assert bootstrap_interval([1.0] * 10) == (1.0, 1.0)


@pytest.mark.slow
def test_length_controlled_win_rate_recovers_the_win_rate_at_equal_length():
    """Wins drawn from a known logistic model, P(win) = sigmoid(a + b tanh(d / sd(d))): the fit reads sigmoid(a)
    back, while the raw win rate carries the length effect."""
    rng = np.random.default_rng(0)
    difference = rng.normal(8, 10, size=4000)  # the candidate mostly longer
    for intercept, slope in ((0.0, 2.0), (1.0, 1.5), (-0.5, 0.0)):
        p = 1 / (1 + np.exp(-(intercept + slope * np.tanh(difference / difference.std(ddof=1)))))
        wins = (rng.random(p.size) < p).astype(float)
        lc, coefficient = length_controlled_win_rate(wins, difference)
        assert lc == pytest.approx(1 / (1 + np.exp(-intercept)), abs=0.03)
        assert coefficient == pytest.approx(slope, abs=0.25)
        if slope:
            assert wins.mean() - lc > 0.05


@pytest.mark.slow
def test_length_controlled_win_rate_without_anything_to_fit():
    d = [1.0, -2.0, 5.0, 0.0]
    assert length_controlled_win_rate([1.0] * 4, d) == (1.0, 0.0)
    assert length_controlled_win_rate([0.0] * 4, d) == (0.0, 0.0)
    assert length_controlled_win_rate([0.5] * 4, d) == (0.5, 0.0)
    assert length_controlled_win_rate([1.0, 0.0, 1.0, 1.0], [3.0] * 4) == (0.75, 0.0)
    # Wins perfectly separated by length: the penalty keeps the fit finite; the longer side wins at any length gap,
    # and with no prompt at zero difference the fit splits the difference.
    lc, coefficient = length_controlled_win_rate([1.0, 1.0, 0.0, 0.0], [2.0, 5.0, -2.0, -5.0])
    assert np.isfinite(coefficient) and coefficient > 5 and lc == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError):
        length_controlled_win_rate([], [])


def test_an_answer_cut_inside_a_character_ends_without_replacement_characters():
    """A byte-level tokenizer decodes the first bytes of a character the token limit cut as U+FFFD."""
    from align.evaluation.generation import cut_character

    assert cut_character("caf\ufffd") == "caf" and cut_character("fin\ufffd\ufffd\ufffd") == "fin"
    assert cut_character("\ufffd" * 6) == "\ufffd" * 6, "an answer of nothing but invalid bytes is shown as it is"
    assert cut_character("ok") == "ok"
