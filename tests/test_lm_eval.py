"""align.evaluation.lm_eval: lm-evaluation-harness tasks on model directories saved the way align saves them.

A tiny GPT-2 built from a config on a BPE tokenizer trained on Python's help text (pydoc_data), saved with
`save_model` (full weights) and `save_trained` (LoRA adapters that name their base), runs two local tasks from
tests/fixtures/lm_eval/, offline:
- tiny_choice, ten multiple-choice questions: acc and acc_norm must equal what this file computes from the same
  model's log-likelihoods of each choice, so the numbers are the model's, not a default;
- tiny_echo, ten prompts answered greedily: the targets of half of them are the model's own greedy answers
  (computed here), the rest a word it never writes, so exact_match must be exactly 0.5;
- tiny_text, the ten questions as texts: word perplexity and bits per byte must equal what this file computes
  from the model's log-likelihood of each (a continuous number: adapters that were not applied would show).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from align.errors import BadInput
from align.evaluation import lm_eval as align_lm_eval
from align.evaluation.lm_eval import plain_metrics, require_lm_eval, run_lm_eval

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
MAX_GEN_TOKS = 4  # tiny_echo.yaml's generation_kwargs
NEVER = "qqqqqqqq"  # a target no greedy answer equals

needs_lm_eval = pytest.mark.skipif(
    align_lm_eval.find_spec("lm_eval") is None,
    reason='lm-evaluation-harness is not installed (pip install -e ".[eval]", or ".[test]", which includes it)',
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread; on a shared 2-core machine a second one costs up to 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny model and its tokenizer, saved in `model_dir`; the fixture tasks copied to `tasks_dir`, with
    tiny_echo's data written there from the model's own greedy answers."""
    from pydoc_data.topics import topics

    from transformers import AutoConfig, AutoModelForCausalLM

    from align.models import ensure_chat_template, save_model, train_tokenizer

    tokenizer = train_tokenizer([topics[name] for name in sorted(topics)[:40]], 512)  # Python's own help text
    ensure_chat_template(tokenizer)  # as a stage saves it
    eos = tokenizer.eos_token_id
    config = AutoConfig.for_model(
        "gpt2", vocab_size=len(tokenizer), n_layer=2, n_head=2, n_embd=32, n_positions=64,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    tmp = tmp_path_factory.mktemp("lm_eval")
    save_model(model, tokenizer, tmp / "model")

    tasks_dir = tmp / "tasks"
    shutil.copytree(FIXTURES, tasks_dir)
    prompts = [f"Question: {row['question']}\nAnswer:" for row in choice_docs()]
    answers = [greedy_answer(model, tokenizer, prompt) for prompt in prompts]
    targets = [answer if i % 2 == 0 else NEVER for i, answer in enumerate(answers)]
    echo = [{"prompt": prompt, "target": target} for prompt, target in zip(prompts, targets, strict=True)]
    (tasks_dir / "tiny_echo.jsonl").write_text("".join(json.dumps(row) + "\n" for row in echo))
    return {"model": model, "tokenizer": tokenizer, "model_dir": tmp / "model", "tasks_dir": tasks_dir, "tmp": tmp}


def choice_docs() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "tiny_choice.jsonl").read_text().splitlines() if line.strip()]


def run_in(world, model_dir: Path, tasks: list[str], **kwargs) -> dict[str, dict[str, float]]:
    """run_lm_eval from the tasks' folder (lm-eval reads a relative data_files from the working directory), with
    datasets' cache in the test's own folder."""
    import datasets.config

    here, cache = Path.cwd(), datasets.config.HF_DATASETS_CACHE
    os.chdir(world["tasks_dir"])
    datasets.config.HF_DATASETS_CACHE = world["tmp"] / "datasets-cache"
    try:
        return run_lm_eval(model_dir, tasks=tasks, include_path=world["tasks_dir"], **kwargs)
    finally:
        os.chdir(here)
        datasets.config.HF_DATASETS_CACHE = cache


# --------------------------------------------------------------------------------------------------
# The same numbers, computed here


