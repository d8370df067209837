"""Every training stage's verdict (align/verdict.py): the paired-bootstrap rule, its likely causes and warnings, the
verdict in summary.json, the console and the trackers; and the report's "Did it help?" section."""

from __future__ import annotations

import base64
import html
import json
import re
from io import BytesIO
from types import SimpleNamespace

import pytest

from align.evaluation import Answer
from align.evaluation.pairwise import bootstrap_interval
from align.verdict import (
    Verdict,
    accuracy_verdict,
    library_default,
    loss_verdict,
    regressions,
    short,
)
from tests.conftest import tiny_lm_recipe, write_yaml

# --------------------------------------------------------------------------------------------------
# The rule, on numbers made to show it


def test_a_clear_drop_in_loss_is_improved_with_its_interval():
    before = [2.0 + 0.1 * (i % 7) for i in range(64)]
    after = [b - 0.44 + 0.25 * (2 * (i % 2) - 1) for i, b in enumerate(before)]  # a change of -0.44 +- 0.25
    verdict = loss_verdict("eval loss", before, after, unit="examples")
    assert verdict.status == "improved" and verdict.warnings == []
    low, high = bootstrap_interval([a - b for b, a in zip(before, after, strict=True)], seed=0)
    assert high < 0
    assert verdict.reasons == [
        f"eval loss 2.30 → 1.86, change −0.44 [−{-low:.2f}, −{-high:.2f}] over 64 held-out examples"
    ]
    assert verdict.record() == {"status": "improved", "reasons": verdict.reasons, "warnings": []}


def test_a_clear_drop_in_accuracy_is_got_worse_and_a_high_learning_rate_is_named():
    before, after = [1] * 40, [1] * 20 + [0] * 20
    verdict = accuracy_verdict("accuracy", before, after, unit="pairs", learning_rate=0.5,
                               default_learning_rate=1e-4, defaults_from="TRL RewardConfig")  # fmt: skip
    assert verdict.status == "got_worse"
    assert verdict.reasons[0].startswith("accuracy 1.00 → 0.50, change −0.50 [")
    assert verdict.reasons[1] == "the learning rate (0.5, 5,000x TRL RewardConfig's default 1e-4) may be too high"


def test_no_change_is_did_not_learn_with_the_causes_stated_in_numbers():
    """The issue's DPO at lr 1e-6: eval loss 0.6931 → 0.6955, pref_accuracy 0.5 → 0.5, and nothing was printed."""
    from trl import DPOConfig

    default, who = library_default(DPOConfig, "learning_rate")
    assert (default, who) == (1e-6, "TRL DPOConfig")
    correct_before = [i % 2 for i in range(64)]
    correct_after = [1 - c if i in (0, 1, 16, 17) else c for i, c in enumerate(correct_before)]  # 2 flips each way
    verdict = accuracy_verdict(
        "pref_accuracy", correct_before, correct_after, unit="pairs", learning_rate=1e-6, default_learning_rate=default,
        defaults_from=who, steps=200, dpo_loss=(0.6931, 0.6955),
    )  # fmt: skip
    assert verdict.status == "did_not_learn"
    low, high = bootstrap_interval([a - b for b, a in zip(correct_before, correct_after, strict=True)], seed=0)
    assert low <= 0 <= high
    assert verdict.reasons[0].startswith("pref_accuracy 0.50 → 0.50, change 0.00 [−")
    assert verdict.reasons[1:] == [
        "the learning rate (1e-6, TRL DPOConfig's default) may be too low",
        "eval loss stays at ln 2 (0.6931 → 0.6955): the policy has hardly moved from its reference",
    ]


def test_an_accuracy_already_perfect_before_training_is_named_as_saturated_and_a_reward_is_not():
    """`did_not_learn: pref_accuracy 1.00 → 1.00` named no cause: every held-out pair was right before training, so
    the measure could not rise. A reward has no such ceiling (its weights set its range)."""
    verdict = accuracy_verdict("pref_accuracy", [1.0] * 24, [1.0] * 24, unit="pairs")
    assert verdict.status == "did_not_learn"
    assert verdict.reasons[1] == (
        "saturated: pref_accuracy was already 1.00 before training on every one of 24 held-out pairs, so it could "
        "not rise; a harder held-out set, or the eval loss and margins, can show what training did"
    )
    assert not any("saturated" in r for r in accuracy_verdict("reward", [1.0] * 24, [1.0] * 24, ceiling=None).reasons)
    assert not any("saturated" in r for r in accuracy_verdict("accuracy", [1.0, 0.0] * 12, [1.0, 0.0] * 12).reasons)


