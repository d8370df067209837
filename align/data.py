"""Data cards, loading (hub / local files / builtin), column mapping, validation and splits.

Every stage's data comes through `load_data`, which returns a `DatasetDict` with `train` and
`validation` splits whose columns are exactly the fields of the card's format.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from align.errors import BadInput, closest
from align.recipe import FORMAT_FIELDS, KIND_FORMATS, DataRef, DataSpec, _format_error, _unknown_keys

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# Fields a format may leave out: UltraFeedback-style message lists often carry the prompt inside them.
OPTIONAL_FIELDS = {"preference_messages": ("prompt",)}


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


def resolve_data(ref: DataRef, base_dir: Path, where: str) -> DataSpec:
    """A stage's `data:` as a full spec: the card's fields with the stage's own fields on top.

    Raises:
        BadInput: unknown card, unknown keys in the card, or an incomplete inline spec.
    """
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
        raise BadInput([f"{label}: {_format_error(e, fields)}" for e in exc.errors()]) from None


def check_kind(spec: DataSpec, kind: str, where: str) -> list[str]:
    """A problem if the data's format cannot feed this kind of stage."""
    if spec.format not in KIND_FORMATS[kind]:
        return [f"{where}.format: '{spec.format}' cannot feed a {kind} stage (use {', '.join(KIND_FORMATS[kind])})"]
    return []


def resolve_files(spec: DataSpec, base_dir: Path) -> dict[str, list[Path]]:
    """Local source files by split; relative paths resolve against the recipe's directory, then the cwd.

    Raises:
        BadInput: a file is missing or of a type align cannot read.
    """
    files = spec.source.files
    by_split = {"train": files} if isinstance(files, list) else dict(files or {})
    out: dict[str, list[Path]] = {}
    for split, names in by_split.items():
        out[split] = []
        for name in names:
            path = Path(os.path.expanduser(name))
            if not path.is_absolute():
                path = base_dir / name if (base_dir / name).exists() or not Path(name).exists() else Path(name)
            if not path.is_file():
                raise BadInput(f"{path}: no such data file")
            if path.suffix.lower() not in FILE_BUILDERS:
                raise BadInput(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(FILE_BUILDERS)})")
            out[split].append(path)
    return out


# --------------------------------------------------------------------------------------------------
# Loading


def load_data(spec: DataSpec, *, seed: int, base_dir: Path) -> DatasetDict:
    """Load a data set as `train` and `validation` splits whose columns are the format's fields.

    The validation split is the source's own where the card names one; otherwise a seeded
    `valid_fraction` cut from train, so the same seed always holds out the same rows.

    Raises:
        BadInput: unreachable or unknown source, unreadable or empty file, missing column, bad row.
    """
    from datasets import DatasetDict

    source = spec.source
    if source.builtin is not None:
        splits = _load_builtin(source.builtin)
    elif source.files is not None:
        splits = {split: _load_files(paths) for split, paths in resolve_files(spec, base_dir).items()}
    else:
        splits = _load_hub(spec)

    train_name, valid_name = spec.splits.train, spec.splits.validation
    label = _source_label(spec)
    for name in (train_name, valid_name):
        if name is not None and name not in splits:
            raise BadInput(f"{label}: no split '{name}' (splits: {', '.join(splits)})")
    train = splits[train_name]
    if valid_name is None:
        cut = train.train_test_split(test_size=spec.valid_fraction, seed=seed, shuffle=True)
        train, valid = cut["train"], cut["test"]
    else:
        valid = splits[valid_name]
    if spec.max_train_rows is not None and len(train) > spec.max_train_rows:
        train = train.shuffle(seed=seed).select(range(spec.max_train_rows))
    if spec.max_eval_rows is not None and len(valid) > spec.max_eval_rows:
        valid = valid.shuffle(seed=seed).select(range(spec.max_eval_rows))

    data = DatasetDict(train=map_columns(train, spec, label), validation=map_columns(valid, spec, label))
    for split, ds in data.items():
        data[split] = clean_rows(ds, spec.format, f"{label} ({split})")
        if spec.format.startswith("preference"):
            data[split] = explicit_prompts(data[split], spec.format, f"{label} ({split})")
        if len(data[split]) == 0:
            raise BadInput(f"{label}: the {split} split has no usable rows")
    logger.info(
        "data %s: %d train rows, %d validation rows", spec.name or label, len(data["train"]), len(data["validation"])
    )
    return data


def _source_label(spec: DataSpec) -> str:
    s = spec.source
    if s.hub:
        return f"hub dataset {s.hub}" + (f" ({s.config})" if s.config else "")
    if s.builtin:
        return f"builtin data set {s.builtin}"
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
            hint="download it on a connected machine (datasets.load_dataset(...).save_to_disk or the hub cache), "
            "or point `data:` at local files with source: {files: [...]}",
        ) from None
    return dict(loaded)