@torch.no_grad()
def choice_logliks(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log p(" choice" | context), summed over the choice's tokens, as lm-eval requests it: the continuation's
    tokens are those of context + " " + choice after the context's own."""
    context_ids = tokenizer(context)["input_ids"]
    logliks = []
    for choice in choices:
        ids = tokenizer(context + " " + choice)["input_ids"]
        logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        logliks.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
    return logliks


def expected_accuracy(model, tokenizer) -> dict[str, float]:
    """acc (most likely choice) and acc_norm (most likely per character) over tiny_choice, computed here; the
    best choice must win by a margin that no batching noise (~1e-6) can flip, else the comparison would be luck."""
    hits, hits_norm = [], []
    for doc in choice_docs():
        logliks = choice_logliks(model, tokenizer, f"Question: {doc['question']}\nAnswer:", doc["choices"])
        per_char = [ll / len(choice) for ll, choice in zip(logliks, doc["choices"], strict=True)]
        for scores in (logliks, per_char):
            top, second = sorted(scores, reverse=True)[:2]
            assert top - second > 1e-4, f"a near tie in {doc['question']!r}: the test's premise does not hold"
        hits.append(logliks.index(max(logliks)) == doc["answer"])
        hits_norm.append(per_char.index(max(per_char)) == doc["answer"])
    return {"acc": sum(hits) / len(hits), "acc_norm": sum(hits_norm) / len(hits_norm)}


@torch.no_grad()
def expected_perplexity(model, tokenizer) -> dict[str, float]:
    """word_perplexity and bits_per_byte over tiny_text, computed here: each question's tokens scored after the
    end-of-text token (lm-eval's prefix for a text with no context), totals over all ten as lm-eval aggregates."""
    loglik, words, size = 0.0, 0, 0
    for doc in choice_docs():
        ids = [tokenizer.eos_token_id] + tokenizer(doc["question"])["input_ids"]
        logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        loglik += sum(logprobs[i - 1, ids[i]].item() for i in range(1, len(ids)))
        words += len(re.split(r"\s+", doc["question"]))
        size += len(doc["question"].encode("utf-8"))
    return {"word_perplexity": math.exp(-loglik / words), "bits_per_byte": -loglik / size / math.log(2)}


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: str) -> str:
    """What lm-eval's generate_until answers: greedy tokens up to eos or MAX_GEN_TOKS, cut at the first newline."""
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=MAX_GEN_TOKS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).split("\n")[0]


