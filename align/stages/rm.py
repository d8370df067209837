"""`kind: rm` — a reward model, trained with TRL's RewardTrainer on preference pairs.

The model is the input policy (by default the previous lm, sft or dpo stage's output) with a sequence-classification
head of one output: the same body, tokenizer and chat template, a new head. It learns to score the chosen answer
above the rejected one (Bradley-Terry), and an eval stage uses it as a judge. Train it on pairs whose prompts the
dpo stage does not train on (the builtin preferences' `reward` split): a judge trained on DPO's own pairs agrees
with DPO by construction.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from align.prompt_format import score_usage
from align.prompt_split import split_all_ids
from align.recipe import PREFERENCE_FORMATS, TrainingStage
from align.stages.base import Figure, TrainingKind
from align.stages.runner import max_length_setting, pair_examples, report_dropped, warn_most_dropped
from align.values import HeldOut, StageParts

if TYPE_CHECKING:
    from align.plan import PlanInputs
    from align.recipe import Stage

logger = logging.getLogger(__name__)

# The reward trainer drops a pair longer than max_length, so what it needs is room for the whole pair.
HINT = "raise max_length (align caps it at the model's positions) or shorten the answers"


class RMKeys(TrainingStage):
    """An rm stage's recipe keys: those of every training stage. Its model is a judge, not a policy."""

    kind: Literal["rm"]
    makes: ClassVar[str | None] = "reward_model"
    article: ClassVar[str] = "an"


class RM(TrainingKind):
    """TRL's RewardTrainer (through the tokenized-data cache), with held-out pair accuracy before and after."""

    name = "rm"
    keys = RMKeys
    formats = PREFERENCE_FORMATS
    about = "a reward model on preference pairs (TRL's RewardTrainer): an eval stage's judge"
    figures = (
        Figure("accuracy", "accuracy", False),
        Figure("margin", "margin", False),
        Figure("eval loss", "eval_loss", True),
    )
    pipeline_tag = "text-classification"
    config = "trl:RewardConfig"
    trainer_class = "trl:RewardTrainer"
    prepare = ("self", "dataset", "processing_class", "args", "dataset_name")
    unit = "pairs"
    reward_head = True  # the input's body with a new sequence-classification head of one output

    def card_usage(self, prompt_format: Any, adapters: bool) -> str:
        return score_usage(prompt_format, adapters)

    def plan_parts(self, stage: Stage, inputs: PlanInputs) -> StageParts:
        """max_length (the library's 1024, capped at the model's positions), the head, and, with the data, the pairs
        the reward trainer will drop for being longer than max_length (none left in a split is a problem here, before
        any stage trains)."""
        from align.models import ensure_chat_template
        from align.plan import batch_figures

        data, tokenizer, start = inputs.data, inputs.tokenizer, inputs.start
        length = max_length_setting(stage, inputs.config)
        details = {"input": start.summary(), "head": "a new sequence-classification head of one output (the reward)"}
        parts = StageParts(fixed={"max_length": length}, details=details)
        if start.lora == "continue":
            parts.problems.append(
                f"stages.{stage.name}.peft: the input model is LoRA adapters of a language model; a reward model "
                "cannot train them on as they are"
            )
            parts.hints.append("save the earlier stage with `merge: true`, or train this stage without `peft:`")
        if tokenizer is None or data is None:
            return parts
        ensure_chat_template(tokenizer)
        max_length = length.value
        kept, lengths = {}, []
        for split, pairs in (("train", data["train"]), ("eval", data["validation"])):
            prompts = list(pairs["prompt"])
            sides = [split_all_ids(tokenizer, prompts, list(pairs[side])) for side in ("chosen", "rejected")]
            totals = [max(len(a[0]) + len(a[1]), len(b[0]) + len(b[1])) for a, b in zip(*sides, strict=True)]
            if split == "train":  # the tokens of the pairs it keeps: a longer pair is dropped, not cut
                fitting = [
                    (a, b) for a, b, n in zip(*sides, totals, strict=True) if max_length is None or n <= max_length
                ]
                lengths = [len(p) + len(c) for pair in fitting for p, c in pair]
            kept[split] = sum(max_length is None or n <= max_length for n in totals)
            if len(pairs) and not kept[split]:
                parts.problems.append(
                    f"stages.{stage.name}.train.max_length: every {split} pair is longer than {max_length} tokens; the "
                    "reward trainer drops such pairs, so none is left"
                )
                parts.hints.append(HINT)
        total = len(data["train"])
        warn_most_dropped(stage, max_length, total - kept["train"], total, "the longer answer does not fit", HINT)
        parts.details.update(
            train_pairs=len(data["train"]),
            train_tokens=sum(lengths),
            max_length=max_length,
            dropped=f"{total - kept['train']} of {total} train pairs (longer than max_length)",
            examples=pair_examples(tokenizer, data["train"]),
        )
        parts.count = lambda effective: batch_figures(effective, kept["train"])
        return parts

    def setup(self) -> None:
        from align.models import ensure_chat_template

        ensure_chat_template(self.tokenizer)
        self.train, self.eval = self.data["train"], self.data["validation"]
        self.max_length = self.planned.settings["max_length"].value

    def eval_sets(self, by_source: dict[str, Any]) -> dict[str, Any]:
        return by_source  # the rows as they are: the Trainer prepares them

    def check(self, trainer: Any) -> None:
        # TRL's reward trainer drops a pair whose chosen or rejected sequence is longer than max_length, not cut it.
        report_dropped(
            self.stage, trainer, (len(self.train), len(self.eval)), reason=f"longer than max_length={self.max_length}",
            refusal=f"every {{split}} pair is longer than {self.max_length} tokens, and the reward trainer drops such "
            "pairs, so none is left",
            hint=HINT,
        )  # fmt: skip

    def measure(self, trainer: Any) -> HeldOut:
        """Every held-out pair the Trainer evaluates, scored as it scores them (its own token ids)."""
        from align.evaluation.judges import score_token_ids

        pairs = trainer.eval_dataset
        pad = self.tokenizer.pad_token_id
        size = trainer.args.per_device_eval_batch_size
        chosen = score_token_ids(trainer.model, pairs["chosen_ids"], pad, batch_size=size)
        rejected = score_token_ids(trainer.model, pairs["rejected_ids"], pad, batch_size=size)
        correct = [int(c > r) for c, r in zip(chosen, rejected, strict=True)]
        margin = sum(c - r for c, r in zip(chosen, rejected, strict=True)) / max(1, len(correct))
        return HeldOut(correct, extra={"margin": margin})

    def summarize(self, before, after, measured_before, measured_after):
        from align.verdict import accuracy_verdict

        metrics = {
            "accuracy_before": measured_before.figure,
            "accuracy": measured_after.figure,
            "margin_before": measured_before.extra["margin"],
            "margin": measured_after.extra["margin"],
        }
        verdict = accuracy_verdict("accuracy", measured_before.values, measured_after.values, unit="pairs",
                                   **self.trained_with)  # fmt: skip
        logged = (after or {}).get("eval_accuracy")
        if isinstance(logged, int | float):
            # Two accuracies of one model in one log: said how they differ, so they do not read as a contradiction.
            logger.info(
                "accuracy %.4f → %.4f: the share of the %d held-out pairs whose chosen answer scores higher; the "
                "Trainer's eval_accuracy in the rows above (%.4f at the end) is a mean of its eval batches' "
                "accuracies, so it differs a little", measured_before.figure, measured_after.figure,
                len(measured_after.values), logged,
            )  # fmt: skip
        return metrics, {"verdict": verdict.record()}
