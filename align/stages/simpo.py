"""`kind: simpo` — SimPO (Meng et al. 2024) with TRL's CPOTrainer (`trl.experimental`): preference optimisation on
length-normalised log-probabilities against a target margin, no reference model.

SimPO is CPO's `loss_type: simpo` with `cpo_alpha: 0`. CPO's default `cpo_alpha` of 1.0 adds an NLL term on the
chosen answers (that is CPO-SimPO, a different method), so align sets 0 and `--print-config` shows it as align's;
a recipe may set it. `beta` defaults to 2.0, the low end of the paper's 2.0-2.5: TRL's 0.1 is CPO's value for
summed log-probabilities, and SimPO's per-token averages are far smaller. The held-out measure is what SimPO optimises:
`pref_accuracy` by each completion's mean token log-probability (the length-normalised preference accuracy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from align.recipe import TrainingStage
from align.stages.base import Figure
from align.stages.preference_family import PairKind, plan_pairs, with_pair_batches
from align.values import Setting, StageParts

if TYPE_CHECKING:
    from align.plan import PlanInputs
    from align.recipe import Stage

SIMPO = "align (managed): SimPO is CPO's simpo loss"
PURE = "align default: pure SimPO (CPO's default 1.0 adds an NLL term: CPO-SimPO)"
BETA = "align default: the SimPO paper's 2.0-2.5 (TRL's 0.1 is CPO's)"


class SimPOKeys(TrainingStage):
    """A simpo stage's recipe keys: those of every training stage."""

    kind: Literal["simpo"]


class SimPO(PairKind):
    """TRL's CPOTrainer with its simpo loss and no NLL term: no reference; preference accuracy by mean token
    log-probability."""

    name = "simpo"
    keys = SimPOKeys
    about = "SimPO: length-normalised preference optimisation with a target margin, no reference model (TRL's CPO)"
    figures = (
        Figure("pref accuracy (per token)", "pref_accuracy", False),
        Figure("eval loss (SimPO)", "eval_loss", True),
    )
    key_settings = ("beta", "loss_type", "cpo_alpha", "simpo_gamma", "max_completion_length")
    config = "trl.experimental.cpo:CPOConfig"
    trainer_class = "trl.experimental.cpo:CPOTrainer"
    method = "SimPO"
    average = True  # what SimPO compares: each completion's mean token log-probability

    def plan_parts(self, stage: Stage, inputs: PlanInputs) -> StageParts:
        """CPO's simpo loss without its NLL term, no reference, where the loss falls, and what max_length does.

        A `loss_type` other than simpo is a problem here: that is another method (CPO), not this kind."""
        fixed = {"loss_type": Setting("simpo", SIMPO)}
        if "cpo_alpha" not in stage.train:
            fixed["cpo_alpha"] = Setting(0.0, PURE)
        if "beta" not in stage.train:
            fixed["beta"] = Setting(2.0, BETA)
        alpha = stage.train.get("cpo_alpha", 0.0)
        details = {
            **self.plan_details(inputs.start),
            "loss_on": "completions only, each by its mean token log-probability (length-normalised)"
            + (f"; plus cpo_alpha {alpha} x NLL on the chosen answers (CPO-SimPO)" if alpha else ""),
        }
        parts = StageParts(fixed=fixed, details=details)
        given = stage.train.get("loss_type", "simpo")
        if given != "simpo":
            parts.problems.append(
                f"stages.{stage.name}.train.loss_type: a simpo stage trains SimPO's loss (got {given!r})"
            )
            parts.hints.append("remove loss_type; for CPO's other losses, that is another method than SimPO")
        return with_pair_batches(plan_pairs(stage, inputs, parts))

    def own_metrics(self, after: dict[str, Any]) -> dict[str, Any]:
        return {"nll_loss": after.get("eval_nll_loss")}  # 0 unless the recipe set cpo_alpha (CPO-SimPO)
