"""`kind: distill`: its checks before any stage trains, parity with a bare DistillationTrainer, resume after SIGKILL,
and the held-out KL to the teacher with its verdict, report plot and card line."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, kill_after, write_yaml

ARITHMETIC = {"card": "arithmetic", "format": "prompt_completion", "columns": {"prompt": "prompt",
              "completion": "completion"}, "max_train_rows": 256, "max_eval_rows": 32}  # fmt: skip
SFT = {"max_length": 32, "max_steps": 4, "per_device_train_batch_size": 16, "learning_rate": 2e-3,
       "logging_steps": 2, "eval_steps": 4, "gradient_checkpointing": False}  # fmt: skip
SMALL = {"model_type": "gpt2", "vocab_size": 301, "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32}


def chain(**distill: Any) -> dict[str, Any]:
    """teacher (sft) -> student (sft) -> distill: tiny, on the builtin arithmetic task."""
    stage = {
        "name": "distill",
        "kind": "distill",
        "model": "@student",
        "teacher": "@teacher",
        "data": {"card": "arithmetic", "max_train_rows": 64, "max_eval_rows": 16},
        "measure": {"prompts": 8, "max_new_tokens": 4},
        "train": {"max_steps": 4, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
                  "max_completion_length": 4, "learning_rate": 1e-3, "logging_steps": 1, "eval_steps": 4,
                  "gradient_checkpointing": False},
    }  # fmt: skip
    stage.update(distill)
    return {
        "name": "distill",
        "seed": 0,
        "precision": "fp32",
        "tracking": {"wandb": {"mode": "disabled"}},
        "stages": [
            {"name": "teacher", "kind": "sft", "model": {**SMALL, "n_layer": 2, "n_embd": 64}, "data": ARITHMETIC,
             "train": SFT},
            {"name": "student", "kind": "sft", "model": dict(SMALL), "data": ARITHMETIC, "train": SFT},
            stage,
        ],
    }  # fmt: skip


def dry_run(tmp_path: Path, run_cli: Any, recipe: dict[str, Any]) -> tuple[int, str, str]:
    return run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--dry-run", "--output-dir", tmp_path / "run")


# --------------------------------------------------------------------------------------------------
# Before any stage trains


def test_the_plan_names_the_teacher_the_divergence_and_trls_own_defaults(tmp_path, run_cli):
    recipe = chain()
    del recipe["stages"][2]["train"]["learning_rate"]
    code, out, err = dry_run(tmp_path, run_cli, recipe)
    assert code == 0, err
    section = out.split("(distill)")[1]
    assert "teacher: @teacher, frozen, in eval mode, never saved" in section
    assert "generalised JSD, beta 1.0 (reverse KL)" in section
    assert "KL(student ‖ teacher) per answer token" in section
    # TRL's distillation defaults are unusual; the plan says they are the library's.
    assert "learning_rate: 1e-06  (library default)" in section


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"train": {"teacher_model_name_or_path": "org/t"}},
            "stages.distill.train.teacher_model_name_or_path: the teacher is the stage's `teacher:`",
        ),
        (
            {"train": {"teacher_model_init_kwargs": {"dtype": "bfloat16"}}},
            "stages.distill.train.teacher_model_init_kwargs: the teacher is the stage's `teacher_loading:`",
        ),
        ({"teacher": "@student"}, "stages.distill.teacher: '@student' is the student itself"),
        ({"model": None, "teacher": "@student"}, "stages.distill.teacher: '@student' is the student itself"),
        ({"teacher": "@later"}, "stages.distill.teacher: '@later' is not an earlier stage"),
    ],
)
def test_a_wrong_teacher_is_refused_before_any_stage_trains(tmp_path, run_cli, change, expected):
    recipe = chain()
    stage = recipe["stages"][2]
    for key, value in change.items():
        if isinstance(value, dict):
            stage[key] = {**stage[key], **value}
        elif value is None:
            del stage[key]
        else:
            stage[key] = value
    recipe["stages"].append({"name": "later", "kind": "sft", "model": "@student", "data": ARITHMETIC, "train": SFT})
    code, out, err = dry_run(tmp_path, run_cli, recipe)
    assert code == 2 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_the_student_under_another_path_is_no_teacher(tmp_path, run_cli):
    """`model: "@student"` with the student stage's own saved model named by its path (after a first run)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from align.builtin import python_docs
    from align.models import train_tokenizer

    saved = tmp_path / "run" / "student" / "model"
    GPT2LMHeadModel(GPT2Config(vocab_size=301, n_layer=1, n_embd=32, n_head=2, n_positions=32)).save_pretrained(saved)
    train_tokenizer(python_docs()["text"][:50], 301).save_pretrained(saved)
    assert AutoTokenizer.from_pretrained(saved) is not None
    code, _, err = dry_run(tmp_path, run_cli, chain(teacher=str(saved) + "/"))
    assert code == 2 and f"stages.distill.teacher: '{saved}/' is {saved}, the student itself" in err, err


