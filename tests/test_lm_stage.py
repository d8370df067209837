"""The LM stage end to end on tiny models: files of the contract, learning, early stopping, chaining."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import TINY_MODEL, read_jsonl, tiny_lm_recipe, write_yaml

SUMMARY_KEYS = {
    "train_loss", "eval_loss", "eval_loss_before", "global_step", "best_step", "stopped_early",
    "train_runtime_s", "train_tokens", "tokens_per_s", "perplexity", "perplexity_before",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny from-scratch LM run shared by the tests that only read its outputs."""
    from align.run import main

    tmp = tmp_path_factory.mktemp("tiny")
    recipe = write_yaml(tmp / "tiny.yaml", tiny_lm_recipe())
    code = main([str(recipe), "--output-dir", str(tmp / "run")])
    assert code == 0
    return tmp / "run"


@pytest.mark.slow
def test_run_directory_has_the_contract_files(tiny_run):
    for name in ("recipe.yaml", "pipeline.json", "align.log", "lm/summary.json", "lm/metrics.jsonl"):
        assert (tiny_run / name).is_file(), name
    model_dir = tiny_run / "lm" / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    assert (model_dir / "tokenizer.json").is_file()

    pipeline = json.loads((tiny_run / "pipeline.json").read_text())
    assert pipeline["name"] == "tiny"
    assert [(s["name"], s["kind"], s["status"]) for s in pipeline["stages"]] == [("lm", "lm", "completed")]
    assert pipeline["stages"][0]["fingerprint"] and pipeline["stages"][0]["dir"].endswith("lm")


@pytest.mark.slow
def test_summary_has_every_key_and_perplexity_fell(tiny_run):
    summary = json.loads((tiny_run / "lm" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["kind"] == "lm"
    assert summary["input_model"] == "scratch:gpt2" and summary["model_dir"].endswith("lm/model")
    assert {"torch", "transformers", "trl", "align"} <= set(summary["versions"])
    metrics = summary["metrics"]
    assert set(metrics) >= SUMMARY_KEYS
    assert metrics["global_step"] == 30
    # Every token trained on is real: whole blocks of 64 (an epoch's last batch may hold fewer than 8 blocks).
    assert metrics["train_tokens"] % 64 == 0 and 0.9 * 30 * 8 * 64 <= metrics["train_tokens"] <= 30 * 8 * 64
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["perplexity"] <= metrics["perplexity_before"] / 2
    assert metrics["stopped_early"] is False


@pytest.mark.slow
def test_metrics_jsonl_rows_follow_the_contract(tiny_run):
    rows = read_jsonl(tiny_run / "lm" / "metrics.jsonl")
    assert all({"step", "epoch", "split"} <= set(r) for r in rows)
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in evals] == [0, 10, 20, 30], "eval before training at step 0, then every eval_steps"
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]


@pytest.mark.slow
def test_log_file_has_stage_lines_at_debug(tiny_run):
    log = (tiny_run / "align.log").read_text()
    assert "[lm]" in log and "DEBUG" in log and "precision fp32" in log
    assert "data python-docs" in log, "records from before the run directory existed are kept"


@pytest.mark.slow
def test_resolved_recipe_is_written(tiny_run):
    import yaml

    resolved = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    assert resolved["stages"][0]["data"]["source"] == {"builtin": "python-docs"}


