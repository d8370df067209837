"""Every shipped recipe resolves; the recipe schema rejects what it should, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align.errors import BadInput
from align.loader import load_recipe
from align.recipe_yaml import apply_overrides
from tests.conftest import REPO, tiny_lm_recipe, write_yaml

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_prints_config(path: Path, run_cli):
    code, out, err = run_cli(path, "--print-config")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    for stage in resolved["stages"]:
        data = stage["data"]
        # The card is expanded: source, format, columns and valid_fraction are all shown.
        assert {"source", "format", "columns", "valid_fraction"} <= set(data), data
        if stage["kind"] == "eval":  # trains nothing: its models, baseline, judges and generation settings
            assert stage["models"] and stage["baseline"] in stage["models"] and stage["judges"], stage
            assert {"max_new_tokens", "temperature", "num_samples", "seed"} <= set(stage["generation"])
            assert "train" not in stage and "model" not in stage
            continue
        assert "models" not in stage and "judges" not in stage
        assert stage["model"], "every stage shows where its model comes from"
        # The effective settings, not only what the recipe wrote: the library's defaults are shown too.
        assert {"learning_rate", "per_device_train_batch_size", "save_total_limit"} <= set(stage["train"])


def test_wikitext_recipe_is_the_classic_experiment(run_cli):
    code, out, _ = run_cli(REPO / "recipes/wikitext_lm.yaml", "--print-config")
    assert code == 0
    stage = yaml.safe_load(out)["stages"][0]
    assert stage["model"] == "openai-community/openai-gpt"
    assert stage["data"]["source"] == {"hub": "wikitext", "config": "wikitext-2-raw-v1"}
    assert stage["data"]["valid_fraction"] == 0.05
    assert stage["train"]["logging_steps"] == 100 and stage["train"]["eval_steps"] == 500
    assert stage["train"]["gradient_accumulation_steps"] > 1
    assert stage["early_stopping"]["patience"] >= 1


def test_set_overrides_by_stage_name_and_parses_yaml_scalars(tmp_path, run_cli):
    path = write_yaml(tmp_path / "r.yaml", tiny_lm_recipe())
    code, out, err = run_cli(path, "--print-config", "--set", "stages.lm.train.max_steps=7", "--set", "seed=3")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["stages"][0]["train"]["max_steps"] == 7 and resolved["seed"] == 3


def test_omitted_model_means_previous_stage(tmp_path):
    recipe = tiny_lm_recipe()
    second = {"name": "more", "kind": "lm", "data": {"card": "python-docs"}}
    recipe["stages"].append(second)
    loaded = load_recipe(write_yaml(tmp_path / "r.yaml", recipe))
    from align.pipeline import resolved_recipe

    assert resolved_recipe(loaded)["stages"][1]["model"] == "@lm"


def problems_of(tmp_path: Path, recipe: dict, *overrides: str) -> list[str]:
    with pytest.raises(BadInput) as info:
        load_recipe(write_yaml(tmp_path / "r.yaml", recipe), list(overrides))
    return info.value.problems


def test_unknown_keys_name_their_path_and_the_closest_key(tmp_path):
    recipe = tiny_lm_recipe(precison="bf16")
    recipe["stages"][0]["early_stoping"] = {"patience": 2}
    recipe["stages"][0]["train"]["max_stpes"] = 3
    recipe["tracking"]["wandb"]["projct"] = "x"
    problems = problems_of(tmp_path, recipe)
    text = "\n".join(problems)
    assert "unknown key 'precison' (did you mean 'precision'?)" in text
    assert "stages.lm: unknown key 'early_stoping' (did you mean 'early_stopping'?)" in text
    assert "tracking.wandb: unknown key 'projct' (did you mean 'project'?)" in text
    assert len(problems) == 3, "every problem is reported, once"
    assert all(p.startswith(str(tmp_path / "r.yaml")) for p in problems), "each line names the file"
    # `train:` keys are checked against TRL's config classes (seconds to import) once the rest is right.
    for key in ("precison", "early_stoping"):
        recipe.pop(key, None), recipe["stages"][0].pop(key, None)
    recipe["tracking"]["wandb"].pop("projct")
    assert problems_of(tmp_path, recipe) == [
        f"{tmp_path / 'r.yaml'}: stages.lm.train: unknown key 'max_stpes' (did you mean 'max_steps'?) "
        "(LMConfig has no such field)"
    ]


def test_a_stage_key_written_one_level_too_deep_is_named_with_where_it_goes(tmp_path):
    """`peft:` under `train:`, `merge:` under `peft:`, and peft's own `rank` for align's `r`: each once an unknown
    key with no pointer to where it belongs."""
    recipe = tiny_lm_recipe()
    recipe["stages"].append(
        {
            "name": "sft",
            "kind": "sft",
            "data": {"card": "python-docs-instruct"},
            "train": {"max_steps": 2, "peft": {"r": 8}},
            "peft": {"rank": 8, "merge": True},
        }
    )
    text = "\n".join(problems_of(tmp_path, recipe))
    up = "is not a key of this section; it belongs one level up, as"
    assert f"stages.sft.peft.merge: `merge` {up} stages.sft.merge" in text
    assert "stages.sft.peft: unknown key 'rank' (did you mean 'r'?)" in text
    recipe["stages"][1]["peft"] = {"r": 8}
    (problem,) = problems_of(tmp_path, recipe)  # train: keys, once the rest is right
    assert problem.endswith(f"stages.sft.train.peft: `peft` {up} stages.sft.peft")
    recipe["stages"][1].update(train={}, peft={"lora_alpha": 8})
    (problem,) = problems_of(tmp_path, recipe)
    assert problem.endswith("stages.sft.peft: unknown key 'lora_alpha' (did you mean 'alpha'?)")


def test_train_value_types_are_checked_and_named(tmp_path):
    problems = problems_of(tmp_path, tiny_lm_recipe(), "stages.lm.train.max_steps=lots")
    assert len(problems) == 1 and "stages.lm.train.max_steps" in problems[0] and "lots" in problems[0]


def test_yaml_exponent_without_dot_is_still_a_float(tmp_path):
    # PyYAML reads `1e-4` as a string; TrainingArguments would choke on it later. We coerce it up front.
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", tiny_lm_recipe()), ["stages.lm.train.learning_rate=1e-4"])
    assert recipe.stages[0].train["learning_rate"] == pytest.approx(1e-4)


def test_settings_align_manages_are_refused_with_the_right_place(tmp_path):
    problems = problems_of(tmp_path, tiny_lm_recipe(), "stages.lm.train.bf16=true", "stages.lm.train.output_dir=x",
                           "stages.lm.train.push_to_hub=true", "stages.lm.train.resume_from_checkpoint=x")  # fmt: skip
    text = "\n".join(problems)
    # Given with --set, the problem names the --set that gave it (the file does not hold the value).
    assert "--set stages.lm.train.bf16=true: set by align: use the recipe's top-level `precision:`" in text
    assert "--set stages.lm.train.output_dir=x: set by align" in text
    # Keys a TRL config carries over: the Trainer would upload mid-training, or resume where align does not.
    assert "--set stages.lm.train.push_to_hub=true: set by align: push a finished stage with `align push" in text
    assert "--set stages.lm.train.resume_from_checkpoint=x: set by align: run the same command again" in text


def test_wrong_types_and_bad_values(tmp_path):
    text = "\n".join(problems_of(tmp_path, tiny_lm_recipe(seed="abc", precision="fp8")))
    assert "seed:" in text and "precision:" in text


def test_stage_references_must_point_back(tmp_path):
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["model"] = "@later"
    recipe["stages"].append({"name": "later", "kind": "lm", "data": {"card": "python-docs"}})
    assert any("'@later' is not an earlier stage" in p for p in problems_of(tmp_path, recipe))


def test_set_with_unknown_stage_suggests_one():
    with pytest.raises(BadInput, match="no stage named 'lmm' \\(did you mean 'lm'\\?\\)"):
        apply_overrides(tiny_lm_recipe(), ["stages.lmm.train.max_steps=3"])
    with pytest.raises(BadInput, match="no stage named 'xyz' \\(stages: lm\\)"):
        apply_overrides(tiny_lm_recipe(), ["stages.xyz.train.max_steps=3"])


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages:\n  - name: [unclosed\n")
    with pytest.raises(BadInput, match=r"bad.yaml: line \d+ malformed YAML"):
        load_recipe(path)


@pytest.mark.slow
def test_cli_bad_input_is_one_error_line_exit_2_no_traceback(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", tiny_lm_recipe(seedd=1))
    proc = subprocess.run(
        [sys.executable, "-m", "align.run", str(path), "--print-config"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {path}: (top level): unknown key 'seedd' (did you mean 'seed'?)"], proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_recipe_file(run_cli, tmp_path):
    code, _, err = run_cli(tmp_path / "nope.yaml")
    assert code == 2 and "nope.yaml: no such file" in err


def test_a_bad_value_given_with_set_is_blamed_on_set_not_on_the_file(run_cli):
    path = REPO / "recipes" / "quickstart.yaml"
    code, _, err = run_cli(path, "--set", "stages.eval.max_prompts=abc", "--dry-run")
    assert code == 2 and err.startswith("error: --set stages.eval.max_prompts=abc: "), err
    code, _, err = run_cli(path, "--set", "stages.sft.train.learning_rat=1", "--dry-run")
    assert code == 2 and err.startswith("error: --set stages.sft.train.learning_rat=1: unknown key"), err
    assert "did you mean 'learning_rate'" in err


@pytest.mark.slow
def test_a_misspelt_key_is_named_before_the_heavy_libraries_load(tmp_path):
    """A typo once took 7-10 s to report: the `train:` checks imported TRL (torch, transformers) first. Checked by
    what the command imported, not by a time (transformers' top level is lazy: its logging is set up first)."""
    recipe = tiny_lm_recipe(traking={"wandb": {"mode": "disabled"}})
    path = write_yaml(tmp_path / "r.yaml", recipe)
    probe = (
        "import sys\nfrom align.run import main\ncode = main([sys.argv[1], '--dry-run'])\n"
        "print(code, sorted(m for m in ('torch', 'trl', 'peft') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert "unknown key 'traking' (did you mean 'tracking'?)" in proc.stderr
    assert proc.stdout.split("\n")[0] == "2 []", proc.stdout


@pytest.mark.parametrize("only", ["", ",", " , "])
def test_an_only_that_names_no_stage_is_refused(tmp_path, run_cli, only):
    """`--only ""` and `--only ,` once ran the whole recipe."""
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", tiny_lm_recipe()), "--only", only, "--dry-run")
    assert code == 2 and "names no stage" in err and "hint: --only STAGE[,STAGE]" in err, err
