"""Shared fixtures: tiny from-scratch models on the builtin corpus, CPU, fp32, fixed seed, tmp_path."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

# Under pytest-xdist (pyproject.toml: `-n auto`), each worker's torch (and each process a test starts, which inherits
# the variable) takes its share of the cores, not all of them each. Set before any test imports torch; a value the user
# set is kept.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """One worker a core by default (pytest-xdist, the `test` extra's), each test file whole on one worker: its
    module fixtures are built once, and test_distributed's launches, which share ports, run one after another.
    `-n N` (`-n 0`: one process, for a debugger or `-x` in file order) and `--dist` given are kept; without xdist
    (a pytest outside the venv) nothing is set, and `pytest_configure` runs the suite with the venv's Python."""
    if not config.pluginmanager.hasplugin("xdist") or "PYTEST_XDIST_WORKER" in os.environ:
        return
    if config.option.numprocesses is None:
        config.option.numprocesses = "auto"
        if config.option.dist == "no":
            config.option.dist = "loadfile"


def pytest_configure(config: pytest.Config) -> None:
    """A plain `pytest` found on PATH outside the project's virtual environment (no torch there) runs the suite
    again with the venv's Python, where `.ci/run` and the README put one; without one, one line saying so instead
    of a ModuleNotFoundError per test file."""
    import importlib.util
    import sys

    missing = [name for name in ("torch", "transformers", "trl") if importlib.util.find_spec(name) is None]
    venv_python = REPO / ".venv" / "bin" / "python"
    if missing and venv_python.is_file() and not os.environ.get("ALIGN_PYTEST_REEXEC"):
        print(f"pytest: {sys.executable} has no {', '.join(missing)}; running the suite with {venv_python}",
              file=sys.stderr, flush=True)  # fmt: skip
        os.environ["ALIGN_PYTEST_REEXEC"] = "1"  # once: a venv without the libraries ends in the line below
        os.chdir(config.invocation_params.dir)
        os.execv(venv_python, [str(venv_python), "-m", "pytest", *config.invocation_params.args])
    if missing:
        pytest.exit(
            f"{', '.join(missing)} not installed for {sys.executable}: run the tests with the Python align is "
            "installed in (`. .venv/bin/activate`, then `python -m pytest -q`; README: Tests)",
            returncode=2,
        )


# Tests never reach a server: wandb writes offline, the hub is never asked.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.pop("WANDB_API_KEY", None)

TINY_MODEL = {"model_type": "gpt2", "vocab_size": 512, "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}


def tiny_lm_recipe(**overrides: Any) -> dict[str, Any]:
    """A one-stage LM recipe that trains in a few seconds on 2 CPU cores."""
    stage = {
        "name": "lm",
        "kind": "lm",
        "model": dict(TINY_MODEL),
        "data": {"card": "python-docs", "max_train_rows": 200, "max_eval_rows": 40},
        "train": {
            "max_length": 64,
            "max_steps": 30,
            "per_device_train_batch_size": 8,
            "learning_rate": 3.0e-3,
            "logging_steps": 5,
            "eval_steps": 10,
        },
    }
    stage.update(overrides.pop("stage", {}))
    recipe = {"name": "tiny", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}
    recipe.update(overrides)
    return recipe


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def run_cli(capsys):
    """Run `python -m align.run ARGS` in-process; returns (exit code, stdout, stderr)."""
    from align.run import main

    def _run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


# Credentials that must never reach the run directory or any tracker's files (tests/test_secrets.py).
SECRETS = {
    "WANDB_API_KEY": "wandbsecret0123456789abcdef0123456789abcd",
    "HF_TOKEN": "hf_secretTOKENvalue0123456789",
    "MY_SERVICE_PASSWORD": "pa55word-very-secret",
}
ALL_TRACKERS = {
    "wandb": {"mode": "offline", "project": "align-test"},
    "trackio": {"project": "align-test"},
    "mlflow": {"experiment": "align-test"},
    "tensorboard": {},
}


@pytest.fixture(scope="session")
def tracked_run(tmp_path_factory, _test_cache) -> dict[str, Any]:
    """lm -> sft with every tracker on and credentials in the environment, run once as a user runs it: `python -m
    align.run` in its own process (trackio fixes its database folder when first imported, so a fresh process is
    what a user gets). Returns the run directory and the command's stdout and stderr."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("tracked")
    recipe = tiny_lm_recipe(tracking=ALL_TRACKERS)
    recipe["stages"][0]["train"].update(max_steps=6, logging_steps=2, eval_steps=3)
    recipe["stages"].append({
        "name": "sft", "kind": "sft", "generations": 1,
        "data": {"card": "python-docs-instruct", "max_train_rows": 48, "max_eval_rows": 16},
        "train": {"max_length": 64, "max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 3.0e-3,
                  "logging_steps": 2, "eval_steps": 2},
    })  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("TRACKIO_DIR", "MLFLOW_TRACKING_URI")} | SECRETS
    done = subprocess.run(
        [sys.executable, "-m", "align.run", str(write_yaml(tmp / "r.yaml", recipe)), "--output-dir", str(tmp / "run")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {"run_dir": tmp / "run", "stdout": done.stdout, "stderr": done.stderr}


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """Every family's tiny model (tests/families.py), built once per test session (well under a second each), and
    its data: `conv`, `pairs` and `prompts` JSONL files."""
    from tests import families

    root = tmp_path_factory.mktemp("families")
    built = {name: families.build(name, root / name) for name in families.FAMILIES}
    # Qwen 2.5 with 1024 positions: a prompt with tools' schemas is longer than the fixtures' 256.
    built["qwen2_5_wide"] = families.widened(built["qwen2_5"], root / "qwen2_5_wide", 1024)
    return {**built, **families.write_data(root / "data")}


@pytest.fixture(scope="session")
def caller(family_models) -> Path:
    """Qwen 2.5's tiny model (1024 positions) taught to answer every prompt with `lookup(word="red")`, the tool of
    `families.lookup_tool()` (tests/families.py: `caller`; about 5 s); sampled at temperature 0.5 it always calls."""
    from tests import families

    namespace: dict[str, Any] = {}
    exec(families.lookup_tool(), namespace)
    return families.caller(family_models["qwen2_5_wide"], family_models["qwen2_5_wide"].parent / "caller",
                           namespace["lookup"], {"word": "red"})  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _test_cache(tmp_path_factory):
    """The tests' own tokenized-data cache (session-wide, set before any module fixture trains): never the
    user's ~/.cache/align. Tests of the cache itself point ALIGN_CACHE_DIR at a folder of their own."""
    os.environ["ALIGN_CACHE_DIR"] = str(tmp_path_factory.mktemp("align-cache"))


@pytest.fixture(autouse=True)
def _drop_align_log_handlers():
    """align.run installs console handlers on the stream of the moment; pytest closes captured streams."""
    yield
    import logging

    from align.runtime import _AlignHandler

    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _AlignHandler)]:
        root.removeHandler(handler)


@contextlib.contextmanager
def captured_trainers() -> Iterator[dict[str, Any]]:
    """The Trainer each stage of an in-process run built, by stage name: tests assert what it holds (its reference,
    its data, its arguments), not the sentence the plan printed about it."""
    import align.stages.runner as runner

    seen: dict[str, Any] = {}
    original = runner.watch

    def watch(trainer: Any, ctx: Any, **kwargs: Any) -> Any:
        seen[ctx.stage.name] = trainer
        return original(trainer, ctx, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "watch", watch)
        yield seen


@pytest.fixture
def trainers() -> Iterator[dict[str, Any]]:
    with captured_trainers() as seen:
        yield seen


def kill_after(proc: Any, state: Path, timeout: float = 240) -> None:
    """SIGKILL `proc`'s whole process group (as the out-of-memory killer or a lost node would) once `state` (a
    checkpoint's trainer_state.json) exists; fails when the run ended first."""
    import signal
    import time

    deadline = time.time() + timeout
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped: make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
