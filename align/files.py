"""Atomic writes: a crash or a full disk never leaves a half-written summary, pipeline or recipe file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from align.errors import StageFailed


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`.

    Raises:
        StageFailed: the directory is not writable or the disk is full; the message names the file.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            # mkstemp makes the file private (0600); the rest of the run directory follows the umask, so must this.
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise StageFailed(f"{path}: cannot write: {exc.strerror or exc}") from None


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only be read by setting it,
    which would race with files other threads create meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or unreadable (an interrupted earlier run)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
