"""`kind: orpo` — Odds Ratio Preference Optimization with TRL's ORPOTrainer (`trl.experimental`): SFT and preference
alignment in one loss, no reference model.

The loss is the chosen answer's NLL plus `beta` (the paper's lambda) times the log odds ratio of chosen over rejected.
TRL's NLL runs over the whole chosen sequence, prompt included, and the dry run says so. The held-out measure is
`pref_accuracy`: the share of eval pairs whose chosen completion the policy finds likelier by its mean token
log-probability (what ORPO's odds ratio compares), before and after. It is the policy's own preference, so it is no tie
by construction before training; the sum over tokens would mostly compare the answers' lengths.

What ORPO and SimPO (align/stages/simpo.py, TRL's CPOTrainer) share, reference-free trainers on pairs, is `PairKind`
in align/stages/preference_family.py.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from align.recipe import TrainingStage
from align.stages.base import Figure
from align.stages.preference_family import PairKind
from align.values import StartingPoint


class ORPOKeys(TrainingStage):
    """An orpo stage's recipe keys: those of every training stage."""

    kind: Literal["orpo"]
    article: ClassVar[str] = "an"


class ORPO(PairKind):
    """TRL's ORPOTrainer on pairs: no reference; preference accuracy by mean token log-probability."""

    name = "orpo"
    keys = ORPOKeys
    about = "Odds Ratio Preference Optimization: SFT and preference in one loss, no reference model (TRL's ORPO)"
    figures = (
        Figure("pref accuracy (per token)", "pref_accuracy", False),
        Figure("eval loss (ORPO)", "eval_loss", True),
    )
    key_settings = ("beta", "max_completion_length")
    config = "trl.experimental.orpo:ORPOConfig"
    trainer_class = "trl.experimental.orpo:ORPOTrainer"
    method = "ORPO"
    average = True  # ORPO's odds are of each completion's mean token log-probability

    def plan_details(self, start: StartingPoint) -> dict[str, str]:
        return {
            **super().plan_details(start),
            "loss_on": "NLL on the whole chosen sequence, prompt included (TRL's ORPO), plus beta x the log odds "
            "ratio of the chosen over the rejected completion",
        }

    def own_metrics(self, after: dict[str, Any]) -> dict[str, Any]:
        return {"log_odds_ratio": after.get("eval_log_odds_ratio"), "nll_loss": after.get("eval_nll_loss")}
