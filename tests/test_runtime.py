"""The shared runtime: precision policy, logging, wandb tracking (offline, read back from disk)."""

from __future__ import annotations

import logging

import pytest

from align.errors import BadInput
from align.recipe import WandbSettings
from align.runtime import CURRENT_STAGE, Tracker, choose_precision, setup_logging
from tests.conftest import tiny_lm_recipe, write_yaml
from tests.wandb_reader import summarize


def test_precision_on_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = choose_precision("auto")
    assert auto.name == "fp32" and "no GPU" in auto.reason and auto.train_args == {"bf16": False, "fp16": False}
    with pytest.raises(BadInput, match="fp16 needs a CUDA GPU"):
        choose_precision("fp16")


@pytest.mark.parametrize(("bf16_ok", "expected"), [(True, "bf16"), (False, "fp16")])
def test_precision_on_gpus(monkeypatch, caplog, bf16_ok, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    with caplog.at_level(logging.WARNING):
        chosen = choose_precision("auto")
    assert chosen.name == expected and chosen.train_args[expected] is True
    if expected == "fp16":
        assert "NaN" in caplog.text, "fp16 is chosen with a warning that names the NaN risk"
        with pytest.raises(BadInput, match="does not support bf16"):
            choose_precision("bf16")


def test_log_lines_carry_time_level_and_stage(tmp_path, capsys):
    setup_logging("info", tmp_path / "align.log")
    token = CURRENT_STAGE.set("sft")
    try:
        logging.getLogger("align.test").info("hello")
        logging.getLogger("align.test").debug("only in the file")
    finally:
        CURRENT_STAGE.reset(token)
    err = capsys.readouterr().err
    assert "INFO    [sft] align.test: hello" in err and "only in the file" not in err
    text = (tmp_path / "align.log").read_text()
    assert "[sft] align.test: hello" in text and "DEBUG   [sft] align.test: only in the file" in text


def test_online_without_credentials_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        tracker = Tracker(WandbSettings(mode="online"), "r", "g", tmp_path)
    assert tracker.mode == "offline"
    warnings = [r for r in caplog.records if "wandb" in r.getMessage()]
    assert len(warnings) == 1 and "wandb sync" in warnings[0].getMessage()
    assert str(tmp_path / "wandb") in warnings[0].getMessage()


def test_disabled_tracking_reports_to_nothing(tmp_path):
    tracker = Tracker(WandbSettings(mode="disabled"), "r", "g", tmp_path)
    assert tracker.report_to == []


def test_offline_wandb_run_per_stage_holds_the_curves(tmp_path, run_cli):
    recipe = tiny_lm_recipe(tracking={"wandb": {"mode": "offline", "project": "align-test"}})
    recipe["stages"][0]["train"]["max_steps"] = 10
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one wandb run per stage"
    info = summarize(runs[0])
    assert info["name"] == "tiny/lm" and info["job_type"] == "lm" and info["group"].startswith("tiny-")
    assert {"train/loss", "eval/loss", "train/grad_norm", "train/learning_rate"} <= info["history_keys"]
    assert {"train/tokens_per_s", "memory/rss_gb"} <= info["history_keys"], "throughput and memory beside the loss"
    assert info["config"]["kind"] == "lm" and info["config"]["train"]["max_steps"] == 10
