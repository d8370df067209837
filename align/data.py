"""Data cards, loading (hub / local files / builtin), column mapping, validation and splits.

Every stage's data comes through `load_data`, which returns a `DatasetDict` with `train` and
`validation` splits whose columns are exactly the fields of the card's format.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from align.errors import BadInput, Problems, closest
from align.recipe import FORMAT_FIELDS, KEEPS_COLUMNS, DataRef, DataSpec, _format_error, _unknown_keys, search_paths

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# Fields a format may leave out: UltraFeedback-style message lists often carry the prompt inside them.
OPTIONAL_FIELDS = {"preference_messages": ("prompt",)}
# Each row's index in the split it was read from, carried through the shuffled cuts so that a bad row is named by
# the file's line (or the source's row), not by its place in a shuffled split. Removed before load_data returns.
ROW = "__align_row__"
# Column names that usually hold a format's field: the `columns:` hint when a field is missing from the source.
FIELD_SYNONYMS: dict[str, tuple[str, ...]] = {
    "prompt": ("question", "instruction", "input", "query"),
    "completion": ("answer", "response", "output", "target"),
    "chosen": ("accepted", "preferred", "better"),
    "rejected": ("worse", "dispreferred"),
    "text": ("content", "body", "document"),
    "messages": ("conversations", "conversation", "dialogue"),
}
# Below this many held-out rows an eval metric is coarse: 2 pairs give a pref_accuracy of 0, 0.5 or 1.
MIN_EVAL_ROWS = 20


# --------------------------------------------------------------------------------------------------
# Cards


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


def resolve_files(spec: DataSpec, base_dir: Path) -> dict[str, list[Path]]:
    """Local source files by split; a relative path is looked for in the recipe's folder, then the working directory
    (`search_paths`, the same rule as a local `model:`).

    Raises:
        BadInput: a file is missing (naming every place looked in) or of a type align cannot read.
    """
    files = spec.source.files
    by_split = {"train": files} if isinstance(files, list) else dict(files or {})
    for split in by_split:
        if split not in read_splits(spec):  # else its files would load and nothing would read them
            raise BadInput(
                f"source.files.{split}: no split of that name is read (train, validation, test)",
                hint=f"name it validation or test, or map it: splits: {{validation: {split}}}",
            )
    out: dict[str, list[Path]] = {}
    for split, names in by_split.items():
        out[split] = []
        for name in names:
            places = search_paths(name, base_dir)
            path = next((p for p in places if p.is_file()), places[0])
            if not path.is_file():
                raise BadInput(f"{name}: no such data file (looked in {' and '.join(map(str, places))})")
            if path.suffix.lower() not in FILE_BUILDERS:
                raise BadInput(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(FILE_BUILDERS)})")
            out[split].append(path)
    return out


# --------------------------------------------------------------------------------------------------
# Loading


def read_splits(spec: DataSpec) -> set[str]:
    """The splits of a local source that are read: train, validation and test by those names, and any `splits:`
    names instead."""
    return {"train", "validation", "test", *filter(None, spec.splits.model_dump().values())}


def split_name(spec: DataSpec, role: str, loaded: Iterable[str] = ()) -> str | None:
    """The source split that plays `role` (validation, test): the one `splits:` names, else the local source's own
    split of that name (`files: {train: [...], validation: [...]}`, or a saved DatasetDict's splits, `loaded`, need
    no `splits:`); None: none (validation: cut from train). A hub set's splits are used only where named."""
    named = getattr(spec.splits, role)
    if named is not None:
        return named
    source = spec.source
    if source is None:
        return None
    if isinstance(source.files, dict) and role in source.files:
        return role
    return role if source.disk is not None and role in loaded else None


def load_data(
    spec: DataSpec, *, seed: int, base_dir: Path, where: str | None = None, prompts_only: bool = False
) -> DatasetDict:
    """Load a data set as `train` and `validation` splits whose columns are the format's fields.

    The validation split is the source's own where the card names one; otherwise a seeded
    `valid_fraction` cut from train, so the same seed always holds out the same rows. `where` (the recipe
    path, `stages.sft.data`) starts every problem and warning.

    `prompts_only` (an eval stage): one split, `test`, with the prompts to answer: the card's `test` split (held
    out from every stage), else its `validation` split, else all of `train` (a file of prompts).

    Raises:
        BadInput: unreachable or unknown source, unreadable or empty file, missing column, bad row.
    """
    if spec.mix is not None:
        return _load_mix(spec, seed, base_dir, where or "data")
    try:
        if prompts_only:
            return _load_prompts(spec, base_dir, where)
        return _load_data(spec, seed, base_dir, where)
    except BadInput as exc:
        if where is None:
            raise
        raise BadInput([f"{where}: {p}" for p in exc.problems], hint=exc.hint) from None


