"""Experiment tracking: wandb, trackio, MLflow and TensorBoard, each read back from what it wrote on disk.

One lm -> sft run with every tracker on (tests/conftest.py: tracked_run) serves most tests; the rest need no training.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from align.recipe import Tracking, WandbSettings
from align.tracking import Backend, Tracker, WandbBackend
from tests.conftest import read_jsonl, tiny_lm_recipe, write_yaml
from tests.wandb_reader import summarize

STAGES = ("lm", "sft")
# What every tracker must hold for every stage: the Trainer's curves under wandb's names, and align's own keys.
CURVES = {"train/loss", "train/grad_norm", "train/learning_rate", "train/global_step", "eval/loss"}
ALIGN_KEYS = {"train/tokens_per_s", "memory/rss_gb"}


# --------------------------------------------------------------------------------------------------
# Readers: what each tracker wrote, per stage run: {"name", "group", "curves": {key: {step: value}}, "summary"}


def read_wandb(run_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        info = summarize(folder)
        # Tables (the greedy answers, the verdict's reasons) are logged as tables, not curves.
        keys = {k for k in info["history_keys"] if "/" in k and not k.startswith(("generations/", "verdict_reasons/"))}
        out[info["name"].split("/")[-1]] = {"name": info["name"], "group": info["group"], "keys": keys, "info": info}
    return out


def read_trackio(run_dir: Path, project: str = "align-test") -> dict[str, dict[str, Any]]:
    db = sqlite3.connect(run_dir / "trackio" / f"{project}.db")
    out = {}
    for run_id, name, config in db.execute("SELECT run_id, run_name, config FROM configs"):
        curves: dict[str, dict[int, Any]] = {}
        for step, metrics in db.execute("SELECT step, metrics FROM metrics WHERE run_id = ? ORDER BY id", (run_id,)):
            for key, value in json.loads(metrics).items():
                curves.setdefault(key, {})[step] = value
        config = json.loads(config)
        out[name.split("/")[-1]] = {"name": name, "group": config["_Group"], "config": config, "curves": curves}
    db.close()
    return out


def read_mlflow(run_dir: Path, monkeypatch, experiment: str = "align-test") -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    out: dict[str, Any] = {"client": client, "parents": parents}
    for run in runs:
        if "mlflow.parentRunId" in run.data.tags:
            curves = {
                key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                for key in run.data.metrics
            }
            out[run.data.tags["align.stage"]] = {"name": run.info.run_name, "run": run, "curves": curves}
    return out


def read_tensorboard(run_dir: Path) -> dict[str, dict[str, Any]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for folder in sorted((run_dir / "tensorboard").glob("*/*")):
        events = EventAccumulator(str(folder))
        events.Reload()
        curves = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
        texts = {tag.split("/")[0]: events.Tensors(tag) for tag in events.Tags()["tensors"]}
        out[folder.name] = {"group": folder.parent.name, "curves": curves, "texts": texts}
    return out


@pytest.fixture(scope="module")
def read_back(tracked_run):
    run_dir = tracked_run["run_dir"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        return {
            "wandb": read_wandb(run_dir),
            "trackio": read_trackio(run_dir),
            "mlflow": read_mlflow(run_dir, monkeypatch),
            "tensorboard": read_tensorboard(run_dir),
        }


# --------------------------------------------------------------------------------------------------
# One run with every tracker


@pytest.mark.slow
def test_every_tracker_holds_wandbs_metric_names_for_each_stage(read_back):
    for stage in STAGES:
        wandb_keys = read_back["wandb"][stage]["keys"]
        assert wandb_keys >= CURVES | ALIGN_KEYS
        for name in ("trackio", "mlflow", "tensorboard"):
            keys = {k for k in read_back[name][stage]["curves"] if "/" in k}
            assert keys == wandb_keys, f"{name} {stage}: {sorted(keys ^ wandb_keys)}"
    assert {"train/mean_token_accuracy", "eval/mean_token_accuracy"} <= read_back["wandb"]["sft"]["keys"]


@pytest.mark.slow
def test_one_run_per_stage_grouped_by_the_pipeline_run(read_back, tracked_run):
    group = read_back["wandb"]["lm"]["group"]
    assert group.startswith("tiny-")
    for stage in STAGES:
        assert read_back["wandb"][stage]["name"] == read_back["trackio"][stage]["name"] == f"tiny/{stage}"
        assert read_back["mlflow"][stage]["name"] == f"tiny/{stage}"
        assert read_back["wandb"][stage]["group"] == read_back["trackio"][stage]["group"] == group
        assert read_back["tensorboard"][stage]["group"] == group
        run = read_back["mlflow"][stage]["run"]
        assert run.data.tags["align.pipeline_run"] == group and run.info.status == "FINISHED"
    assert len(read_back["trackio"]) == len(read_back["mlflow"]) - 2 == len(read_back["tensorboard"]) == 2
    (parent,) = read_back["mlflow"]["parents"]
    assert parent.info.run_name == group and parent.info.status == "FINISHED"
    assert {read_back["mlflow"][s]["run"].data.tags["mlflow.parentRunId"] for s in STAGES} == {parent.info.run_id}
    # Each run carries its stage's resolved recipe as its config.
    assert read_back["wandb"]["lm"]["info"]["config"]["train"]["max_steps"] == 6
    assert read_back["wandb"]["lm"]["info"]["job_type"] == "lm"
    assert read_back["trackio"]["sft"]["config"]["kind"] == "sft"
    assert read_back["mlflow"]["lm"]["run"].data.params["train.max_steps"] == "6"
    assert '"max_steps": 6' in read_back["tensorboard"]["lm"]["texts"]["config"][0].tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_every_tracker_holds_the_same_values_at_the_same_steps(read_back, tracked_run):
    for stage in STAGES:
        rows = read_jsonl(tracked_run["run_dir"] / stage / "metrics.jsonl")
        loss = {r["step"]: r["loss"] for r in rows if r["split"] == "train" and "loss" in r}
        eval_loss = {r["step"]: r["eval_loss"] for r in rows if r["split"] == "eval"}
        assert len(loss) >= 2 and 0 in eval_loss, "the step-0 evaluation is on the curve"
        for name in ("trackio", "mlflow", "tensorboard"):
            curves = read_back[name][stage]["curves"]
            assert curves["train/loss"] == pytest.approx(loss, rel=1e-6), name
            # The final re-measurement of the saved model stays off the curve, as it does for wandb.
            assert curves["eval/loss"] == pytest.approx(eval_loss, rel=1e-6), name
            assert set(curves["train/tokens_per_s"]) <= set(loss)


@pytest.mark.slow
def test_summaries_and_the_generations_table(read_back, tracked_run):
    summary = json.loads((tracked_run["run_dir"] / "sft" / "summary.json").read_text())["metrics"]
    for name in ("trackio", "mlflow", "tensorboard"):
        curves = read_back[name]["sft"]["curves"]
        for key in ("eval_loss", "perplexity", "eval_loss_before", "tokens_per_s"):
            (value,) = curves[key].values()
            assert value == pytest.approx(summary[key], rel=1e-6), f"{name}: {key}"
    client, run = read_back["mlflow"]["client"], read_back["mlflow"]["sft"]["run"]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "generations.json")).read_text())
    assert table["columns"] == ["prompt", "before", "after"] and len(table["data"]) == 1
    assert "| prompt | before | after |" in (
        read_back["tensorboard"]["sft"]["texts"]["generations"][0].tensor_proto.string_val[0].decode()
    )
    (logged,) = read_back["trackio"]["sft"]["curves"]["generations"].values()
    assert logged["_type"] == "trackio.table"


@pytest.mark.slow
def test_trackers_keep_stdout_for_the_results_table(tracked_run):
    out = tracked_run["stdout"]
    assert "Trackio" not in out and "trackio" not in out.lower(), "trackio's prints go to align.log"
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    assert [line.split()[0] for line in lines[header + 1 : header + 3]] == ["lm", "sft"], out  # the table
    assert lines[-1].lstrip().startswith("sft "), out  # then the verdicts
    log = (tracked_run["run_dir"] / "align.log").read_text()
    assert "trackio show --project align-test" in log and "tensorboard run tiny/lm" in log


# --------------------------------------------------------------------------------------------------
# Without training


def test_a_tracker_that_is_not_installed_stops_the_run_before_anything_is_written(tmp_path, run_cli, monkeypatch):
    # An entry of None in sys.modules makes `import mlflow` fail and find_spec("mlflow") answer None.
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "trackio", None)
    recipe = tiny_lm_recipe(tracking={"wandb": {"mode": "disabled"}, "mlflow": {}, "trackio": {}, "tensorboard": {}})
    code, out, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 2, err
    assert "error: tracking.trackio: trackio is not installed" in err
    assert "error: tracking.mlflow: mlflow is not installed" in err and "tensorboard" not in err
    assert 'hint: pip install -e ".[trackio,mlflow]"' in err
    assert not (tmp_path / "run").exists()


def test_tracker_settings_are_strict(tmp_path):
    from align.errors import BadInput
    from align.loader import load_recipe

    recipe = tiny_lm_recipe(tracking={"mlflow": {"experiement": "x"}, "tensorboard": {"logdir": "x"}})
    with pytest.raises(BadInput) as caught:
        load_recipe(write_yaml(tmp_path / "r.yaml", recipe))
    text = "\n".join(caught.value.problems)
    assert "tracking.mlflow: unknown key 'experiement' (did you mean 'experiment'?)" in text
    assert "tracking.tensorboard: unknown key 'logdir'" in text
    defaults = Tracking.model_validate({"mlflow": {}, "trackio": {}})
    assert defaults.mlflow.experiment == "align" and defaults.mlflow.tracking_uri is None
    assert defaults.trackio.project == "align" and defaults.tensorboard is None


class _Stage:
    name, kind = "lm", "lm"


def test_alerts_and_a_failing_tracker(tmp_path, monkeypatch, caplog):
    """Alerts land in MLflow (a tag) and TensorBoard (text); a tracker that fails warns once and is off for the
    rest of the stage, while the others go on."""

    class Broken(Backend):
        name = "broken"

        def log(self, values, step):
            raise OSError("disk full")

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    settings = Tracking.model_validate({"wandb": {"mode": "disabled"}, "mlflow": {}, "tensorboard": {}})
    tracker = Tracker(settings, "r", "r-group", tmp_path)
    tracker.backends.append(Broken(None, "r", "r-group", tmp_path))
    tracker.start_stage(_Stage(), {"kind": "lm"})
    with caplog.at_level(logging.WARNING):
        for step in (1, 2):
            tracker.log_trainer({"loss": 1.0 / step, "grad_norm": 0.5}, step)
    tracker.alert("loss spike", "the loss doubled")
    tracker.finish_stage()
    assert [r.getMessage() for r in caplog.records if "broken" in r.getMessage()] == [
        "broken: log failed (OSError: disk full); no more broken records this stage"
    ]
    mlflow = read_mlflow(tmp_path, monkeypatch, experiment="align")
    assert mlflow["lm"]["curves"]["train/loss"] == {1: 1.0, 2: 0.5}
    assert mlflow["lm"]["run"].data.tags["align.alert.1"] == "loss spike (step 2): the loss doubled"
    board = read_tensorboard(tmp_path)["lm"]
    assert board["curves"]["train/grad_norm"] == {1: 0.5, 2: 0.5}
    assert b"**loss spike**: the loss doubled" in board["texts"]["alerts"][0].tensor_proto.string_val[0]


# --------------------------------------------------------------------------------------------------
# wandb's mode


def test_online_wandb_without_credentials_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        backend = WandbBackend(WandbSettings(mode="online"), "r", "g", tmp_path)
    assert backend.mode == "offline"
    warnings = [r for r in caplog.records if "wandb" in r.getMessage()]
    assert len(warnings) == 1 and "wandb sync" in warnings[0].getMessage()
    assert str(tmp_path / "wandb") in warnings[0].getMessage()


def test_disabled_tracking_reports_to_nothing_and_opens_nothing(tmp_path):
    tracker = Tracker(Tracking.model_validate({"wandb": {"mode": "disabled"}}), "r", "g", tmp_path)
    assert tracker.report_to == [] and tracker.backends == []
    tracker.start_stage(_Stage(), {})
    tracker.log({"train/tokens_per_s": 1.0})
    tracker.finish_stage()
    assert not any(tmp_path.iterdir())
