"""A recipe's YAML: read with the safe loader, `--set KEY=VALUE` overrides by dotted path, a problem blamed on the
file or on the `--set` that gave its value, pydantic's errors named by their YAML path, unknown keys found with the
closest valid one, and a mapping written back as YAML.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel

from align.errors import BadInput, misplaced_key_message, unknown_key_message
from align.recipe import Strict


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader.

    Raises:
        BadInput: the file is missing, is not YAML, or is not a mapping.
    """
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BadInput(f"{path}:{where} malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply `KEY=VALUE` overrides by dotted path; under `stages`, a part names a stage (or its index).

    Values are parsed as YAML scalars, so `max_steps=20` is an int and `mode=offline` a string.

    Raises:
        BadInput: an override without `=`, or naming a stage that does not exist.
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise BadInput(f"{source} {item}: expected KEY=VALUE")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise BadInput(f"{source} {item}: empty key")
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if parts[:i] == ["stages"]:
                    node = _stage_by_name(node, part, f"{source} {key}")
                else:
                    node = _list_item(node, part, f"{source} {key}", ".".join(parts[:i]))
                continue
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict | list):
                raise BadInput(f"{source} {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
            node = nxt
        if isinstance(node, list):
            raise BadInput(f"{source} {key}: name a key inside the stage, e.g. {key}.train.max_steps=20")
        node[parts[-1]] = value
    return raw


def _list_item(items: list[Any], part: str, where: str, path: str) -> Any:
    """An entry of a list other than `stages` (a mix's sources, an eval's judges): by its index, as error messages
    spell it (`mix.1`), or by the `name:` it was given.

    Raises:
        BadInput: no entry of that index or name.
    """
    for item in items:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    named = [str(item["name"]) for item in items if isinstance(item, dict) and item.get("name")]
    also = f", or one of the names given: {', '.join(named)}" if named else ""
    raise BadInput(f"{where}: {path} has no entry '{part}' (its entries are 0 to {len(items) - 1}{also})")


def _stage_by_name(stages: list[Any], part: str, where: str) -> dict[str, Any]:
    names = [s.get("name", s.get("kind")) for s in stages if isinstance(s, dict)]
    for stage in stages:
        if isinstance(stage, dict) and stage.get("name", stage.get("kind")) == part:
            return stage
    if part.isdigit() and int(part) < len(stages):
        return stages[int(part)]
    message = unknown_key_message(where, part, names).replace("unknown key", "no stage named")
    raise BadInput(message if "did you mean" in message else f"{message} (stages: {', '.join(map(str, names))})")


def blame(problem: str, path: Path, overrides: list[str] | None) -> str:
    """A problem named after where its value came from: `--set KEY=VALUE` for a value given on the command line
    (the file does not hold it), else the recipe file."""
    where = problem.split(":", 1)[0]
    unknown = re.search(r"unknown key '([^']+)'", problem)
    if unknown:  # "stages.eval: unknown key 'max_prompt'" names the mapping; the value's own path is the key's
        where = f"{where}.{unknown.group(1)}"
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        if where == key or where.startswith(key + "."):
            return f"--set {item}: {problem.split(':', 1)[1].strip()}"
    return f"{path}: {problem}"


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _yaml_path(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    """`('stages', 0, 'train')` -> `stages.lm.train`: the same spelling `--set` takes (a stage by its name, any
    other list's item by its index: `stages.sft.data.mix.1.weight`)."""
    parts: list[str] = []
    node: Any = raw
    for part in loc:
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            item = node[part]
            label = item.get("name") if isinstance(item, dict) and parts == ["stages"] else None
            parts.append(str(label) if label else str(part))
            node = item
        elif isinstance(part, str):
            if part in {"str", "ScratchModel", "list[str]"} or part.startswith(("dict[", "function-")):
                continue  # pydantic names union members in locations; they are not YAML keys
            parts.append(part)
            node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def _format_error(err: dict[str, Any], raw: dict[str, Any]) -> str:
    where = _yaml_path(tuple(err["loc"]), raw)
    msg = err["msg"]
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    value = err.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) and err["type"] != "value_error" else ""
    return f"{where}: {msg}{shown}"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The Strict model inside an annotation like `X | None` or `list[X]`, if there is exactly one."""
    if isinstance(annotation, type) and issubclass(annotation, Strict):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list):
        found = [m for m in map(_model_of, typing.get_args(annotation)) if m is not None]
        return found[0] if len(found) == 1 else None
    return None


def _unknown_keys(
    node: Any, model: type[BaseModel], where: str, raw: dict[str, Any], outer: tuple[str, Any] | None = None
):
    """Yield an unknown-key message for every key the schema does not know, with a suggestion. `outer`: the
    enclosing section's path and fields, for a key written one level too deep (`peft: {merge: true}`)."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            # A stage by its name, any other entry by its index: as `--set` spells them (`stages.sft.data.mix.1`).
            named = where.lstrip(".") == "stages" and isinstance(item, dict) and item.get("name")
            yield from _unknown_keys(item, model, f"{where}.{item['name'] if named else i}", raw)
        return
    if not isinstance(node, dict):
        return
    fields = model.model_fields
    for key, value in node.items():
        path = f"{where}.{key}".lstrip(".")
        if key not in fields:
            if outer is not None and key in outer[1]:
                yield misplaced_key_message(path, f"{outer[0]}.{key}")
            else:
                yield unknown_key_message(where.lstrip(".") or "(top level)", str(key), fields)
            continue
        sub = _model_of(fields[key].annotation)
        if sub is not None:
            yield from _unknown_keys(value, sub, path, raw, (where.lstrip("."), fields) if where else None)


def to_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