def test_a_reward_model_or_an_eval_stage_is_no_teacher(tmp_path, run_cli):
    recipe = chain(teacher="@judge")
    recipe["stages"].insert(2, {"name": "judge", "kind": "rm", "model": "@student",
                                "data": {"card": "python-docs-preferences"}})  # fmt: skip
    code, _, err = dry_run(tmp_path, run_cli, recipe)
    assert code == 2 and "stages.distill.teacher: '@judge' is an rm stage, not a language model" in err, err


def test_a_teacher_with_another_vocabulary_is_refused_naming_both_sizes(tmp_path, run_cli):
    recipe = chain()
    recipe["stages"][0]["model"]["vocab_size"] = 280
    code, _, err = dry_run(tmp_path, run_cli, recipe)
    assert code == 2, err
    assert (
        "stages.distill.teacher: the teacher's vocabulary has 280 tokens (280 embedding rows), the student's 301 tokens"
        in err
    )


def test_the_same_size_is_not_the_same_vocabulary():
    """Two tokenizers of one size trained on different text: the check names the first id whose token differs."""
    from transformers import GPT2Config

    from align.builtin import python_docs
    from align.models import train_tokenizer
    from align.stages.distill import vocabulary_problem

    texts = python_docs()["text"][:300]
    one, other = train_tokenizer(texts[:150], 400), train_tokenizer(texts[150:], 400)
    assert len(one) == len(other) == 400
    config = GPT2Config(vocab_size=400)
    problem = vocabulary_problem(one, config, other, config)
    first = next(i for i in range(400) if one.convert_ids_to_tokens(i) != other.convert_ids_to_tokens(i))
    assert problem is not None and f"id {first} is " in problem and "(400 tokens) is not the student's (400)" in problem
    assert vocabulary_problem(one, config, copy.deepcopy(one), config) is None


def test_a_conversation_gives_its_turns_before_the_last_answer_as_the_prompt(tmp_path, run_cli):
    """messages rows: the trainer gets each conversation up to its last assistant turn, which the student writes."""
    from datasets import Dataset

    from align.stages.distill import as_prompts

    turns = [{"role": "system", "content": "Add."}, {"role": "user", "content": "What is 1 + 2 + 3 + 4? Answer:"},
             {"role": "assistant", "content": " 10"}]  # fmt: skip
    rows = [{"messages": turns}] * 24
    assert as_prompts(Dataset.from_list(rows))[0] == {"prompt": turns[:2]}
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = chain(data={"source": {"files": [str(path)]}, "format": "messages", "valid_fraction": 0.25})
    # At 32 positions the rendered conversation leaves no room for the answer: TRL would fail mid-training.
    code, _, err = dry_run(tmp_path, run_cli, recipe)
    assert code == 2 and "stages.distill.train.max_completion_length: 24 of 24 prompts leave no room" in err, err
    assert "the model's 32 positions (the longest prompt is " in err and not (tmp_path / "run").exists()
    for stage in recipe["stages"][:2]:
        stage["model"]["n_positions"] = 64
    code, out, err = dry_run(tmp_path, run_cli, recipe)
    assert code == 0, err
    section = out.split("(distill)")[1]
    assert r"prompt: 'system: Add.\nuser: What is 1 + 2 + 3 + 4? Answer:'" in section and " 10" not in section


