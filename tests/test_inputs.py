"""What the user points align at: local model and data paths, columns, bad rows, and data that trains badly.

Each error names where to look (the recipe path, the file and its line, the user's own column) and, where it can,
carries its fix as a `hint:`; data that would train badly without being wrong is a warning at preflight.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import yaml

from align.data import first_unique, load_data
from align.errors import BadInput
from align.recipe import DataSpec
from tests.conftest import TINY_MODEL, tiny_lm_recipe, write_yaml


def spec(**fields) -> DataSpec:
    return DataSpec.model_validate({"format": "prompt_completion", **fields})


def save_tiny_model(directory: Path) -> Path:
    """A one-layer GPT-2 with its own byte-level tokenizer, saved as a local `model:` directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.builtin import python_docs
    from align.models import save_model, train_tokenizer

    tokenizer = train_tokenizer(python_docs()["text"][:200], 300)
    config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    save_model(AutoModelForCausalLM.from_config(config), tokenizer, directory)
    return directory


def lm_recipe(model: str | dict) -> dict:
    recipe = tiny_lm_recipe()
    recipe["stages"][0].update(model=model, data={"card": "python-docs", "max_train_rows": 40, "max_eval_rows": 20})
    return recipe


# --------------------------------------------------------------------------------------------------
# Local paths: the recipe's folder first, then the working directory, for models as for data