def _load_source(spec: DataSpec, base_dir: Path) -> tuple[dict[str, Dataset], dict[str, RowOrigin]]:
    """Every split of the source as it is, and where each row of a file came from (for error messages)."""
    source = spec.source
    label = _source_label(spec)
    origins: dict[str, RowOrigin] = {}
    if source.builtin is not None:
        splits = _load_builtin(source.builtin)
    elif source.files is not None:
        splits = {}
        for split, paths in resolve_files(spec, base_dir).items():
            splits[split], counts = _load_files(paths)
            origins[split] = RowOrigin(label, list(zip(paths, counts, strict=True)))
    elif source.disk is not None:
        splits = _load_disk(disk_folder(spec, base_dir))
        unread = [name for name in splits if name not in read_splits(spec)]
        if unread:  # else its rows would be left out in silence (a `valid` split: 5% cut from train instead)
            raise BadInput(
                f"source.disk: the saved data set's split {', '.join(map(repr, unread))} is not read "
                f"(splits: {', '.join(splits)}; read: train, validation, test)",
                hint=f"map it: splits: {{validation: {unread[0]}}}",
            )
    else:
        splits = _load_hub(spec)
    return splits, origins


def _load_prompts(spec: DataSpec, base_dir: Path, where: str | None) -> DatasetDict:
    """An eval stage's prompts: one split, `test` (see `load_data`)."""
    from datasets import DatasetDict

    label = _source_label(spec)
    splits, origins = _load_source(spec, base_dir)
    name = split_name(spec, "test", splits) or split_name(spec, "validation", splits) or spec.splits.train
    if name not in splits:
        raise BadInput(f"{label}: no split '{name}' (splits: {', '.join(splits)})")
    origin = origins.get(name) or RowOrigin(f"{label} (split {name})")
    # Every column is kept: the judges read them whatever the format (a messages row's `answer`).
    rows = _usable_rows(map_columns(_numbered(splits[name]), spec, label, keep_others=True), spec, label, origin, name)
    logger.info("data %s: %d prompts to evaluate (the plan's test split: the source's split '%s')",
                spec.name or label, len(rows), name)  # fmt: skip
    return DatasetDict(test=rows)


def _usable_rows(rows: Dataset, spec: DataSpec, label: str, origin: RowOrigin, split: str) -> Dataset:
    """A split's rows in the format's fields, checked (bad rows named, empty ones dropped and counted), preference
    prompts made explicit, the row numbers used for messages removed.

    Raises:
        BadInput: a bad row, or no usable row left.
    """
    names = column_labels(spec)
    rows = clean_rows(rows, spec.format, label, origin=origin, names=names)
    if spec.format.startswith("preference"):
        rows = explicit_prompts(rows, spec.format, label, origin=origin, names=names)
    if len(rows) == 0:
        raise BadInput(f"{label}: the {split} split has no usable rows")
    return rows.remove_columns(ROW)


def _load_data(spec: DataSpec, seed: int, base_dir: Path, where: str | None) -> DatasetDict:
    from datasets import DatasetDict

    label = _source_label(spec)
    splits, origins = _load_source(spec, base_dir)

    train_name, valid_name = spec.splits.train, split_name(spec, "validation", splits)
    for name in (train_name, valid_name):
        if name is not None and name not in splits:
            raise BadInput(f"{label}: no split '{name}' (splits: {', '.join(splits)})")
    train = _numbered(splits[train_name])
    if valid_name is None:
        try:
            cut = train.train_test_split(test_size=spec.valid_fraction, seed=seed, shuffle=True)
        except ValueError:  # a split that would leave train empty
            raise BadInput(
                f"{label}: {len(train)} rows are too few to hold out valid_fraction {spec.valid_fraction} and train "
                "on the rest",
                hint="add rows, or give the source a validation split (files: {train: [...], validation: [...]}, "
                "or a saved DatasetDict with one)",
            ) from None
        train, valid = cut["train"], cut["test"]
        valid_origin = origins.get(train_name) or RowOrigin(f"{label} (split {train_name})")
    else:
        if "valid_fraction" in spec.model_fields_set:  # set, and nothing would say it changed nothing
            logger.warning("%s: valid_fraction %s is not used: the source has a validation split ('%s'), which is the "
                           "held-out set", label, spec.valid_fraction, valid_name)  # fmt: skip
        valid = _numbered(splits[valid_name])
        valid_origin = origins.get(valid_name) or RowOrigin(f"{label} (split {valid_name})")
    train_origin = origins.get(train_name) or RowOrigin(f"{label} (split {train_name})")
    if spec.max_train_rows is not None and len(train) > spec.max_train_rows:
        train = train.shuffle(seed=seed).select(range(spec.max_train_rows))
    if spec.max_eval_rows is not None and len(valid) > spec.max_eval_rows:
        valid = valid.shuffle(seed=seed).select(range(spec.max_eval_rows))

    data = DatasetDict(
        train=_usable_rows(map_columns(train, spec, label), spec, label, train_origin, "train"),
        validation=_usable_rows(map_columns(valid, spec, label), spec, label, valid_origin, "validation"),
    )
    warn_unseparated(data, where or label)
    warn_small_validation(spec, len(data["validation"]), len(splits[train_name]), where or label, valid_name)
    logger.info(
        "data %s: %d train rows, %d validation rows", spec.name or label, len(data["train"]), len(data["validation"])
    )
    return data