def test_an_unreachable_hub_teacher_is_refused_before_stage_one(tmp_path, run_cli):
    code, _, err = dry_run(tmp_path, run_cli, chain(teacher="someone/not-on-this-machine"))
    assert code == 2 and "stages.distill.teacher" in err and "not-on-this-machine" in err, err


# --------------------------------------------------------------------------------------------------
# Training (slow)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> dict[str, Any]:
    """The chain trained once for the module."""
    from align.loader import load_recipe
    from align.pipeline import run_pipeline
    from tests.conftest import captured_trainers

    root = tmp_path_factory.mktemp("distill")
    path = write_yaml(root / "r.yaml", chain())
    with captured_trainers() as seen:
        run_pipeline(load_recipe(path), output_dir=root / "run", log_level="warning")
    return {"root": root, "run": root / "run", "trainer": seen["distill"]}


@pytest.mark.slow
def test_the_kl_to_the_teacher_is_measured_before_and_after_with_its_verdict(distilled):
    from align.card import model_card
    from align.report import build_report

    summary = json.loads((distilled["run"] / "distill" / "summary.json").read_text())
    m = summary["metrics"]
    assert m["kl_to_teacher_before"] > 0 and m["kl_to_teacher"] >= 0
    assert abs(m["gap_closed"] - (1 - m["kl_to_teacher"] / m["kl_to_teacher_before"])) < 1e-12
    assert summary["verdict"]["status"] == "improved", summary["verdict"]
    assert summary["verdict"]["reasons"][0].startswith("kl_to_teacher ")
    assert summary["teacher"] == "@teacher" and summary["kl_direction"].startswith("KL(student ‖ teacher)")
    assert summary["teacher_model"] == str(distilled["run"] / "teacher" / "model")
    assert len(summary["teacher_answers_sha256"]) == 16
    html = build_report(distilled["run"]).read_text()
    assert "KL to the teacher" in html and "kl_to_teacher" in html
    card = model_card(distilled["run"], "distill")
    teacher = json.loads((distilled["run"] / "pipeline.json").read_text())["stages"][0]["fingerprint"]
    assert f"`distill` read teacher `@teacher` (fingerprint `{teacher}`)." in card
    assert summary["teacher_fingerprint"] == teacher
    assert "| `distill` | kl_to_teacher |" in card


@pytest.mark.slow
def test_the_teacher_is_frozen_in_eval_mode_and_never_saved(distilled):
    from safetensors.torch import load_file

    teacher = distilled["trainer"].teacher_model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    saved = load_file(str(distilled["run"] / "teacher" / "model" / "model.safetensors"))
    held = teacher.state_dict()
    assert all((held[k] == saved[k]).all() for k in saved), "the teacher is the teacher stage's model, untouched"
    assert sorted(p.name for p in (distilled["run"] / "distill" / "model").iterdir() if "teacher" in p.name) == []


def resume_recipe() -> dict[str, Any]:
    recipe = chain()
    recipe["stages"][2]["train"].update(max_steps=16, save_steps=4, eval_steps=8, logging_steps=2)
    return recipe


@pytest.mark.slow
def test_a_distill_stage_killed_mid_stage_resumes_to_the_unbroken_runs_weights(tmp_path, run_cli):
    """SIGKILL (the whole process group, as the out-of-memory killer would) once checkpoint-4 of the distill stage is
    saved; the same command resumes from it and ends at the weights of a run that was never stopped. Only the run
    that is killed is a process of its own; the other two run in this one, as the grpo-with-tools test does."""
    from safetensors.torch import load_file

    path = write_yaml(tmp_path / "r.yaml", resume_recipe())
    code, _, err = run_cli(path, "--output-dir", tmp_path / "whole")
    assert code == 0, err

    command = [sys.executable, "-m", "align.run", str(path), "--output-dir", str(tmp_path / "cut")]
    cut = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                           start_new_session=True)  # fmt: skip
    kill_after(cut, tmp_path / "cut/distill/checkpoints/checkpoint-4/trainer_state.json")
    assert json.loads((tmp_path / "cut/distill/summary.json").read_text())["status"] == "running"

    code, _, err = run_cli(path, "--output-dir", tmp_path / "cut")
    assert code == 0 and "resuming from checkpoint-" in err, err
    ends = [load_file(str(tmp_path / run / "distill/model/model.safetensors")) for run in ("whole", "cut")]
    worst = max(float((ends[0][k] - ends[1][k]).abs().max()) for k in ends[0])
    assert worst <= 1e-5, f"the resumed run's weights differ from the unbroken run's by {worst:.2e}"
    summaries = [json.loads((tmp_path / run / "distill/summary.json").read_text()) for run in ("whole", "cut")]
    assert summaries[0]["metrics"]["kl_to_teacher"] == pytest.approx(summaries[1]["metrics"]["kl_to_teacher"])


