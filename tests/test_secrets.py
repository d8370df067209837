"""Credentials in the environment or the recipe never reach the run directory, nor any tracker's files."""

from __future__ import annotations

import pytest

from tests.conftest import SECRETS, tiny_lm_recipe, write_yaml


@pytest.mark.slow
def test_no_byte_of_a_secret_lands_under_the_run_directory(tracked_run):
    # Every tracker writes under the run directory (conftest.py: tracked_run): wandb, trackio, MLflow, TensorBoard.
    run_dir = tracked_run["run_dir"]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    written = {
        "recipe": [p for p in files if p.name == "recipe.yaml"],
        "wandb": [p for p in files if p.suffix == ".wandb"],
        "trackio": [p for p in files if p.suffix == ".db" and p.parent == run_dir / "trackio"],
        "mlflow": [p for p in files if (run_dir / "mlruns") in p.parents and p.name == "meta.yaml"],
        "tensorboard": [p for p in files if p.name.startswith("events.out.tfevents")],
    }
    assert all(written.values()), {k: len(v) for k, v in written.items()}
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in data, f"{secret[:6]}... found in {path}"
    for secret in SECRETS.values():
        assert secret not in tracked_run["stdout"] + tracked_run["stderr"]


def test_a_credential_in_the_recipe_is_refused_before_anything_is_written(tmp_path, run_cli):
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"]["hub_token"] = "hf_inRecipeSecret999"
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 2 and "train.hub_token: credentials stay out of recipes" in err and "set HF_TOKEN" in err
    assert "hf_inRecipeSecret999" not in err and not (tmp_path / "run").exists()


def test_the_model_card_carries_no_secret(tmp_path, monkeypatch):
    """The model card quotes a run's recipe, summaries and versions (align/card.py): a secret value anywhere there
    is redacted from it too (tracked_run above scans the cards of a real run with everything else)."""
    import json

    from align.card import model_card

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    token, password = SECRETS["HF_TOKEN"], SECRETS["MY_SERVICE_PASSWORD"]
    run = tmp_path / "run"
    (run / "sft" / "model").mkdir(parents=True)
    (run / "pipeline.json").write_text(json.dumps({"name": "r", "stages": [{"name": "sft", "kind": "sft"}]}))
    data = {"card": "d", "source": {"files": [f"/data/{token}.jsonl"]}, "format": "text"}
    recipe = {"name": "r", "tracking": {"wandb": {"entity": token}},
              "stages": [{"name": "sft", "kind": "sft", "model": f"org/model-{password}", "data": data}]}  # fmt: skip
    write_yaml(run / "recipe.yaml", recipe)
    summary = {"stage": "sft", "kind": "sft", "status": "completed", "fingerprint": "f", "input_model": token,
               "versions": {"align": "0.1.0"}, "metrics": {"eval_loss": 1.0, "note": password}}  # fmt: skip
    (run / "sft" / "summary.json").write_text(json.dumps(summary))
    text = model_card(run, "sft")
    assert "## How it was made" in text and "***" in text
    for secret in SECRETS.values():
        assert secret not in text