def test_no_change_names_few_steps_a_long_warmup_tiny_lora_and_a_small_eval_split():
    after = [3.0 + 0.1 * (-1) ** i for i in range(12)]  # six up, six down: no change overall
    verdict = loss_verdict(
        "eval loss", [3.0] * 12, after, unit="examples", learning_rate=2e-7, default_learning_rate=2e-5,
        defaults_from="TRL SFTConfig", steps=6, warmup_steps=4, lora_r=2, trainable_weights=1536, total_weights=150000,
    )  # fmt: skip
    low, high = bootstrap_interval([a - 3.0 for a in after], seed=0)
    assert verdict.status == "did_not_learn"
    assert verdict.reasons == [
        f"eval loss 3.00 → 3.00, change 0.00 [−{-low:.2f}, +{high:.2f}] over 12 held-out examples",
        "the learning rate (2e-7, 100x below TRL SFTConfig's default 2e-5) may be too low",
        "warmup takes 4 of the 6 steps: the learning rate was below its set value for most of the run",
        "only 6 optimizer steps",
        "LoRA rank r=2: 1,536 of 150,000 weights (1.02%) train",
        f"only 12 held-out examples: the interval is ±{(high - low) / 2:.2f} wide, so a smaller change cannot show",
    ]


def test_warnings_never_decide_the_status():
    def answer(tokens: int, ended: bool, loop: bool = False) -> Answer:
        ids = tuple([7, 8] * (tokens // 2)) if loop else tuple(range(tokens))
        return Answer(text="x", token_ids=ids, ended=ended)

    before_answers = [answer(20, True) for _ in range(4)]
    after_answers = [answer(8, False, loop=True) for _ in range(4)]
    chosen_before = [-110.0 - i for i in range(16)]
    chosen_after = [c - 19.2 for c in chosen_before]
    verdict = accuracy_verdict(
        "pref_accuracy", [0] * 8 + [1] * 8, [1] * 16, unit="pairs",
        chosen_logps=(chosen_before, chosen_after), answers=(before_answers, after_answers),
    )  # fmt: skip
    assert verdict.status == "improved", "falling chosen log-probabilities alone do not make got_worse"
    assert verdict.warnings == [
        "answers got shorter: 20.0 → 8.0 tokens on average over 4 greedy answers",
        "answers got more repetitive: repeated 4-grams 0.00 → 0.60 over 4 greedy answers",
        "fewer answers end on their own: 100% → 0% of 4 greedy answers end with eos (the rest hit the token limit)",
        "chosen log-probability fell −117.5 → −136.7 (change −19.2 [−19.2, −19.2] over 16 held-out pairs): the "
        "chosen answers became less likely too (common in healthy preference training; a concern together with worse "
        "answers)",
    ]


def test_shorter_answers_are_no_warning_where_the_before_answers_were_loops():
    """`be be be ...` before and a short real answer after once gave "answers got shorter": the loop broke."""
    loops = [Answer(text="x", token_ids=tuple([7, 8] * 12), ended=False) for _ in range(4)]
    short = [Answer(text="x", token_ids=tuple(range(6)), ended=True) for _ in range(4)]
    verdict = accuracy_verdict("pref_accuracy", [0] * 8 + [1] * 8, [1] * 16, unit="pairs", answers=(loops, short))
    assert not any("shorter" in w for w in verdict.warnings), verdict.warnings
    real = [Answer(text="x", token_ids=tuple(range(24)), ended=True) for _ in range(4)]
    verdict = accuracy_verdict("pref_accuracy", [0] * 8 + [1] * 8, [1] * 16, unit="pairs", answers=(real, short))
    assert any(w.startswith("answers got shorter: 24.0 → 6.0") for w in verdict.warnings), verdict.warnings


def test_a_stage_built_from_scratch_says_its_improvement_is_by_construction():
    """...and only beside `improved`: beside `did_not_learn` (a grpo from scratch) 'any training improves on it'
    contradicted the verdict it sat under."""
    from align.stages.runner import scratch_warning
    from align.values import StartingPoint

    fields = {k: "x" for k in StartingPoint.__dataclass_fields__}
    scratch = StartingPoint(**{**fields, "input": "scratch"})
    assert "random initialisation" in scratch_warning(scratch, "improved")[0]
    assert scratch_warning(scratch, "did_not_learn") == scratch_warning(scratch, "got_worse") == []
    assert scratch_warning(StartingPoint(**{**fields, "input": "full"}), "improved") == []


def test_a_handful_of_examples_is_flagged_whatever_the_status():
    verdict = loss_verdict("eval loss per example", [6.103, 6.104], [6.041, 6.043])
    assert verdict.status == "improved"
    assert verdict.warnings == ["only 2 held-out examples: an interval resampled from so few is rough"]


def test_a_loss_that_is_no_longer_finite_is_got_worse_and_bad_input_is_refused():
    assert loss_verdict("eval loss", [2.0, 2.0], [2.0, float("inf")]).status == "got_worse"
    with pytest.raises(ValueError, match="2 examples before training but 1 after"):
        loss_verdict("eval loss", [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no held-out examples"):
        accuracy_verdict("accuracy", [], [])
    with pytest.raises(TypeError):
        loss_verdict("eval loss", [1.0], [1.0], learning_rte=1e-3)


def test_library_defaults_come_from_the_class_that_declares_them():
    from align.stages.lm_config import LMConfig

    assert library_default(LMConfig, "learning_rate") == (5e-5, "transformers TrainingArguments")


def test_regressions_put_the_largest_loss_first_and_average_samples():
    rows = []
    for p in range(5):
        for model, score in (("sft", 0.0), ("dpo", [0.5, -2.0, 0.1, -0.5, 0.0][p])):
            for sample in (1, 0):  # sample 0 is shown, whatever order the file holds
                scores = {"rm": score + sample, "rouge_l": -score}
                rows.append({"prompt_index": p, "prompt": f"q{p}", "reference": None, "model": model, "sample": sample,
                             "answer": f"{model} {p}.{sample}", "scores": scores})  # fmt: skip
    worst = regressions(rows, "sft", "dpo", 3, judge="rm")
    assert [r["prompt_index"] for r in worst] == [1, 3, 4]
    assert worst[0] | {} == {"prompt_index": 1, "prompt": "q1", "reference": None, "baseline": "sft 1.0",
                             "candidate": "dpo 1.0", "baseline_score": 0.5, "candidate_score": -1.5,
                             "difference": -2.0}  # fmt: skip
    assert [r["prompt_index"] for r in regressions(rows, "sft", "dpo", 2, judge="rouge_l")] == [0, 2]
    assert [r["prompt_index"] for r in regressions(rows, "sft", "dpo", 1)] == [1], "the first judge by default"


def test_the_verdict_reaches_the_log_and_every_tracker_call(caplog):
    from align.stages.runner import report_verdict

    calls = []
    tracker = SimpleNamespace(
        summary=lambda values: calls.append(("summary", values)),
        table=lambda key, columns, rows: calls.append(("table", key, columns, rows)),
        alert=lambda title, text: calls.append(("alert", title, text)),
    )
    verdict = Verdict("did_not_learn", ["pref_accuracy 0.50 → 0.50", "only 4 optimizer steps"], ["w"])
    with caplog.at_level("INFO"):
        record = report_verdict(SimpleNamespace(tracker=tracker), SimpleNamespace(name="dpo"), verdict)
    assert record == verdict.record()
    assert calls == [
        ("summary", {"verdict": "did_not_learn"}),
        ("table", "verdict_reasons", ["status", "kind", "text"], [
            ["did_not_learn", "reason", "pref_accuracy 0.50 → 0.50"],
            ["did_not_learn", "reason", "only 4 optimizer steps"],
            ["did_not_learn", "warning", "w"],
        ]),
        ("alert", "dpo: did_not_learn", "pref_accuracy 0.50 → 0.50; only 4 optimizer steps"),
    ]  # fmt: skip
    assert "verdict: did_not_learn — pref_accuracy 0.50 → 0.50; only 4 optimizer steps" in caplog.text
    assert short(verdict.record(), 30) == "did_not_learn: pref_accuracy…"


# --------------------------------------------------------------------------------------------------
# Tiny real runs built to improve, to learn nothing and to get worse


@pytest.fixture(scope="module")
def verdict_run(tmp_path_factory):
    """lm (python-docs: improves) -> dpo at learning rate 1e-7 (learns nothing) -> an lm stage trained on one
    repeated phrase and evaluated on Python's help text (gets worse), run as a user runs it."""
    import contextlib
    import io
    from pydoc_data.topics import topics

    from align.run import main

    tmp = tmp_path_factory.mktemp("verdict")
    (tmp / "loop.jsonl").write_text("".join(json.dumps({"text": "zq " * 150}) + "\n" for _ in range(24)))
    docs = [text for _, text in sorted(topics.items()) if 600 < len(text) < 1500][:16]  # ~80 blocks of 64 tokens
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in docs))
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"].update(max_steps=10, eval_steps=5)
    recipe["stages"].append({
        "name": "dpo", "kind": "dpo", "model": "@lm", "generations": 2,
        "data": {"card": "python-docs-preferences", "max_train_rows": 32, "max_eval_rows": 16},
        "train": {"beta": 0.1, "max_length": 64, "max_steps": 4, "per_device_train_batch_size": 8,
                  "learning_rate": 1e-7, "logging_steps": 2, "eval_steps": 2},
    })  # fmt: skip
    recipe["stages"].append({
        "name": "worse", "kind": "lm", "model": "@lm",
        "data": {"source": {"files": {"train": [str(tmp / "loop.jsonl")], "validation": [str(tmp / "docs.jsonl")]}},
                 "format": "text", "splits": {"validation": "validation"}},
        "train": {"max_length": 64, "max_steps": 10, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                  "logging_steps": 5, "eval_steps": 5},
    })  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(write_yaml(tmp / "r.yaml", recipe)), "--output-dir", str(tmp / "run")]) == 0
    return {"run_dir": tmp / "run", "stdout": out.getvalue()}