class MixedData(dict):
    """A mix's `train` and `validation` splits (a `DatasetDict`'s two keys), with what was taken from each source.

    `mix`: per source, in the recipe's order, {name, weight, share, available, taken, repeated, rows_sha256}, as
    summary.json's `data.mix` records it. `validation_sources`: each source's name and its count of validation
    rows, in the order the validation split holds them (one source after another).
    """

    def __init__(self, train: Dataset, validation: Dataset, mix: list[dict[str, Any]],
                 validation_sources: list[tuple[str, int]], train_by_source: dict[str, Dataset]) -> None:  # fmt: skip
        super().__init__(train=train, validation=validation)
        self.mix = mix
        self.validation_sources = validation_sources
        self.train_by_source = train_by_source  # the rows taken from each source, before the mix was shuffled

    def describe(self, tokenizer: Any = None) -> list[str]:
        """The mix as `--dry-run` shows it: per source, the train rows taken of those it has, its share of the
        rows and, with a tokenizer, of the tokens (a source of long rows weighs more in the loss than its rows
        say), and its validation rows."""
        tokens = {}
        if tokenizer is not None:
            for name, rows in self.train_by_source.items():
                ids = tokenizer(training_texts(rows), add_special_tokens=False, verbose=False)["input_ids"]
                tokens[name] = sum(map(len, ids))
        total = sum(tokens.values())
        lines = []
        for m in self.mix:
            line = f"{m['name']}: {m['taken']} of {m['available']} train rows ({m['share']:.1%} of rows"
            line += f", {tokens[m['name']] / total:.1%} of tokens)" if total else ")"
            line += f", weight {m['weight']:g}, {m['validation']} validation rows"
            if m["repeated"]:
                line += f"; REPEATED {m['taken'] / m['available']:.1f} times"
            lines.append(line)
        return lines

    def validation_by_source(self) -> dict[str, Dataset]:
        """Each source's own validation rows."""
        out, start = {}, 0
        for name, count in self.validation_sources:
            out[name] = self["validation"].select(range(start, start + count))
            start += count
        return out


def mix_counts(available: list[int], weights: list[float], rows: int | None) -> list[int]:
    """The rows to take from each source: shares of `rows` by weight (largest remainder, so they sum to `rows`).
    Without `rows`, the largest total whose shares repeat no source's row."""
    import math

    shares = [w / sum(weights) for w in weights]
    if rows is None:
        rows = min(math.floor(n / s + 1e-9) for n, s in zip(available, shares, strict=True))
    exact = [rows * s for s in shares]
    counts = [math.floor(x + 1e-9) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: rows - sum(counts)]:
        counts[i] += 1
    return counts


def _load_mix(spec: DataSpec, seed: int, base_dir: Path, where: str) -> MixedData:
    """A mix's splits (see `DataRef`): each source loaded as on its own, its train rows shuffled with `seed` and its
    share taken; the train split shuffled again with `seed`; the validation split every source's own, in order.

    Raises:
        BadInput: a source's problems (at `where.mix.<i>`), a `mix_rows` that would repeat a source more than
            MAX_REPEATS times, or sources whose rows do not share their columns' types.
    """
    import math

    from datasets import concatenate_datasets

    from align.cache import dataset_fingerprint
    from align.recipe import MAX_REPEATS

    found, loaded = Problems(), []
    for i, source in enumerate(spec.mix):
        try:
            loaded.append(load_data(source, seed=seed, base_dir=base_dir, where=f"{where}.mix.{i}"))
        except BadInput as exc:
            found.absorb(exc)
    found.raise_if_any()
    available = [len(d["train"]) for d in loaded]
    counts = mix_counts(available, [s.weight for s in spec.mix], spec.mix_rows)
    for source, n, count in zip(spec.mix, available, counts, strict=True):
        if math.ceil(count / n) > MAX_REPEATS:
            raise BadInput(
                f"{where}.mix_rows: {spec.mix_rows} rows would repeat {source.name}'s {n} train rows "
                f"{math.ceil(count / n)} times (at most {MAX_REPEATS})",
                hint=f"lower mix_rows, or {source.name}'s weight, or give it more rows",
            )
    parts, mix, by_source = [], [], {}
    for i, (source, data, count) in enumerate(zip(spec.mix, loaded, counts, strict=True)):
        rows = data["train"].shuffle(seed=seed)
        n = len(rows)
        taken = rows.select([j % n for j in range(count)]).flatten_indices()
        parts.append(taken)
        by_source[source.name] = taken
        mix.append({
            "name": source.name, "weight": source.weight, "share": round(count / max(1, sum(counts)), 6),
            "available": n, "taken": count, "repeated": count > n, "validation": len(data["validation"]),
            "rows_sha256": dataset_fingerprint(taken), "format": spec.mix[i].format,
        })  # fmt: skip
        if count > n:
            logger.warning("%s.mix.%d: %s is repeated to give %d rows from its %d (%.1f times)", where, i,
                           source.name, count, n, count / n)  # fmt: skip
    train = _concatenate(parts, spec, where, concatenate_datasets).shuffle(seed=seed).flatten_indices()
    validation = _concatenate([d["validation"] for d in loaded], spec, where, concatenate_datasets)
    logger.info("data %s: %d train rows (%s), %d validation rows", spec.name, len(train),
                ", ".join(f"{m['name']} {m['taken']} of {m['available']}" for m in mix), len(validation))  # fmt: skip
    return MixedData(train, validation, mix, [(m["name"], m["validation"]) for m in mix], by_source)


