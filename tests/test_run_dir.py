"""The run directory: names never reach outside it, one run holds it at a time, `--fresh` clears only what align
wrote, and align's files follow the umask like the rest of the directory."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_lm_recipe, write_yaml


def short_recipe(**overrides) -> dict:
    recipe = tiny_lm_recipe(**overrides)
    recipe["stages"][0]["train"].update(max_steps=2, eval_steps=2, logging_steps=1)
    recipe["stages"][0]["data"].update(max_train_rows=40, max_eval_rows=8)
    return recipe


# --------------------------------------------------------------------------------------------------
# Names that are paths


@pytest.mark.parametrize("name", ["..", ".", "...", "a/b", "../x"])
def test_a_stage_named_like_a_path_is_refused_and_nothing_is_deleted(tmp_path, run_cli, name):
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "keep.txt").write_text("the user's own file")
    recipe = short_recipe(stage={"name": name})
    path = write_yaml(tmp_path / "r.yaml", recipe)
    code, _, err = run_cli(path, "--output-dir", parent / "run")
    assert code == 2, err
    assert f"stages.{name}.name: {name!r} is not a valid name" in err
    assert (parent / "keep.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in parent.iterdir()) == ["keep.txt"], "nothing written"


@pytest.mark.parametrize("name", ["../../escape", "..", "a/b"])
def test_a_recipe_name_is_not_a_path(tmp_path, run_cli, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    path = write_yaml(tmp_path / "r.yaml", short_recipe(name=name))
    code, _, err = run_cli(path)
    assert code == 2, err
    assert f"name: {name!r} is not a valid name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"], "no run directory anywhere"


def test_a_card_name_is_not_a_path(tmp_path, run_cli):
    recipe = short_recipe()
    recipe["stages"][0]["data"]["card"] = "../secrets"
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--dry-run")
    assert code == 2 and "stages.lm.data.card: '../secrets' is not a valid name" in err


def test_removal_refuses_the_run_directory_itself_and_anything_outside(tmp_path):
    from align.errors import StageFailed
    from align.rundir import remove_inside

    run = tmp_path / "run"
    (run / "lm").mkdir(parents=True)
    (tmp_path / "keep.txt").write_text("x")
    for target in (run, run / ".", run / "..", tmp_path / "keep.txt", run / "lm" / ".." / ".."):
        with pytest.raises(StageFailed, match="refusing to delete"):
            remove_inside(run, target)
    assert (tmp_path / "keep.txt").exists() and (run / "lm").is_dir()
    os.symlink(tmp_path, run / "link")
    remove_inside(run, run / "link")
    assert not (run / "link").exists() and (tmp_path / "keep.txt").exists(), "a link goes, not what it points at"
    remove_inside(run, run / "lm")
    assert not (run / "lm").exists()


# --------------------------------------------------------------------------------------------------
# One run per directory

HOLD = """
import sys, time
from pathlib import Path
from align.rundir import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_second_run_is_refused_while_one_holds_the_directory_and_a_dead_holder_is_taken_over(tmp_path, run_cli):
    path = write_yaml(tmp_path / "r.yaml", short_recipe())
    run_dir = tmp_path / "run"
    assert run_cli(path, "--output-dir", run_dir)[0] == 0
    metrics_before = (run_dir / "lm" / "metrics.jsonl").read_text()

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.strftime("%H:%M")
        code, _, err = run_cli(path, "--output-dir", run_dir, "--fresh")
        assert code == 2, err
        assert f"error: {run_dir} is in use by process {holder.pid} since {started}" in err
        assert "align.data" not in err and "preflight" not in err, "refused before preflight's seconds: " + err
        assert (run_dir / "lm" / "metrics.jsonl").read_text() == metrics_before, "the holder's files are untouched"
    finally:
        holder.kill()  # SIGKILL: the lock is left behind, as after an out-of-memory kill
        holder.wait()

    code, _, err = run_cli(path, "--output-dir", run_dir, "--fresh")
    assert code == 0, err
    assert f"taking over the lock of process {holder.pid}" in (run_dir / "align.log").read_text()
    assert not (run_dir / ".align.lock.json").exists(), "released at the end"