# The shipped recipe, short: every stage a few steps (the README gives the full recipe's figures).
SHORT = ["stages.teacher.train.max_steps=60", "stages.student.train.max_steps=15",
         "stages.distill.train.max_steps=15", "stages.sft_only.train.max_steps=30", "stages.distill.measure.prompts=32",
         "stages.eval.max_prompts=64"]  # fmt: skip


@pytest.mark.slow
def test_the_shipped_recipe_runs_short_and_reports_the_kl_and_the_eval_beside_sft_only(tmp_path, run_cli):
    out = tmp_path / "run"
    code, stdout, err = run_cli(REPO / "recipes" / "distill.yaml", "--output-dir", out,
                                *(x for s in SHORT for x in ("--set", s)))  # fmt: skip
    assert code == 0, err
    distill = json.loads((out / "distill" / "summary.json").read_text())
    assert distill["verdict"]["status"] == "improved", distill["verdict"]
    assert distill["metrics"]["kl_to_teacher"] < distill["metrics"]["kl_to_teacher_before"]
    models = json.loads((out / "eval" / "summary.json").read_text())["metrics"]["models"]
    assert set(models) == {"sft_only", "student", "distill", "teacher"}
    assert all(isinstance(m["score_mean"]["exact_match"], float) for m in models.values())
    assert re.search(r"distill +improved: kl_to_teacher ", stdout), stdout


def test_a_kl_of_zero_before_training_is_named_as_the_cause_not_the_learning_rate():
    """Where the plan cannot tell (the same weights under another name), the verdict says why nothing was learned."""
    from types import SimpleNamespace

    from align.stages.distill import Distill
    from align.values import HeldOut

    kind = Distill()
    kind.ctx = SimpleNamespace(tracker=SimpleNamespace(table=lambda *args: None))
    kind.prompts, kind.trained_with = [], {"learning_rate": 1e-3, "default_learning_rate": 1e-6}
    metrics, extra = kind.summarize({}, {}, HeldOut([0.0] * 8), HeldOut([0.001, 0.0012] * 4))
    assert metrics["kl_to_teacher_before"] == 0.0 and metrics["gap_closed"] is None
    reasons = extra["verdict"].reasons
    assert len(reasons) == 2 and "is the teacher the student itself, under another path?" in reasons[1], reasons


@pytest.mark.slow
def test_a_teacher_saved_as_lora_adapters_teaches(tmp_path):
    """The teacher stage trained LoRA adapters (on a base stage of its own): the distill stage loads them on their
    base and distils from that model."""
    from align.loader import load_recipe
    from align.pipeline import run_pipeline

    recipe = chain()
    base = {**recipe["stages"][0], "name": "base"}
    recipe["stages"][0] = {**recipe["stages"][0], "model": "@base", "peft": {"r": 4}}
    recipe["stages"].insert(0, base)
    run_pipeline(load_recipe(write_yaml(tmp_path / "r.yaml", recipe)), output_dir=tmp_path / "run", log_level="warning")
    summary = json.loads((tmp_path / "run" / "distill" / "summary.json").read_text())
    assert (tmp_path / "run" / "teacher" / "model" / "adapter_config.json").is_file(), "the teacher is adapters"
    assert summary["status"] == "completed" and summary["teacher_model"] == str(tmp_path / "run" / "teacher" / "model")
    assert summary["metrics"]["kl_to_teacher"] < summary["metrics"]["kl_to_teacher_before"]