def verdicts(run_dir) -> dict[str, dict]:
    return {s: json.loads((run_dir / s / "summary.json").read_text())["verdict"] for s in ("lm", "dpo", "worse")}


@pytest.mark.slow
def test_tiny_runs_improve_learn_nothing_and_get_worse(verdict_run):
    found = verdicts(verdict_run["run_dir"])
    print(json.dumps(found, indent=1, ensure_ascii=False))  # the texts, for a reader of `pytest -s`
    assert found["lm"]["status"] == "improved"
    number = r"\d+\.\d+"
    assert re.fullmatch(rf"eval loss per example {number} → {number}, change −{number} \[−{number}, −{number}\] over "
                        r"\d+ held-out blocks", found["lm"]["reasons"][0]), found["lm"]  # fmt: skip

    dpo = found["dpo"]
    assert dpo["status"] == "did_not_learn", dpo
    assert re.fullmatch(r"pref_accuracy \d\.\d+ → \d\.\d+, change .+ over 16 held-out pairs", dpo["reasons"][0]), dpo
    assert "the learning rate (1e-7, 10x below TRL DPOConfig's default 1e-6) may be too low" in dpo["reasons"]
    assert any(r.startswith("eval loss stays at ln 2 (0.6931 → 0.693") for r in dpo["reasons"]), dpo
    assert "only 4 optimizer steps" in dpo["reasons"]

    worse = found["worse"]
    assert worse["status"] == "got_worse", worse
    assert re.fullmatch(rf"eval loss per example {number} → {number}, change \+{number} \[\+{number}, \+{number}\] "
                        r"over \d+ held-out blocks", worse["reasons"][0]), worse  # fmt: skip
    high = "the learning rate (0.01, 200x transformers TrainingArguments's default 5e-5) may be too high"
    assert worse["reasons"][1:] == [high]


