"""The run directory's safety: one run at a time holds it, and align only ever deletes what it wrote there.

A run directory can sit beside a user's own files (`--output-dir ~/experiments/x`), and recipe values name
folders inside it. So every removal goes through `remove_inside`, which refuses anything that is not strictly
inside the run directory, and `--fresh` removes only the files and stage folders an earlier align run wrote.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from align.errors import BadInput, StageFailed
from align.files import read_json

logger = logging.getLogger(__name__)

LOCK_FILE = ".align.lock"
# Who holds the lock, for the message a second run prints. A separate file: the lock file itself belongs to
# filelock, which may truncate or remove it.
LOCK_INFO = ".align.lock.json"
# The files align writes at the top of a run directory (stage folders come from pipeline.json).
RUN_FILES = ("pipeline.json", "recipe.yaml", "align.log", "report.html")
RUN_DIRS = ("wandb", "trackio", "mlruns", "tensorboard")  # the trackers' local records (align/tracking.py)
OWN_FILES = (LOCK_FILE, LOCK_INFO)


def check_output_dir(run_dir: Path, recipe: Any, fresh: bool) -> None:
    """Refuse a directory that holds something other than this recipe's runs, before anything is written.

    Raises:
        BadInput: the directory holds another recipe's run (without `--fresh`), files align did not write, or a
            folder named like one of the recipe's stages that align did not make.
    """
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise BadInput(f"{run_dir}: output directory is a file", hint="choose another --output-dir")
    inside = inputs_inside(run_dir, recipe)
    if inside:
        # A run may clear (--fresh) or rewrite (a stage of the same name) what is in its directory: a model this
        # recipe reads from there could be gone before the stage that reads it starts.
        raise BadInput(
            [f"{where}: {path} is inside the output directory {run_dir}, which this run writes to and may clear"
             for where, path in inside],
            hint="choose another --output-dir for this recipe (its models stay where they are)",
        )  # fmt: skip
    pipeline = read_json(run_dir / "pipeline.json")
    if pipeline is None:
        if any(p.name not in OWN_FILES for p in run_dir.iterdir()):
            raise BadInput(
                f"{run_dir}: output directory is not empty and holds no align run",
                hint="choose another --output-dir (align never writes into, or clears, a folder it did not make)",
            )
        return
    if pipeline.get("name") != recipe.name and not fresh:
        raise BadInput(
            f"{run_dir}: holds the run of recipe '{pipeline.get('name')}', not '{recipe.name}'",
            hint="choose another --output-dir, or pass --fresh to replace it",
        )
    for stage in recipe.stages:
        folder = run_dir / stage.name
        if folder.is_dir() and not (folder / "summary.json").is_file() and any(folder.iterdir()):
            raise BadInput(
                f"{folder}: a folder align did not write is in the way of stage '{stage.name}'",
                hint="move it out of the run directory, or choose another --output-dir",
            )


def inputs_inside(run_dir: Path, recipe: Any) -> list[tuple[str, Path]]:
    """The local models the recipe reads (a stage's `model:`, an eval stage's `models:` and reward judges; not
    `@stage` references, which the run makes) that lie inside `run_dir`."""
    from align.recipe import search_paths, stage_ref

    root = run_dir.resolve()
    found = []
    for stage in recipe.stages:
        for key, ref in stage.model_refs().items():
            where = f"stages.{stage.name}.{key}"
            if not isinstance(ref, str) or stage_ref(ref) is not None:
                continue
            path = next((p for p in search_paths(ref, recipe.base_dir) if p.exists()), None)
            if path is not None and root in path.resolve().parents:
                found.append((where, path))
    return found


def remove_inside(run_dir: Path, target: Path) -> None:
    """Delete `target`, a file or folder align wrote, only if it lies strictly inside `run_dir`.

    Raises:
        StageFailed: the target resolves to the run directory itself or to anything outside it (a bug or a
            symlink; recipe names are checked so that this never happens).
    """
    root = run_dir.resolve()
    if target.is_symlink():
        target.unlink()  # the link goes, never what it points at
        return
    resolved = target.resolve()
    if resolved == root or root not in resolved.parents:
        raise StageFailed(f"{target}: refusing to delete: it is not inside the run directory {run_dir}")
    if resolved.is_dir():
        shutil.rmtree(resolved)
    elif resolved.exists():
        resolved.unlink()


def clear_for_fresh(run_dir: Path, stage_names: list[str], whole: bool = True) -> None:
    """`--fresh`: remove what earlier runs wrote (log, records, report, trackers' runs, stage folders), so nothing
    stale survives — the old `align.log`, or wandb runs that `wandb sync` would upload — and keep files the user put
    there. Not `whole` (`--fresh --only`): only the named stages' folders, the run's records kept for the others."""
    if not run_dir.is_dir():
        return
    old = read_json(run_dir / "pipeline.json") or {}
    names = set(stage_names)
    if whole:
        names |= {s.get("name") for s in old.get("stages", []) if isinstance(s, dict)}
    removed = []
    for name in sorted(n for n in names if isinstance(n, str)):
        folder = run_dir / name
        if folder.is_dir() and (folder / "summary.json").is_file():
            remove_inside(run_dir, folder)
            removed.append(name + "/")
    for name in (*RUN_FILES, *RUN_DIRS) if whole else ():
        if (run_dir / name).exists():
            remove_inside(run_dir, run_dir / name)
            removed.append(name)
    if removed:
        logger.debug("--fresh: removed %s from %s", ", ".join(removed), run_dir)


class RunLock:
    """An exclusive lock on a run directory for the whole run, taken by the main process only.

    It is an OS file lock (flock), so a process that dies, even by SIGKILL, releases it: the next run takes it
    over and says so.
    """

    def __init__(self, run_dir: Path):
        from filelock import FileLock

        self.run_dir = run_dir
        self._lock = FileLock(str(run_dir / LOCK_FILE), timeout=0, thread_local=False)

    def acquire(self) -> None:
        """Take the lock, or say who holds it.

        Raises:
            BadInput: another live process holds the run directory.
        """
        info_path = self.run_dir / LOCK_INFO
        previous = read_json(info_path)
        self.acquire_quietly()
        if previous and previous.get("pid") != os.getpid():
            logger.info(
                "%s: taking over the lock of process %s, which is no longer running",
                self.run_dir,
                previous.get("pid"),
            )
        info_path.write_text(json.dumps({"pid": os.getpid(), "since": time.time()}))

    @classmethod
    def check_free(cls, run_dir: Path) -> None:
        """Refuse at once a run directory another live run holds, before the seconds of preflight; writes nothing
        (an existing lock file is only taken and let go). The lock itself is taken later, by `acquire`.

        Raises:
            BadInput: another live process holds the run directory.
        """
        if not (run_dir / LOCK_FILE).is_file():
            return
        probe = cls(run_dir)
        probe.acquire_quietly()
        probe._lock.release()

    def acquire_quietly(self) -> None:
        """Take the lock without recording this process as its holder (see `acquire`).

        Raises:
            BadInput: another live process holds the run directory.
        """
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            holder = read_json(self.run_dir / LOCK_INFO) or {}
            since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", time.time())))
            raise BadInput(
                f"{self.run_dir} is in use by process {holder.get('pid', '?')} since {since}",
                hint="wait for it to finish, or choose another --output-dir",
            ) from None

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def release(self) -> None:
        with contextlib.suppress(OSError):
            (self.run_dir / LOCK_INFO).unlink()
        self._lock.release()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
