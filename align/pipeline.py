"""Runs a recipe's stages in order: preflight for all of them first, then train, fingerprint, record.

Preflight loads and checks every stage's data and model before the first step of training, so a typo
in stage three is reported before hours of stage one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from align import __version__, versions
from align import stages as registry
from align.card import write_model_card
from align.context import RunState, StageContext
from align.errors import AlignError, BadInput, GuardStopped, Interrupted, Problems, StageFailed, closest
from align.files import read_json, write_json_atomic, write_text_atomic
from align.plan import PlanInputs, StagePlan, describe, plain
from align.recipe import DataSpec, Recipe, ScratchModel, Stage, model_source, stage_ref
from align.recipe_yaml import to_yaml
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
from align.tracking import Tracker, check_installed, report_to
from align.values import StageOutput, StageResult, counted, saved_model_dir

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


def print_config(recipe: Recipe, specs: dict[str, DataSpec], output_dir: Path) -> str:
    """`--print-config`: the resolved recipe as YAML, each stage's `train:` holding the effective value of every
    setting that matters, each marked with where it came from. Loads no data and no weights; a value that needs a
    model the machine does not have says so instead of guessing.

    Raises:
        BadInput: a setting the plan rejects (an option the model does not support, a combination the config
            class refuses).
    """
    precision = choose_precision(recipe.precision)
    # stdout is the YAML: a library that prints while loading (transformers' "Running in WANDB offline mode")
    # must not land in it.
    with contextlib.redirect_stdout(sys.stderr):
        plans = plan_stages(recipe, specs, None, precision, output_dir, report_to(recipe.tracking.wandb))
    resolved = redact(resolved_recipe(recipe, specs), secret_values())
    sources: dict[str, dict[str, str]] = {}
    for entry, stage in zip(resolved["stages"], recipe.stages, strict=True):
        if not registry.get(stage.kind).trains:
            continue  # its settings are its own keys, shown as resolved above
        settings = plans[stage.name].effective
        entry["train"] = redact({k: plain(s.value) for k, s in settings.items()}, secret_values())
        sources[stage.name] = {k: s.source for k, s in settings.items()}
    return _with_sources(to_yaml(resolved), sources)


def _with_sources(text: str, sources: dict[str, dict[str, str]]) -> str:
    """Append `# <source>` to each line of a stage's `train:` block (comments keep the YAML loadable)."""
    out, stage, indent = [], None, None
    for line in text.splitlines():
        stripped = line.lstrip()
        depth = len(line) - len(stripped)
        if stripped.startswith("- name: ") and depth == 0:
            stage, indent = stripped.removeprefix("- name: ").strip("'\""), None
        elif stripped == "train:" and stage is not None:
            indent = depth + 2
        elif indent is not None and depth < indent:
            indent = None
        elif indent is not None and depth == indent and ":" in stripped:
            key = stripped.split(":", 1)[0]
            source = sources.get(stage, {}).get(key)
            if source:
                line = f"{line}  # {source}"
        out.append(line)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# Preflight


def resolve_specs(recipe: Recipe) -> dict[str, DataSpec]:
    """Every stage's data spec (cards expanded), with format/kind checks. Collects all problems.

    Raises:
        BadInput: every problem found, together.
    """
    from align.data_cards import check_format, resolve_data

    specs, found = {}, Problems()
    for stage in recipe.stages:
        where = f"stages.{stage.name}.data"
        try:
            kind = registry.get(stage.kind)
            specs[stage.name] = spec = resolve_data(stage.data, recipe.base_dir, where, accepts=kind.formats)
            found.add(check_format(spec, kind, where))
        except BadInput as exc:
            found.absorb(exc)
    found.raise_if_any()
    return specs


