"""What a run would do, shown without training or writing anything: `--print-config` (the resolved recipe with every
setting's effective value and its source) and `--dry-run` (preflight and the plan of every stage).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from align import stages as registry
from align.pipeline import resolved_recipe
from align.plan import describe, plain
from align.preflight import plan_stages, preflight
from align.recipe import DataSpec, Recipe
from align.recipe_yaml import to_yaml
from align.run_records import check_only, only_stages, planned_status
from align.runtime import choose_precision
from align.secrets import redact, secret_values
from align.tracking import report_to
from align.values import counted


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
