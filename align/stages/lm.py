"""`kind: lm` — causal-LM fine-tuning on plain text with transformers' Trainer (why not TRL: see lm_config.py).

Text is tokenized, joined and cut into full blocks no longer than the model's positions, so every token
in a batch is real: no compute goes to padding and no sample ends mid-block.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from align.recipe import TrainingStage
from align.stages.base import Figure, TrainingKind
from align.stages.runner import max_length_setting, perplexities
from align.values import HeldOut, Setting, StageParts

if TYPE_CHECKING:
    from align.plan import PlanInputs
    from align.recipe import Stage

logger = logging.getLogger(__name__)


def collate_blocks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack full blocks; every token is a label.

    transformers' DataCollatorForLanguageModeling masks labels equal to the pad token, and with pad = eos (the
    usual choice for GPT tokenizers) it would silently never train the model to end a text.
    """
    import torch

    input_ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


class LMKeys(TrainingStage):
    """An lm stage's recipe keys: those of every training stage. It trains every weight, so it takes no `peft:`."""

    kind: Literal["lm"]
    article: ClassVar[str] = "an"

    def problems(self, earlier: list[Stage]) -> list[str]:
        problems = super().problems(earlier)
        if self.peft is not None:
            problems.append(f"stages.{self.name}.peft: an lm stage trains every weight; LoRA is for the stages that "
                            "adapt a model after it (sft, preference, reward model)")  # fmt: skip
        return problems


class LM(TrainingKind):
    """transformers' Trainer on full blocks of real tokens (made by the plan), every token a label."""

    name = "lm"
    keys = LMKeys
    formats = ("text",)
    about = "causal-LM fine-tuning on plain text (transformers' Trainer on full blocks of real tokens)"
    figures = (Figure("eval loss", "eval_loss", True), Figure("perplexity", "perplexity", True))
    config = "align.stages.lm_config:LMConfig"
    unit = "blocks"
    token_loss = True

    def plan_parts(self, stage: Stage, inputs: PlanInputs) -> StageParts:
        """The block length and, with the data, blocks, token counts and a sample."""
        from align.plan import batch_figures

        data, tokenizer = inputs.data, inputs.tokenizer
        length = max_length_setting(stage, inputs.config)
        size = int(length.value or 1024)  # the block length: None would mean one endless block
        parts = StageParts(
            fixed={"max_length": Setting(size, length.source)}, details={"input": inputs.start.summary()}
        )
        if data is None or tokenizer is None:
            return parts
        train_blocks, train_stats = cached_blocks(data["train"], tokenizer, size, "train")
        eval_blocks, eval_stats = cached_blocks(data["validation"], tokenizer, size, "eval")
        parts.prepared = {"train": (train_blocks, train_stats), "eval": (eval_blocks, eval_stats)}
        for split, stats in (("training", train_stats), ("eval", eval_stats)):
            if not stats["blocks"]:
                parts.problems.append(
                    f"stages.{stage.name}.train.max_length: the {split} text ({stats['tokens']} tokens) fills no "
                    f"block of {size} tokens"
                )
                parts.hints.append("lower max_length, or give the stage more text")
        sample = tokenizer.decode(train_blocks[0]["input_ids"][:64]) if len(train_blocks) else ""
        parts.details.update(
            block_size=size,
            train_tokens=train_stats["tokens"],
            eval_tokens=eval_stats["tokens"],
            train_blocks=train_stats["blocks"],
            eval_blocks=eval_stats["blocks"],
            truncation_rate=train_stats["dropped_tokens"] / max(1, train_stats["tokens"]),
            packing_efficiency=1.0,  # every position of every block holds a real token
            examples=[{"text": sample, "loss_mask": "every token is trained on (language modelling)"}],
        )
        parts.count = lambda effective: batch_figures(effective, train_stats["blocks"])
        return parts

    def setup(self) -> None:
        # An lm stage trains every weight: LoRA adapters of an earlier stage were merged into their base (load_start).
        prepared = self.planned.prepared
        (self.train, train_stats), (self.eval, eval_stats) = prepared["train"], prepared["eval"]
        size = self.planned.settings["max_length"].value
        logger.info(
            "%d train blocks and %d eval blocks of %d tokens (%d and %d tail tokens dropped)",
            train_stats["blocks"], eval_stats["blocks"], size, train_stats["dropped_tokens"],
            eval_stats["dropped_tokens"],
        )  # fmt: skip
        self.extra = {"block_size": size, "train_blocks": train_stats["blocks"], "eval_blocks": eval_stats["blocks"]}

    def eval_sets(self, by_source: dict[str, Any]) -> dict[str, Any]:
        # Each source's text in blocks of its own: the whole split's blocks run across the sources' boundaries.
        size = self.planned.settings["max_length"].value
        return {name: cached_blocks(rows, self.tokenizer, size, f"eval {name}")[0] for name, rows in by_source.items()}

    def trainer(self, args: Any, callbacks: list[Any]) -> Any:
        from transformers import Trainer

        return Trainer(
            model=self.model, args=args, train_dataset=self.train, eval_dataset=self.eval,
            data_collator=collate_blocks, processing_class=self.tokenizer, callbacks=callbacks,
        )  # fmt: skip

    def measure(self, trainer: Any) -> HeldOut:
        from align.verdict import example_losses

        return HeldOut(example_losses(trainer))  # each eval block's loss, for the verdict

    def summarize(self, before, after, measured_before, measured_after):
        from align.verdict import loss_verdict

        losses = measured_before.values, measured_after.values
        verdict = loss_verdict("eval loss per example", *losses, unit="blocks", **self.trained_with)
        return perplexities(before, after), {"verdict": verdict}


def cached_blocks(ds: Any, tokenizer: Any, size: int, split: str) -> tuple[Any, dict[str, int]]:
    """`pack_text_blocks` through the tokenized-data cache (keyed by the rows, the tokenizer and the block length)."""
    from align.cache import cache_root, dataset_fingerprint, fetch, tokenizer_fingerprint
    from align.data import pack_text_blocks

    if cache_root() is None:
        return pack_text_blocks(ds, tokenizer, size)
    parts = {
        "kind": "lm",
        "format": "text",
        "split": split,
        "data": dataset_fingerprint(ds),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "block_size": size,
    }
    return fetch(parts, lambda: pack_text_blocks(ds, tokenizer, size), f"lm {split}")
