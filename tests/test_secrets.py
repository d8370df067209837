"""Credentials in the environment or the recipe never reach the run directory."""

from __future__ import annotations

from tests.conftest import tiny_lm_recipe, write_yaml

SECRETS = {
    "WANDB_API_KEY": "wandbsecret0123456789abcdef0123456789abcd",
    "HF_TOKEN": "hf_secretTOKENvalue0123456789",
    "MY_SERVICE_PASSWORD": "pa55word-very-secret",
}


def test_no_byte_of_a_secret_lands_under_the_run_directory(tmp_path, run_cli, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    recipe = tiny_lm_recipe(tracking={"wandb": {"mode": "offline"}})
    recipe["stages"][0]["train"]["max_steps"] = 5
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "recipe.yaml" for p in files) and any(p.suffix == ".wandb" for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in data, f"{secret[:6]}... found in {path}"


def test_a_credential_in_the_recipe_is_refused_before_anything_is_written(tmp_path, run_cli):
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"]["hub_token"] = "hf_inRecipeSecret999"
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 2 and "train.hub_token: credentials stay out of recipes" in err and "set HF_TOKEN" in err
    assert "hf_inRecipeSecret999" not in err and not (tmp_path / "run").exists()