def check_models(recipe: Recipe, found: Problems) -> None:
    """Problems with stage models that can be found without loading weights."""
    from align.models import hub_config, is_adapter_dir, scratch_config

    for stage in recipe.stages:
        model = getattr(stage, "model", None)  # the model a training stage starts from (an eval's are its own)
        if isinstance(model, ScratchModel):
            try:
                scratch_config(model, f"stages.{stage.name}.model")
            except BadInput as exc:
                found.absorb(exc)
        # Every model the stage reads, as its kind declares them (an eval's models and judges, an online stage's
        # reward models): one not on this machine is refused now, not once the stages before it have trained.
        for key, ref in stage.model_refs().items():
            where = f"stages.{stage.name}.{key}"
            if stage_ref(ref) is not None:
                continue
            try:
                hub_config(ref, where, stage.trust_remote_code, recipe.base_dir)
                local = Path(ref).expanduser()
                if local.is_dir() and not is_adapter_dir(ref) and not any(local.glob("*.safetensors")):
                    found.add([f"{where}: {local} has no safetensors weights; align does not load pickled (.bin) "
                               "weights (convert: save_pretrained(..., safe_serialization=True))"])  # fmt: skip
            except BadInput as exc:
                found.absorb(exc)


def load_all_data(recipe: Recipe, specs: dict[str, DataSpec], found: Problems) -> dict[str, Any]:
    """Load every stage's data up front; problems go to `found`."""
    from align.data import load_data

    data = {}
    for stage in recipe.stages:
        CURRENT_STAGE.set(stage.name)
        try:
            data[stage.name] = load_data(
                specs[stage.name], seed=recipe.seed, base_dir=recipe.base_dir, where=f"stages.{stage.name}.data",
                prompts_only=registry.get(stage.kind).prompts_only,
            )  # fmt: skip
        except BadInput as exc:
            found.absorb(exc)
    CURRENT_STAGE.set("-")
    return data


def preflight(recipe: Recipe) -> tuple[dict[str, DataSpec], dict[str, Any]]:
    """Validate models and data for all stages; return the specs and the loaded data.

    Raises:
        BadInput: all problems found, together.
    """
    specs = resolve_specs(recipe)
    found = Problems()
    try:
        check_installed(recipe.tracking)  # a tracker that is not installed would fail only once training started
    except BadInput as exc:
        found.absorb(exc)
    check_models(recipe, found)
    data = load_all_data(recipe, specs, found)
    found.raise_if_any()
    return specs, data


# --------------------------------------------------------------------------------------------------
# Planning


def plan_stages(
    recipe: Recipe,
    specs: dict[str, DataSpec],
    data: dict[str, Any] | None,
    precision: Any,
    run_dir: Path,
    report_to: list[str],
) -> dict[str, StagePlan]:
    """Plan every stage in order, each by its kind (align/plan.py holds what the plans share). With `data` (dry
    run, run) tokenizers are loaded or trained and every check against the data runs; without (`--print-config`),
    only settings, and what needs an unavailable model is shown as unknown.

    Raises:
        BadInput: every problem of every stage, together.
    """
    plans: dict[str, StagePlan] = {}
    found = Problems()
    for stage in recipe.stages:
        CURRENT_STAGE.set(stage.name)
        inputs = PlanInputs(recipe, specs[stage.name], data and data[stage.name], plans, data or {}, precision,
                            run_dir, report_to)  # fmt: skip
        plan, problems = registry.get(stage.kind).plan(stage, inputs)
        found.add(problems.problems)
        found.hints += problems.hints
        if plan is not None:
            plans[stage.name] = plan
    CURRENT_STAGE.set("-")
    found.raise_if_any()
    return plans


