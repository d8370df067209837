"""The tokenized-data cache: a stage's prepared (tokenized, masked, truncated, packed) data kept on disk.

A second run of the same data through the same tokenizer loads the prepared rows (memory-mapped Arrow files)
instead of tokenizing again. The key holds everything the preparation reads, so nothing stale is ever reused:

- the data's content (a hash of the Arrow rows handed to the preparation, after align's own conversions),
- the tokenizer (a hash of every file `save_pretrained` writes: vocabulary, merges, special tokens, chat
  template), the chat template the trainer renders with, `max_length` and the data format,
- every `args.<name>` and `self.<name>` that TRL's data preparation reads, found in its source at run time
  (so a TRL release that reads a new setting keys on it too), and the TRL, transformers, datasets and align
  versions.

Where: `$ALIGN_CACHE_DIR` (default `~/.cache/align`), folder `tokenized/<key>/`. `ALIGN_CACHE_DIR=off` turns
the cache off. Delete the folder to reclaim the space; a damaged entry is rebuilt. A cache that cannot be
written (read-only, disk full) costs a warning, never the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align import versions

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

CACHE_ENV = "ALIGN_CACHE_DIR"
PREPARED_BY = ("trl", "transformers", "datasets", "tokenizers")
_META = "align_cache.json"
# How a tokenizer was loaded (where from, which flags), not what it is: left out of its fingerprint.
_PATH_KEYS = {
    "name_or_path", "_name_or_path", "tokenizer_file", "local_files_only", "is_local", "cache_dir", "revision",
    "_commit_hash", "token", "trust_remote_code", "force_download", "proxies", "subfolder",
}  # fmt: skip


def cache_root() -> Path | None:
    """The cache folder; None when `ALIGN_CACHE_DIR=off`, or when the run spans several machines (the cache is
    a local folder: a rank on another machine would never find what the main process stored)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    world = os.environ.get("WORLD_SIZE", "1")
    if value.lower() in ("off", "0", "false", "none") or os.environ.get("LOCAL_WORLD_SIZE", world) != world:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "align"


# --------------------------------------------------------------------------------------------------
# What a key is made of


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer as it would be saved: every file, with the paths it was loaded from left out."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory(prefix="align-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            content = path.read_bytes()
            if path.suffix == ".json":
                content = json.dumps(_without_paths(json.loads(content)), sort_keys=True).encode()
            digest.update(path.name.encode() + b"\0" + content + b"\0")
    # Not every template reaches the saved files the same way across versions; the live one decides rendering.
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return digest.hexdigest()[:20]


def _without_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k not in _PATH_KEYS}
    return value


class _HashSink:
    """A write-only file that hashes what is written to it (Arrow's IPC writer streams into it)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return len(data)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def dataset_fingerprint(ds: Dataset) -> str:
    """A hash of a data set's rows and columns: the Arrow table (and row selection, if any) in IPC form."""
    import pyarrow as pa

    from align.patches import arrow_tables

    sink = _HashSink()
    for table in arrow_tables(ds):
        stream = pa.PythonFile(sink, mode="w")
        with pa.ipc.new_stream(stream, table.schema) as writer:
            writer.write_table(table)
    return sink.digest.hexdigest()[:20]


def _value(value: Any) -> Any:
    """A JSON-able stand-in for a setting: tokenizers by fingerprint, simple values as they are."""
    if hasattr(value, "save_pretrained") and hasattr(value, "convert_tokens_to_ids"):
        return tokenizer_fingerprint(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _value(v) for k, v in value.items()}
    return repr(value)  # an object with an address in its repr only ever misses, never hits stale


