"""What the pipeline hands a stage: a read-only, typed view of what that stage needs.

The pipeline keeps the run's state (`RunState`: every stage's data, plan, output so far) and, for each stage,
builds a `StageContext` from it: that stage's data, spec and plan, the outputs of the stages before it, the
checkpoint to resume from. A stage cannot change it, and reads nothing by another stage's name.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from align.recipe import model_source, stage_ref
from align.values import StageOutput

if TYPE_CHECKING:
    from align.plan import StagePlan
    from align.recipe import DataSpec, Recipe, ScratchModel, Stage
    from align.runtime import Precision
    from align.tracking import Tracker


@dataclass(frozen=True)
class StageContext:
    """Everything a stage's `run(stage, ctx)` reads, decided before it started. Frozen: a stage changes nothing
    in it, and so nothing another stage will see."""

    recipe: Recipe
    stage: Stage
    run_dir: Path
    precision: Precision
    tracker: Tracker
    data: Any  # this stage's DatasetDict: train and validation
    spec: DataSpec
    plan: StagePlan
    outputs: Mapping[str, StageOutput]  # the stages that finished before this one, by name
    resume_from: str | None = None  # the checkpoint of an earlier, unfinished run of this very stage
    # The input as summary.json records it (its kind's `input_label`): `@lm (runs/x/lm/model)`, a hub id, ...
    input_label: str = ""
    started: float = field(default_factory=time.perf_counter)  # time.perf_counter() when the stage began

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.stage.name

    @property
    def model_source(self) -> str | ScratchModel:
        """The stage's `model` as written, an omitted one read as `@<previous policy stage>`."""
        return model_source(self.stage, self.recipe)

    @property
    def model_ref(self) -> str | ScratchModel:
        """What to load: a `@stage` reference becomes that stage's saved model directory."""
        ref = stage_ref(self.model_source)
        return str(self.outputs[ref].model_dir) if ref is not None else self.model_source


@dataclass
class RunState:
    """The pipeline's own record of a run, changed only by the pipeline: data, specs and plans by stage, and the
    outputs of the stages finished so far."""

    recipe: Recipe
    run_dir: Path
    precision: Precision
    tracker: Tracker
    data: dict[str, Any]
    specs: dict[str, DataSpec]
    plans: dict[str, StagePlan]
    outputs: dict[str, StageOutput] = field(default_factory=dict)

    def for_stage(self, stage: Stage, resume_from: str | None = None, input_label: str = "") -> StageContext:
        """The read-only view of the run that `stage` gets."""
        return StageContext(
            recipe=self.recipe,
            stage=stage,
            run_dir=self.run_dir,
            precision=self.precision,
            tracker=self.tracker,
            data=self.data[stage.name],
            spec=self.specs[stage.name],
            plan=self.plans[stage.name],
            outputs=MappingProxyType(dict(self.outputs)),
            resume_from=resume_from,
            input_label=input_label,
        )