def test_local_model_resolves_against_the_recipe_folder_like_data(tmp_path, monkeypatch, run_cli):
    save_tiny_model(tmp_path / "project" / "models" / "tiny")
    recipe = write_yaml(tmp_path / "project" / "r.yaml", lm_recipe("models/tiny"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    code, out, err = run_cli(recipe, "--print-config")
    assert code == 0, err
    # Resolved once, at load, to the directory found: every consumer and the fingerprint see the same one.
    assert yaml.safe_load(out)["stages"][0]["model"] == str(tmp_path / "project" / "models" / "tiny")
    code, out, err = run_cli(recipe, "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert f"model: {tmp_path / 'project' / 'models' / 'tiny'}" in out

    # Not beside the recipe: the working directory, as before.
    monkeypatch.chdir(tmp_path / "project")
    code, out, err = run_cli(write_yaml(tmp_path / "elsewhere" / "r.yaml", lm_recipe("models/tiny")), "--print-config")
    assert code == 0, err
    assert yaml.safe_load(out)["stages"][0]["model"] == str(tmp_path / "project" / "models" / "tiny")


@pytest.mark.parametrize("model", ["./models/nope", "models/base/nope", "models/nope/", "~/align-no-such-model"])
def test_missing_model_directory_is_named_as_a_directory(tmp_path, monkeypatch, run_cli, model):
    (tmp_path / "recipes").mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(write_yaml(tmp_path / "recipes" / "r.yaml", lm_recipe(model)), "--dry-run")
    assert code == 2
    assert f": stages.lm.model: '{model}': no such directory (looked in " in err, err
    assert err.count("error: ") == 1 and f"error: {tmp_path / 'recipes' / 'r.yaml'}: stages.lm.model" in err
    if not model.startswith("~"):
        assert str(tmp_path / "recipes" / model.lstrip("./")) in err and str(tmp_path / model.lstrip("./")) in err
    assert "Hugging Face cache" not in err and "hf download" not in err


def test_a_ref_that_could_be_either_says_both_and_names_the_current_download_command(tmp_path, run_cli):
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", lm_recipe("org/no-such-model")), "--dry-run")
    assert code == 2
    assert "not in the local Hugging Face cache, the hub is offline, and there is no local directory" in err, err
    assert f"looked in {tmp_path / 'org/no-such-model'}" in err
    assert "hint: download it on a connected machine (hf download org/no-such-model)" in err
    assert "huggingface-cli" not in err


@pytest.mark.parametrize(
    ("change", "named", "reason"),
    [
        ({"num_attention_heads": 3}, "stages.lm.model.hidden_size, stages.lm.model.num_attention_heads",
         "The hidden size (32) is not a multiple of the number of attention heads (3)."),
        ({"num_key_value_heads": "two"}, "stages.lm.model.num_key_value_heads",
         "Field 'num_key_value_heads' with value 'two' doesn't match any type in (int, NoneType)"),
    ],
)  # fmt: skip
def test_a_from_scratch_config_the_library_refuses_is_exit_2_with_its_reason(tmp_path, run_cli, change, named, reason):
    """transformers' own checks of a config (strict dataclasses) as one error line naming the recipe's key, before
    anything is written: the reason was lost behind 'unexpected StrictDataclassClassValidationError', exit 1."""
    model = {"model_type": "llama", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64, **change}  # fmt: skip
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", lm_recipe(model)), "--output-dir", tmp_path / "run")
    assert code == 2, err
    assert f"error: {tmp_path / 'r.yaml'}: {named}: {reason}" in err, err
    assert err.count("error: ") == 1 and "Strict" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("stage", "where"),
    [
        ({"name": "eval", "kind": "eval", "data": {"card": "python-docs-instruct"},
          "judges": [{"reward_model": "someone/not-here-rm"}]}, "stages.eval.judges.0.reward_model"),
        ({"name": "grpo", "kind": "grpo", "data": {"card": "arithmetic"},
          "rewards": [{"function": "exact_match"}, {"reward_model": "someone/not-here-rm"}]},
         "stages.grpo.rewards.1.reward_model"),
        ({"name": "grpo", "kind": "grpo", "data": {"card": "arithmetic"}, "rewards": [{"function": "exact_match"}],
          "monitor": [{"reward_model": "someone/not-here-rm"}]}, "stages.grpo.monitor.0.reward_model"),
    ],
)  # fmt: skip
def test_a_reward_model_not_on_this_machine_is_refused_before_any_stage_trains(tmp_path, run_cli, stage, where):
    """Every model a stage reads (its kind's model_refs) is checked offline before the first stage trains: a grpo
    reward model from the hub once failed only after the stages before it had trained (an eval judge too)."""
    recipe = lm_recipe({**TINY_MODEL})
    recipe["stages"].append(stage)
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 2, err
    assert f"error: {tmp_path / 'r.yaml'}: {where}: cannot load model 'someone/not-here-rm': not in the local" in err
    assert not (tmp_path / "run").exists(), "refused before the lm stage trained"


def test_missing_data_file_names_both_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput) as info:
        load_data(
            spec(source={"files": ["nope.jsonl"]}), seed=0, base_dir=tmp_path / "recipes", where="stages.sft.data"
        )
    assert info.value.problems == [
        f"stages.sft.data: nope.jsonl: no such data file (looked in {tmp_path / 'recipes/nope.jsonl'} and "
        f"{tmp_path / 'nope.jsonl'})"
    ]


# --------------------------------------------------------------------------------------------------
# Columns: every missing one at once, with the mapping that fixes it


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def test_missing_columns_are_named_together_with_the_mapping_as_hint(tmp_path, run_cli):
    write_csv(tmp_path / "qa.csv", ["question", "answer"], [[f"q{i}? ", f"a{i}"] for i in range(40)])
    stage = {"name": "sft", "kind": "sft", "model": {"model_type": "gpt2"},
             "data": {"source": {"files": ["qa.csv"]}, "format": "prompt_completion"}}  # fmt: skip
    recipe = {"name": "x", "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--dry-run")
    assert code == 2
    lines = err.strip().splitlines()
    missing = "stages.sft.data: qa.csv: columns 'prompt', 'completion' missing (columns: question, answer)"
    assert f"error: {tmp_path / 'r.yaml'}: {missing}" in lines
    assert lines[-1] == "hint: columns: {prompt: question, completion: answer}"


@pytest.mark.parametrize(
    ("fmt", "header", "columns", "hint"),
    [
        ("preference", ["prompt", "better", "worse"], {}, "columns: {chosen: better, rejected: worse}"),
        ("text", ["Body", "id"], {}, "columns: {text: Body}"),
        ("messages", ["conversations"], {}, "columns: {messages: conversations}"),
        # A misspelt mapping: the closest column, and the fields already mapped stay in the hint.
        (
            "prompt_completion",
            ["instruction", "response"],
            {"prompt": "instruction", "completion": "responce"},
            "columns: {prompt: instruction, completion: response}",
        ),  # fmt: skip
        # One field without any likely column: no hint at all, rather than half of one.
        ("prompt_completion", ["question", "zzz"], {}, None),
    ],
)
def test_columns_hint(tmp_path, fmt, header, columns, hint):
    (tmp_path / "d.jsonl").write_text((json.dumps(dict.fromkeys(header, "x")) + "\n") * 40)
    with pytest.raises(BadInput) as info:
        load_data(spec(format=fmt, source={"files": ["d.jsonl"]}, columns=columns), seed=0, base_dir=tmp_path)
    assert info.value.hint == hint


# --------------------------------------------------------------------------------------------------
# Bad rows: the file's line and the user's column, whatever split the row landed in


def test_blank_csv_cell_names_the_file_line_and_the_users_column(tmp_path):
    rows = [[f"What does q{i} refer to? ", f"The instance {i}"] for i in range(36)]
    rows[19][1] = ""  # row 19: the file's line 21 (the header is line 1)
    write_csv(tmp_path / "qa.csv", ["question", "answer"], rows)
    card = spec(source={"files": ["qa.csv"]}, columns={"prompt": "question", "completion": "answer"})
    for seed in range(4):  # wherever the shuffled cut puts the row, train or validation
        with pytest.raises(BadInput) as info:
            load_data(card, seed=seed, base_dir=tmp_path)
        assert info.value.problems == [
            f"{tmp_path / 'qa.csv'}: line 21: column 'answer' (completion) is missing or null"
        ]


def test_jsonl_rows_are_named_by_line_counting_blank_lines(tmp_path):
    lines = [json.dumps({"q": f"q{i} ", "a": f"a{i}"}) for i in range(30)]
    lines[12] = json.dumps({"q": "q12 ", "a": None})
    (tmp_path / "d.jsonl").write_text("\n".join(lines[:5] + ["", "  "] + lines[5:]) + "\n")
    card = spec(source={"files": ["d.jsonl"]}, columns={"prompt": "q", "completion": "a"})
    with pytest.raises(BadInput, match=r"d.jsonl: line 15: column 'a' \(completion\) is missing or null"):
        load_data(card, seed=0, base_dir=tmp_path)


def test_preference_rows_without_a_shared_prompt_name_their_line(tmp_path):
    rows = [{"good": f"Q{i}? A{i}.", "bad": f"Q{i}? B{i}."} for i in range(30)]
    rows[7] = {"good": "Yes.", "bad": "No."}
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, rows)))
    card = spec(
        format="preference_implicit", source={"files": ["p.jsonl"]}, columns={"chosen": "good", "rejected": "bad"}
    )
    with pytest.raises(
        BadInput, match=r"p.jsonl: line 8: column 'good' \(chosen\) and column 'bad' \(rejected\) share"
    ):
        load_data(card, seed=0, base_dir=tmp_path)