@pytest.mark.slow
def test_the_console_table_ends_with_every_stage_verdict_in_full(verdict_run):
    lines = verdict_run["stdout"].rstrip().splitlines()
    assert ["stage", "status", "before", "→", "after", "time", "model"] in [line.split() for line in lines]
    start = lines.index("verdicts:")
    expected = [("lm", "improved"), ("dpo", "did_not_learn"), ("worse", "got_worse")]
    for line, (stage, status) in zip(lines[start + 1 :], expected, strict=True):
        assert line.split()[:2] == [stage, f"{status}:"], line
        assert "…" not in line, "the first reason in full"
        summary = json.loads((verdict_run["run_dir"] / stage / "summary.json").read_text())
        assert summary["verdict"]["reasons"][0] in line


@pytest.mark.slow
def test_the_report_shows_each_stage_verdict_in_the_table_its_section_and_did_it_help(verdict_run):
    from align.report import build_report

    run_dir = verdict_run["run_dir"]
    page = build_report(run_dir).read_text()
    found = verdicts(run_dir)
    top = page.split("<h2 id='did-it-help'>Did it help?</h2>")[1].split("<h2>Stages</h2>")[0]
    for stage, verdict in found.items():
        status = verdict["status"]
        line = f"<span class='{status}'>{status.replace('_', ' ')}</span>"
        assert line + " — " + html.escape(verdict["reasons"][0]) in top
        section = page.split(f"<h2>{stage} (")[1].split("<h2>")[0]
        assert f"<p class='verdict'>Verdict: {line}</p>" in section
        assert all(f"<li>{html.escape(reason)}</li>" in section for reason in verdict["reasons"])
    assert "<th>verdict</th>" in page.split("<h2>Stages</h2>")[1].split("</table>")[0]
    assert "<table class='models'>" not in page, "no eval stage: only the stage verdicts"


