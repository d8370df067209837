"""A data source's splits as they are: local files, a folder `save_to_disk` wrote, a hub data set or a builtin one;
which of its splits are read, where its files and folder are, how the plan and the log name it, and why a file would
not load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from align.data_rows import RowOrigin
from align.errors import BadInput, closest
from align.recipe import DataSpec, search_paths

if TYPE_CHECKING:
    from datasets import Dataset


FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


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
