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