def _load_files(paths: list[Path]) -> Dataset:
    from datasets import concatenate_datasets, config, load_dataset

    # datasets pings a download counter on S3 for every load, local files too (3 s timeout): on a firewalled
    # machine that is 3 s per file for nothing. Local files need no network at all.
    config.HF_UPDATE_DOWNLOAD_COUNTS = False
    parts = []
    for path in paths:
        if path.stat().st_size == 0 or not path.read_bytes()[:4096].strip():
            raise BadInput(f"{path}: empty file")
        builder = FILE_BUILDERS[path.suffix.lower()]
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
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
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
                return f"{path}: line {number}: broken JSON: {err.msg}"
            if not isinstance(row, dict):
                return f"{path}: line {number}: each line must be a JSON object, got {type(row).__name__}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{path}: cannot read: {first[:200]}"


def map_columns(ds: Dataset, spec: DataSpec, label: str) -> Dataset:
    """Rename the source's columns to the format's fields and drop the rest.

    A field mapped to a list of columns (Alpaca's `[instruction, input]`) joins their non-empty values.

    Raises:
        BadInput: a needed column is missing; the message lists the columns there are.
    """
    fields = FORMAT_FIELDS[spec.format]
    optional = OPTIONAL_FIELDS.get(spec.format, ())
    sources: dict[str, list[str]] = {}
    for field in fields:
        mapped = spec.columns.get(field, field)
        columns = [mapped] if isinstance(mapped, str) else list(mapped)
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            if field in optional and field not in spec.columns:
                continue
            hint = closest(missing[0], ds.column_names)
            suggestion = f"; map it with columns: {{{field}: {hint}}}" if hint else ""
            raise BadInput(
                f"{label}: column '{missing[0]}' missing (columns: {', '.join(ds.column_names)}){suggestion}",
            )
        sources[field] = columns
    joined = {f: c for f, c in sources.items() if len(c) > 1}
    if joined:

        def join(row: dict[str, Any]) -> dict[str, Any]:
            return {f: "\n\n".join(str(row[c]) for c in cols if row[c]) for f, cols in joined.items()}

        ds = ds.map(join, desc="join columns")
    renames = {cols[0]: field for field, cols in sources.items() if field not in joined}
    ds = ds.select_columns(list(renames) + list(joined))
    return ds.rename_columns({k: v for k, v in renames.items() if k != v})


ROLES = ("system", "user", "assistant", "tool")


def _messages_problem(messages: list[Any], field: str, need_assistant: bool) -> str | None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"column '{field}': message {i} must be a mapping with 'role' and 'content'"
        if message["role"] not in ROLES:
            return f"column '{field}': message {i} has unknown role {message['role']!r} (roles: {', '.join(ROLES)})"
        if not isinstance(message["content"], str):
            return f"column '{field}': message {i} content must be a string, got {type(message['content']).__name__}"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return f"column '{field}': no assistant turn to learn from"
    return None


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | list) and not (value.strip() if isinstance(value, str) else value))


def _row_problem(fmt: str, row: dict[str, Any]) -> tuple[str | None, str | None]:
    """(error, None) for a row that cannot be used, (None, reason) for one to drop, (None, None) for a good one."""
    for field in FORMAT_FIELDS[fmt]:
        if field not in row:
            continue  # an optional field the source does not have
        value = row[field]
        if value is None and fmt != "text" and field in row:
            return f"column '{field}' is missing or null", None
        if isinstance(value, list) and fmt != "text":
            error = _messages_problem(value, field, need_assistant=field != "prompt")
            if error:
                return error, None
        elif value is not None and not isinstance(value, str):
            kind = "a string" if fmt == "text" else "a string or a list of messages"
            return f"column '{field}' must be {kind}, got {type(value).__name__}", None
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


def explicit_prompts(ds: Dataset, fmt: str, label: str) -> Dataset:
    """Every preference row as an explicit (prompt, chosen, rejected) triple, in one shape per data set.

    Implicit prompts are split out of the transcripts; a separate prompt column beside full message lists
    (UltraFeedback) is dropped in favour of the turns inside them; a string prompt beside assistant-only
    message lists becomes a user turn.

    Raises:
        BadInput: transcripts that share no prompt, or a row without any prompt, naming the row.
    """
    prompts, chosen_out, rejected_out = [], [], []
    for i, row in enumerate(ds):
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        inside = isinstance(chosen, list) and chosen and chosen[0]["role"] != "assistant"
        if fmt == "preference_implicit" or inside:
            prompt, chosen, rejected = split_implicit(chosen, rejected)
            if not prompt:
                raise BadInput(f"{label}: row {i}: columns 'chosen' and 'rejected' share no prompt at their start")
        elif isinstance(chosen, list) and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if _is_empty(prompt):
            raise BadInput(f"{label}: row {i}: column 'prompt' is empty")
        prompts.append(prompt)
        chosen_out.append(chosen)
        rejected_out.append(rejected)
    from datasets import Dataset

    return Dataset.from_dict({"prompt": prompts, "chosen": chosen_out, "rejected": rejected_out})


def clean_rows(ds: Dataset, fmt: str, label: str) -> Dataset:
    """Check each row's shape for the format; drop rows that carry nothing to learn, saying how many.

    Raises:
        BadInput: a row of the wrong shape, naming the row (0-based, in the loaded split) and column.
    """
    keep, dropped = [], {}
    for i, row in enumerate(ds):
        error, reason = _row_problem(fmt, row)
        if error:
            raise BadInput(f"{label}: row {i}: {error}")
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
