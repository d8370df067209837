"""`kind: lm` — causal-LM fine-tuning on plain text with transformers' Trainer (why not TRL: see lm_config.py).

Text is tokenized, joined and cut into full blocks no longer than the model's positions, so every token
in a batch is real: no compute goes to padding and no sample ends mid-block.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from align.stages.common import (
    StageResult,
    early_stopping_callbacks,
    evaluate,
    load_start,
    log_training,
    max_length_setting,
    metrics_writer,
    perplexity,
    save_stage_model,
    summary_metrics,
    training_args,
    watch,
)

if TYPE_CHECKING:
    from align.plan import StageParts
    from align.recipe import Stage
    from align.runtime import RunContext

logger = logging.getLogger(__name__)


def collate_blocks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack full blocks; every token is a label.

    transformers' DataCollatorForLanguageModeling masks labels equal to the pad token, and with pad = eos (the
    usual choice for GPT tokenizers) it would silently never train the model to end a text.
    """
    import torch

    input_ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def run(stage: Stage, ctx: RunContext) -> StageResult:
    """Fine-tune a causal LM on a text data set; evaluate before and after; save the model."""
    from transformers import Trainer

    from align.runtime import seed_everything

    # 1. Seed, model and tokenizer ---------------------------------------------------------------
    seed_everything(ctx.seed)
    # An lm stage trains every weight: LoRA adapters of an earlier stage are merged into their base first.
    model, tokenizer, start = load_start(ctx, stage)

    # 2. Data: full blocks of real tokens, made by the plan ------------------------------------------
    plan = ctx.plans[stage.name]
    size = plan.settings["max_length"].value
    (train_blocks, train_stats), (eval_blocks, eval_stats) = plan.prepared["train"], plan.prepared["eval"]
    logger.info(
        "%d train blocks and %d eval blocks of %d tokens (%d and %d tail tokens dropped)",
        train_stats["blocks"], eval_stats["blocks"], size, train_stats["dropped_tokens"], eval_stats["dropped_tokens"],
    )  # fmt: skip

    # 3. Trainer ------------------------------------------------------------------------------------
    args = training_args(stage, ctx)
    writer = metrics_writer(ctx, stage)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=collate_blocks,
        processing_class=tokenizer,
        callbacks=[writer, *early_stopping_callbacks(stage)],
    )
    guard = watch(trainer, ctx)
    log_training(args, len(train_blocks), "blocks")

    # 4. Evaluate, train, evaluate ------------------------------------------------------------------
    before = evaluate(trainer, writer, "before")
    result = trainer.train(resume_from_checkpoint=ctx.resume_from(stage))
    ctx.check_finite(stage, writer, guard)
    after = evaluate(trainer, writer, "final")

    # 5. Save and summarise -------------------------------------------------------------------------
    model_dir, _ = save_stage_model(ctx, stage, trainer, tokenizer, start)
    metrics = summary_metrics(stage, trainer, result, before, after, writer)
    metrics["perplexity"] = perplexity(after.get("eval_loss"))
    metrics["perplexity_before"] = perplexity(before.get("eval_loss"))
    extra = {
        "input": start.input,
        "block_size": size,
        "train_blocks": train_stats["blocks"],
        "eval_blocks": eval_stats["blocks"],
    }
    return StageResult(stage.name, stage.kind, "completed", model_dir, ctx.input_label(stage), metrics, extra)


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


def plan(stage: Stage, *, spec: Any, data: Any, tokenizer: Any, config: Any, start: Any) -> StageParts:
    """An LM stage's part of its plan: the block length and, with the data, blocks, token counts and a sample."""
    from align.plan import Setting, StageParts, batch_figures

    length = max_length_setting(stage, config)
    size = int(length.value or 1024)  # the block length: None would mean one endless block
    parts = StageParts(fixed={"max_length": Setting(size, length.source)}, details={"input": start.summary()})
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
