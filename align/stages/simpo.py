"""`kind: simpo` — SimPO (Meng et al. 2024) with TRL's CPOTrainer (`trl.experimental`): preference optimisation on
length-normalised log-probabilities against a target margin, no reference model.

SimPO is CPO's `loss_type: simpo` with `cpo_alpha: 0`. CPO's default `cpo_alpha` of 1.0 adds an NLL term on the
chosen answers (that is CPO-SimPO, a different method), so align sets 0 and `--print-config` shows it as align's;
a recipe may set it. `beta` defaults to 2.0, the low end of the paper's 2.0-2.5: TRL's 0.1 is CPO's value for
summed log-probabilities, and SimPO's per-token averages are far smaller. The held-out measure is what SimPO optimises:
`pref_accuracy` by each completion's mean token log-probability (the length-normalised preference accuracy).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

from align.recipe import PREFERENCE_FORMATS, TrainingStage
from align.stages.base import Figure, TrainingKind
from align.stages.common import run_stage
from align.stages.preference_family import PairStage, plan_pairs
from align.values import Setting, StageParts, StageResult, StartingPoint

if TYPE_CHECKING:
    from align.context import StageContext
    from align.recipe import Stage

logger = logging.getLogger(__name__)

SIMPO = "align (managed): SimPO is CPO's simpo loss"
PURE = "align default: pure SimPO (CPO's default 1.0 adds an NLL term: CPO-SimPO)"
BETA = "align default: the SimPO paper's 2.0-2.5 (TRL's 0.1 is CPO's)"


def run(stage: Stage, ctx: StageContext) -> StageResult:
    """Align a model to preference pairs with SimPO; measure length-normalised preference accuracy before and
    after; save."""
    return run_stage(stage, ctx, SimPOStage)


class SimPOStage(PairStage):
    trainer_name = "CPOTrainer"
    method = "SimPO"
    average = True  # what SimPO compares: each completion's mean token log-probability

    def own_metrics(self, after: dict[str, Any]) -> dict[str, Any]:
        return {"nll_loss": after.get("eval_nll_loss")}  # 0 unless the recipe set cpo_alpha (CPO-SimPO)


def plan(
    stage: Stage, *, spec: Any, data: Any, tokenizer: Any, config: Any, start: StartingPoint, recipe: Any = None
) -> StageParts:
    """A SimPO stage's part of its plan: CPO's simpo loss without its NLL term, no reference, where the loss falls.

    A `loss_type` other than simpo is a problem here: that is another method (CPO), not this kind."""
    fixed = {"loss_type": Setting("simpo", SIMPO)}
    if "cpo_alpha" not in stage.train:
        fixed["cpo_alpha"] = Setting(0.0, PURE)
    if "beta" not in stage.train:
        fixed["beta"] = Setting(2.0, BETA)
    alpha = stage.train.get("cpo_alpha", 0.0)
    parts = StageParts(fixed=fixed, details={
        "input": start.summary(),
        "reference": "none (SimPO is reference-free)",
        "loss_on": "completions only, each by its mean token log-probability (length-normalised)"
                   + (f"; plus cpo_alpha {alpha} x NLL on the chosen answers (CPO-SimPO)" if alpha else ""),
    })  # fmt: skip
    given = stage.train.get("loss_type", "simpo")
    if given != "simpo":
        parts.problems.append(f"stages.{stage.name}.train.loss_type: a simpo stage trains SimPO's loss (got {given!r})")
        parts.hints.append("remove loss_type; for CPO's other losses, that is another method than SimPO")
    return plan_pairs(stage, data=data, tokenizer=tokenizer, config=config, parts=parts)


class SimPOKeys(TrainingStage):
    """A simpo stage's recipe keys: those of every training stage."""

    kind: Literal["simpo"]


def _config() -> type:
    from align.patches import experimental

    return experimental("CPOConfig")


KIND = TrainingKind(
    name="simpo",
    keys=SimPOKeys,
    formats=PREFERENCE_FORMATS,
    run=run,
    about="SimPO: length-normalised preference optimisation with a target margin, no reference model (TRL's CPO)",
    figures=(
        Figure("pref accuracy (per token)", "pref_accuracy", False),
        Figure("eval loss (SimPO)", "eval_loss", True),
    ),  # fmt: skip
    config=_config,
    plan_parts=plan,
)
