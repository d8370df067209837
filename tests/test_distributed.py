"""The same recipe under several processes (2 on the CPU, gloo): side effects once, stages in step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_MODEL, tiny_lm_recipe, write_yaml

ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))  # a dataclass: an unknown key is a TypeError
    assert config.num_processes >= 1 and str(config.mixed_precision) == "no"
    assert path.read_text().startswith("#"), "each config opens with the command that uses it"


def test_two_processes_run_the_chain_once(tmp_path):
    model = {**TINY_MODEL, "n_positions": 128}
    recipe = tiny_lm_recipe(tracking={"wandb": {"mode": "offline"}}, stage={"model": model})
    recipe["stages"][0]["train"].update(max_steps=6, eval_steps=3)
    small = {"max_length": 128, "max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "eval_steps": 3}
    rows = {"max_train_rows": 32, "max_eval_rows": 8}
    recipe["stages"] += [
        {"name": "sft", "kind": "sft", "data": {"card": "python-docs-instruct", **rows}, "train": dict(small),
         "generations": 1},
        {"name": "dpo", "kind": "dpo", "data": {"card": "python-docs-preferences", **rows}, "train": dict(small),
         "generations": 1},
    ]  # fmt: skip
    path = write_yaml(tmp_path / "r.yaml", recipe)
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "-m", "align.run", str(path),
         "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    for stage in ("lm", "sft", "dpo"):
        assert err.count(f"] {stage}: completed in") == 1, f"{stage}: its completion is logged once"
    assert "x 2 processes" in err, "one distributed run of 2 processes, not two runs of 1"
    assert not [line for line in err.splitlines() if "[rank1" in line and " INFO " in line], "rank 1 says only warnings"
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 3, "one wandb run per stage"
    pipeline = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert [s["status"] for s in pipeline["stages"]] == ["completed"] * 3
    assert proc.stdout.count("completed") == 3, "the closing table is printed once"