# --------------------------------------------------------------------------------------------------
# Fingerprints and records


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_identity(spec: DataSpec, base_dir: Path) -> dict[str, Any]:
    """What pins the data's content: file hashes, the hub revision, or the Python version (builtin sets); for a mix,
    each source's, by name."""
    if spec.mix is not None:
        return {source.name: data_identity(source, base_dir) for source in spec.mix}
    source = spec.source
    if source.files is not None:
        from align.data_sources import resolve_files

        return {f"{split}:{path.name}": file_sha256(path)
                for split, paths in resolve_files(spec, base_dir).items() for path in paths}  # fmt: skip
    if source.disk is not None:
        from align.data_sources import disk_folder

        folder = disk_folder(spec, base_dir)
        return {
            str(path.relative_to(folder)): file_sha256(path) for path in sorted(folder.rglob("*")) if path.is_file()
        }
    if source.builtin is not None:
        from align.builtin import BUILTIN_VERSION

        # pydoc_data's text changes between Python versions, the sets' contents between align's versions of them.
        return {"python": platform.python_version(), "builtin": BUILTIN_VERSION}
    return {"revision": source.revision or "main"}


def fingerprint(stage: Stage, spec: DataSpec, input_fingerprint: str, recipe: Recipe, precision: str) -> str:
    """A hash of everything that determines a stage's output: config, data and its content, input, seed, align."""
    # The stage as recipe.yaml saves it (defaults its kind fills in spelt out) and its data as resolved (`spec`), not
    # as written: a saved recipe.yaml, which spells a card out in full, finds its stages cached.
    entry = stage.model_dump(mode="json", exclude={"data"})
    registry.get(stage.kind).resolve(entry, stage, recipe)
    payload = {
        "stage": entry,
        "data": spec.model_dump(mode="json"),
        "data_content": data_identity(spec, recipe.base_dir),
        "input": input_fingerprint,
        "seed": recipe.seed,
        "precision": precision,
        "align": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_identity(stage: Stage, recipe: Recipe, outputs: Any) -> str:
    """What the stage's fingerprint takes from its input, as its kind says (an earlier stage's fingerprint, a hub
    id or path as written, every model and judge an eval reads)."""
    return registry.get(stage.kind).input_identity(stage, recipe, outputs)


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
    recipe, specs, tracker = state.recipe, state.specs, state.tracker
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
        summaries.append(summary)
        logger.info("[%d/%d] %s: completed in %.1f s", i, len(recipe.stages), stage.name, elapsed)
    return summaries


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


# --------------------------------------------------------------------------------------------------
# Dry run


def dry_run(recipe: Recipe, output_dir: Path, only: list[str] | None = None) -> str:
    """Validate everything that can be validated without training and print the plan the run would execute
    (`only`: as `--only` would run it).

    Raises:
        BadInput: every problem found, as in a real run.
    """
    selected = only_stages(recipe, only)
    precision = choose_precision(recipe.precision)
    specs, data = preflight(recipe)
    plans = plan_stages(recipe, specs, data, precision, output_dir, report_to(recipe.tracking.wandb))
    lines = [f"preflight: recipe {recipe.name}, {counted(len(recipe.stages), 'stage')}, output {output_dir}",
             f"precision: {precision.name} ({precision.reason})"]  # fmt: skip
    status = planned_status(recipe, specs, precision.name, output_dir)
    if selected:
        status.update({name: f"--only: {left.what}" for name, left in
                       check_only(recipe, specs, precision.name, output_dir, selected).items()})  # fmt: skip
    from align.data_sources import data_label

    for plan, stage in zip(plans.values(), recipe.stages, strict=True):
        plan.details = {"run": status[stage.name], **plan.details}
        split = data[stage.name]
        rows = ", ".join(f"{len(rows)} {name} rows" for name, rows in split.items())
        plan.details = {"data": f"{data_label(specs[stage.name])} ({specs[stage.name].format}): {rows}",
                        **plan.details}  # fmt: skip
        stopping = getattr(stage, "early_stopping", None)  # a training stage's
        if stopping is not None:
            plan.details["early stopping"] = f"patience {stopping.patience}, restores the best checkpoint"
        if plan.runtime:
            plan.details["decided when the stage starts"] = "; ".join(plan.runtime)
    lines += describe(plans)
    lines += ["", "dry run: nothing was trained or written"]
    return "\n".join(lines)