@pytest.mark.slow
def test_only_one_of_two_simultaneous_runs_gets_the_directory(tmp_path):
    recipe = short_recipe()
    # Long enough to still be training whatever the machine's speed; Ctrl-C ends it once the second run is refused.
    recipe["stages"][0]["train"].update(max_steps=100_000, eval_steps=50, save_steps=100_000)
    path = write_yaml(tmp_path / "r.yaml", recipe)
    command = [sys.executable, "-m", "align.run", str(path), "--output-dir", str(tmp_path / "run")]
    log = (tmp_path / "first.log").open("w")  # a file, not a pipe nobody reads while it fills
    first = subprocess.Popen(command, stdout=log, stderr=log, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "lm" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.05)  # the first run is training: it holds the directory
        second = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert second.returncode == 2 and f"is in use by process {first.pid} since" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in rows if r["split"] == "eval" and r["step"] == 0) == 1, "one run's rows, not two"
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps == sorted(set(steps))


# --------------------------------------------------------------------------------------------------
# --fresh and file modes


@pytest.mark.slow
def test_fresh_clears_what_align_wrote_and_keeps_the_users_files(tmp_path, run_cli):
    path = write_yaml(tmp_path / "r.yaml", short_recipe())
    run_dir = tmp_path / "run"
    assert run_cli(path, "--output-dir", run_dir)[0] == 0
    (run_dir / "align.log").write_text("OLD RUN LOG\n")
    stale = run_dir / "wandb" / "offline-run-20260101_000000-old"
    stale.mkdir(parents=True)
    (run_dir / "notes.md").write_text("mine")
    (run_dir / "lm" / "metrics.jsonl").write_text('{"step": 999, "split": "train", "loss": 1.0}\n')

    code, _, err = run_cli(path, "--output-dir", run_dir, "--fresh")
    assert code == 0, err
    assert "OLD RUN LOG" not in (run_dir / "align.log").read_text()
    assert not stale.exists(), "no stale wandb run for `wandb sync` to upload"
    assert (run_dir / "notes.md").read_text() == "mine"
    assert '"step": 999' not in (run_dir / "lm" / "metrics.jsonl").read_text()