def _concatenate(parts: list[Dataset], spec: DataSpec, where: str, concatenate: Any) -> Dataset:
    """The sources' rows as one split; a column some sources lack (a prompt_only set's reward columns) is null in
    their rows. Raises BadInput naming the two sources whose rows differ in type."""
    columns = list(dict.fromkeys(c for ds in parts for c in ds.column_names))
    features = {}
    for ds in parts:
        for c in ds.column_names:
            features.setdefault(c, ds.features[c])
    filled = []
    for ds in parts:
        for c in columns:
            if c not in ds.column_names:
                ds = ds.add_column(c, [None] * len(ds), feature=features[c])
        filled.append(ds.select_columns(columns))
    first = filled[0].features
    for i, ds in enumerate(filled[1:], start=1):
        try:  # a CSV's large_string against a JSON file's string: the same values
            filled[i] = ds.cast(first) if ds.features != first else ds
        except (ValueError, TypeError, NotImplementedError, ArithmeticError) as exc:
            column = next((c for c in columns if ds.features[c] != first[c]), columns[0])
            raise BadInput(
                f"{where}.mix.{i}: its {column!r} holds {_kind_of(ds.features[column])}, {spec.mix[0].name}'s "
                f"({where}.mix.0) {_kind_of(first[column])}",
                hint="give every source of a mix the same shape of rows (all strings, or all message lists)",
            ) from exc
    return concatenate(filled)


def _kind_of(feature: Any) -> str:
    from datasets import Value

    return f"{feature.dtype} values" if isinstance(feature, Value) else "message lists"


def _numbered(ds: Dataset) -> Dataset:
    import numpy as np

    return ds.add_column(ROW, np.arange(len(ds), dtype=np.int64))


@dataclass
class RowOrigin:
    """Where a split's rows were read from, so a row is named where the user can find it: a file's line."""

    label: str  # the source, for rows not read from files: `hub dataset x (split train)`
    # Each file and how many rows it gave, in the order they were read.
    files: list[tuple[Path, int]] = dataclasses.field(default_factory=list)

    def locate(self, index: int) -> str:
        """`qa.csv: line 21` for the row at `index` of the split as read (before any shuffle)."""
        for path, count in self.files:
            if index < count:
                return f"{path}: {file_position(path, index)}"
            index -= count
        return f"{self.label}: row {index}"


def file_position(path: Path, index: int) -> str:
    """Where the `index`-th row (0-based) that `datasets` read from a file is in it: its line, where it has lines."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return f"row {index}"
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".txt":
        return f"line {index + 1}"
    if suffix == ".csv":
        starts = _csv_record_lines(text)
    elif suffix == ".json" and text.lstrip().startswith("["):
        starts = _json_array_lines(text)
    else:  # JSON Lines: datasets skips blank lines
        starts = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return f"line {starts[index]}" if index < len(starts) else f"row {index}"


def _csv_record_lines(text: str) -> list[int]:
    """The line each data record starts on (a quoted cell may span lines; blank lines are skipped, as pandas does)."""
    reader = csv.reader(text.splitlines(keepends=True))
    starts = []
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except (StopIteration, csv.Error):
            break
        if record and not (len(record) == 1 and not record[0].strip()):
            starts.append(start)
    return starts[1:]  # the first record is the header


_BETWEEN_ITEMS = re.compile(r"[\s,]*")


def _json_array_lines(text: str) -> list[int]:
    """The line each element of a top-level JSON array starts on."""
    decoder, starts = json.JSONDecoder(), []
    position = text.index("[") + 1
    try:
        while True:
            position = _BETWEEN_ITEMS.match(text, position).end()
            if position >= len(text) or text[position] == "]":
                return starts
            starts.append(text.count("\n", 0, position) + 1)
            _, position = decoder.raw_decode(text, position)
    except json.JSONDecodeError:
        return starts


def warn_small_validation(spec: DataSpec, n_valid: int, n_source: int, where: str, split: str | None) -> None:
    """A warning when the held-out split is too small for its metrics to mean much, with the setting to change.
    `split`: the source's split it is (None: cut from train)."""
    if n_valid >= MIN_EVAL_ROWS:
        return
    if spec.max_eval_rows is not None and spec.max_eval_rows < MIN_EVAL_ROWS:
        origin, fix = f"max_eval_rows: {spec.max_eval_rows}", "raise max_eval_rows"
    elif split is None:
        origin = f"valid_fraction {spec.valid_fraction} of {n_source} rows"
        fix = (
            f"raise valid_fraction (>= {MIN_EVAL_ROWS / max(1, n_source):.2g} gives {MIN_EVAL_ROWS} rows), or give "
            "the source a validation split (files: {train: [...], validation: [...]}, or a saved DatasetDict with one)"
        )
    else:
        origin, fix = f"the source's split '{split}'", "give the validation split more rows"
    logger.warning(
        "%s: the validation split has only %d rows (%s): eval loss and accuracies measured on it are coarse (an "
        "accuracy moves in steps of %.2g); %s",
        where, n_valid, origin, 1 / max(1, n_valid), fix,
    )  # fmt: skip


