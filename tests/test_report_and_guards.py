"""A run that goes non-finite stops with the cause named; every run leaves a report a person can open."""

from __future__ import annotations

import base64
import json
import re

from tests.conftest import tiny_lm_recipe, write_yaml


def two_stage_recipe() -> dict:
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"]["max_steps"] = 20
    recipe["stages"].append(
        {"name": "sft", "kind": "sft", "data": {"card": "python-docs-instruct", "max_train_rows": 32},
         "train": {"max_length": 64, "max_steps": 2, "per_device_train_batch_size": 8}}
    )  # fmt: skip
    return recipe


def test_exploding_learning_rate_stops_the_pipeline_and_names_the_cause(tmp_path, run_cli):
    path = write_yaml(tmp_path / "r.yaml", two_stage_recipe())
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run", "--set", "stages.lm.train.learning_rate=1e12")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite train loss" in errors[0] and "learning rate too high" in errors[0], err
    assert "Traceback" not in err
    lm = json.loads((tmp_path / "run" / "lm" / "summary.json").read_text())
    assert lm["status"] == "failed" and "non-finite" in lm["error"]
    assert not (tmp_path / "run" / "sft" / "summary.json").exists(), "no later stage runs"
    pipeline = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert [s["status"] for s in pipeline["stages"]] == ["failed", "pending"]
    assert (tmp_path / "run" / "report.html").is_file(), "a failed run still gets its report"


def test_report_is_self_contained_with_decodable_plots(tmp_path, run_cli):
    from io import BytesIO

    import matplotlib.image

    path = write_yaml(tmp_path / "r.yaml", two_stage_recipe())
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run")
    assert code == 0, err
    page = (tmp_path / "run" / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) >= 3
    for data in images:
        pixels = matplotlib.image.imread(BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert "Train and eval loss" in page and "Resolved recipe" in page and "Greedy answers" in page
    assert "http://" not in page and "https://" not in page.split("Resolved recipe")[0], "nothing fetched"


def test_report_command_rebuilds_and_rejects_non_runs(tmp_path, capsys):
    from align.report import main

    assert main([str(tmp_path)]) == 2
    assert "not an align run directory" in capsys.readouterr().err


def _feed(guard, losses, grad_norm=1.0):
    """Drive a NumericGuard as the Trainer would: one micro-batch loss, then the step's end."""
    from types import SimpleNamespace

    import torch

    state, control = SimpleNamespace(global_step=0), SimpleNamespace(should_training_stop=False)
    for step, loss in enumerate(losses, start=1):
        guard.pending.append(torch.tensor(loss))
        guard.grad_norm = grad_norm
        state.global_step = step
        guard.on_step_end(None, state, control)
    return control


def test_numeric_guard_stops_on_a_raw_nan_and_on_an_infinite_grad_norm():
    from align.guards import NumericGuard

    guard = NumericGuard()
    control = _feed(guard, [2.0, 1.9, float("nan"), 1.8])
    assert control.should_training_stop is True
    assert guard.nonfinite["step"] == 3 and guard.nonfinite["what"] == "loss"
    guard = NumericGuard()
    control = _feed(guard, [2.0], grad_norm=float("inf"))
    assert control.should_training_stop and guard.nonfinite["what"] == "grad norm"


def test_under_fp16_loss_scaling_an_overflowed_step_is_skipped_not_fatal(caplog):
    from align.guards import NumericGuard

    guard = NumericGuard(loss_scaling=True, max_skipped=5)
    with caplog.at_level("INFO"):
        control = _feed(guard, [2.0, 1.9], grad_norm=float("inf"))  # the scaler settling: two skipped steps
        control = _feed(guard, [1.8, 1.7], grad_norm=1.0)
    assert control.should_training_stop is False and guard.nonfinite is None
    assert "loss scaler skipped the step" in caplog.text and guard.skipped_in_a_row == 0
    control = _feed(guard, [1.6] * 5, grad_norm=float("inf"))  # the scale collapses: five in a row
    assert control.should_training_stop and guard.nonfinite["what"] == "grad norm"
    guard = NumericGuard(loss_scaling=True)
    control = _feed(guard, [float("nan")], grad_norm=float("inf"))
    assert control.should_training_stop and guard.nonfinite["what"] == "loss", "a NaN loss stops at once"


def test_numeric_guard_warns_on_spikes_and_zero_loss(caplog):
    from align.guards import NumericGuard

    with caplog.at_level("WARNING"):
        control = _feed(NumericGuard(), [2.0] * 20 + [9.0] + [2.0] * 5)
    assert control.should_training_stop is False
    assert "loss spike at step 21" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        _feed(NumericGuard(), [1.0, 0.0, 0.0])
    assert caplog.text.count("exactly 0") == 1


def test_metrics_rows_carry_throughput_and_memory(tmp_path, run_cli):
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"]["max_steps"] = 10
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "lm" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all(r["tokens_per_s"] > 0 and r["memory/rss_gb"] > 0 for r in train[1:])
    metrics = json.loads((tmp_path / "run" / "lm" / "summary.json").read_text())["metrics"]
    assert 0.1 < metrics["peak_memory_gb"] < 8, "the stage's peak resident memory, in GiB"
    assert 0 < metrics["time_to_first_step_s"] < metrics["train_runtime_s"] + 60


def test_report_loads_in_a_real_headless_browser(tmp_path, run_cli):
    """Debian's chromium opens the report from disk, with no network, and every embedded image decodes."""
    import os
    import shutil
    import subprocess

    import pytest

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("ALIGN_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed, and .ci/run requires it (apt-get install chromium)")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    recipe = two_stage_recipe()
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    page = (tmp_path / "run" / "report.html").read_text()
    probe = (
        "<script>window.addEventListener('load',()=>{const i=[...document.images];document.body.setAttribute("
        "'data-decoded',i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length)})</script>"
    )
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]  # fmt: skip
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", (tmp_path / "probe.html").as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    decoded = re.search(r'data-decoded="(\d+)/(\d+)"', dom)
    assert decoded, "the page did not finish loading"
    assert int(decoded.group(2)) >= 3 and decoded.group(1) == decoded.group(2)
