"""`align schema`: the recipe's JSON Schema, for editors' YAML completion and checking.

Built from the same pydantic classes the loader validates with (align/recipe.py, each kind's keys), a stage's
shape chosen by its `kind`; each training kind's `train:` keys are its TRL config class's fields, with their
defaults and help. It is a helper for editors: `align run --dry-run` remains the full check (references between
stages, data, models).

    align schema > align.schema.json
    # then, first line of a recipe:  # yaml-language-server: $schema=./align.schema.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

# Python types as JSON Schema types (a field of another type is described, not typed).
JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string", dict: "object", list: "array"}


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a recipe: every key, its type, default and description."""
    from pydantic import Field, create_model

    from align import stages as registry
    from align.recipe import Recipe

    kinds = registry.kinds()
    union = Annotated[Union[tuple(kind.keys for kind in kinds.values())], Field(discriminator="kind")]  # noqa: UP007
    model = create_model(
        "Recipe", __base__=Recipe, __doc__="An align recipe: stages run in order, each on an earlier one's output.",
        stages=(list[union], Field(min_length=1, description="the stages, in order")),
    )  # fmt: skip
    schema = model.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "align recipe"
    definitions = schema.get("$defs", {})
    for kind in kinds.values():
        entry = definitions[kind.keys.__name__]
        # The loader names a stage after its kind where no name is given.
        entry["required"] = [key for key in entry.get("required", []) if key != "name"]
        if kind.trains and "train" in entry.get("properties", {}):
            entry["properties"]["train"] = train_schema(kind.config_class())
    # A stage's shape by its kind, as if/then pairs rather than pydantic's oneOf: a validator then reports the key
    # that is wrong in the stage's own kind, not "valid under none of 11 shapes".
    schema["properties"]["stages"]["items"] = {
        "type": "object",
        "required": ["kind"],
        "properties": {"kind": {"enum": list(kinds), "description": "what the stage does"}},
        "allOf": [
            {"if": {"properties": {"kind": {"const": name}}}, "then": {"$ref": f"#/$defs/{kind.keys.__name__}"}}
            for name, kind in kinds.items()
        ],
    }
    return schema


def train_schema(config_class: type) -> dict[str, Any]:
    """A training kind's `train:` section: its config class's init fields with their defaults and help."""
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # a hint that does not resolve: the field is described without a type
        hints = {}
    properties: dict[str, Any] = {}
    for field in dataclasses.fields(config_class):
        if not field.init or field.name.startswith("_"):
            continue
        entry: dict[str, Any] = {}
        json_type = _json_type(hints.get(field.name))
        if json_type:
            entry["type"] = json_type
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.default is not dataclasses.MISSING and _plain(default):
            entry["default"] = default
        if field.metadata.get("help"):
            entry["description"] = " ".join(str(field.metadata["help"]).split())
        properties[field.name] = entry
    return {
        "type": "object",
        "description": f"keys of {config_class.__module__.split('.')[0]}'s {config_class.__name__}",
        "properties": properties,
        "additionalProperties": False,
    }


def _json_type(hint: Any) -> str | list[str] | None:
    """The JSON type(s) of a field's type hint, where it has plain ones (int, float | None, ...)."""
    if hint is None:
        return None
    args = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    found: list[str] = []
    for arg in args:
        origin = typing.get_origin(arg) or arg
        if arg is type(None):
            found.append("null")
        elif origin in JSON_TYPES:
            found.append(JSON_TYPES[origin])
        else:
            return None  # an enum, a Literal, a class: left untyped rather than typed wrongly
    if "number" in found and "integer" not in found:
        found.append("integer")  # JSON's 1 is an integer; a float field takes it
    return found[0] if len(found) == 1 else found


def _plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="align schema", description="Print the recipe's JSON Schema.")
    parser.add_argument("--output", "-o", type=Path, help="write it to this file instead of standard output")
    args = parser.parse_args(argv)
    # stdout is the JSON: a library that prints while it loads (transformers' "[INFO] Running in WANDB offline mode"
    # under WANDB_MODE=offline) must not land in `align schema > align.schema.json`.
    with contextlib.redirect_stdout(sys.stderr):
        text = json.dumps(recipe_schema(), indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        print(f"wrote {args.output}: the recipe's JSON Schema (point your editor's YAML extension at it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