def warn_unseparated(data: DatasetDict, where: str) -> None:
    """A warning when string prompts and answers would run together.

    TRL joins a string prompt and its completion (or chosen / rejected answer) with nothing between them, and align
    keeps that convention; a prompt that does not end in whitespace before an answer that does not start with any
    trains on 'refer to?The instance'. Counted over both splits.
    """
    answers = [f for f in ("completion", "chosen", "rejected") if f in data["train"].column_names]
    if "prompt" not in data["train"].column_names or not answers:
        return
    joined, total, example = 0, 0, None
    for ds in data.values():
        columns = [ds["prompt"]] + [ds[f] for f in answers]
        for prompt, *outs in zip(*columns, strict=True):
            if not isinstance(prompt, str) or not prompt:
                continue
            total += 1
            bad = [o for o in outs if isinstance(o, str) and o and not prompt[-1].isspace() and not o[0].isspace()]
            if bad:
                joined += 1
                example = example or prompt[-30:] + bad[0][:30]
    if joined:
        answer = "completion" if answers == ["completion"] else "chosen or rejected answer"
        logger.warning(
            "%s: in %d of %d rows the prompt does not end in whitespace and the %s does not start with any; they are "
            "joined as they are (TRL's convention), so the model trains on %r: end the prompts with a space or a "
            "newline, or start the answers with one",
            where, joined, total, answer, example,
        )  # fmt: skip


def first_unique(values: list[Any], n: int) -> list[Any]:
    """The first `n` distinct values, in order (prompts may be strings or message lists, which do not hash)."""
    seen: dict[str, Any] = {}
    for value in values:
        if len(seen) >= n:
            break
        seen.setdefault(json.dumps(value, sort_keys=True, default=str), value)
    return list(seen.values())


def data_label(spec: DataSpec) -> str:
    """How the plan and the log name a stage's data: its card, else its source (a mix: its sources' names)."""
    if spec.name:
        return spec.name
    if spec.source is None:
        return "a mix of " + ", ".join(data_label(m) for m in spec.mix or [])
    return _source_label(spec)


def _source_label(spec: DataSpec) -> str:
    s = spec.source
    if s.hub:
        return f"hub dataset {s.hub}" + (f" ({s.config})" if s.config else "")
    if s.builtin:
        return f"builtin data set {s.builtin}"
    if s.disk:
        return f"saved data set {s.disk}"
    files = s.files if isinstance(s.files, list) else [f for fs in (s.files or {}).values() for f in fs]
    return ", ".join(files)


def _load_builtin(name: str) -> dict[str, Dataset]:
    from datasets import Dataset

    from align.builtin import BUILTINS, load_builtin

    if name not in BUILTINS:
        guess = closest(name, BUILTINS)
        raise BadInput(
            f"source.builtin: no builtin data set '{name}'" + (f" (did you mean '{guess}'?)" if guess else "")
        )
    return {split: Dataset.from_dict(rows) for split, rows in load_builtin(name).items()}