# --------------------------------------------------------------------------------------------------
# "Did it help?" from an eval stage's files (fabricated in the eval stage's format)


WORSE = "win rate 0.31 [0.24, 0.38] vs sft by reward_model"


def fabricated_run(run_dir):
    """A run directory with sft and dpo stages (their verdicts) and an eval stage comparing them on 12 prompts."""
    stages = [("sft", "sft"), ("dpo", "dpo"), ("eval", "eval")]
    run_dir.mkdir()
    pipeline = {"name": "fab", "stages": [{"name": n, "kind": k, "status": "completed", "fingerprint": "f",
                                           "dir": str(run_dir / n)} for n, k in stages]}  # fmt: skip
    (run_dir / "pipeline.json").write_text(json.dumps(pipeline))
    stage_verdicts = {
        "sft": {"status": "improved", "reasons": ["eval loss 2.31 → 1.87, change −0.44 [−0.47, −0.41] over 64 "
                                                  "held-out examples"], "warnings": []},
        "dpo": {"status": "did_not_learn", "reasons": ["pref_accuracy 0.50 → 0.50, change 0.00 [−0.04, +0.04] over "
                                                       "64 held-out pairs", "only 4 optimizer steps"],
                "warnings": ["answers got shorter: 20.0 → 8.0 tokens on average over 4 greedy answers"]},
    }  # fmt: skip
    for name, kind in stages[:2]:
        (run_dir / name).mkdir()
        summary = {"stage": name, "kind": kind, "status": "completed", "metrics": {"eval_loss": 1.0},
                   "verdict": stage_verdicts[name]}  # fmt: skip
        (run_dir / name / "summary.json").write_text(json.dumps(summary))
    model = {"score_mean": {"reward_model": 0.1, "rouge_l": 0.2}, "lc_win_rate": 0.5, "mean_length": 31.2,
             "repetition": 0.05, "distinct_2": 0.8, "eos_rate": 0.9, "lm_eval": {"arc_easy": {"acc": 0.3}}}  # fmt: skip
    models = {
        "sft": model | {"model": "@sft (runs/x/sft/model)", "win_rate": 0.5, "win_rate_ci": [0.5, 0.5],
                        "verdict": {"status": "baseline", "reasons": ["the baseline"]}},
        "dpo": model | {"model": "@dpo (runs/x/dpo/model)", "win_rate": 0.31, "win_rate_ci": [0.24, 0.38],
                        "lc_win_rate": 0.35, "eos_rate": 1.0, "verdict": {"status": "worse", "reasons": [WORSE]}},
    }  # fmt: skip
    metrics = {"baseline": "sft", "prompts": 12, "judge": "reward_model", "judges": ["reward_model", "rouge_l"],
               "models": models}  # fmt: skip
    (run_dir / "eval").mkdir()
    summary = {"stage": "eval", "kind": "eval", "status": "completed", "metrics": metrics,
               "verdict": {"status": "worse", "reasons": [f"dpo: {WORSE}"]}}  # fmt: skip
    (run_dir / "eval" / "summary.json").write_text(json.dumps(summary))
    rows = []
    for p in range(12):
        for label in ("sft", "dpo"):
            score = 0.0 if label == "sft" else (p - 6) / 2  # prompt 0 is the largest regression, 6 a tie
            rows.append({"prompt_index": p, "prompt": f"question {p}?", "reference": None, "model": label, "sample": 0,
                         "answer": f"<{label} answer {p}>", "tokens": 3, "ended": True,
                         "scores": {"reward_model": score, "rouge_l": 0.1}})  # fmt: skip
    (run_dir / "eval" / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_did_it_help_opens_the_report_with_models_intervals_verdicts_and_regressions(tmp_path):
    import matplotlib.image

    from align.report import build_report

    page = build_report(fabricated_run(tmp_path / "run")).read_text()
    top = page.split("<h2 id='did-it-help'>Did it help?</h2>")[1].split("<h2>Stages</h2>")[0]
    assert page.index("Did it help?") < page.index("<h2>Stages</h2>")
    # The eval's own verdict first, then every model's figures and verdict.
    assert top.index("dpo: win rate 0.31 [0.24, 0.38] vs sft by reward_model") < top.index("<table class='models'>")
    table = top.split("<table class='models'>")[1].split("</table>")[0]
    for heading in ("score: reward_model", "score: rouge_l", "win rate [95% CI]", "LC win rate", "mean length",
                    "repetition", "distinct-2", "eos rate", "arc_easy/acc", "verdict"):  # fmt: skip
        assert f"<th>{heading}</th>" in table, heading
    dpo_row = table.split("<td>dpo<br>")[1].split("</tr>")[0]
    assert "0.31<br>[0.24, 0.38]" in dpo_row and "<span class='worse'>worse</span>" in dpo_row and ">0.35<" in dpo_row
    assert "<span class='baseline'>baseline</span>" in table
    sft_row = table.split("<td>sft<br>")[1].split("</tr>")[0]
    assert "- (the baseline)" in sft_row and "[0.5" not in sft_row, "no interval of the baseline against itself"
    # A column's numbers share their decimals: an eos rate of 1 beside 0.9 once read as a different precision.
    assert ">0.9000<" in sft_row and ">1.0000<" in dpo_row and ">1<" not in dpo_row
    # The intervals, drawn.
    (png,) = re.findall(r"<img class='win-rates' alt='([^']*)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", top)
    assert png[0] == "Win rate against the baseline with 95% intervals: sft 0.50; dpo 0.31", "as the page writes them"
    assert matplotlib.image.imread(BytesIO(base64.b64decode(png[1])), format="png").shape[0] > 50
    # Side by side, the largest regressions first: only prompts where dpo scored below (6 is a tie, 7 on better).
    regress = top.split("largest regressions first")[1].split("</table>")[0]
    shown = [int(p) for p in re.findall(r"question (\d+)\?", regress)]
    assert shown == [0, 1, 2, 3, 4, 5]
    assert regress.index("&lt;sft answer 0&gt;") < regress.index("&lt;dpo answer 0&gt;")
    # Each score named by its model (an arrow between two models read as before -> after).
    assert "&rarr;" not in regress and re.search(r"<td class='num'>sft [\d.]+<br>dpo -?[\d.]+<br>", regress), regress
    # The stage verdicts, one line each, with the eval stage left out (its verdict is its own).
    lines = re.findall(r"<li><b>(\w+)</b> \((\w+)\): <span class='(\w+)'>", top)
    assert lines == [("sft", "sft", "improved"), ("dpo", "dpo", "did_not_learn")]
    # The eval's own section points to the models' figures instead of a table of one count.
    eval_section = page.split("<h2>eval (eval)")[1].split("<h2>")[0]
    assert "<th>metric</th>" not in eval_section and "every model's figures are in" in eval_section
    # Each stage's section holds its reasons and warnings.
    dpo_section = page.split("<h2>dpo (dpo)")[1].split("<h2>")[0]
    assert "<li>only 4 optimizer steps</li>" in dpo_section
    assert "warning: answers got shorter: 20.0 → 8.0 tokens" in dpo_section


def test_figures_side_by_side_share_their_decimals():
    """The closing table once read `accuracy 0.4848 → 1` and `eval_loss 5.97 → 5.902` (each number `.4g` alone)."""
    from align.values import same_decimals

    assert same_decimals(0.4848, 1) == ["0.4848", "1.0000"]
    assert same_decimals(5.97, 5.902) == ["5.970", "5.902"]
    assert same_decimals(8.287, 5.324) == ["8.287", "5.324"]
    assert same_decimals(0.0, 0.0) == ["0", "0"]
    assert same_decimals(1.5e-5, 2e-5) == ["1.5e-05", "2e-05"], "tiny figures keep their significant digits"
    assert same_decimals(float("nan"), 0.5) == ["nan", "0.5000"]


def test_an_eval_of_several_models_heads_with_the_worst_and_names_every_one_that_differs():
    """dpo ties the baseline, orpo loses every prompt, grpo wins: the stage is `worse`, its first reason (the console's
    verdict line) and the closing table's headline lead with orpo, then grpo, then dpo. The stage once took the last
    model's verdict, and `no_difference: dpo` hid orpo's 0.00."""
    from align.evaluation.verdicts import eval_verdict
    from align.stages.eval import Eval

    def model(rate: float, low: float, high: float, status: str) -> dict:
        return {"win_rate": rate, "win_rate_ci": [low, high],
                "verdict": {"status": status, "reasons": [f"win rate {rate:.2f} [{low:.2f}, {high:.2f}]"],
                            "warnings": []}}  # fmt: skip

    metrics = {"baseline": "sft", "models": {
        "sft": {"win_rate": 0.5, "win_rate_ci": [0.5, 0.5], "verdict": {"status": "baseline", "reasons": [""]}},
        "dpo": model(0.57, 0.45, 0.68, "no_difference"), "orpo": model(0.0, 0.0, 0.0, "worse"),
        "grpo": model(0.8, 0.7, 0.9, "better"),
    }}  # fmt: skip
    verdict = eval_verdict(metrics)
    assert verdict["status"] == "worse"
    assert verdict["reasons"] == [
        "orpo: win rate 0.00 [0.00, 0.00] (worse)",
        "grpo: win rate 0.80 [0.70, 0.90] (better)",
        "dpo: win rate 0.57 [0.45, 0.68] (no_difference)",
    ]
    summary = {"metrics": metrics, "verdict": verdict}
    assert Eval().headline(summary) == "win rate vs sft: orpo 0.00 (worse), grpo 0.80 (better), dpo 0.57"
    del metrics["models"]["orpo"]
    assert eval_verdict(metrics)["status"] == "better"
    del metrics["models"]["grpo"]
    assert eval_verdict(metrics)["status"] == "no_difference"


def test_a_models_card_carries_the_evals_verdict_on_that_model_not_on_the_whole_stage(tmp_path):
    """dpo tied the baseline, orpo lost: the eval stage is `worse`, yet dpo's card must say `no_difference`."""
    from align.card import later_evaluations

    def model(status: str) -> dict:
        return {"verdict": {"status": status, "reasons": [], "warnings": []}}

    (tmp_path / "eval").mkdir()
    (tmp_path / "pipeline.json").write_text(json.dumps({"stages": [{"name": "eval", "kind": "eval"}]}))
    summary = {"status": "completed", "verdict": {"status": "worse", "warnings": [], "reasons": [
        "orpo: win rate 0.00 [0.00, 0.00] (worse)", "dpo: win rate 0.57 [0.45, 0.68] (no_difference)"]},
        "metrics": {"baseline": "sft", "models": {"sft": model("baseline"), "dpo": model("no_difference"),
                                                  "orpo": model("worse")}}}  # fmt: skip
    (tmp_path / "eval" / "summary.json").write_text(json.dumps(summary))
    assert later_evaluations(tmp_path, "dpo") == [
        "- `eval`: **no_difference**: win rate 0.57 [0.45, 0.68] (no_difference)."
    ]
    assert later_evaluations(tmp_path, "orpo")[0].startswith("- `eval`: **worse**: win rate 0.00")


def test_a_report_shows_no_regressions_where_every_prompt_is_a_tie(tmp_path):
    """Ties are no regression: where the candidate never scored below the baseline the page says so, instead of
    a table of ties (both models scored 0 on every prompt of a short tools run)."""
    from align.report import build_report

    run_dir = fabricated_run(tmp_path / "run")
    path = run_dir / "eval" / "generations.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "scores": {"reward_model": 0.0, "rouge_l": 0.0}}) + "\n" for r in rows))
    top = build_report(run_dir).read_text().split("<h2 id='did-it-help'>Did it help?</h2>")[1].split("<h2>Stages")[0]
    assert "largest regressions first" not in top
    assert "No prompt where dpo scored below sft by reward_model." in top
