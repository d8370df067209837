"""A split's rows: where each was read from (a file's line), its columns mapped to the format's fields, its shape
checked (bad rows named, empty ones dropped), and preference prompts made explicit.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import BadInput
from align.recipe import FORMAT_FIELDS, KEEPS_COLUMNS, DataSpec

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)


# Fields a format may leave out: UltraFeedback-style message lists often carry the prompt inside them.
# A conversation's `tools` (their schemas) is there only for tool-call transcripts.
OPTIONAL_FIELDS = {"preference_messages": ("prompt",), "messages": ("tools",)}
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
        if field == "tools":  # a conversation's tool schemas: a list, or the JSON text of one (Arrow's way)
            if value is not None and not isinstance(value, str | list):
                return f"{column} must be a list of tool schemas or its JSON text, got {type(value).__name__}", None
            continue
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