def disk_folder(spec: DataSpec, base_dir: Path) -> Path:
    """The folder of a `source: {disk: ...}`, found as a data file is (`search_paths`).

    Raises:
        BadInput: no such folder, or one that `save_to_disk` did not write.
    """
    places = search_paths(spec.source.disk, base_dir)
    folder = next((p for p in places if p.is_dir()), places[0])
    if not folder.is_dir():
        raise BadInput(f"source.disk: {spec.source.disk}: no such folder (looked in {' and '.join(map(str, places))})")
    if not ((folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()):
        raise BadInput(
            f"source.disk: {folder} holds no data set saved by datasets' save_to_disk (no state.json or "
            "dataset_dict.json)",
            hint="save it with Dataset.save_to_disk / DatasetDict.save_to_disk, or give files: source: {files: [...]}",
        )
    return folder


def _load_disk(folder: Path) -> dict[str, Dataset]:
    """A folder `save_to_disk` wrote: a DatasetDict's splits, or a lone Dataset as `train`."""
    from datasets import Dataset, load_from_disk

    loaded = load_from_disk(str(folder))
    return {"train": loaded} if isinstance(loaded, Dataset) else dict(loaded)


def _load_hub(spec: DataSpec) -> dict[str, Dataset]:
    from datasets import load_dataset

    from align.runtime import hub_offline

    label = _source_label(spec)
    try:
        loaded = load_dataset(spec.source.hub, spec.source.config, revision=spec.source.revision)
    except Exception as exc:  # datasets raises many types here; all mean "could not get it"
        offline = hub_offline()
        reason = "the hub is not reachable (offline mode)" if offline else str(exc).splitlines()[0][:200]
        raise BadInput(
            f"{label}: cannot load: {reason}",
            hint="on a connected machine, datasets.load_dataset(...).save_to_disk(FOLDER), copy FOLDER here and "
            "use source: {disk: FOLDER}; or local files: source: {files: [...]}",
        ) from None
    return dict(loaded)


def _load_files(paths: list[Path]) -> tuple[Dataset, list[int]]:
    """The files' rows as one data set, and how many rows each file gave."""
    from datasets import concatenate_datasets, load_dataset

    from align.patches import skip_download_counts

    skip_download_counts()  # align/patches.py: no S3 ping (3 s on a firewalled machine) for a local file
    parts = []
    for path in paths:
        if path.stat().st_size == 0 or not path.read_bytes()[:4096].strip():
            raise BadInput(f"{path}: empty file")
        builder = FILE_BUILDERS[path.suffix.lower()]
        if builder == "csv" and path.stat().st_size < 1 << 16:  # a file past 64 KiB holds more than a header
            lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if len(lines) <= 1:  # datasets says only 'Instruction "train" corresponds to no data!'
                raise BadInput(f"{path}: a header line and no rows")
        # datasets logs its own ERROR for a broken file; ours names the line, so theirs is held back.
        quiet = logging.getLogger("datasets.packaged_modules")
        level, quiet.level = quiet.level, logging.CRITICAL
        try:
            ds = load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:
            raise BadInput(diagnose_file(path, exc)) from None
        finally:
            quiet.setLevel(level)
        if len(ds) == 0:
            raise BadInput(f"{path}: no rows")
        parts.append(ds)
    try:
        return (parts[0] if len(parts) == 1 else concatenate_datasets(parts)), [len(part) for part in parts]
    except Exception as exc:
        raise BadInput(f"{', '.join(map(str, paths))}: files have different columns: {exc}") from None


def diagnose_file(path: Path, exc: Exception) -> str:
    """A one-line account of why a file would not load, naming the line where that can be found."""
    if path.suffix.lower() in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
            try:
                json.loads(text)
            except json.JSONDecodeError as err:
                return f"{path}: line {err.lineno}: broken JSON: {err.msg}"
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                looks_csv = number == 1 and not line.lstrip().startswith(("{", "[")) and ("," in line or "\t" in line)
                csv_note = (
                    "; it looks like CSV (a header of comma-separated names): name the file .csv" if looks_csv else ""
                )
                return f"{path}: line {number}: broken JSON: {err.msg}{csv_note}"
            if not isinstance(row, dict):
                return f"{path}: line {number}: each line must be a JSON object, got {type(row).__name__}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{path}: cannot read: {first[:200]}"


def map_columns(ds: Dataset, spec: DataSpec, label: str, keep_others: bool = False) -> Dataset:
    """Rename the source's columns to the format's fields and drop the rest, or keep the rest where functions read
    them: `prompt_only` rows (the rewards') and, in any format, `keep_others` (an eval's judges').

    A field mapped to a list of columns (Alpaca's `[instruction, input]`) joins their non-empty values.

    Raises:
        BadInput: needed columns are missing: all of them, in one problem that lists the columns there are, with
            a `columns:` hint where the source's columns suggest one for every missing field.
    """
    fields = FORMAT_FIELDS[spec.format]
    optional = OPTIONAL_FIELDS.get(spec.format, ())
    sources: dict[str, list[str]] = {}
    missing: dict[str, list[str]] = {}
    for name in fields:
        mapped = spec.columns.get(name, name)
        columns = [mapped] if isinstance(mapped, str) else list(mapped)
        absent = [c for c in columns if c not in ds.column_names]
        if absent and not (name in optional and name not in spec.columns):
            missing[name] = absent
        elif not absent:
            sources[name] = columns
    if missing:
        names = [f"'{c}'" + (f" (for {name})" if c != name else "") for name, cs in missing.items() for c in cs]
        available = [c for c in ds.column_names if c != ROW]
        raise BadInput(
            f"{label}: column{'s' if len(names) > 1 else ''} {', '.join(names)} missing "
            f"(columns: {', '.join(available)})",
            hint=columns_hint(spec, missing, sources, available),
        )
    joined = {f: c for f, c in sources.items() if len(c) > 1}
    if joined:

        def join(row: dict[str, Any]) -> dict[str, Any]:
            return {f: "\n\n".join(str(row[c]) for c in cols if row[c]) for f, cols in joined.items()}

        ds = ds.map(join, desc="join columns")
    renames = {cols[0]: field for field, cols in sources.items() if field not in joined}
    if keep_others or spec.format in KEEPS_COLUMNS:  # functions read the other columns (an `answer`, a `topic`)
        taken = set(renames) | {c for cols in joined.values() for c in cols}
        clash = [c for c in ds.column_names if c not in taken and c in renames.values()]
        ds = ds.remove_columns(clash)  # a column named like a field the mapping fills from another column
        return ds.rename_columns({k: v for k, v in renames.items() if k != v})
    ds = ds.select_columns(list(renames) + list(joined) + ([ROW] if ROW in ds.column_names else []))
    return ds.rename_columns({k: v for k, v in renames.items() if k != v})


def columns_hint(
    spec: DataSpec, missing: dict[str, list[str]], found: dict[str, list[str]], available: list[str]
) -> str | None:
    """`columns: {prompt: question, completion: answer}` when the source has a likely column for every missing one.

    A likely column is the closest spelling of a column the recipe names, else a usual name for the field
    (`FIELD_SYNONYMS`), else the closest spelling of the field; each column serves one field only.
    """
    free = [c for c in available if not any(c in cs for cs in found.values())]
    lower = {c.lower(): c for c in free}
    mapping = {name: cs[0] if len(cs) == 1 else cs for name, cs in found.items()}
    for name, absent in missing.items():
        mapped = spec.columns.get(name, name)
        chosen = [c for c in ([mapped] if isinstance(mapped, str) else mapped) if c not in absent]
        for column in absent:
            guesses = difflib.get_close_matches(column, free, n=1, cutoff=0.6) if column != name else []
            guesses += [lower[s] for s in FIELD_SYNONYMS.get(name, ()) if s in lower]
            guesses += difflib.get_close_matches(name, free, n=1, cutoff=0.6)
            guess = next((g for g in guesses if g in free), None)
            if guess is None:
                return None
            free.remove(guess)
            chosen.append(guess)
        mapping[name] = chosen[0] if len(chosen) == 1 else chosen
    shown = {name: mapping[name] for name in FORMAT_FIELDS[spec.format] if mapping.get(name, name) != name}
    return "columns: {" + ", ".join(f"{name}: {_yaml_flow(value)}" for name, value in shown.items()) + "}"


def _yaml_flow(value: str | list[str]) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(_yaml_flow, value)) + "]"
    return value if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", value) else json.dumps(value)


