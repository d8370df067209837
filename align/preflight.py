"""What a run does before it trains: every stage's data spec resolved, its models checked and its data loaded
(preflight), then every stage planned by its kind.

Preflight loads and checks every stage's data and model before the first step of training, so a typo
in stage three is reported before hours of stage one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align import stages as registry
from align.errors import BadInput, Problems
from align.plan import PlanInputs, StagePlan
from align.recipe import DataSpec, Recipe, ScratchModel, stage_ref
from align.runtime import CURRENT_STAGE
from align.tracking import check_installed

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
