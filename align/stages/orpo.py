"""`kind: orpo` — Odds Ratio Preference Optimization with TRL's ORPOTrainer (`trl.experimental`): SFT and preference
alignment in one loss, no reference model.

The loss is the chosen answer's NLL plus `beta` (the paper's lambda) times the log odds ratio of chosen over rejected.
TRL's NLL runs over the whole chosen sequence, prompt included, and the dry run says so. The held-out measure is
`pref_accuracy`: the share of eval pairs whose chosen completion the policy finds likelier by its mean token
log-probability (what ORPO's odds ratio compares), before and after. It is the policy's own preference, so it is no tie
by construction before training; the sum over tokens would mostly compare the answers' lengths.

`PairStage` is what ORPO and SimPO (align/stages/simpo.py, TRL's CPOTrainer) share: reference-free trainers on pairs.
TRL tokenizes their data inside the trainer's constructor, with no preparation step to hook, so align's
tokenized-data cache does not cover them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from align.prompt_split import split_all_ids
from align.recipe import PREFERENCE_FORMATS, TrainingStage
from align.stages.base import Figure, TrainingKind
from align.stages.common import (
    StageKind,
    max_length_setting,
    measure_pairs,
    pair_examples,
    run_stage,
    summarize_pairs,
    warn_most_dropped,
)
from align.values import Setting, StageParts, StageResult, StartingPoint

if TYPE_CHECKING:
    from align.context import StageContext
    from align.recipe import Stage

logger = logging.getLogger(__name__)

PAIR_BATCHES = {
    # TRL's pair collator needs the string columns it keeps beside the token ids; the Trainer's default drops them.
    "remove_unused_columns": Setting(False, "align (managed): TRL's pair collator reads every column"),
    # Its batches hold chosen_input_ids and rejected_input_ids, no input_ids: the Trainer cannot count their tokens
    # (it warns at every step), so the summary's train_tokens and tokens_per_s are null.
    "include_num_input_tokens_seen": Setting("no", "align (managed): pair batches have no input_ids to count"),
}


def run(stage: Stage, ctx: StageContext) -> StageResult:
    """Align a model to preference pairs with ORPO; measure preference accuracy before and after; save."""
    return run_stage(stage, ctx, ORPOStage)


class PairStage(StageKind):
    """A reference-free trainer of `trl.experimental` on preference pairs, with preference accuracy (`average`: by
    each completion's mean token log-probability) and greedy answers to held-out prompts before and after."""

    unit = "pairs"
    trainer_name = ""  # the class in `trl.experimental`
    method = ""  # as the guards' messages name it
    average = False

    def setup(self) -> None:
        from align.data import first_unique
        from align.models import ensure_chat_template

        ensure_chat_template(self.tokenizer)
        self.extra = {"reference": "none"}
        self.max_length = self.plan.settings["max_length"].value
        self.train, self.eval = (fitting(self.data[split], self.tokenizer, self.max_length, split)
                                 for split in ("train", "validation"))  # fmt: skip
        self.prompts = first_unique(self.eval["prompt"], self.stage.generations)

    def trainer(self, args: Any, callbacks: list[Any]) -> Any:
        from align.models import lora_config
        from align.patches import experimental

        return experimental(self.trainer_name)(
            model=self.model, args=args, train_dataset=self.train, eval_dataset=self.eval,
            processing_class=self.tokenizer, callbacks=callbacks,
            peft_config=lora_config(self.stage.peft) if self.start.lora == "new" else None,
        )  # fmt: skip

    def guards(self) -> list[Any]:
        from align.guards import PreferenceGuard

        return [PreferenceGuard(self.ctx.tracker, method=self.method, stuck_loss=None)]

    def measure(self, trainer: Any) -> dict[str, Any]:
        return measure_pairs(self, trainer, self.eval, self.average)

    def check(self, trainer: Any) -> None:
        # What the card and summary.json say it trained with (the method's own settings, as the trainer holds them).
        self.extra.update({k: getattr(trainer.args, k) for k in ("beta", "loss_type", "cpo_alpha", "simpo_gamma")
                           if hasattr(trainer.args, k)})  # fmt: skip

    def summarize(self, before, after, measured_before, measured_after):
        metrics, extra = summarize_pairs(self, after, measured_before, measured_after)
        return {**metrics, **self.own_metrics(after)}, extra

    def own_metrics(self, after: dict[str, Any]) -> dict[str, Any]:
        """The method's own figures from the final evaluation."""
        return {}


class ORPOStage(PairStage):
    trainer_name = "ORPOTrainer"
    method = "ORPO"
    average = True  # ORPO's odds are of each completion's mean token log-probability

    def own_metrics(self, after: dict[str, Any]) -> dict[str, Any]:
        return {"log_odds_ratio": after.get("eval_log_odds_ratio"), "nll_loss": after.get("eval_nll_loss")}


def fits(tokenizer: Any, pairs: Any, max_length: int | None) -> list[bool]:
    """Per pair, whether its prompt leaves room for an answer in `max_length` (with the BOS token TRL may add).

    TRL's ORPO and CPO trainers shorten the answers to fit `max_length` but keep a prompt that alone is longer: the
    sequence then runs past the model's positions and fails mid-training (IndexError in the embedding)."""
    if max_length is None:
        return [True] * len(pairs)
    ids = split_all_ids(tokenizer, list(pairs["prompt"]), list(pairs["chosen"]))
    return [len(p) < max_length - 1 for p, _ in ids]


def fitting(pairs: Any, tokenizer: Any, max_length: int | None, split: str) -> Any:
    """The pairs whose prompt leaves room for an answer (`fits`); the others are dropped, and the log says so."""
    keep = fits(tokenizer, pairs, max_length)
    if all(keep):
        return pairs
    logger.warning("%s: %d of %d pairs dropped: the prompt alone fills max_length=%s", split,
                   len(keep) - sum(keep), len(keep), max_length)  # fmt: skip
    return pairs.select([i for i, k in enumerate(keep) if k])


def plan_pairs(stage: Stage, *, data: Any, tokenizer: Any, config: Any, parts: StageParts) -> StageParts:
    """What a reference-free pair stage's plan shares: max_length (capped at the model's positions) and, with the
    data, the pairs `max_length` cuts (TRL shortens their answers to fit) or drops (their prompt alone fills it; none
    left in a split is a problem here), the planned steps and two rendered pairs (the compared answer in [[ ]])."""
    from align.models import ensure_chat_template
    from align.plan import batch_figures

    length = max_length_setting(stage, config)
    parts.fixed.update({"max_length": length, **PAIR_BATCHES})
    if tokenizer is None or data is None:
        return parts
    ensure_chat_template(tokenizer)
    max_length = length.value
    train = data["train"]
    sides = [split_all_ids(tokenizer, list(train["prompt"]), list(train[side])) for side in ("chosen", "rejected")]
    lengths = [len(p) + len(c) for side in sides for p, c in side]
    truncated = sum(max_length is not None and n > max_length for n in lengths)
    kept = {}
    for split, pairs in (("train", train), ("eval", data["validation"])):
        kept[split] = sum(fits(tokenizer, pairs, max_length))
        if len(pairs) and not kept[split]:
            parts.problems.append(f"stages.{stage.name}.train.max_length: every {split} prompt fills {max_length} "
                                  "tokens, so no pair is left to learn from")  # fmt: skip
            parts.hints.append("raise max_length (align caps it at the model's positions) or shorten the prompts")
    total = len(train)
    warn_most_dropped(stage, max_length, total - kept["train"], total, "the prompt alone fills it",
                      "raise max_length (align caps it at the model's positions) or shorten the prompts")  # fmt: skip
    parts.details.update(
        train_pairs=len(train),
        train_tokens=sum(min(n, max_length or n) for n in lengths),
        max_length=max_length,
        truncation_rate=truncated / max(1, len(lengths)),
        truncated=f"{truncated} of {len(lengths)} answers (TRL shortens the answer to fit max_length)",
        dropped=f"{len(train) - kept['train']} of {len(train)} train pairs (prompt fills max_length)",
        examples=pair_examples(tokenizer, train),
    )
    parts.count = lambda effective: batch_figures(effective, kept["train"])
    return parts


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
