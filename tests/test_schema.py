"""`align schema`: the recipe's JSON Schema from the classes the loader validates with, checked with a real
validator (jsonschema) against the shipped recipes and against typos an editor should underline."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from tests.conftest import REPO


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    from align.cli import main

    path = tmp_path_factory.mktemp("schema") / "align.schema.json"
    assert main(["schema", "-o", str(path)]) == 0
    return json.loads(path.read_text())


def problems(schema, recipe) -> list[tuple[str, str]]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    return [("/".join(map(str, e.absolute_path)), e.message) for e in validator.iter_errors(recipe)]


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid_under_the_schema(schema, path):
    assert problems(schema, yaml.safe_load(path.read_text())) == []


def test_every_key_of_every_kind_is_in_the_schema_with_train_keys_typed_defaulted_and_described(schema):
    from align import stages as registry

    for kind in registry.kinds().values():
        entry = schema["$defs"][kind.keys.__name__]
        assert set(entry["properties"]) == set(kind.keys.model_fields), kind.name
    train = schema["$defs"]["SFTKeys"]["properties"]["train"]
    assert train["additionalProperties"] is False
    assert train["properties"]["learning_rate"]["default"] == pytest.approx(2e-5)
    assert "integer" in train["properties"]["max_steps"]["type"] and train["properties"]["max_steps"]["description"]
    dpo = schema["$defs"]["DPOKeys"]["properties"]["train"]["properties"]
    assert "beta" in dpo and "beta" not in train["properties"], "each kind's train: keys are its own config's"


def test_typos_are_found_where_they_are(schema):
    recipe = {"name": "x", "stages": [{"kind": "sft", "model": "gpt2", "data": {"card": "c"},
                                       "train": {"learning_rate": 1e-4}}]}  # fmt: skip
    assert problems(schema, recipe) == [], "a stage's name defaults to its kind"
    cases = [
        (lambda r: r.update(traking={}), "", "'traking' was unexpected"),
        (lambda r: r["stages"][0]["train"].update(learnig_rate=1), "stages/0/train", "'learnig_rate' was unexpected"),
        (lambda r: r["stages"][0]["train"].update(max_steps="many"), "stages/0/train/max_steps", "not of type"),
        (lambda r: r["stages"][0].update(kind="sftt"), "stages/0/kind", "is not one of"),
        (lambda r: r["stages"][0].update(loading={"dtype": "float8"}), "stages/0/loading", ""),
    ]
    for change, where, message in cases:
        broken = copy.deepcopy(recipe)
        change(broken)
        found = problems(schema, broken)
        assert found and found[0][0].startswith(where) and message in found[0][1], (where, found)


def test_align_schema_on_stdout_is_json_alone_when_a_library_prints_while_it_loads(monkeypatch, capsys):
    """`align schema > align.schema.json` with WANDB_MODE=offline: transformers prints '[INFO] Running in WANDB offline
    mode' on stdout while it loads, which made the file invalid JSON. Whatever prints while the schema is built goes
    to stderr."""
    from align import schema as module

    def noisy() -> dict:
        print("[INFO] Running in WANDB offline mode")
        return {"$defs": {}}

    monkeypatch.setattr(module, "recipe_schema", noisy)
    assert module.main([]) == 0
    out, err = capsys.readouterr()
    assert "$defs" in json.loads(out), "stdout is the schema and nothing else"
    assert "Running in WANDB offline mode" in err
