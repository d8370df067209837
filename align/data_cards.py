"""Data cards, and a stage's `data:` resolved to a full spec: a card's fields with the stage's own on top, a mix's
sources each resolved, and the check that the format can feed the stage's kind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from align.errors import BadInput, Problems, closest
from align.recipe import DataRef, DataSpec
from align.recipe_yaml import _format_error, _unknown_keys

REPO_ROOT = Path(__file__).resolve().parent.parent


def card_dirs(base_dir: Path) -> list[Path]:
    """Where cards are looked up, in order: beside the recipe, the current directory, align's own."""
    dirs = [
        base_dir / "data_cards",
        base_dir.parent / "data_cards",
        Path.cwd() / "data_cards",
        REPO_ROOT / "data_cards",
    ]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def card_path(name: str, base_dir: Path) -> Path:
    """The card file of a data set by name.

    Raises:
        BadInput: no card of that name exists.
    """
    known: set[str] = set()
    for folder in card_dirs(base_dir):
        path = folder / f"{name}.md"
        if path.is_file():
            return path
        if folder.is_dir():
            known |= {p.stem for p in folder.glob("*.md")}
    guess = closest(name, known)
    hint = f" (did you mean '{guess}'?)" if guess else f" (cards: {', '.join(sorted(known)) or 'none'})"
    raise BadInput(f"data card '{name}' not found{hint}")


def read_card_fields(path: Path) -> dict[str, Any]:
    """The YAML front matter of a card, as a mapping.

    Raises:
        BadInput: no front matter, or it is not valid YAML.
    """
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---"):
        raise BadInput(f"{path}: a data card starts with YAML front matter between '---' lines")
    parts = text.split("\n---", 1)
    if len(parts) != 2:
        raise BadInput(f"{path}: front matter is not closed by a '---' line")
    try:
        fields = yaml.safe_load(parts[0].removeprefix("---"))
    except yaml.YAMLError as exc:
        raise BadInput(f"{path}: malformed YAML front matter: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(fields, dict):
        raise BadInput(f"{path}: front matter must be a mapping")
    return fields


def resolve_data(ref: DataRef, base_dir: Path, where: str, accepts: Iterable[str] | None = None) -> DataSpec:
    """A stage's `data:` as a full spec: the card's fields with the stage's own fields on top. `accepts`: the
    formats the stage takes, so that a mix's source of another format is named for that, not for the mismatch.

    Raises:
        BadInput: unknown card, unknown keys in the card, or an incomplete inline spec.
    """
    if ref.mix is not None:
        return _resolve_mix(ref, base_dir, where, tuple(accepts) if accepts is not None else None)
    given = ref.model_dump(exclude_none=True, exclude={"card"})
    label = where
    if ref.card is not None:
        path = card_path(ref.card, base_dir)
        label = str(path)
        fields = read_card_fields(path)
        problems = list(_unknown_keys(fields, DataSpec, "", fields))
        if problems:
            raise BadInput([f"{path}: {p}" for p in problems])
        fields.update(given)
        fields.setdefault("name", ref.card)
    else:
        fields = given
        if "source" not in fields or "format" not in fields:
            raise BadInput(f"{where}: give `card: NAME`, or an inline `source:` and `format:`")
    try:
        return DataSpec.model_validate(fields)
    except ValidationError as exc:
        raise BadInput(
            [f"{label}: {_format_error(e, fields).removeprefix('(top level): ')}" for e in exc.errors()]
        ) from None


# Formats whose rows `load_data` brings to another's: an implicit-prompt preference set's rows are explicit triples.
MIXES_AS = {"preference_implicit": "preference"}


def _resolve_mix(ref: DataRef, base_dir: Path, where: str, accepts: tuple[str, ...] | None = None) -> DataSpec:
    """A `data: {mix: [...]}` as a spec whose `mix` holds every source resolved (its card expanded), named, weighted,
    and whose `format` is the one the sources' rows are brought to.

    Raises:
        BadInput: fields beside `mix:` that belong in its entries, an empty mix, a source's own problems (named
            `stages.<name>.data.mix.<i>...`), or formats that cannot be brought to one.
    """
    from align.recipe import MixedSource

    beside = sorted(ref.model_dump(exclude_none=True, exclude={"mix", "mix_rows", "name"}))
    if beside:
        raise BadInput(
            f"{where}: {', '.join(beside)} beside `mix:` (each source of a mix takes its own)",
            hint=f"move {', '.join(beside)} into the entries of {where}.mix",
        )
    if not ref.mix:
        raise BadInput(f"{where}.mix: an empty mix", hint="give at least one source, each with its `weight`")
    found = Problems()
    sources: list[MixedSource] = []
    for i, entry in enumerate(ref.mix):
        at = f"{where}.mix.{i}"
        try:
            spec = resolve_data(DataRef(**entry.model_dump(exclude_none=True, exclude={"weight"})), base_dir, at)
        except BadInput as exc:
            found.absorb(exc)
            continue
        fields = spec.model_dump() | {"weight": entry.weight}
        sources.append(MixedSource.model_validate(fields | {"name": entry.name or spec.name or _short_name(spec)}))
    found.raise_if_any()
    taken: set[str] = set()
    for source in sources:  # unique, and usable in a metric's name: eval_<name>_loss
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.name).strip("_") or "source"
        base, n = name, 2
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        source.name = name
    formats = [MIXES_AS.get(s.format, s.format) for s in sources]
    if len(set(formats)) > 1 and accepts is not None:  # a source the stage cannot take: that is the problem
        refused = [f"{where}.mix.{i}.format: '{s.format}' cannot feed this stage (use {', '.join(accepts)})"
                   for i, s in enumerate(sources) if s.format not in accepts]  # fmt: skip
        if refused:
            raise BadInput(refused)
    for i, fmt in enumerate(formats):
        if fmt != formats[0]:
            preference = any(f.startswith("preference") for f in (sources[0].format, sources[i].format))
            raise BadInput(
                f"{where}.mix.{i}.format: '{sources[i].format}' cannot be mixed with '{sources[0].format}' "
                f"({where}.mix.0): a mix's rows share one format",
                hint="preference and preference_implicit mix (as preference); other formats do not"
                if preference
                else "give every source the same format (map its columns to that format's fields)",
            )
    return DataSpec(name=ref.name or "mix", format=formats[0], mix=sources, mix_rows=ref.mix_rows)


def _short_name(spec: DataSpec) -> str:
    """A source's name where neither the recipe nor a card gives one: its first file's stem, its builtin or hub id."""
    s = spec.source
    if s.files is not None:
        files = s.files if isinstance(s.files, list) else [f for fs in s.files.values() for f in fs]
        return Path(files[0]).stem
    if s.disk is not None:
        return Path(s.disk).name
    return s.builtin or (s.hub or "source").split("/")[-1]


def check_format(spec: DataSpec, kind: Any, where: str) -> list[str]:
    """A problem if the data's format cannot feed this kind of stage (`kind`: its `align.stages.base.Kind`); for a
    mix, each source's, named by its place (`stages.sft.data.mix.1.format`)."""
    if spec.mix is not None:
        if kind.prompts_only:
            return [f"{where}.mix: {kind.a_kind} stage reads one set of prompts; give its `data:` one source"]
        return [p for i, source in enumerate(spec.mix) for p in check_format(source, kind, f"{where}.mix.{i}")]
    if spec.format not in kind.formats:
        return [f"{where}.format: '{spec.format}' cannot feed {kind.a_kind} stage (use {', '.join(kind.formats)})"]
    return []
