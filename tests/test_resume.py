"""A run killed mid-stage resumes from its last checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The metrics of the resume recipe run start to end, once for the module."""
    from align.run import main

    folder = tmp_path_factory.mktemp("whole")
    path = write_yaml(folder / "r.yaml", recipe_for_resume())
    # In this process (a process of its own would add the imports' seconds): only the stopped runs need one.
    assert main([str(path), "--output-dir", str(folder / "run"), "--log-level", "warning"]) == 0
    return json.loads((folder / "run/lm/summary.json").read_text())["metrics"]


def stop_after_first_checkpoint(proc, out, how: signal.Signals) -> str:
    """Send `how` once the run has saved checkpoint-40; return its stderr."""
    state = out / "lm/checkpoints/checkpoint-40/trainer_state.json"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped: make it longer"
    if how == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group, as the out-of-memory killer or a lost node would
    else:
        os.kill(proc.pid, how)
    _, err = proc.communicate(timeout=120)
    return err


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stopped_stage_resumes_and_matches_an_uninterrupted_run(tmp_path, uninterrupted, how, run_cli):
    path = write_yaml(tmp_path / "r.yaml", recipe_for_resume())
    cut = tmp_path / "cut"
    proc = run(path, cut, start_new_session=True)
    err = stop_after_first_checkpoint(proc, cut, how)
    summary = json.loads((cut / "lm/summary.json").read_text())
    if how == signal.SIGKILL:
        assert summary["status"] == "running", "nothing ran to record the end"
        resume_at = None
    else:
        # Ctrl-C and SIGTERM end the step, save it, and stop: at most one step is lost.
        assert summary["status"] == "interrupted" and "Traceback" not in err, err
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[how], "the shell's 128 + signal"
        assert json.loads((cut / "pipeline.json").read_text())["stages"][0]["status"] == "interrupted"
        saved = re.search(rf"error: stopped by {how.name} after step (\d+); checkpoint-(\d+) is saved", err)
        assert saved and saved[1] == saved[2], err
        resume_at = f"checkpoint-{saved[1]}"
        assert (cut / "lm/checkpoints" / resume_at / "trainer_state.json").is_file()
        assert "hint: run the same command again to resume from it" in err

    code, _, err = run_cli(path, "--output-dir", cut)  # the resumed run in this process
    assert code == 0, err
    assert f"resuming from {resume_at or 'checkpoint-'}" in err
    metrics = json.loads((cut / "lm/summary.json").read_text())["metrics"]
    assert metrics["global_step"] == uninterrupted["global_step"] == 120
    assert abs(metrics["eval_loss"] - uninterrupted["eval_loss"]) < 1e-4 * uninterrupted["eval_loss"]
    assert metrics["eval_loss_before"] == uninterrupted["eval_loss_before"]
    rows = [json.loads(line) for line in (cut / "lm/metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)), "no step logged twice"


@pytest.mark.slow
def test_a_cached_stage_is_skipped_quickly(tmp_path):
    from align.run import main

    recipe = recipe_for_resume()
    recipe["stages"][0]["train"].update(max_steps=4, eval_steps=2, save_steps=2)
    path = write_yaml(tmp_path / "r.yaml", recipe)
    assert main([str(path), "--output-dir", str(tmp_path / "run"), "--log-level", "warning"]) == 0  # here: faster
    started = time.perf_counter()
    again = run(path, tmp_path / "run")
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "cached" in err
    assert time.perf_counter() - started < 30
    pipeline = json.loads((tmp_path / "run/pipeline.json").read_text())
    assert [s["status"] for s in pipeline["stages"]] == ["cached"]


@pytest.mark.slow
def test_a_crash_mid_stage_resumes_from_the_last_checkpoint(tmp_path, run_cli, monkeypatch):
    from align.metrics import MetricsWriter

    recipe = recipe_for_resume()
    recipe["stages"][0]["train"].update(max_steps=30, eval_steps=10, save_steps=10)
    path = write_yaml(tmp_path / "r.yaml", recipe)
    original = MetricsWriter.on_step_end

    def crash_at_step_15(self, args, state, control, **kwargs):
        if state.global_step == 15:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(MetricsWriter, "on_step_end", crash_at_step_15)
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run")
    assert code == 1 and "illegal memory access" in err
    assert json.loads((tmp_path / "run/lm/summary.json").read_text())["status"] == "failed"
    monkeypatch.setattr(MetricsWriter, "on_step_end", original)
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run")
    assert code == 0 and "resuming from checkpoint-10" in err, err
    assert json.loads((tmp_path / "run/lm/summary.json").read_text())["metrics"]["global_step"] == 30
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run", "--fresh")
    assert code == 0 and "resuming" not in err, "--fresh alone starts over"


def test_a_stage_a_guard_stopped_is_not_resumed_into_the_same_blow_up(tmp_path, caplog):
    from align.run_records import interrupted_checkpoint

    stage_dir = tmp_path / "lm"
    checkpoint = stage_dir / "checkpoints" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")

    def left(**summary):
        (stage_dir / "summary.json").write_text(json.dumps({"fingerprint": "fp", **summary}))
        return interrupted_checkpoint(stage_dir, "fp")

    for status in ("running", "interrupted", "failed"):
        assert left(status=status) == checkpoint, status
    (stage_dir / "checkpoints" / "checkpoint-18").mkdir()  # a save cut short by a second Ctrl-C: no trainer state
    assert left(status="interrupted") == checkpoint, "the newest complete checkpoint, not the torn one"
    assert left(status="failed", resumable=False, error="non-finite train loss (nan) at step 12") is None
    assert "a guard stopped this stage last time" in caplog.text
    assert left(status="interrupted", fingerprint="other") is None, "a changed stage starts over"
    assert left(status="completed") is None


@pytest.mark.slow
def test_a_changed_data_file_reruns_the_stage_an_unchanged_one_is_cached(tmp_path, run_cli):
    (tmp_path / "notes.txt").write_text("\n".join(f"line {i} of some text to learn from" for i in range(400)))
    recipe = tiny_lm_recipe(stage={"data": {"source": {"files": ["notes.txt"]}, "format": "text"}})
    recipe["stages"][0]["train"]["max_steps"] = 3
    path = write_yaml(tmp_path / "r.yaml", recipe)
    assert run_cli(path, "--output-dir", tmp_path / "run")[0] == 0
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run")
    assert code == 0 and "unchanged since the last run" in err
    (tmp_path / "notes.txt").write_text("\n".join(f"other line {i} with new words" for i in range(400)))
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run")
    assert code == 0 and "unchanged since the last run" not in err
    assert json.loads((tmp_path / "run/pipeline.json").read_text())["stages"][0]["status"] == "completed"
