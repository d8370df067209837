"""A run killed mid-stage resumes from its last checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import tiny_lm_recipe, write_yaml


def recipe_for_resume() -> dict:
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"].update(max_steps=120, eval_steps=20, save_steps=20, logging_steps=10)
    return recipe


def run(path, out, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "align.run", str(path), "--output-dir", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", recipe_for_resume())

    whole = run(path, tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    expected = json.loads((tmp_path / "whole/lm/summary.json").read_text())["metrics"]

    killed = run(path, tmp_path / "cut", start_new_session=True)
    state = tmp_path / "cut/lm/checkpoints/checkpoint-40/trainer_state.json"
    deadline = time.time() + 240
    while not state.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the run ended before it could be killed: make it longer"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert json.loads((tmp_path / "cut/lm/summary.json").read_text())["status"] == "running"

    resumed = run(path, tmp_path / "cut")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming from checkpoint-" in err
    metrics = json.loads((tmp_path / "cut/lm/summary.json").read_text())["metrics"]
    assert metrics["global_step"] == expected["global_step"] == 120
    assert abs(metrics["eval_loss"] - expected["eval_loss"]) < 1e-4 * expected["eval_loss"]
    assert metrics["eval_loss_before"] == expected["eval_loss_before"]
    rows = [json.loads(line) for line in (tmp_path / "cut/lm/metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)), "no step logged twice"

    started = time.perf_counter()
    again = run(path, tmp_path / "cut")
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "cached" in err
    assert time.perf_counter() - started < 30
    pipeline = json.loads((tmp_path / "cut/pipeline.json").read_text())
    assert [s["status"] for s in pipeline["stages"]] == ["cached"]


def test_a_changed_data_file_reruns_the_stage_an_unchanged_one_is_cached(tmp_path, run_cli):
    (tmp_path / "notes.txt").write_text("\n".join(f"line {i} of some text to learn from" for i in range(120)))
    recipe = tiny_lm_recipe(stage={"data": {"source": {"files": ["notes.txt"]}, "format": "text"}})
    recipe["stages"][0]["train"]["max_steps"] = 3
    path = write_yaml(tmp_path / "r.yaml", recipe)
    assert run_cli(path, "--output-dir", tmp_path / "run")[0] == 0
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run")
    assert code == 0 and "unchanged since the last run" in err
    (tmp_path / "notes.txt").write_text("\n".join(f"other line {i} with new words" for i in range(120)))
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run")
    assert code == 0 and "unchanged since the last run" not in err
    assert json.loads((tmp_path / "run/pipeline.json").read_text())["stages"][0]["status"] == "completed"