def column_labels(spec: DataSpec) -> dict[str, str]:
    """Each field as the user's data names it: `column 'answer' (completion)`, or `column 'text'` when unmapped."""
    labels = {}
    for name in FORMAT_FIELDS[spec.format]:
        mapped = spec.columns.get(name, name)
        if isinstance(mapped, str):
            labels[name] = f"column '{mapped}'" + (f" ({name})" if mapped != name else "")
        else:
            labels[name] = "columns " + " + ".join(f"'{c}'" for c in mapped) + f" ({name})"
    return labels


ROLES = ("system", "user", "assistant", "tool")


def _messages_problem(messages: list[Any], column: str, need_assistant: bool) -> str | None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"{column}: message {i} must be a mapping with 'role' and 'content'"
        if message["role"] not in ROLES:
            return f"{column}: message {i} has unknown role {message['role']!r} (roles: {', '.join(ROLES)})"
        if not isinstance(message["content"], str):
            return f"{column}: message {i} content must be a string, got {type(message['content']).__name__}"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return f"{column}: no assistant turn to learn from"
    return None


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | list) and not (value.strip() if isinstance(value, str) else value))


def _row_problem(fmt: str, row: dict[str, Any], names: dict[str, str] | None = None) -> tuple[str | None, str | None]:
    """(error, None) for a row that cannot be used, (None, reason) for one to drop, (None, None) for a good one.

    `names` says how the user's data names each field (`column_labels`); by default, by the field's name.
    """
    for field in FORMAT_FIELDS[fmt]:
        if field not in row:
            continue  # an optional field the source does not have
        value = row[field]
        column = (names or {}).get(field, f"column '{field}'")
        if field == "label":  # unpaired_preference: a desirable answer or not
            if not isinstance(value, bool):
                return f"{column} must be true or false (true: a desirable answer), got {value!r}", None
            continue
        if value is None and fmt != "text" and field in row:
            return f"{column} is missing or null", None
        if isinstance(value, list) and fmt != "text":
            error = _messages_problem(value, column, need_assistant=field != "prompt")
            if error:
                return error, None
        elif value is not None and not isinstance(value, str):
            kind = "a string" if fmt == "text" else "a string or a list of messages"
            return f"{column} must be {kind}, got {type(value).__name__}", None
        if field != "prompt" and _is_empty(value):
            return None, f"empty {field}"
    if fmt.startswith("preference") and row["chosen"] == row["rejected"]:
        return None, "chosen equals rejected"
    return None, None


# Where an implicit string prompt ends: after the last turn marker the two transcripts share (HH-RLHF style).
TURN_MARKERS = ("\n\nAssistant:", "\nAssistant:", "Assistant:")


