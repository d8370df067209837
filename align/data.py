"""Loading a stage's data: `load_data` and the mixes it builds, the warnings about held-out and joined rows, and the
language-modelling blocks.

Every stage's data comes through `load_data`, which returns a `DatasetDict` with `train` and
`validation` splits whose columns are exactly the fields of the card's format.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.data_rows import ROW, RowOrigin, clean_rows, column_labels, explicit_prompts, map_columns, training_texts
from align.data_sources import _load_source, _source_label, split_name
from align.errors import BadInput, Problems
from align.recipe import DataSpec

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)


# Below this many held-out rows an eval metric is coarse: 2 pairs give a pref_accuracy of 0, 0.5 or 1.
MIN_EVAL_ROWS = 20


# --------------------------------------------------------------------------------------------------
# Loading


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


def warn_small_validation(spec: DataSpec, n_valid: int, n_source: int, where: str, split: str | None) -> None:
    """A warning when the held-out split is too small for its metrics to mean much, with the setting to change.
    `split`: the source's split it is (None: cut from train)."""
    if n_valid >= MIN_EVAL_ROWS:
        return
    say = logger.warning
    if spec.max_eval_rows is not None and spec.max_eval_rows < MIN_EVAL_ROWS:
        # The recipe asked for so few (a shipped recipe keeps its runs short): said, but no warning of its own choice.
        origin, fix, say = (
            f"max_eval_rows: {spec.max_eval_rows}, the recipe's choice",
            "raise max_eval_rows",
            logger.info,
        )
    elif split is None:
        origin = f"valid_fraction {spec.valid_fraction} of {n_source} rows"
        fix = (
            f"raise valid_fraction (>= {MIN_EVAL_ROWS / max(1, n_source):.2g} gives {MIN_EVAL_ROWS} rows), or give "
            "the source a validation split (files: {train: [...], validation: [...]}, or a saved DatasetDict with one)"
        )
    else:
        origin, fix = f"the source's split '{split}'", "give the validation split more rows"
    say(
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