def test_json_array_and_multiline_csv_rows_are_named_by_their_first_line(tmp_path):
    items = [{"prompt": f"p{i} ", "completion": f"c{i}"} for i in range(25)]
    items[3]["completion"] = None
    (tmp_path / "d.json").write_text(json.dumps(items, indent=2))
    with pytest.raises(BadInput, match=r"d.json: line 14: column 'completion' is missing or null"):
        load_data(spec(source={"files": ["d.json"]}), seed=0, base_dir=tmp_path)

    rows = [["a\nquestion on two lines ", f"answer {i}"] for i in range(25)]
    rows[4][1] = ""
    write_csv(tmp_path / "m.csv", ["prompt", "completion"], rows)
    with pytest.raises(BadInput, match=r"m.csv: line 10: column 'completion' is missing or null"):
        load_data(spec(source={"files": ["m.csv"]}), seed=0, base_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# Data that trains badly without being wrong: warnings at preflight


def test_small_validation_split_warns_once_with_the_fix(tmp_path, caplog):
    write_csv(tmp_path / "qa.csv", ["prompt", "completion"], [[f"q{i} ", f"a{i}"] for i in range(36)])
    with caplog.at_level(logging.WARNING, logger="align.data"):
        data = load_data(spec(source={"files": ["qa.csv"]}), seed=0, base_dir=tmp_path, where="stages.sft.data")
    assert len(data["validation"]) == 2
    warnings = [r.getMessage() for r in caplog.records if "validation split" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "stages.sft.data: the validation split has only 2 rows (valid_fraction 0.05 of 36 rows)" in warnings[0]
    assert "raise valid_fraction" in warnings[0] and "give the source a validation split (files:" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="align.data"):
        load_data(spec(source={"files": ["qa.csv"]}, valid_fraction=0.6), seed=0, base_dir=tmp_path)
    assert not [r for r in caplog.records if "validation split" in r.getMessage()]

    # Few rows by the recipe's own `max_eval_rows`: said at INFO (a shipped recipe warned of its own choice).
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="align.data"):
        load_data(spec(source={"files": ["qa.csv"]}, valid_fraction=0.6, max_eval_rows=4), seed=0, base_dir=tmp_path)
    said = [r for r in caplog.records if "validation split" in r.getMessage()]
    assert [r.levelname for r in said] == ["INFO"] and "(max_eval_rows: 4, the recipe's choice)" in said[0].getMessage()


