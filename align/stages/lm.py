"""`kind: lm` — causal-LM fine-tuning on plain text with transformers' Trainer (why not TRL: see lm_config.py).

Text is tokenized, joined and cut into full blocks no longer than the model's positions, so every token
in a batch is real: no compute goes to padding and no sample ends mid-block.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from align.stages.common import (
    StageResult,
    capped_max_length,
    early_stopping_callbacks,
    evaluate,
    load_start,
    metrics_writer,
    perplexity,
    planned_steps,
    save_stage_model,
    summary_metrics,
    training_args,
    watch,
)

if TYPE_CHECKING:
    from align.recipe import Stage
    from align.runtime import RunContext

logger = logging.getLogger(__name__)


def block_size(stage: Stage, config: Any) -> int:
    """Block length: `train.max_length` (default 1024), capped at the model's positions."""
    return int(capped_max_length(stage, config) or 1024)


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
    data = ctx.data[stage.name]
    # An lm stage trains every weight: LoRA adapters of an earlier stage are merged into their base first.
    model, tokenizer, start = load_start(ctx, stage, texts=lambda: data["train"]["text"])

    # 2. Data: full blocks of real tokens ---------------------------------------------------------
    size = block_size(stage, model.config)
    train_blocks, train_stats = cached_blocks(data["train"], tokenizer, size, "train")
    eval_blocks, eval_stats = cached_blocks(data["validation"], tokenizer, size, "eval")
    logger.info(
        "%d train blocks and %d eval blocks of %d tokens (%d and %d tail tokens dropped)",
        train_stats["blocks"], eval_stats["blocks"], size, train_stats["dropped_tokens"], eval_stats["dropped_tokens"],
    )  # fmt: skip

    # 3. Trainer ------------------------------------------------------------------------------------
    args = training_args(stage, ctx, supports_checkpointing=model.supports_gradient_checkpointing, max_length=size)
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
    logger.info(
        "training: %d steps planned, effective batch %d blocks (%d per device x %d accumulation x %d processes)",
        planned_steps(args, len(train_blocks), args.world_size),
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size,
    )  # fmt: skip

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


def preflight(stage: Stage, ctx: RunContext, tokenizer: Any, config: Any) -> dict[str, Any]:
    """What `--dry-run` shows for an LM stage: blocks, token counts, dropped tail, planned steps, a sample."""
    from align.data import pack_text_blocks

    data = ctx.data[stage.name]
    size = block_size(stage, config)
    train_blocks, train_stats = pack_text_blocks(data["train"], tokenizer, size)
    _, eval_stats = pack_text_blocks(data["validation"], tokenizer, size)
    args = training_args(stage, ctx, supports_checkpointing=_supports_checkpointing(config), max_length=size)
    sample = tokenizer.decode(train_blocks[0]["input_ids"][:64]) if len(train_blocks) else ""
    return {
        "block_size": size,
        "train_tokens": train_stats["tokens"],
        "eval_tokens": eval_stats["tokens"],
        "train_blocks": train_stats["blocks"],
        "eval_blocks": eval_stats["blocks"],
        "truncation_rate": train_stats["dropped_tokens"] / max(1, train_stats["tokens"]),
        "packing_efficiency": 1.0,  # every position of every block holds a real token
        "planned_steps": planned_steps(args, train_stats["blocks"]),
        "effective_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps,
        "examples": [{"text": sample, "loss_mask": "every token is trained on (language modelling)"}],
    }


def _supports_checkpointing(config: Any) -> bool:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return bool(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].supports_gradient_checkpointing)
    except KeyError:
        return False
