"""`kind: orpo` — Odds Ratio Preference Optimization with TRL's ORPOTrainer (`trl.experimental`): SFT and preference
alignment in one loss, no reference model.

The loss is the chosen answer's NLL plus `beta` (the paper's lambda) times the log odds ratio of chosen over rejected.
TRL's NLL runs over the whole chosen sequence, prompt included, and the dry run says so. The held-out measure is
`pref_accuracy`: the share of eval pairs whose chosen completion the policy finds likelier by its mean token
log-probability (what ORPO's odds ratio compares), before and after. It is the policy's own preference, so it is no tie
by construction before training; the sum over tokens would mostly compare the answers' lengths.

What ORPO and SimPO (align/stages/simpo.py, TRL's CPOTrainer) share, reference-free trainers on pairs, is `PairStage`
in align/stages/preference_family.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from align.recipe import PREFERENCE_FORMATS, TrainingStage
from align.stages.base import Figure, TrainingKind
from align.stages.common import run_stage
from align.stages.preference_family import PairStage, plan_pairs
from align.values import StageParts, StageResult, StartingPoint

if TYPE_CHECKING:
    from align.context import StageContext
    from align.recipe import Stage

logger = logging.getLogger(__name__)


def run(stage: Stage, ctx: StageContext) -> StageResult:
    """Align a model to preference pairs with ORPO; measure preference accuracy before and after; save."""
    return run_stage(stage, ctx, ORPOStage)


class ORPOStage(PairStage):
    trainer_name = "ORPOTrainer"
    method = "ORPO"
    average = True  # ORPO's odds are of each completion's mean token log-probability

    def own_metrics(self, after: dict[str, Any]) -> dict[str, Any]:
        return {"log_odds_ratio": after.get("eval_log_odds_ratio"), "nll_loss": after.get("eval_nll_loss")}


def plan(
    stage: Stage, *, spec: Any, data: Any, tokenizer: Any, config: Any, start: StartingPoint, recipe: Any = None
) -> StageParts:
    """An ORPO stage's part of its plan: no reference, and where its loss falls."""
    parts = StageParts(details={
        "input": start.summary(),
        "reference": "none (ORPO is reference-free)",
        "loss_on": "NLL on the whole chosen sequence, prompt included (TRL's ORPO), plus beta x the log odds ratio "
                   "of the chosen over the rejected completion",
    })  # fmt: skip
    return plan_pairs(stage, data=data, tokenizer=tokenizer, config=config, parts=parts)


class ORPOKeys(TrainingStage):
    """An orpo stage's recipe keys: those of every training stage."""

    kind: Literal["orpo"]
    article: ClassVar[str] = "an"


def _config() -> type:
    from align.patches import experimental

    return experimental("ORPOConfig")


KIND = TrainingKind(
    name="orpo",
    keys=ORPOKeys,
    formats=PREFERENCE_FORMATS,
    run=run,
    about="Odds Ratio Preference Optimization: SFT and preference in one loss, no reference model (TRL's ORPO)",
    figures=(
        Figure("pref accuracy (per token)", "pref_accuracy", False),
        Figure("eval loss (ORPO)", "eval_loss", True),
    ),  # fmt: skip
    config=_config,
    plan_parts=plan,
)