def test_prompts_and_answers_that_would_run_together_warn_with_counts(tmp_path, caplog):
    rows = [[f"What does q{i} refer to?", f"[[The instance {i}"] for i in range(30)]
    rows += [[f"Question {i}:\n", f"answer {i}"] for i in range(10)]
    write_csv(tmp_path / "qa.csv", ["prompt", "completion"], rows)
    with caplog.at_level(logging.WARNING, logger="align.data"):
        load_data(spec(source={"files": ["qa.csv"]}, valid_fraction=0.5), seed=0, base_dir=tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "whitespace" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert (
        "in 30 of 40 rows the prompt does not end in whitespace and the completion does not start with any"
        in (warnings[0])
    )
    assert "refer to?[[The instance" in warnings[0]

    pairs = [{"prompt": f"Say {i}.", "chosen": f" {i}", "rejected": f"no{i}"} for i in range(40)]
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, pairs)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="align.data"):
        load_data(spec(format="preference", source={"files": ["p.jsonl"]}, valid_fraction=0.5), seed=0,
                  base_dir=tmp_path)  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if "whitespace" in r.getMessage()]
    assert len(warnings) == 1 and "in 40 of 40 rows" in warnings[0] and "chosen or rejected answer" in warnings[0]

    separated = [[f"q{i}? ", f"a{i}"] for i in range(40)]
    write_csv(tmp_path / "ok.csv", ["prompt", "completion"], separated)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="align.data"):
        load_data(spec(source={"files": ["ok.csv"]}, valid_fraction=0.5), seed=0, base_dir=tmp_path)
    assert not [r for r in caplog.records if "whitespace" in r.getMessage()]


# --------------------------------------------------------------------------------------------------
# DPO's generation prompts


def test_generation_prompts_are_distinct():
    messages = [{"role": "user", "content": "hi"}]
    assert first_unique(["a", "a", "b", "a", "c", "d"], 3) == ["a", "b", "c"]
    other = [{"role": "user", "content": "yo"}]
    assert first_unique([messages, messages, other], 4) == [messages, other]
