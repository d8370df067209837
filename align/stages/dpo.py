"""`kind: dpo` — Direct Preference Optimization with TRL's DPOTrainer.

The reference is the stage's input model: with fresh LoRA adapters, the same weights with the adapters off (no
second copy); continuing on an earlier stage's adapters, TRL's frozen copy of them; without LoRA, a frozen copy
(adapters of the input merged first), or its log-probabilities computed once, with `precompute_ref_log_probs`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

from align.prompt_split import split_all_ids
from align.recipe import PREFERENCE_FORMATS, TrainingStage
from align.stages.base import Figure, TrainingKind
from align.stages.common import (
    StageKind,
    max_length_setting,
    measure_pairs,
    pair_examples,
    report_dropped,
    run_stage,
    summarize_pairs,
    warn_most_dropped,
)
from align.stages.preference_family import reference_for, reference_plan
from align.values import StageParts, StageResult, StartingPoint

if TYPE_CHECKING:
    from align.context import StageContext
    from align.recipe import Stage

logger = logging.getLogger(__name__)


def run(stage: Stage, ctx: StageContext) -> StageResult:
    """Align a model to preference pairs; measure preference accuracy before and after; save."""
    return run_stage(stage, ctx, DPOStage)


class DPOStage(StageKind):
    """TRL's DPOTrainer (through the tokenized-data cache) against the planned reference, with preference accuracy
    and greedy answers to held-out prompts before and after."""

    unit = "pairs"
    lm_head = True

    def setup(self) -> None:
        from align.data import first_unique
        from align.models import ensure_chat_template

        ensure_chat_template(self.tokenizer)
        # Full DPO on SFT adapters merged them first (load_start): policy and reference both start as the SFT model.
        self.ref_model, reference = reference_for(self.stage, self.start, self.model)
        logger.info("reference model: %s", reference)
        self.max_length = self.plan.settings["max_length"].value
        self.train, self.eval = self.data["train"], self.data["validation"]
        self.prompts = first_unique(self.eval["prompt"], self.stage.generations)  # each prompt has several pairs
        self.extra = {"reference": reference}

    def eval_sets(self, by_source: dict[str, Any]) -> dict[str, Any]:
        return by_source  # the rows as they are: the Trainer prepares them

    def trainer(self, args: Any, callbacks: list[Any]) -> Any:
        from trl import DPOTrainer

        from align.cache import cached_trainer
        from align.models import lora_config

        return cached_trainer(DPOTrainer, "dpo", self.ctx.spec.format)(
            model=self.model, ref_model=self.ref_model, args=args, train_dataset=self.train,
            eval_dataset=self.eval, processing_class=self.tokenizer, callbacks=callbacks,
            peft_config=lora_config(self.stage.peft) if self.start.lora == "new" else None,
        )  # fmt: skip

    def guards(self) -> list[Any]:
        from align.guards import PreferenceGuard

        return [PreferenceGuard(self.ctx.tracker)]  # chosen answers pushed down; a loss stuck at ln 2

    def check(self, trainer: Any) -> None:
        report_dropped(
            self.stage, trainer, (len(self.train), len(self.eval)),
            reason=f"the prompt alone fills max_length={self.max_length}",
            refusal=f"every {{split}} prompt fills {self.max_length} tokens, so no pair is left to learn from",
            hint="raise max_length (align caps it at the model's positions) or shorten the prompts",
        )  # fmt: skip
        self.extra.update(beta=trainer.args.beta, loss_type=trainer.args.loss_type)

    def measure(self, trainer: Any) -> dict[str, Any]:
        return measure_pairs(self, trainer, self.eval)

    def summarize(self, before, after, measured_before, measured_after):
        return summarize_pairs(self, after, measured_before, measured_after,
                               dpo_loss=(before.get("eval_loss"), after.get("eval_loss")))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Dry run


def plan(
    stage: Stage, *, spec: Any, data: Any, tokenizer: Any, config: Any, start: StartingPoint, recipe: Any = None
) -> StageParts:
    """A DPO stage's part of its plan: max_length, the reference model, and, with the data, the pairs whose prompt
    alone fills `max_length` (TRL drops them; none left in a split is a problem here, before any stage trains)."""
    from align.models import ensure_chat_template
    from align.plan import batch_figures

    length = max_length_setting(stage, config)
    parts = StageParts(
        fixed={"max_length": length}, details={"input": start.summary(), "reference": reference_plan(stage, start)}
    )
    if tokenizer is None or data is None:
        return parts
    ensure_chat_template(tokenizer)
    max_length = length.value
    kept, lengths, truncated = {}, [], 0
    for split, pairs in (("train", data["train"]), ("eval", data["validation"])):
        prompts = list(pairs["prompt"])
        sides = [split_all_ids(tokenizer, prompts, list(pairs[side])) for side in ("chosen", "rejected")]
        if split == "train":
            lengths = [len(p) + len(c) for side in sides for p, c in side]
            truncated = sum(max_length is not None and n > max_length for n in lengths)
        # TRL drops a pair whose prompt alone fills max_length: nothing of either answer would be left.
        kept[split] = sum(max_length is None or len(p) < max_length for p, _ in sides[0])
        if len(pairs) and not kept[split]:
            parts.problems.append(
                f"stages.{stage.name}.train.max_length: every {split} prompt fills {max_length} tokens, so no pair "
                "is left to learn from"
            )
            parts.hints.append("raise max_length (align caps it at the model's positions) or shorten the prompts")
    total = len(data["train"])
    warn_most_dropped(stage, max_length, total - kept["train"], total, "the prompt alone fills it",
                      "raise max_length (align caps it at the model's positions) or shorten the prompts")  # fmt: skip
    parts.details.update(
        train_pairs=len(data["train"]),
        train_tokens=sum(min(n, max_length or n) for n in lengths),  # TRL cuts each side to max_length
        max_length=max_length,
        truncation_rate=truncated / max(1, len(lengths)),
        dropped=f"{len(data['train']) - kept['train']} of {len(data['train'])} train pairs (prompt fills max_length)",
        examples=pair_examples(tokenizer, data["train"]),
    )
    parts.count = lambda effective: batch_figures(effective, kept["train"])
    return parts


class DPOKeys(TrainingStage):
    """A dpo stage's recipe keys: those of every training stage."""

    kind: Literal["dpo"]


KIND = TrainingKind(
    name="dpo",
    keys=DPOKeys,
    formats=PREFERENCE_FORMATS,
    run=run,
    about="Direct Preference Optimization against a reference model (TRL's DPOTrainer; every loss_type it has)",
    figures=(Figure("pref accuracy", "pref_accuracy", False), Figure("eval loss (DPO)", "eval_loss", True)),
    config="trl:DPOConfig",
    plan_parts=plan,
)
