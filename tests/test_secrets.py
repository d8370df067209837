"""Credentials in the environment or the recipe never reach the run directory, nor any tracker's files."""

from __future__ import annotations

import json

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


def library_setting_names() -> set[str]:
    """Every field name of every transformers config class in CONFIG_MAPPING and of every TRL config class (the
    dataclass fields, the constructor's parameters and the attribute-map aliases): the settings a recipe may carry."""
    import dataclasses
    import inspect

    import trl
    from transformers import CONFIG_MAPPING, TrainingArguments

    classes = [CONFIG_MAPPING[name] for name in CONFIG_MAPPING]
    classes += [getattr(trl, n) for n in dir(trl) if n.endswith("Config") and dataclasses.is_dataclass(getattr(trl, n))]
    names: set[str] = {f.name for f in dataclasses.fields(TrainingArguments)}
    for cls in classes:
        if dataclasses.is_dataclass(cls):
            names |= {f.name for f in dataclasses.fields(cls)}
        names |= set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs", "args"}
        names |= set(getattr(cls, "attribute_map", None) or {})
    return names


def test_no_library_setting_is_redacted_but_true_credentials():
    """Redaction judges a key by its words: of the ~2,500 setting names of transformers' and TRL's config classes,
    only the hub token is a credential (`num_key_value_heads`, `pad_token`, `key_bias` and `max_new_tokens` are not)."""
    from align.secrets import is_credential_name, redact

    names = library_setting_names()
    assert len(names) > 1000 and "num_key_value_heads" in names and "hub_token" in names
    assert {n for n in names if is_credential_name(n)} == {"hub_token"}
    assert redact({n: "x" * 8 for n in names}) == {n: ("***" if n == "hub_token" else "x" * 8) for n in names}


@pytest.mark.parametrize(
    "name", ["hub_token", "token", "api_key", "apiKey", "OPENAI_API_KEY", "accessToken", "client_secret", "password",
             "db_password", "secret", "auth_token", "hf_token", "passphrase"],
)  # fmt: skip
def test_a_credential_key_is_redacted_wherever_it_stands(name):
    from align.secrets import redact

    assert redact({"stages": [{"rewards": [{"args": {name: "sk-abcdef123456"}}]}]}) == {
        "stages": [{"rewards": [{"args": {name: "***"}}]}]
    }
    assert redact({name: True}) == {name: True}, "a switch (use_auth_token: true) hides nothing"


def test_only_credential_variables_are_struck_from_text(monkeypatch):
    """A variable's value is struck from every string only where the variable is a credential: TOKENIZERS_PARALLELISM's
    `false` and $PWD's folder stay in the recipe's paths."""
    from align.secrets import redact, secret_values

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PWD", "/home/someone/work")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_abcdef0123456789")
    monkeypatch.setenv("DB_SECRET_VALUE", "s3cr3t-value")
    values = secret_values()
    assert "ghp_abcdef0123456789" in values and "s3cr3t-value" in values
    assert "false" not in values and "/home/someone/work" not in values
    text = "/home/someone/work/false_positives.jsonl with ghp_abcdef0123456789"
    assert redact(text, values) == "/home/someone/work/false_positives.jsonl with ***"


@pytest.mark.slow
def test_a_grouped_query_scratch_models_saved_recipe_keeps_its_settings_and_runs_again_cached(tmp_path, run_cli):
    """A from-scratch llama with grouped-query attention: recipe.yaml keeps `num_key_value_heads` (it was saved as
    '***', and the saved recipe then failed to run), and running the saved recipe finds the stage cached."""
    import yaml

    recipe = tiny_lm_recipe()
    recipe["stages"][0]["model"] = {"model_type": "llama", "vocab_size": 512, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "max_position_embeddings": 128}  # fmt: skip
    recipe["stages"][0]["train"].update(max_steps=2, logging_steps=1, eval_steps=2)
    out = tmp_path / "run"
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", out)
    assert code == 0, err
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["stages"][0]["model"]["num_key_value_heads"] == 2
    code, _, err = run_cli(out / "recipe.yaml", "--output-dir", out)
    assert code == 0, err
    assert json.loads((out / "pipeline.json").read_text())["stages"][0]["status"] == "cached"
