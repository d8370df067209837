"""A run directory's records of its stages: what they say of a stage's last run there (cached, resumable, its last
checkpoint), what a run into it would do with each stage, what an `--only` run leaves, and the pipeline.json and
summary.json a run writes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from align import stages as registry
from align import versions
from align.errors import BadInput, closest
from align.files import read_json, write_json_atomic
from align.fingerprints import fingerprint, input_identity
from align.recipe import DataSpec, Recipe, Stage
from align.runtime import is_main_process
from align.values import StageOutput, StageResult, saved_model_dir

logger = logging.getLogger(__name__)


def _last_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint: a second Ctrl-C can cut a save short, leaving a newer folder without its
    trainer state, which the Trainer cannot resume from (the complete one before it can)."""
    folder = stage_dir / "checkpoints"
    found = folder.glob("checkpoint-*") if folder.is_dir() else []
    steps = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in found if p.name.rsplit("-", 1)[1].isdigit())
    complete = [path for _, path in steps if (path / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


# A stage left in one of these resumes from its last checkpoint: cut off while running (SIGKILL, an out-of-memory
# kill, a lost machine), stopped by a signal, or failed on an error. Not after a guard stopped it (`resumable`).
RESUMABLE = ("running", "interrupted", "failed")


def resumable(stage_dir: Path, fp: str) -> bool:
    """Whether this very stage (same fingerprint) ran before and did not complete."""
    summary = read_json(stage_dir / "summary.json")
    return bool(summary) and summary.get("status") in RESUMABLE and summary.get("fingerprint") == fp


def interrupted_checkpoint(stage_dir: Path, fp: str) -> Path | None:
    """The last checkpoint of this very stage (same fingerprint) whose run did not complete."""
    if not resumable(stage_dir, fp):
        return None
    summary = read_json(stage_dir / "summary.json")
    if summary.get("resumable") is False:
        logger.warning(
            "%s: a guard stopped this stage last time (%s): starting it over rather than resuming into the same "
            "blow-up; change the setting at fault (the learning rate, the precision) first",
            stage_dir.name,
            summary.get("error", "non-finite loss"),
        )
        return None
    return _last_checkpoint(stage_dir)


def _cached_summary(stage: Stage, stage_dir: Path, fp: str) -> dict[str, Any] | None:
    """The summary of a completed run of this very stage whose output is still in place, else None."""
    summary = read_json(stage_dir / "summary.json")
    if not summary or summary.get("status") not in ("completed", "cached") or summary.get("fingerprint") != fp:
        return None
    return summary if registry.get(stage.kind).output_complete(stage_dir, summary) else None


def planned_status(recipe: Recipe, specs: dict[str, DataSpec], precision: str, run_dir: Path) -> dict[str, str]:
    """What a run into `run_dir` would do with each stage, from the fingerprints it would compute: `cached`,
    `resumes from checkpoint-N`, `runs again (changed since the last run)` or `will run` (never ran there); for
    `--dry-run`."""
    outputs: dict[str, StageOutput] = {}
    out = {}
    for stage in recipe.stages:
        fp = fingerprint(stage, specs[stage.name], input_identity(stage, recipe, outputs), recipe, precision)
        stage_dir = run_dir / stage.name
        outputs[stage.name] = StageOutput(stage.name, stage.kind, stage_dir / "model", fp)
        checkpoint = interrupted_checkpoint(stage_dir, fp)
        if _cached_summary(stage, stage_dir, fp) is not None:
            out[stage.name] = f"cached (unchanged since the last run in {run_dir}, fingerprint {fp})"
        elif checkpoint is not None:
            out[stage.name] = f"resumes from {checkpoint.name} (fingerprint {fp})"
        elif (stage_dir / "summary.json").is_file():
            out[stage.name] = f"runs again: changed since the last run in {run_dir} (fingerprint {fp})"
        else:
            out[stage.name] = f"will run: not run before in {run_dir} (fingerprint {fp})"
    return out


def only_stages(recipe: Recipe, only: list[str] | None) -> set[str] | None:
    """The stages `--only` names (None: every stage).

    Raises:
        BadInput: a name that is no stage of the recipe.
    """
    if not only:
        return None
    names = [stage.name for stage in recipe.stages]
    for name in only:
        if name not in names:
            guess = closest(name, names)
            raise BadInput(f"--only: no stage named '{name}'" + (f" (did you mean '{guess}'?)" if guess else "")
                           + f" (stages: {', '.join(names)})")  # fmt: skip
    return set(only)


# What happens to a stale stage next: a run without --only compares its fingerprint again, and an --only run that
# only tried a setting (`--set`) leaves the recipe making the earlier stages as they were, so it may not rerun.
RERUN = "the next run without --only reruns it if the stages it starts from still differ from those it was made from"


class Left(NamedTuple):
    """A stage `--only` does not run: what happens to it, and whether its files were made from earlier stages
    that this run changes (`stale`: the next plain run reruns it)."""

    what: str
    status: str = "cached"
    stale: bool = False


def check_only(
    recipe: Recipe, specs: dict[str, DataSpec], precision: str, run_dir: Path, selected: set[str]
) -> dict[str, Left]:
    """With `--only`: every stage before the last one named that is not named must have completed in `run_dir` as
    the recipe now describes it (its fingerprint), since the named stages start from it. Returns what happens to
    each stage that is not run (kept as it is, or not run, and stale or not); writes nothing.

    Raises:
        BadInput: an earlier stage that is not named and has not completed there (or changed since), named.
    """
    names = [stage.name for stage in recipe.stages]
    last = max(names.index(name) for name in selected)
    outputs: dict[str, StageOutput] = {}
    kept, problems = {}, []
    for i, stage in enumerate(recipe.stages):
        fp = fingerprint(stage, specs[stage.name], input_identity(stage, recipe, outputs), recipe, precision)
        stage_dir = run_dir / stage.name
        if i > last:
            # The fingerprint it would have after this run, from the named stages' new ones: equal to the one it
            # was made with, it is still current; different, its files came from models this run replaces.
            outputs[stage.name] = StageOutput(stage.name, stage.kind, stage_dir / "model", fp)
            was = (read_json(stage_dir / "summary.json") or {}).get("status") or "pending"
            ran = was in ("completed", "cached")
            stale = ran and _cached_summary(stage, stage_dir, fp) is None
            kept[stage.name] = Left(
                "not run (after the stages --only names): its files are left as they are"
                + (f"; they were made from earlier stages as they were before this run, so it is stale now ({RERUN})"
                   if stale else "; still current (fingerprint unchanged)" if ran else ""),
                "completed" if was == "cached" else was,  # an old run directory's summary may say cached
                stale,
            )  # fmt: skip
            continue
        if stage.name in selected:
            outputs[stage.name] = StageOutput(stage.name, stage.kind, stage_dir / "model", fp)
            continue
        cached = _cached_summary(stage, stage_dir, fp)
        if cached is None:
            was = (read_json(stage_dir / "summary.json") or {}).get("status")
            why = (
                "it has not run there"
                if was is None
                else ("it changed since it ran" if was in ("completed", "cached") else f"it is {was}")
            )
            problems.append(f"--only {','.join(n for n in names if n in selected)}: stage {stage.name} comes before "
                            f"and has not completed in {run_dir} as the recipe now describes it ({why})")  # fmt: skip
            outputs[stage.name] = StageOutput(stage.name, stage.kind, stage_dir / "model", fp)  # for the later ones
            continue
        outputs[stage.name] = StageOutput(stage.name, stage.kind, saved_model_dir(stage_dir, cached), fp, "cached")
        kept[stage.name] = Left(f"kept as it is (completed, fingerprint {fp})")
    if problems:
        missing = [stage.name for stage in recipe.stages if any(f"stage {stage.name} comes" in p for p in problems)]
        wanted = [n for n in names if n in selected or n in missing]
        raise BadInput(problems, hint=f"run it too: --only {','.join(wanted)}; or run the recipe without --only")
    return kept


class Records:
    """pipeline.json and each stage's summary.json, rewritten atomically on every change. `kept`: stages this run
    leaves as they are (`--only`), whose entries are taken from the pipeline.json already there."""

    def __init__(self, recipe: Recipe, run_dir: Path, kept: set[str] | frozenset[str] = frozenset()):
        self.run_dir = run_dir
        before = {e.get("name"): e for e in (read_json(run_dir / "pipeline.json") or {}).get("stages", [])}
        self.pipeline: dict[str, Any] = {
            "name": recipe.name,
            "stages": [
                before[s.name] if s.name in kept and s.name in before else
                {"name": s.name, "kind": s.kind, "status": "pending", "fingerprint": None, "dir": str(run_dir / s.name)}
                for s in recipe.stages
            ],
        }  # fmt: skip

    def update(self, name: str, **fields: Any) -> None:
        for entry in self.pipeline["stages"]:
            if entry["name"] == name:
                entry.update(fields)
        self.write()

    def mark_left(self, name: str, status: str, stale: bool) -> None:
        """The entry of a stage an `--only` run does not train: its status (`cached` where the run takes it as its
        input, the stage's own where it comes after), and a `stale` note where its inputs changed, or none."""
        for entry in self.pipeline["stages"]:
            if entry["name"] == name:
                entry["status"] = status
                entry.pop("stale", None)
                if stale:
                    entry["stale"] = f"made from earlier stages that an --only run changed; {RERUN}"

    def write(self) -> None:
        if is_main_process():
            write_json_atomic(self.run_dir / "pipeline.json", self.pipeline)

    def summary(self, stage: Stage, result: StageResult | None, *, status: str, fp: str, input_model: str, **extra):
        data = {
            "stage": stage.name,
            "kind": stage.kind,
            "status": status,
            "fingerprint": fp,
            "input_model": input_model,
            "model_dir": str(result.model_dir) if result and result.model_dir else None,
            "versions": versions(),
            "metrics": result.metrics if result else {},
            **(result.extra if result else {}),
            **extra,
        }
        if is_main_process():
            write_json_atomic(self.run_dir / stage.name / "summary.json", data)
        return data
