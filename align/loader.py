"""Loading a recipe: YAML, `--set` overrides, the generic shape (align/recipe.py), then each stage by its kind.

A stage is validated with its kind's own class (the registry's `Kind.keys`), and its `train:` against its kind's
config class, so a key is always checked against what that kind takes. A key another kind takes is named as such
("only eval stages take `judges`"). Every problem of every stage is collected and raised once, each naming its
YAML path as `--set` spells it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from align import stages as registry
from align.errors import BadInput, closest, unknown_key_message
from align.recipe import Recipe, Stage, check_recipe, check_train, resolve_local_models
from align.recipe_yaml import _dedupe, _format_error, _model_of, _unknown_keys, apply_overrides, blame, load_yaml


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe; collect every problem and raise them together.

    Raises:
        BadInput: anything wrong with the recipe, each problem naming its YAML path.
    """
    path = Path(path)
    raw = apply_overrides(load_yaml(path), overrides or [])
    entries = raw.get("stages")
    for entry in entries if isinstance(entries, list) else []:
        # A stage's name defaults to its kind, so the common one-stage-per-kind recipe needs no names.
        if isinstance(entry, dict) and "name" not in entry and isinstance(entry.get("kind"), str):
            entry["name"] = entry["kind"]
    top = {k: v for k, v in raw.items() if k != "stages"}
    problems = list(_unknown_keys(top, Recipe, "", raw))
    stages: list[Stage] = []
    stage_problems: list[str] = []
    # The `train:` keys are checked against TRL's config classes, whose import (torch, transformers) takes seconds:
    # only once every cheaper check passed, so a misspelt key anywhere else is named at once.
    for deep in (False, True):
        stages, stage_problems = [], []
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            stage, found = load_stage(entry, i, raw, deep=deep)
            stage_problems += found
            if stage is not None:
                stages.append(stage)
        if problems or stage_problems:
            break
    try:
        recipe = Recipe.model_validate({**raw, "stages": stages} if isinstance(entries, list) else raw)
    except ValidationError as exc:
        errors = [e for e in exc.errors() if e["type"] != "extra_forbidden"]
        if stage_problems:  # the stages' own problems say more than "the list is short"
            errors = [e for e in errors if tuple(e["loc"][:1]) != ("stages",)]
        problems += [_format_error(err, raw) for err in errors]
        problems += stage_problems
        raise BadInput([blame(p, path, overrides) for p in _dedupe(problems)]) from None
    problems += stage_problems
    if not problems:
        problems += check_recipe(recipe)
    if problems:
        raise BadInput([blame(p, path, overrides) for p in _dedupe(problems)])
    recipe._path = path
    recipe._overridden = frozenset(item.partition("=")[0].strip() for item in overrides or [])
    resolve_local_models(recipe)
    return recipe


def load_stage(entry: Any, index: int, raw: dict[str, Any], deep: bool = True) -> tuple[Stage | None, list[str]]:
    """One stage, validated by its kind's class (None where it is invalid), and every problem found; `deep`: its
    `train:` keys too, against the kind's config class (TRL imported)."""
    label = entry.get("name") if isinstance(entry, dict) and entry.get("name") else str(index)
    where = f"stages.{label}"
    if not isinstance(entry, dict):
        return None, [f"{where}: a stage is a mapping (name, kind, data, ...), got {type(entry).__name__}"]
    name = entry.get("kind")
    if name is None:
        return None, [f"{where}.kind: required key is missing (kinds: {', '.join(registry.names())})"]
    if not isinstance(name, str) or name not in registry.names():
        guess = closest(str(name), registry.names())
        also = f"did you mean '{guess}'? " if guess else ""
        return None, [f"{where}.kind: unknown kind {name!r} ({also}kinds: {', '.join(registry.names())})"]
    kind = registry.get(name)
    problems = list(foreign_keys(entry, kind, where, raw))
    if deep and kind.trains and isinstance(entry.get("train"), dict):
        problems += check_train(kind.config_class(), entry["train"], bool(entry.get("early_stopping")),
                                f"{where}.train", stage_keys=kind.keys.model_fields)  # fmt: skip
    try:
        stage = kind.keys.model_validate(entry)
    except ValidationError as exc:
        errors = [e for e in exc.errors() if e["type"] != "extra_forbidden"]
        problems += [_format_error({**e, "loc": ("stages", index, *e["loc"])}, raw) for e in errors]
        return None, problems
    return (stage if not problems else None), problems


def foreign_keys(entry: dict[str, Any], kind: Any, where: str, raw: dict[str, Any]):
    """A message for every key the kind does not take: one that other kinds take names them, any other gets the
    closest key this kind takes. Keys it takes are looked into (their own sections' unknown keys)."""
    fields = kind.keys.model_fields
    for key, value in entry.items():
        if key in fields:
            sub = _model_of(fields[key].annotation)
            if sub is not None:
                yield from _unknown_keys(value, sub, f"{where}.{key}", raw, (where, fields))
            continue
        takers = [k.name for k in registry.kinds().values() if key in k.keys.model_fields]
        if takers:
            trains = "" if kind.trains else ", which trains nothing"
            yield (f"{where}.{key}: only {', '.join(takers)} stages take `{key}` (this stage is "
                   f"{kind.a_kind} stage{trains})")  # fmt: skip
        else:
            yield unknown_key_message(where, str(key), fields)
