"""`kind: sft` — supervised fine-tuning with TRL's SFTTrainer.

Formats `prompt_completion`, `messages` and `text`. The loss falls on completions / assistant turns only
by default; packing is used only where the model's attention keeps packed samples apart.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from align.errors import BadInput
from align.stages.common import (
    StageResult,
    capped_max_length,
    early_stopping_callbacks,
    evaluate,
    generation_table,
    load_start,
    metrics_writer,
    perplexity,
    planned_steps,
    render_mask,
    save_stage_model,
    starting_point,
    summary_metrics,
    training_args,
    watch,
)

if TYPE_CHECKING:
    from datasets import Dataset

    from align.recipe import Stage
    from align.runtime import RunContext

logger = logging.getLogger(__name__)


def run(stage: Stage, ctx: RunContext) -> StageResult:
    """Fine-tune on prompt/completion pairs, conversations or text; evaluate and sample before and after; save."""
    from trl import SFTTrainer

    from align.cache import cached_trainer
    from align.data import training_texts
    from align.lm_head import install as install_lm_head
    from align.models import ensure_chat_template, generate, lora_config
    from align.runtime import seed_everything

    fmt = ctx.specs[stage.name].format

    # 1. Seed, model, tokenizer, chat template ------------------------------------------------------
    seed_everything(ctx.seed)
    data = ctx.data[stage.name]
    model, tokenizer, start = load_start(ctx, stage, texts=lambda: training_texts(data["train"]))
    template = ensure_chat_template(tokenizer)

    # 2. Data and loss mask -------------------------------------------------------------------------
    train_ds, eval_ds, loss = loss_settings(stage, fmt, data["train"], data["validation"], tokenizer)
    max_length = capped_max_length(stage, model.config)

    # 3. Trainer ------------------------------------------------------------------------------------
    pack, pack_reason = choose_packing(stage, model)
    logger.info("%s", pack_reason)
    args = training_args(
        stage, ctx, supports_checkpointing=model.supports_gradient_checkpointing, max_length=max_length, **loss, **pack
    )
    peft_config = lora_config(stage.peft) if start.lora == "new" else None
    writer = metrics_writer(ctx, stage)
    logger.info("LM head: %s", install_lm_head(args.device))  # align/lm_head.py
    trainer = cached_trainer(SFTTrainer, "sft", fmt)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[writer, *early_stopping_callbacks(stage)],
    )
    guard = watch(trainer, ctx)
    report_truncation(stage, trainer, len(train_ds), len(eval_ds), max_length, args.packing)
    logger.info(
        "first training example, trained tokens in [[ ]]: %r", render_labels(trainer.train_dataset[0], tokenizer)
    )
    logger.info(
        "training: %d steps planned, effective batch %d", planned_steps(args, len(train_ds), args.world_size),
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
    )  # fmt: skip

    # 4. Evaluate and sample, train, evaluate and sample ---------------------------------------------
    prompts = eval_prompts(eval_ds, stage.generations)
    answers_before = generate(trainer.model, tokenizer, prompts)
    before = evaluate(trainer, writer, "before")
    result = trainer.train(resume_from_checkpoint=ctx.resume_from(stage))
    ctx.check_finite(stage, writer, guard)
    after = evaluate(trainer, writer, "final")
    answers_after = generate(trainer.model, tokenizer, prompts)
    generations = generation_table(ctx, prompts, answers_before, answers_after)

    # 5. Save and summarise -------------------------------------------------------------------------
    model_dir, saved = save_stage_model(ctx, stage, trainer, tokenizer, start)
    metrics = summary_metrics(stage, trainer, result, before, after, writer)
    metrics["perplexity"] = perplexity(after.get("eval_loss"))
    metrics["perplexity_before"] = perplexity(before.get("eval_loss"))
    extra = {
        "input": start.input,
        "chat_template": template,
        "loss_on": describe_loss(loss, fmt),
        "packing": pack_reason,
        "saved": saved,
        "generations": generations,
    }
    return StageResult(stage.name, stage.kind, "completed", model_dir, ctx.input_label(stage), metrics, extra)


# --------------------------------------------------------------------------------------------------
# The pieces, in the order `run` uses them


def loss_settings(
    stage: Stage, fmt: str, train: Dataset, valid: Dataset, tokenizer: Any
) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """Where the loss falls: completions (prompt_completion), assistant turns (messages), everything (text).

    Where the chat template cannot mark assistant turns, conversations become prompt (all turns before the
    last assistant turn) and completion (that turn), trained completion-only, and the log says so.
    """
    from align.models import marks_assistant_turns

    if fmt == "messages" and stage.train.get("assistant_only_loss", True):
        if marks_assistant_turns(tokenizer):
            return train, valid, {"assistant_only_loss": True}
        logger.warning(
            "the chat template cannot mark assistant turns: training on each conversation's last assistant turn, "
            "with the earlier turns as its prompt (completion-only loss)"
        )
        split = {"prompt": _before_last_assistant, "completion": _last_assistant}

        def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
            return {key: fn(row["messages"]) for key, fn in split.items()}

        train = train.map(to_prompt_completion, remove_columns=["messages"])
        valid = valid.map(to_prompt_completion, remove_columns=["messages"])
        return train, valid, {"completion_only_loss": True}
    return train, valid, {}


def describe_loss(loss: dict[str, Any], fmt: str) -> str:
    if loss.get("assistant_only_loss"):
        return "assistant turns"
    if fmt == "prompt_completion" or loss.get("completion_only_loss"):
        return "completions" if loss.get("completion_only_loss", True) else "whole sequences"
    return "whole sequences"


def _last_assistant_index(messages: list[dict[str, Any]]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def _before_last_assistant(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return messages[: _last_assistant_index(messages)]


def _last_assistant(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [messages[_last_assistant_index(messages)]]


def sequence_lengths(ds: Dataset, tokenizer: Any) -> list[int]:
    """Token length of each example as it will be trained (chat template applied, eos added)."""
    lengths = []
    for row in ds:
        if "messages" in row:
            lengths.append(len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)))
        elif "prompt" in row:
            if isinstance(row["prompt"], list):
                convo = row["prompt"] + row["completion"]
                lengths.append(len(tokenizer.apply_chat_template(convo, tokenize=True, return_dict=False)))
            else:
                lengths.append(
                    len(tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]) + 1
                )
        else:
            lengths.append(len(tokenizer(row["text"], add_special_tokens=False)["input_ids"]) + 1)
    return lengths


def count_truncated(ds: Dataset, tokenizer: Any, max_length: int | None, split: str) -> tuple[int, list[int]]:
    """Count (and report) the examples longer than `max_length` before any trainer exists (for --dry-run)."""
    lengths = sequence_lengths(ds, tokenizer)
    over = sum(1 for n in lengths if max_length is not None and n > max_length)
    if over:
        logger.warning(
            "%s: %d of %d examples are longer than max_length=%d and will be truncated", split, over, len(lengths),
            max_length,
        )  # fmt: skip
    return over, lengths


def report_truncation(stage: Stage, trainer: Any, n_train: int, n_eval: int, max_length: int | None, packed: bool):
    """Say what TRL's preparation cut: examples truncated to `max_length`, and examples it dropped because
    truncation left them no trained token. Counted on TRL's own output, so nothing is tokenized twice.

    Raises:
        BadInput: no training example keeps a trained token (max_length shorter than the prompts).
    """
    if packed or max_length is None:
        return
    train, where = trainer.train_dataset, f"stages.{stage.name}.train.max_length"
    for split, kept, total in (("training", len(train), n_train), ("eval", len(trainer.eval_dataset), n_eval)):
        if total and not kept:
            raise BadInput(
                f"{where}: {max_length} tokens leave no {split} example a trained token (prompts fill it)",
                hint="raise max_length (align caps it at the model's positions) or shorten the prompts",
            )
    import pyarrow.compute as pc

    # Counted in Arrow: materialising every row as a Python list cost 1.5 s on 30,000 examples.
    lengths = pc.list_value_length(train.with_format("arrow")["input_ids"])
    truncated = int(pc.sum(pc.greater_equal(lengths, max_length)).as_py() or 0)
    if truncated:
        logger.warning("train: %d of %d examples were truncated to max_length=%d", truncated, len(train), max_length)
    dropped = {"train": n_train - len(train), "eval": n_eval - len(trainer.eval_dataset)}
    for split, count in dropped.items():
        if count:
            logger.warning("%s: %d examples dropped: truncation at %d tokens left them nothing to learn", split,
                           count, max_length)  # fmt: skip


def choose_packing(stage: Stage, model: Any) -> tuple[dict[str, Any], str]:
    """Padding-free packing where the attention keeps packed samples apart; otherwise none. Says which and why.

    Raises:
        BadInput: `packing: true` (best-fit) asked of a model that would let samples attend to each other.
    """
    from align.models import attention_separates_sequences

    asked = stage.train.get("packing")
    strategy = stage.train.get("packing_strategy", "bfd")
    separates = attention_separates_sequences(model)
    attention = str(getattr(model.config, "_attn_implementation", None) or "eager")
    if asked is None:
        if separates and "flash" in attention:
            return {"packing": True}, f"packing: padding-free ({attention} keeps packed samples apart)"
        if separates:
            # Measured on the CPU: sdpa separates packed samples only through a dense mask over the whole packed
            # row, which made a step 10x slower than padded batches.
            return {"packing": False}, (
                f"packing: off — {attention} keeps packed samples apart only with a dense mask over the whole "
                "packed row, which costs more than padding; batches are padded to their longest example"
            )
        return {"packing": False}, (
            f"packing: off — this model's attention ({attention}) would let packed samples see each other; "
            "batches are padded to their longest example"
        )
    if asked and strategy == "wrapped":
        logger.warning("packing_strategy: wrapped cuts samples mid-sequence and lets them attend to each other")
        return {}, "packing: wrapped, as the recipe asks (samples attend across boundaries)"
    if asked and not separates:
        raise BadInput(
            f"stages.{stage.name}.train.packing: this model's attention cannot keep packed samples apart "
            "(it would let them attend to each other)",
            hint="remove `packing` (align then pads each batch instead), or use a model with flash attention",
        )
    return {}, f"packing: {'padding-free, as the recipe asks' if asked else 'off, as the recipe asks'}"


def eval_prompts(ds: Dataset, count: int) -> list[Any]:
    """The first `count` eval prompts: the prompt field, or a conversation up to its last assistant turn."""
    prompts = []
    for row in ds.select(range(min(count, len(ds)))):
        if "prompt" in row:
            prompts.append(row["prompt"])
        elif "messages" in row:
            prompts.append(_before_last_assistant(row["messages"]))
        else:
            prompts.append(row["text"][:200])
    return prompts


def render_labels(example: dict[str, Any], tokenizer: Any) -> str:
    """An example as TRL prepared it, with the tokens that carry a loss marked."""
    ids = example["input_ids"]
    if "labels" in example:
        mask = [int(label != -100) for label in example["labels"]]
    else:
        mask = example.get("assistant_masks") or example.get("completion_mask") or [1] * len(ids)
    return render_mask(ids, mask, tokenizer)


def render_example(row: dict[str, Any], tokenizer: Any, loss: dict[str, Any]) -> str:
    """How TRL will tokenize one row and where its loss falls, without building a trainer (for --dry-run)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    eos = tokenizer.eos_token or ""
    if "messages" in row:
        template = tokenizer.chat_template
        if loss.get("assistant_only_loss") and not has_generation_markers(template):
            template = get_training_chat_template(tokenizer)
        out = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=template
        )
        mask = out["assistant_masks"] if loss.get("assistant_only_loss") else [1] * len(out["input_ids"])
        return render_mask(out["input_ids"], mask, tokenizer)
    if "prompt" in row:
        if isinstance(row["prompt"], list):
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
        else:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            full = tokenizer(row["prompt"] + row["completion"] + eos, add_special_tokens=False)["input_ids"]
        shared = next(
            (i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), min(len(prompt), len(full))
        )
        trained = loss.get("completion_only_loss", True)
        return render_mask(full, [0] * shared + [int(trained)] * (len(full) - shared), tokenizer)
    ids = tokenizer(row["text"] + eos, add_special_tokens=False)["input_ids"]
    return render_mask(ids, [1] * len(ids), tokenizer)