@pytest.mark.slow
def test_weights_change_from_a_local_model_directory(tmp_path, run_cli):
    """A `model:` that is a save_pretrained directory is used as it is, and training changes its weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.builtin import python_docs
    from align.models import save_model, scratch_config, train_tokenizer
    from align.recipe import ScratchModel

    tokenizer = train_tokenizer(python_docs()["text"], 512)
    config = scratch_config(ScratchModel(**TINY_MODEL), "test", vocab_size=len(tokenizer))
    torch.manual_seed(0)
    save_model(AutoModelForCausalLM.from_config(config), tokenizer, tmp_path / "base")

    recipe = tiny_lm_recipe(stage={"model": str(tmp_path / "base")})
    recipe["stages"][0]["train"]["max_steps"] = 5
    code, out, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    before = load_file(tmp_path / "base" / "model.safetensors")
    after = load_file(tmp_path / "run" / "lm" / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert AutoConfig.from_pretrained(tmp_path / "run" / "lm" / "model").n_embd == TINY_MODEL["n_embd"]
    assert "lm" in out and "completed" in out, "the closing table names the stage and its status"


@pytest.mark.slow
def test_early_stopping_restores_the_best_model(tmp_path, run_cli):
    """A small text set trained many epochs with a high learning rate: eval loss turns up, the run stops."""
    recipe = tiny_lm_recipe(
        stage={
            "model": {**TINY_MODEL, "n_embd": 64},
            "data": {"card": "python-docs", "max_train_rows": 60, "max_eval_rows": 40},
            "train": {
                "max_length": 64,
                "max_steps": 400,
                "per_device_train_batch_size": 8,
                "learning_rate": 3.0e-3,
                "logging_steps": 5,
                "eval_steps": 10,
            },  # fmt: skip
            "early_stopping": {"patience": 2},
        }
    )
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "lm" / "summary.json").read_text())["metrics"]
    evals = [r for r in read_jsonl(tmp_path / "run" / "lm" / "metrics.jsonl") if r["split"] == "eval"]
    assert metrics["stopped_early"] is True and metrics["global_step"] < 400
    assert metrics["best_step"] < metrics["global_step"]
    lowest = min(r["eval_loss"] for r in evals)
    assert metrics["eval_loss"] == pytest.approx(lowest, rel=1e-5)
    assert evals[-1]["eval_loss"] > lowest, "the run stopped because eval loss turned up"


@pytest.mark.slow
def test_chained_stage_takes_the_previous_output(tmp_path, run_cli):
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"]["max_steps"] = 5
    recipe["stages"].append(
        {"name": "again", "kind": "lm", "data": {"card": "python-docs", "max_train_rows": 100, "max_eval_rows": 20},
         "train": {"max_length": 64, "max_steps": 5, "per_device_train_batch_size": 8, "eval_steps": 5}}
    )  # fmt: skip
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "again" / "summary.json").read_text())
    assert summary["input_model"].startswith("@lm (") and summary["input_model"].endswith("lm/model)")
    first = json.loads((tmp_path / "run" / "lm" / "summary.json").read_text())["metrics"]
    # The second stage starts from the first one's trained weights, not from a fresh scratch model.
    assert summary["metrics"]["eval_loss_before"] < first["eval_loss_before"]


def test_dry_run_plans_and_writes_nothing(tmp_path, run_cli):
    code, out, err = run_cli(
        write_yaml(tmp_path / "r.yaml", tiny_lm_recipe()), "--dry-run", "--output-dir", tmp_path / "run"
    )
    assert code == 0, err
    assert not (tmp_path / "run").exists()
    for needle in ("precision: fp32", "block_size: 64", "train_tokens:", "truncation_rate:", "packing_efficiency: 1.0",
                   "planned_steps: 30", "loss_mask"):  # fmt: skip
        assert needle in out, needle


def test_bad_data_leaves_the_output_directory_untouched(tmp_path, run_cli):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "pipeline.json").write_text('{"name": "tiny", "stages": []}')
    (run_dir / "keep.txt").write_text("precious")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    recipe = tiny_lm_recipe(stage={"data": {"source": {"files": ["bad.jsonl"]}, "format": "text"}})
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", run_dir)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "bad.jsonl: line 2: broken JSON" in errors[0], err
    assert "Traceback" not in err and " ERROR " not in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["keep.txt", "pipeline.json"]
    assert (run_dir / "keep.txt").read_text() == "precious"


def test_another_recipes_run_directory_is_refused(tmp_path, run_cli):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "pipeline.json").write_text('{"name": "someone-else", "stages": []}')
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", tiny_lm_recipe()), "--output-dir", run_dir)
    assert code == 2 and "holds the run of recipe 'someone-else'" in err


def test_offline_hub_recipe_fails_fast_and_clearly(run_cli):
    import time

    from tests.conftest import REPO

    started = time.perf_counter()
    code, _, err = run_cli(REPO / "recipes/wikitext_lm.yaml", "--offline", "--output-dir", "/nonexistent/never")
    assert code == 2
    assert "cannot load model 'openai-community/openai-gpt'" in err and "hub dataset wikitext" in err
    assert "hint:" in err
    assert time.perf_counter() - started < 15


def test_run_lm_is_importable():
    from align.stages import run_lm
    from align.stages.lm import LM

    assert isinstance(run_lm.__self__, LM) and run_lm.__func__ is LM.run


def test_pickled_weights_are_refused_before_training(tmp_path, run_cli):
    from transformers import AutoModelForCausalLM

    from align.builtin import python_docs
    from align.models import scratch_config, train_tokenizer
    from align.recipe import ScratchModel

    tokenizer = train_tokenizer(python_docs()["text"][:200], 300)
    config = scratch_config(ScratchModel(**TINY_MODEL), "test", vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "pickled")
    tokenizer.save_pretrained(tmp_path / "pickled")
    # An old-style checkpoint: pickled weights only.
    (tmp_path / "pickled" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    recipe = tiny_lm_recipe(stage={"model": str(tmp_path / "pickled")})
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 2 and "has no safetensors weights" in err
    assert not (tmp_path / "run").exists()