def test_fresh_never_clears_a_folder_that_holds_no_align_run(tmp_path, run_cli):
    target = tmp_path / "documents"
    (target / "lm").mkdir(parents=True)
    (target / "lm" / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", short_recipe()), "--output-dir", target, "--fresh")
    assert code == 2 and "holds no align run" in err
    assert (target / "lm" / "thesis.tex").read_text() == "years of work"


@pytest.mark.slow
def test_files_follow_the_umask(tmp_path, run_cli):
    old = os.umask(0o022)
    try:
        path = write_yaml(tmp_path / "r.yaml", short_recipe())
        assert run_cli(path, "--output-dir", tmp_path / "run")[0] == 0
    finally:
        os.umask(old)
    for name in ("report.html", "pipeline.json", "recipe.yaml", "lm/summary.json", "lm/metrics.jsonl"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name


# --------------------------------------------------------------------------------------------------
# The test suite itself


def test_plain_pytest_collects_from_the_repository_root():
    pytest_bin = Path(sys.executable).with_name("pytest")
    proc = subprocess.run(
        [str(pytest_bin), "--collect-only", "-q", "tests/test_recipes.py"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_a_pytest_without_xdist_still_collects_the_suite():
    """A pytest without pytest-xdist (one outside the venv, before conftest runs the suite with the venv's Python)
    must get past the ini's options: `-n` in addopts once stopped it at `error: unrecognized arguments: -n`."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "--collect-only", "-q", "tests/test_recipes.py"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and "unrecognized arguments" not in proc.stderr, proc.stdout[-2000:] + proc.stderr


@pytest.mark.parametrize(
    ("xdist", "given", "dist", "expected"),
    [(True, None, "no", ("auto", "loadfile")), (True, 0, "no", (0, "no")), (True, None, "load", ("auto", "load")),
     (False, None, "no", (None, "no"))],
    ids=["default", "n0_kept", "dist_kept", "no_xdist"],
)  # fmt: skip
def test_the_suite_runs_one_worker_a_core_unless_told_otherwise(monkeypatch, xdist, given, dist, expected):
    from types import SimpleNamespace

    from tests import conftest

    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    config = SimpleNamespace(pluginmanager=SimpleNamespace(hasplugin=lambda name: xdist and name == "xdist"),
                             option=SimpleNamespace(numprocesses=given, dist=dist))  # fmt: skip
    conftest.pytest_cmdline_main(config)
    assert (config.option.numprocesses, config.option.dist) == expected


def test_a_pytest_outside_the_environment_says_so_in_one_line(monkeypatch):
    """A `pytest` found on PATH outside the virtual environment once failed with a ModuleNotFoundError per file."""
    import importlib.util

    from tests import conftest

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "torch" else real(name, *args))
    monkeypatch.setenv("ALIGN_PYTEST_REEXEC", "1")  # as after a re-run with a venv that lacks torch too
    with pytest.raises(pytest.exit.Exception, match=r"^torch not installed for .*\. \.venv/bin/activate") as info:
        conftest.pytest_configure(None)
    assert info.value.returncode == 2
    monkeypatch.setattr(importlib.util, "find_spec", real)
    conftest.pytest_configure(None)  # with the libraries: nothing


def test_a_plain_pytest_outside_the_environment_runs_the_suite_with_the_projects_venv(monkeypatch, tmp_path):
    """`pytest` as most users type it, from a PATH whose Python has no torch: the suite runs again with the
    repository's `.venv` Python (what `.ci/run` makes), with the same arguments, from the same directory."""
    import importlib.util
    from types import SimpleNamespace

    from tests import conftest

    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    monkeypatch.setattr(conftest, "REPO", tmp_path)
    environ = {k: v for k, v in os.environ.items() if k != "ALIGN_PYTEST_REEXEC"}
    monkeypatch.setattr(os, "environ", environ)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "torch" else real(name, *args))
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append((path, argv)))
    monkeypatch.setattr(os, "chdir", lambda path: calls.append(("chdir", path)))
    config = SimpleNamespace(invocation_params=SimpleNamespace(dir=tmp_path / "tests", args=("-q", "-m", "not slow")))
    with pytest.raises(pytest.exit.Exception):  # the real execv never returns; the stand-in falls through to it
        conftest.pytest_configure(config)
    assert calls == [("chdir", tmp_path / "tests"),
                     (venv_python, [str(venv_python), "-m", "pytest", "-q", "-m", "not slow"])]  # fmt: skip
    assert environ["ALIGN_PYTEST_REEXEC"] == "1", "once: a venv without torch ends in the one-line exit"


# --------------------------------------------------------------------------------------------------
# --only


def test_only_runs_the_named_stages_on_the_earlier_ones_and_leaves_the_others_untouched(tmp_path, run_cli):
    recipe = short_recipe(stage={"model": {**tiny_lm_recipe()["stages"][0]["model"], "n_positions": 128}})
    small = {"max_length": 128, "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "eval_steps": 2}
    rows = {"max_train_rows": 16, "max_eval_rows": 4}
    recipe["stages"] += [
        {"name": "sft", "kind": "sft", "data": {"card": "python-docs-instruct", **rows}, "train": dict(small),
         "generations": 0},
        {"name": "dpo", "kind": "dpo", "data": {"card": "python-docs-preferences", **rows}, "train": dict(small),
         "generations": 0},
    ]  # fmt: skip
    path, run_dir = write_yaml(tmp_path / "r.yaml", recipe), tmp_path / "run"

    code, _, err = run_cli(path, "--output-dir", run_dir, "--only", "sft")
    assert (
        code == 2 and "--only sft: stage lm comes before and has not completed in" in err and "(it has not run" in err
    )
    assert "hint: run it too: --only lm,sft" in err and not run_dir.exists()
    code, _, err = run_cli(path, "--output-dir", run_dir, "--only", "stf")
    assert code == 2 and "--only: no stage named 'stf' (did you mean 'sft'?)" in err

    assert run_cli(path, "--output-dir", run_dir)[0] == 0

    def files(stage):
        return {p: p.read_bytes() for p in (run_dir / stage).rglob("*") if p.is_file()}

    lm, dpo, sft = files("lm"), files("dpo"), json.loads((run_dir / "sft" / "summary.json").read_text())
    changed = ["--set", "stages.sft.train.learning_rate=1e-3"]
    code, out, err = run_cli(path, "--output-dir", run_dir, "--only", "sft", "--dry-run")
    assert code == 0 and "still current (fingerprint unchanged)" in out and "stale" not in out, out + err
    code, out, err = run_cli(path, "--output-dir", run_dir, "--only", "sft", "--dry-run", *changed)
    assert code == 0 and "run: --only: kept as it is (completed" in out and "run: --only: not run" in out, out + err
    assert "so it is stale now" in out, out
    code, out, err = run_cli(path, "--output-dir", run_dir, "--only", "sft", *changed)
    assert code == 0, err
    # Said as it happens: this replaces the run's sft model; a copy is where to try a value.
    assert (f"--only sft with --set: the sft model in {run_dir} is replaced by one trained with the --set values" in err
            and f"cp -r {run_dir} {run_dir}-try, then --output-dir {run_dir}-try" in err), err  # fmt: skip
    again = json.loads((run_dir / "sft" / "summary.json").read_text())
    assert again["status"] == "completed" and again["fingerprint"] != sft["fingerprint"], "sft ran with the new rate"
    assert files("lm") == lm and files("dpo") == dpo, "the stages --only did not name are left as they were"
    pipeline = {s["name"]: s for s in json.loads((run_dir / "pipeline.json").read_text())["stages"]}
    # dpo was made from the sft this run replaced: pipeline.json says so, not only the log.
    assert "stale" not in pipeline["lm"] and "an --only run changed" in pipeline["dpo"]["stale"], pipeline
    # lm was this run's input (cached); dpo was not run, so it keeps its own status; the report says it is stale.
    assert pipeline["lm"]["status"] == "cached" and pipeline["dpo"]["status"] == "completed", pipeline
    assert "dpo (dpo): completed (stale)" in (run_dir / "report.html").read_text()
    assert "so it is stale now" in out + err
    assert [line.split()[0] for line in out.splitlines()[1:] if line.strip()][:1] == ["sft"], out

    # An earlier stage changed since it ran: the named stage would start from a model the recipe no longer makes.
    code, _, err = run_cli(path, "--output-dir", run_dir, "--only", "dpo", "--set", "stages.lm.train.max_steps=3")
    assert code == 2 and "stage lm comes before" in err and "(it changed since it ran)" in err
    assert "stage sft comes before" in err, "sft changed too (its input lm did): both are named"


def test_a_run_read_from_another_directory_or_copied_is_still_cached_and_uses_its_own_models(
    tmp_path, run_cli, monkeypatch
):
    """summary.json's model_dir is as the run's working directory spelt it (`runs/x/lm/model`): read from another
    directory, every stage 'changed since the last run' and would train again; read from a copy, the stages after
    took the original run's models."""
    import copy
    import shutil

    recipe = short_recipe()
    recipe["stages"].append({**copy.deepcopy(recipe["stages"][0]), "name": "lm2", "model": "@lm"})
    path = write_yaml(tmp_path / "r.yaml", recipe)
    monkeypatch.chdir(tmp_path)
    assert run_cli(path, "--output-dir", "runs/x")[0] == 0
    assert json.loads((tmp_path / "runs/x/lm/summary.json").read_text())["model_dir"] == "runs/x/lm/model"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(path, "--output-dir", tmp_path / "runs/x", "--dry-run")
    assert code == 0 and out.count("run: cached") == 2, out + err

    shutil.copytree(tmp_path / "runs/x", tmp_path / "copy")
    shutil.rmtree(tmp_path / "runs")  # the original is gone: nothing may read it
    code, out, err = run_cli(path, "--output-dir", tmp_path / "copy", "--dry-run")
    assert code == 0 and out.count("run: cached") == 2, out + err
    code, out, err = run_cli(path, "--output-dir", tmp_path / "copy")
    assert code == 0, err
    pipeline = json.loads((tmp_path / "copy/pipeline.json").read_text())
    assert [s["status"] for s in pipeline["stages"]] == ["cached", "cached"]