def make_key(parts: dict[str, Any]) -> str:
    # The libraries that prepare the rows: another release may prepare them differently.
    payload = json.dumps(parts | {"versions": versions(PREPARED_BY)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------------
# The store


def fetch(
    parts: dict[str, Any], build: Callable[[], tuple[Dataset, dict[str, Any]]], label: str
) -> tuple[Dataset, dict[str, Any]]:
    """Prepared data and its statistics for `parts`: loaded from the cache, or built, stored and loaded back
    (so the first and every later run train on the same memory-mapped rows; where storing fails, and on the
    other processes of a distributed run, the freshly built rows)."""
    from align.runtime import is_main_process

    root = cache_root()
    if root is None:
        return build()
    entry = root / "tokenized" / make_key(parts)
    # Every process must take the same path: TRL's preparation holds main-process-first barriers.
    loaded = _load(entry, label) if _everyone((entry / _META).is_file()) else None
    if _everyone(loaded is not None):
        return loaded  # type: ignore[return-value]
    start = time.perf_counter()
    ds, stats = build()
    elapsed = time.perf_counter() - start
    if is_main_process() and _store(entry, ds, {"parts": parts, "stats": stats, "label": label, "build_s": elapsed}):
        logger.info("%s: prepared %d rows in %.1f s; cached in %s", label, len(ds), elapsed, entry)
        stored = _load(entry, label, quiet=True)
        if stored is not None:
            return stored
    return ds, stats


def _everyone(flag: bool) -> bool:
    """True only where every process of a distributed run says True (a single process: its own answer)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    from accelerate.utils import gather_object

    return all(gather_object([flag]))


def _load(entry: Path, label: str, quiet: bool = False) -> tuple[Dataset, dict[str, Any]] | None:
    from datasets import load_from_disk

    meta_path = entry / _META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        ds = load_from_disk(str(entry))
    except Exception as exc:  # a damaged entry is rebuilt, not trusted
        logger.warning("%s: cached tokenized data at %s is unreadable (%s); preparing it again", label, entry, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    if not quiet:
        logger.info("%s: tokenized data from the cache (%d rows, %s)", label, len(ds), entry)
    return ds, meta.get("stats", {})


def _store(entry: Path, ds: Dataset, meta: dict[str, Any]) -> bool:
    """Write the entry into a temporary folder and rename it into place: readers never see half an entry."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        ds.save_to_disk(str(tmp))
        (tmp / _META).write_text(json.dumps(meta, indent=2, default=str))
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / _META).is_file():  # not another process that stored it first
                raise
        return True
    except OSError as exc:
        logger.warning("could not write the tokenized-data cache under %s (%s); continuing without it", entry, exc)
        return False
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# TRL trainers whose data preparation goes through the cache


def cached_trainer(trainer_cls: type, kind: str, data_format: str, contract: tuple[str, ...]) -> type:
    """`trainer_cls` with its data preparation (TRL's tokenize/mask/truncate/pack step) going through the cache;
    `contract`: the arguments of TRL's data-preparation method the kind was written against.

    TRL prepares in-memory data sets again on every run (datasets' own map cache needs file-backed data, and
    keys on a pickled tokenizer). Every process takes the same path (hit or miss), so TRL's main-process-first
    barriers inside the preparation stay matched. The hook into TRL's private method is align/patches.py's.
    """
    from align.patches import settings_read_by_preparation, wrap_preparation

    def around(
        prepare: Any, trainer: Any, dataset: Any, processing_class: Any, args: Any, extra: tuple, split: str
    ) -> Any:
        from datasets import Dataset

        usable = cache_root() is not None and isinstance(dataset, Dataset)
        if not usable or any(callable(x) for x in extra):  # no hashing at all when the cache is off
            return prepare()
        arg_names, self_names = settings_read_by_preparation(trainer_cls)
        parts = {
            "kind": kind,
            "format": data_format,
            "split": split,
            "data": dataset_fingerprint(dataset),
            "tokenizer": tokenizer_fingerprint(processing_class),
            "call": [_value(x) for x in extra],
            "args": {n: _value(getattr(args, n, None)) for n in arg_names},
            # `self._tokenizer` is the processing class for text models: hashed once, above.
            "trainer": {
                n: "processing_class"
                if getattr(trainer, n, None) is processing_class
                else _value(getattr(trainer, n, None))
                for n in self_names
            },
        }
        prepared, _ = fetch(parts, lambda: (prepare(), {}), f"{kind} {split}")
        return prepared

    return wrap_preparation(trainer_cls, around, contract)