def split_implicit(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from two transcripts that share their beginning.

    Message lists split at the first differing turn (TRL's `extract_prompt`). Strings split after the last
    turn marker of their common prefix, else at its last whitespace, so a shared first word of the two
    answers ("I think" / "I don't") stays in the answers instead of moving into the prompt.
    """
    if isinstance(chosen, list):
        from trl.data_utils import extract_prompt

        out = extract_prompt({"chosen": chosen, "rejected": rejected})
        return out["prompt"], out["chosen"], out["rejected"]
    common = os.path.commonprefix([chosen, rejected])
    cut = max((common.rfind(m) + len(m) for m in TURN_MARKERS if m in common), default=-1)
    if cut < 0:
        cut = max(common.rfind(" "), common.rfind("\n"))
    cut = max(cut, 0)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def explicit_prompts(
    ds: Dataset, fmt: str, label: str, origin: RowOrigin | None = None, names: dict[str, str] | None = None
) -> Dataset:
    """Every preference row as an explicit (prompt, chosen, rejected) triple, in one shape per data set.

    Implicit prompts are split out of the transcripts; a separate prompt column beside full message lists
    (UltraFeedback) is dropped in favour of the turns inside them; a string prompt beside assistant-only
    message lists becomes a user turn.

    Raises:
        BadInput: transcripts that share no prompt, or a row without any prompt, naming the row (see `clean_rows`).
    """
    names = {f: f"column '{f}'" for f in ("prompt", "chosen", "rejected")} | (names or {})
    prompts, chosen_out, rejected_out, rows = [], [], [], []
    for i, row in enumerate(ds):
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        inside = isinstance(chosen, list) and chosen and chosen[0]["role"] != "assistant"
        if fmt == "preference_implicit" or inside:
            prompt, chosen, rejected = split_implicit(chosen, rejected)
            if not prompt:
                raise BadInput(
                    f"{_row_place(row, i, label, origin)}: {names['chosen']} and {names['rejected']} share no prompt "
                    "at their start"
                )
        elif isinstance(chosen, list) and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if _is_empty(prompt):
            raise BadInput(f"{_row_place(row, i, label, origin)}: {names['prompt']} is empty")
        prompts.append(prompt)
        chosen_out.append(chosen)
        rejected_out.append(rejected)
        rows.append(row.get(ROW, i))
    from datasets import Dataset

    out = {"prompt": prompts, "chosen": chosen_out, "rejected": rejected_out}
    return Dataset.from_dict(out | ({ROW: rows} if ROW in ds.column_names else {}))


def _row_place(row: dict[str, Any], i: int, label: str, origin: RowOrigin | None) -> str:
    """`qa.csv: line 21` where the row's origin is known, else `label: row i` (its place in `ds`)."""
    if origin is not None and ROW in row:
        return origin.locate(row[ROW])
    return f"{label}: row {i}"


def clean_rows(
    ds: Dataset, fmt: str, label: str, origin: RowOrigin | None = None, names: dict[str, str] | None = None
) -> Dataset:
    """Check each row's shape for the format; drop rows that carry nothing to learn, saying how many.

    Raises:
        BadInput: a row of the wrong shape, naming the row and the column as the user's data has them: the file's
            line (from `origin` and the row's `ROW` index) and the column `names` maps the field to. Without them,
            the row's 0-based place in `ds` and the field.
    """
    keep, dropped = [], {}
    for i, row in enumerate(ds):
        error, reason = _row_problem(fmt, row, names)
        if error:
            raise BadInput(f"{_row_place(row, i, label, origin)}: {error}")
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            keep.append(i)
    if dropped:
        counts = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
        # Blank lines are normal in text corpora (WikiText is a third blank); anything else deserves a warning.
        log = logger.info if fmt == "text" else logger.warning
        log("%s: %d rows skipped (%s)", label, sum(dropped.values()), counts)
        ds = ds.select(keep)
    return ds


def training_texts(ds: Dataset) -> list[str]:
    """All the text of a split, whatever its format: what a from-scratch tokenizer is trained on."""
    texts = []
    for row in ds:
        for value in row.values():
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                texts += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return texts


# --------------------------------------------------------------------------------------------------
# Language-modelling blocks


def pack_text_blocks(ds: Dataset, tokenizer: Any, block_size: int) -> tuple[Dataset, dict[str, int]]:
    """Tokenize text rows, join them (eos between rows) and cut the stream into full `block_size` blocks.

    Every token in a block is real, so no compute goes to padding; only the tail of each 1,000-row
    batch that does not fill a block is dropped, and counted. Returns the blocks and token counts.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [row + eos for row in ids]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        stream = [token for row in batch["input_ids"] for token in row]
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    tokens = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenize")
    total = sum(len(row) for row in tokens["input_ids"])
    blocks = tokens.map(group, batched=True, batch_size=1000, remove_columns=tokens.column_names, desc="blocks")
    used = len(blocks) * block_size
    return blocks, {"tokens": total, "block_tokens": used, "dropped_tokens": total - used, "blocks": len(blocks)}