def preflight(stage: Stage, ctx: RunContext, tokenizer: Any, config: Any) -> dict[str, Any]:
    """What `--dry-run` shows for an SFT stage: two rendered examples with their loss mask, token statistics."""
    from align.models import ensure_chat_template, marks_assistant_turns

    data = ctx.data[stage.name]
    fmt = ctx.specs[stage.name].format
    template = ensure_chat_template(tokenizer)
    start = starting_point(ctx, stage)
    train, _, loss = loss_settings(stage, fmt, data["train"], data["validation"], tokenizer)
    max_length = capped_max_length(stage, config)
    truncated, lengths = count_truncated(train, tokenizer, max_length, "train")
    args = training_args(stage, ctx, supports_checkpointing=False, max_length=max_length, **loss)
    used = [min(n, max_length or n) for n in lengths]
    longest_per_batch = _padded_tokens(used, args.per_device_train_batch_size)
    return {
        "input": f"{start.input}: {start.describe()}",
        "chat_template": template
        + ("" if fmt != "messages" or marks_assistant_turns(tokenizer) else " (no turn marks)"),
        "loss_on": describe_loss(loss, fmt),
        "train_examples": len(train),
        "train_tokens": sum(used),
        "max_length": max_length,
        "truncated": f"{truncated} of {len(lengths)} ({truncated / max(1, len(lengths)):.1%})",
        "truncation_rate": truncated / max(1, len(lengths)),
        "packing_efficiency": sum(used) / max(1, longest_per_batch),
        "packing": "decided when the model is loaded (padding-free only where the attention keeps samples apart)",
        "planned_steps": planned_steps(args, len(train)),
        "examples": [
            {"rendered": render_example(row, tokenizer, loss)} for row in train.select(range(min(2, len(train))))
        ],
    }


def _padded_tokens(lengths: list[int], batch_size: int) -> int:
    """Token slots when each batch (in data order) is padded to its longest example: the no-packing cost."""
    return sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
    )
