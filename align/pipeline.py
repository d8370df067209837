"""Runs a recipe's stages in order, holding the run directory: preflight for all of them first, then train,
fingerprint, record; and builds the context one stage needs to run from Python (`stage_context`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from align import __version__
from align import stages as registry
from align.card import write_model_card
from align.context import RunState, StageContext
from align.errors import AlignError, BadInput, GuardStopped, Interrupted, StageFailed
from align.files import read_json, write_text_atomic
from align.fingerprints import fingerprint, input_identity
from align.preflight import plan_stages, preflight
from align.recipe import DataSpec, Recipe, Stage, model_source, stage_ref
from align.recipe_yaml import to_yaml
from align.run_records import (
    Records,
    _cached_summary,
    _last_checkpoint,
    check_only,
    interrupted_checkpoint,
    only_stages,
    resumable,
)
from align.rundir import RunLock, check_output_dir, clear_for_fresh, remove_inside
from align.runtime import (
    CURRENT_STAGE,
    choose_precision,
    close_log_file,
    is_main_process,
    log_to_file,
    main_process_first,
    same_on_every_rank,
    set_console_level,
    wait_for_everyone,
)
from align.secrets import redact, secret_values
from align.signals import raise_if_requested, stop_on_signals
from align.tracking import Tracker, report_to
from align.values import StageOutput, counted, saved_model_dir

logger = logging.getLogger(__name__)


def resolved_recipe(recipe: Recipe, specs: dict[str, DataSpec] | None = None) -> dict[str, Any]:
    """The recipe with defaults filled in by each stage's kind (an omitted model spelled `@<previous>`, an eval's
    models listed) and data cards expanded."""
    data = recipe.model_dump(mode="json")
    for stage, given in zip(data["stages"], recipe.stages, strict=True):
        registry.get(given.kind).resolve(stage, given, recipe)
        spec = (specs or {}).get(stage["name"])
        if spec is not None:
            expanded = spec.model_dump(mode="json")
            for part, given_part in [(expanded, spec), *zip(expanded.get("mix") or [], spec.mix or [], strict=True)]:
                if given_part.source is not None:
                    part["source"] = given_part.source.model_dump(mode="json", exclude_none=True)
            if spec.mix is not None:  # as a recipe takes it back: the sources' own fields, nothing beside `mix:`
                expanded = {"mix": expanded["mix"], **({"mix_rows": spec.mix_rows} if spec.mix_rows else {}),
                            **({"name": given.data.name} if given.data.name else {})}  # fmt: skip
            stage["data"] = {"card": given.data.card, **expanded}
        else:
            stage["data"] = {k: v for k, v in stage["data"].items() if v is not None}
    return data


# --------------------------------------------------------------------------------------------------
# Running


def run_pipeline(
    recipe: Recipe,
    *,
    output_dir: Path,
    log_level: str = "info",
    fresh: bool = False,
    only: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Preflight every stage, then run them in order, holding the run directory; return each stage's summary.
    `only`: run just these stages, on the earlier ones completed in `output_dir` (their files, and those of the
    stages after, are left as they are); `fresh` then starts only these over.

    Raises:
        BadInput: a problem found before training started, or the run directory is in use (exit 2).
        StageFailed: a stage failed during training (exit 1); later stages are not run.
        Interrupted: SIGINT or SIGTERM stopped a stage after saving a checkpoint (exit 130 or 143).
    """
    selected = only_stages(recipe, only)
    check_output_dir(output_dir, recipe, fresh)
    # A directory another run holds is refused now, not after preflight's seconds; the lock is taken below.
    busy = None
    if is_main_process():
        try:
            RunLock.check_free(output_dir)
        except BadInput as exc:
            busy = (exc.problems, exc.hint)
    busy = same_on_every_rank(busy)
    if busy is not None:
        raise BadInput(busy[0], hint=busy[1])
    precision = choose_precision(recipe.precision)
    with main_process_first():
        specs, data = preflight(recipe)
    # Every process plans together: the tokenized-data cache's lookups are collective.
    plans = plan_stages(recipe, specs, data, precision, output_dir, report_to(recipe.tracking.wandb))
    kept = check_only(recipe, specs, precision.name, output_dir, selected) if selected else {}

    # Nothing is written before this point: bad input leaves an existing run directory as it was.
    with hold_run_dir(output_dir, recipe, fresh, selected):
        log_to_file(output_dir / "align.log")
        set_console_level(log_level)
        logger.info("align %s: recipe %s, %s -> %s", __version__, recipe.name, counted(len(recipe.stages), "stage"),
                    output_dir)  # fmt: skip
        logger.info("precision %s: %s", precision.name, precision.reason)
        if is_main_process():
            resolved = redact(resolved_recipe(recipe, specs), secret_values())
            write_text_atomic(output_dir / "recipe.yaml", to_yaml(resolved))
        group = f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        tracker = Tracker(recipe.tracking, recipe.name, group, output_dir)
        state = RunState(recipe, output_dir, precision, tracker, data, specs, plans)
        records = Records(recipe, output_dir, set(kept))
        for name, left in kept.items():
            logger.info("--only: %s %s", name, left.what)
            # pipeline.json says so too, not only the log: `completed` alone would read as current.
            records.mark_left(name, left.status, left.stale)
        records.write()
        try:
            with stop_on_signals():
                return _run_stages(state, records, fresh, selected)
        finally:
            CURRENT_STAGE.set("-")
            if is_main_process():
                write_report(output_dir)
            close_log_file()


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, recipe: Recipe, fresh: bool, selected: set[str] | None = None):
    """Lock the run directory for the whole run (main process), check it again under the lock, and clear what
    earlier runs wrote when `--fresh`. Every process learns the outcome, so none waits for a run that refused.

    Raises:
        BadInput: another run holds the directory, or it changed into one this run may not use.
    """
    lock, refusal = None, None
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir)
        try:
            lock.acquire()
            check_output_dir(run_dir, recipe, fresh)  # another run may have written here while we prepared
            if fresh:  # with --only, only those stages start over
                names = [stage.name for stage in recipe.stages if not selected or stage.name in selected]
                clear_for_fresh(run_dir, names, whole=not selected)
        except BadInput as exc:
            refusal = (exc.problems, exc.hint)
    refusal = same_on_every_rank(refusal)
    if refusal is not None:
        if lock is not None and lock.held:
            lock.release()
        raise BadInput(refusal[0], hint=refusal[1])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def stage_context(recipe: Recipe, stage_name: str, output_dir: Path, write_to: Path | None = None) -> StageContext:
    """What `run_lm`, `run_sft` or `run_dpo` need to run one stage from Python, without the pipeline: the recipe
    preflighted and planned as a run would (every stage, so a later one is planned on an earlier one's
    architecture), the outputs of the earlier stages that completed in `output_dir`, and tracking off.

    The stage writes its files under `write_to`, never into `output_dir`: a model replaced there would no longer be
    the one its summary, its fingerprint and the later stages' inputs describe. Default: a new folder beside the
    run, `<output_dir>+<stage>-<YYYYmmdd-HHMMSS>`. It takes no lock and writes no records: `run_pipeline` is the
    way to run a recipe; this is for a notebook or a script that wants one stage's `StageResult`.

    Raises:
        BadInput: the recipe's problems, a stage that does not exist, an earlier stage it needs that has not
            completed in `output_dir`, or `write_to` inside `output_dir`.
    """
    from align.recipe import Tracking

    names = [stage.name for stage in recipe.stages]
    if stage_name not in names:
        raise BadInput(f"no stage named '{stage_name}' (stages: {', '.join(names)})")
    if write_to is None:
        write_to = output_dir.with_name(f"{output_dir.name}+{stage_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if write_to.resolve().is_relative_to(output_dir.resolve()):
        raise BadInput(
            f"write_to: {write_to} is inside the run directory {output_dir}: a stage run from Python would replace "
            "files that the run's records describe",
            hint="give another write_to, or rerun the stage into the run with align run (it reruns what changed)",
        )
    precision = choose_precision(recipe.precision)
    specs, data = preflight(recipe)
    plans = plan_stages(recipe, specs, data, precision, write_to, [])
    quiet = Tracking.model_validate({"wandb": {"mode": "disabled"}})
    state = RunState(recipe, write_to, precision, Tracker(quiet, recipe.name, "python", write_to), data, specs,
                     plans)  # fmt: skip
    for stage in recipe.stages[: names.index(stage_name)]:
        summary = read_json(output_dir / stage.name / "summary.json") or {}
        model_dir = saved_model_dir(output_dir / stage.name, summary)
        if summary.get("status") in ("completed", "cached") and model_dir is not None:
            state.outputs[stage.name] = StageOutput(stage.name, stage.kind, model_dir, summary.get("fingerprint", ""))
    stage = recipe.stages[names.index(stage_name)]
    kind = registry.get(stage.kind)
    ref = stage_ref(model_source(stage, recipe)) if kind.trains else None
    if ref is not None and ref not in state.outputs:
        raise BadInput(f"stage '{stage_name}' starts from '@{ref}', which has not completed in {output_dir}",
                       hint="run the recipe (align run) or that stage first")  # fmt: skip
    return state.for_stage(stage, input_label=kind.input_label(stage, recipe, state.outputs))


def write_report(run_dir: Path) -> None:
    """report.html at the end of every run, failed ones too; a report that cannot be drawn never fails the run."""
    from align.report import build_report

    try:
        logger.info("report: %s", build_report(run_dir))
    except Exception as exc:  # the run's own outcome matters more than its pictures
        logger.warning("report.html could not be written: %s", exc)


def _run_stages(
    state: RunState, records: Records, fresh: bool, selected: set[str] | None = None
) -> list[dict[str, Any]]:
    recipe, specs = state.recipe, state.specs
    summaries = []
    last = (
        max(i for i, s in enumerate(recipe.stages, start=1) if s.name in selected) if selected else len(recipe.stages)
    )
    for i, stage in enumerate(recipe.stages, start=1):
        if i > last:
            break  # --only: the stages after the last one named are not run
        CURRENT_STAGE.set(stage.name)
        raise_if_requested(f"before stage {stage.name}")
        fp = fingerprint(stage, specs[stage.name], input_identity(stage, recipe, state.outputs), recipe,
                         state.precision.name)  # fmt: skip
        stage_dir = state.run_dir / stage.name
        kept = selected is not None and stage.name not in selected
        cached = None if fresh and not kept else _cached_summary(stage, stage_dir, fp)
        wait_for_everyone()
        if kept:  # --only: an earlier stage, completed (check_only made sure), taken as it is and left untouched
            model_dir = saved_model_dir(stage_dir, cached)
            state.outputs[stage.name] = StageOutput(stage.name, stage.kind, model_dir, fp, "cached")
            continue
        if cached is not None:
            logger.info(
                "[%d/%d] %s: unchanged since the last run (fingerprint %s): cached",
                i,
                len(recipe.stages),
                stage.name,
                fp,
            )
            model_dir = saved_model_dir(stage_dir, cached)
            state.outputs[stage.name] = StageOutput(stage.name, stage.kind, model_dir, fp, "cached")
            # summary.json is left as the run that trained the stage wrote it (`completed`): this run reused the
            # stage, which pipeline.json and the closing table say, but it did not change what the stage is.
            records.update(stage.name, status="cached", fingerprint=fp, input_model=cached.get("input_model"))
            summaries.append({**cached, "status": "cached"})
            continue
        summaries.append(_run_stage(state, records, stage, i, fp, fresh))
    return summaries


def _run_stage(state: RunState, records: Records, stage: Stage, i: int, fp: str, fresh: bool) -> dict[str, Any]:
    """Run the `i`-th stage (from 1), which is neither cached nor kept: resume it from its last checkpoint, go on from
    the work its kind kept, or start it clean; record it running, run its kind, then record how it ended and write
    its model card. Returns its summary.

    Raises:
        Interrupted: a signal (or Ctrl-C) stopped it; its records say `interrupted`.
        StageFailed: it failed; its records say `failed`. An `AlignError` it raised is raised as it is.
    """
    recipe, specs, tracker = state.recipe, state.specs, state.tracker
    stage_dir = state.run_dir / stage.name
    kind = registry.get(stage.kind)
    checkpoint = None if fresh else interrupted_checkpoint(stage_dir, fp)
    # A kind that keeps its work as it goes (an eval's answers, model by model) goes on from it.
    goes_on = kind.keeps_progress and not fresh and resumable(stage_dir, fp)
    # Every process has decided (cached, resume, or afresh) from the same files; only now may they change.
    wait_for_everyone()
    if checkpoint is not None:
        logger.info("[%d/%d] %s: resuming from %s", i, len(recipe.stages), stage.name, checkpoint.name)
    elif goes_on:
        logger.info("[%d/%d] %s: going on from the answers it kept", i, len(recipe.stages), stage.name)
    elif stage_dir.exists() and is_main_process():
        remove_inside(state.run_dir, stage_dir)  # a changed (or --fresh) stage starts clean: no stale metrics rows
    input_model = kind.input_label(stage, recipe, state.outputs)
    from align.data_sources import data_label

    logger.info("[%d/%d] %s: %s from %s on %s", i, len(recipe.stages), stage.name, stage.kind, input_model,
                data_label(specs[stage.name]))  # fmt: skip
    records.update(stage.name, status="running", fingerprint=fp, input_model=input_model)
    records.summary(stage, None, status="running", fp=fp, input_model=input_model)
    tracker.start_stage(stage, redact(resolved_recipe(recipe, specs)["stages"][i - 1], secret_values()))
    from align.metrics import reset_peak_memory

    reset_peak_memory()
    ctx = state.for_stage(stage, str(checkpoint) if checkpoint is not None else None, input_model)
    started = ctx.started
    try:
        result = kind.run(stage, ctx)
    except BaseException as exc:
        stopped = _as_stop(exc, stage, stage_dir)
        status = "interrupted" if stopped is not None else "failed"
        shown = stopped or exc
        error = shown.problems[0] if isinstance(shown, AlignError) else f"{type(exc).__name__}: {exc}"
        # A guard's stop is not resumed: the same settings would run into the same non-finite loss.
        records.summary(stage, None, status=status, fp=fp, input_model=input_model, error=error,
                        resumable=not isinstance(exc, GuardStopped))  # fmt: skip
        records.update(stage.name, status=status)
        tracker.finish_stage(exit_code=1)
        if stopped is not None:
            raise stopped from None
        if isinstance(exc, AlignError):
            raise
        raise StageFailed(f"stage {stage.name} failed: {error}") from exc
    wait_for_everyone()  # the next stage loads this one's model: the main process must have saved it
    elapsed = time.perf_counter() - started
    # The plan it ran (settings with their sources): the stage's folder says how it was made.
    summary = records.summary(stage, result, status="completed", fp=fp, input_model=input_model,
                              wall_time_s=elapsed, plan=ctx.plan.record())  # fmt: skip
    records.update(stage.name, status="completed")
    if result.model_dir is not None:
        write_model_card(ctx.run_dir, stage.name)  # align/card.py: model/README.md, from the records just written
    for judged in (result.metrics.get("models") or {}) if result.model_dir is None else ():
        if (ctx.run_dir / judged / "model" / "README.md").is_file():  # an eval's verdict reaches the cards
            write_model_card(ctx.run_dir, judged)
    if result.metrics.get("stopped_early"):
        tracker.log({"train/early_stop_step": result.metrics["global_step"]})
    tracker.summary(result.metrics)
    tracker.finish_stage()
    state.outputs[stage.name] = StageOutput(stage.name, stage.kind, result.model_dir, fp)
    logger.info("[%d/%d] %s: completed in %.1f s", i, len(recipe.stages), stage.name, elapsed)
    return summary


def _as_stop(exc: BaseException, stage: Stage, stage_dir: Path) -> Interrupted | None:
    """The `Interrupted` a signal raised, or one for a KeyboardInterrupt (a second Ctrl-C, or one outside the
    handler); None for any other failure."""
    if isinstance(exc, Interrupted):
        return exc
    if not isinstance(exc, KeyboardInterrupt):
        return None
    from align.signals import requested

    last = _last_checkpoint(stage_dir)
    signum = requested() or signal.SIGINT
    return Interrupted(
        signum,
        f"stage {stage.name} stopped at once by {signal.Signals(signum).name}"
        + (f"; its last checkpoint is {last.name}" if last else "; no checkpoint had been saved yet"),
        hint="run the same command again to " + ("resume from it" if last else "start the stage again"),
    )