# --------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.slow
@needs_lm_eval
def test_scores_are_the_models_own_and_the_offline_switches_are_restored(world, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # As on a connected machine: the run goes offline (nothing here may reach the hub) and comes back online.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    tasks = ["tiny_choice", "tiny_echo", "tiny_text"]
    scores = run_in(world, world["model_dir"], tasks, batch_size=4)  # padded batches

    assert set(scores) == set(tasks)
    assert set(scores["tiny_choice"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(scores["tiny_echo"]) == {"exact_match", "exact_match_stderr"}
    assert set(scores["tiny_text"]) == {"word_perplexity", "bits_per_byte"}  # no closed-form standard error
    assert all(type(value) is float for metrics in scores.values() for value in metrics.values())
    assert all(0.0 <= value <= 1.0 for task in ("tiny_choice", "tiny_echo") for value in scores[task].values())
    model, tokenizer = world["model"], world["tokenizer"]
    expected = expected_accuracy(model, tokenizer)
    assert scores["tiny_choice"]["acc"] == pytest.approx(expected["acc"])
    assert scores["tiny_choice"]["acc_norm"] == pytest.approx(expected["acc_norm"])
    assert scores["tiny_echo"]["exact_match"] == pytest.approx(0.5)
    assert scores["tiny_text"] == pytest.approx(expected_perplexity(model, tokenizer), rel=1e-5)
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "HF_DATASETS_OFFLINE" not in os.environ
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False


def lora_adapters(world, target_modules: list[str], steps: int) -> tuple[Path, Any]:
    """LoRA adapters on the tiny model, trained `steps` steps on the right answers of tiny_choice, saved as a stage
    saves them (save_trained: adapter_config.json naming the base's directory, the tokenizer beside them)."""
    from types import SimpleNamespace

    from peft import get_peft_model

    from align.models import lora_config, save_trained

    tokenizer = world["tokenizer"]
    settings = SimpleNamespace(r=8, alpha=16, dropout=0.0, target_modules=target_modules)
    adapted = get_peft_model(type(world["model"]).from_pretrained(world["model_dir"]), lora_config(settings))
    right = [f"Question: {doc['question']}\nAnswer: {doc['choices'][doc['answer']]}" for doc in choice_docs()]
    batch = tokenizer(right, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(steps):
        adapted(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter_dir = world["tmp"] / f"adapter-{'-'.join(target_modules)}"
    kind = save_trained(adapted.eval(), tokenizer, adapter_dir, merge=False, base_ref=str(world["model_dir"]))
    assert kind == "adapter" and not (adapter_dir / "config.json").exists()
    return adapter_dir, adapted


@pytest.mark.slow
@needs_lm_eval
def test_lora_adapters_are_scored_on_the_base_they_name(world):
    """lm-eval loads the base the adapters name, puts the adapters on it (`peft=`), and scores the adapted model."""
    adapter_dir, adapted = lora_adapters(world, ["c_attn", "c_fc"], steps=30)
    tokenizer = world["tokenizer"]
    expected = expected_perplexity(adapted, tokenizer)
    before = expected_perplexity(world["model"], tokenizer)["bits_per_byte"]
    assert expected["bits_per_byte"] < before - 0.01, "the adapters must change the model"

    scores = run_in(world, adapter_dir, ["tiny_choice", "tiny_text"], batch_size=4)
    assert scores["tiny_text"] == pytest.approx(expected, rel=1e-5)
    accuracy = expected_accuracy(adapted, tokenizer)
    assert scores["tiny_choice"]["acc"] == pytest.approx(accuracy["acc"])
    assert scores["tiny_choice"]["acc_norm"] == pytest.approx(accuracy["acc_norm"])


@pytest.mark.slow
@needs_lm_eval
def test_adapters_on_a_tied_lm_head_ask_for_a_merged_model(world):
    """GPT-2's LM head shares the embeddings' weights: lm-eval ties them again after PEFT has put adapters on the
    head, which transformers refuses (KeyError: attribute 'weight' already exists). Merged, the model loads."""
    adapter_dir, _ = lora_adapters(world, ["c_attn", "lm_head"], steps=0)
    with pytest.raises(BadInput, match="tied") as caught:
        run_in(world, adapter_dir, ["tiny_choice"])
    assert "merge: true" in caught.value.hint


@pytest.mark.slow
@needs_lm_eval
def test_an_unknown_task_names_where_it_was_looked_for(world, monkeypatch):
    """A name not among the local tasks is looked for among lm-eval's own too; indexing those takes 14 s on two
    cores, so here a stand-in index holds the local tasks alone."""
    from lm_eval.tasks import TaskManager

    def local_only(include_path):
        return TaskManager(include_path=include_path, include_defaults=False)

    monkeypatch.setattr(align_lm_eval, "_with_builtin_tasks", local_only)
    with pytest.raises(BadInput) as caught:
        run_in(world, world["model_dir"], ["tiny_choise", "tiny_echo"])
    (problem,) = caught.value.problems
    assert "'tiny_choise'" in problem and str(world["tasks_dir"]) in problem
    assert "did you mean 'tiny_choice'?" in problem


@pytest.mark.slow
@needs_lm_eval
def test_bad_directories_are_refused_before_lm_eval_loads_anything(tmp_path):
    with pytest.raises(BadInput, match="is not a folder"):
        run_lm_eval(tmp_path, tasks=["tiny_choice"], include_path=tmp_path / "missing")
    with pytest.raises(BadInput, match="no model here"):
        run_lm_eval(tmp_path, tasks=["tiny_choice"])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(BadInput, match="gone.: no such directory"):
        run_lm_eval(tmp_path, tasks=["tiny_choice"])


@pytest.mark.slow
def test_require_lm_eval_names_the_install_command(monkeypatch):
    monkeypatch.setattr(align_lm_eval, "find_spec", lambda name: None)
    with pytest.raises(BadInput) as caught:
        require_lm_eval("stages.eval.lm_eval")
    assert caught.value.problems == ["stages.eval.lm_eval: lm-evaluation-harness is not installed"]
    assert caught.value.hint == 'pip install -e ".[eval]"'
    with pytest.raises(BadInput, match="not installed"):
        run_lm_eval(".", tasks=["tiny_choice"])


@pytest.mark.slow
def test_plain_metrics_drop_the_default_filter_and_what_is_not_a_number():
    results = {
        "alias": "tiny",
        "acc,none": 0.5,
        "acc_stderr,none": "N/A",
        "exact_match,strict-match": 1,
        "exact_match_stderr,strict-match": 0.25,
    }
    assert plain_metrics(results) == {
        "acc": 0.5,
        "exact_match,strict-match": 1.0,
        "exact_match_stderr,strict-match": 0.25,
    }
