"""`kind: dpo` — Direct Preference Optimization with TRL's DPOTrainer.

The reference is the stage's input model: with fresh LoRA adapters, the same weights with the adapters off (no
second copy); continuing on an earlier stage's adapters, TRL's frozen copy of them; without LoRA, a frozen copy
(adapters of the input merged first), or its log-probabilities computed once, with `precompute_ref_log_probs`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

from align.recipe import PREFERENCE_FORMATS, TrainingStage
from align.stages.base import Figure, TrainingKind
from align.stages.preference_family import (
    LENGTH_HINT,
    measure_pairs,
    plan_pairs,
    preference_plots,
    reference_for,
    reference_plan,
    summarize_pairs,
)
from align.stages.runner import report_dropped
from align.values import StageParts

if TYPE_CHECKING:
    from align.plan import PlanInputs
    from align.recipe import Stage

logger = logging.getLogger(__name__)


class DPOKeys(TrainingStage):
    """A dpo stage's recipe keys: those of every training stage."""

    kind: Literal["dpo"]


class DPO(TrainingKind):
    """TRL's DPOTrainer (through the tokenized-data cache) against the planned reference, with preference accuracy
    and greedy answers to held-out prompts before and after."""

    name = "dpo"
    keys = DPOKeys
    formats = PREFERENCE_FORMATS
    about = "Direct Preference Optimization against a reference model (TRL's DPOTrainer; every loss_type it has)"
    figures = (Figure("pref accuracy", "pref_accuracy", False), Figure("eval loss (DPO)", "eval_loss", True))
    key_settings = ("beta", "loss_type", "loss_weights", "precompute_ref_log_probs")
    config = "trl:DPOConfig"
    trainer_class = "trl:DPOTrainer"
    prepare = ("self", "dataset", "processing_class", "args", "dataset_name")
    unit = "pairs"
    lm_head = True

    def plots(self, rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, str, str]]:
        return preference_plots(rows)

    def plan_parts(self, stage: Stage, inputs: PlanInputs) -> StageParts:
        """max_length, the reference model, and, with the data, what max_length cuts and drops (TRL drops a pair
        whose prompt alone fills it: nothing of either answer would be left)."""
        details = {"input": inputs.start.summary(), "reference": reference_plan(stage, inputs.start)}
        return plan_pairs(stage, inputs, StageParts(details=details), room=0)

    def setup(self) -> None:
        from align.data import first_unique
        from align.models import ensure_chat_template

        ensure_chat_template(self.tokenizer)
        # Full DPO on SFT adapters merged them first (load_start): policy and reference both start as the SFT model.
        self.ref_model, reference = reference_for(self.stage, self.start, self.model)
        logger.info("reference model: %s", reference)
        self.max_length = self.planned.settings["max_length"].value
        self.train, self.eval = self.data["train"], self.data["validation"]
        self.prompts = first_unique(self.eval["prompt"], self.stage.generations)  # each prompt has several pairs
        self.extra = {"reference": reference}

    def eval_sets(self, by_source: dict[str, Any]) -> dict[str, Any]:
        return by_source  # the rows as they are: the Trainer prepares them

    def trainer(self, args: Any, callbacks: list[Any]) -> Any:
        return super().trainer(args, callbacks, ref_model=self.ref_model)

    def guards(self) -> list[Any]:
        from align.guards import PreferenceGuard

        return [PreferenceGuard(self.ctx.tracker)]  # chosen answers pushed down; a loss stuck at ln 2

    def check(self, trainer: Any) -> None:
        report_dropped(
            self.stage, trainer, (len(self.train), len(self.eval)),
            reason=f"the prompt alone fills max_length={self.max_length}",
            refusal=f"every {{split}} prompt fills {self.max_length} tokens, so no pair is left to learn from",
            hint=LENGTH_HINT,
        )  # fmt: skip
        self.extra.update(beta=trainer.args.beta, loss_type=trainer.args.loss_type)

    def measure(self, trainer: Any) -> dict[str, Any]:
        return measure_pairs(self, trainer, self.eval)

    def summarize(self, before, after, measured_before, measured_after):
        return summarize_pairs(self, after, measured_before, measured_after,
                               dpo_loss=(before.get("eval_loss"), after.get("eval_loss")))  # fmt: skip
