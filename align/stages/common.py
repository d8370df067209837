"""Pieces every stage shares: training arguments, evaluation phases, and the stage's result."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import BadInput
from align.recipe import config_class

if TYPE_CHECKING:
    from transformers import Trainer

    from align.guards import MetricsWriter, NumericGuard
    from align.recipe import Stage
    from align.runtime import RunContext

logger = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What a stage returns: its status, where its model is, and the summary metrics of the contract."""

    name: str
    kind: str
    status: str
    model_dir: Path | None
    input_model: str
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def training_args(stage: Stage, ctx: RunContext, *, supports_checkpointing: bool, **fixed: Any) -> Any:
    """The TRL config for a stage: the recipe's `train:` keys, with what align manages set on top.

    align decides the output directory, tracking, precision, seed, and (with early stopping) the best-model
    bookkeeping, logging each decision that a user might not expect.

    Raises:
        BadInput: the TRL config class rejects the combination (it names the problem).
    """
    import sys

    cfg: dict[str, Any] = {"logging_steps": 10, "eval_strategy": "steps", "save_total_limit": 2}
    cfg.update(stage.train)
    cfg.update(
        output_dir=str(ctx.stage_dir(stage) / "checkpoints"),
        report_to=ctx.tracker.report_to,
        run_name=f"{ctx.recipe.name}/{stage.name}",
        seed=ctx.seed,
        # A NaN loss must be seen as NaN: the Trainer's filter would log it as 0.
        logging_nan_inf_filter=False,
        include_num_input_tokens_seen="non_padding",
        **ctx.precision.train_args,
    )
    cfg.update(fixed)
    cfg.setdefault("disable_tqdm", not sys.stderr.isatty())
    cfg.setdefault("dataloader_pin_memory", ctx.precision.device != "cpu")
    # On a machine without a GPU, several processes (torchrun / accelerate launch) only form one distributed run
    # when the Trainer is told it is on the CPU: it then uses gloo instead of training each rank alone.
    cfg.setdefault("use_cpu", ctx.precision.device == "cpu")
    if "gradient_checkpointing" not in stage.train:
        cfg["gradient_checkpointing"] = supports_checkpointing
        if not supports_checkpointing:
            logger.info("gradient checkpointing off: this model does not support it")
    elif stage.train["gradient_checkpointing"] and not supports_checkpointing:
        raise BadInput(f"stages.{stage.name}.train.gradient_checkpointing: this model does not support it")

    if stage.early_stopping is not None:
        # The best checkpoint must be on disk to be restored, so saving follows evaluation step for step.
        cfg.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
        cfg["save_strategy"] = cfg["eval_strategy"]
        if cfg.get("eval_steps") is not None:
            cfg["save_steps"] = cfg["eval_steps"]
        logger.info(
            "early stopping (patience %d): align set load_best_model_at_end, metric_for_best_model=eval_loss and "
            "save_strategy/save_steps = eval_strategy/eval_steps (%s/%s)",
            stage.early_stopping.patience,
            cfg["eval_strategy"],
            cfg.get("eval_steps") or cfg["logging_steps"],
        )
    try:
        args = config_class(stage.kind)(**cfg)
    except (ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"stages.{stage.name}.train: {first}") from None
    # Every argument, once, in align.log: what actually ran, defaults included.
    logger.debug("%s for stage %s:\n%s", type(args).__name__, stage.name, args.to_json_string())
    return args


def planned_steps(args: Any, n_train: int, world_size: int = 1) -> int:
    """Optimizer steps the Trainer will take for `n_train` rows (or `max_steps` where set)."""
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    return max(1, math.ceil(n_train / per_step)) * math.ceil(args.num_train_epochs)


def evaluate(trainer: Trainer, writer: MetricsWriter, phase: str) -> dict[str, float]:
    """Evaluate outside training: `before` lands on the eval curve at step 0; `final` is kept apart."""
    from transformers.integrations import WandbCallback

    writer.phase = None if phase == "before" else f"eval_{phase}"
    wandb_cb = None
    if phase != "before":
        # The final evaluation re-measures the restored model; on the wandb curve it would read as a new point.
        wandb_cb = trainer.pop_callback(WandbCallback)
    try:
        return trainer.evaluate()
    finally:
        writer.phase = None
        if wandb_cb is not None:
            trainer.add_callback(wandb_cb)


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 700.0))


def watch(trainer: Trainer, ctx: RunContext) -> NumericGuard:
    """Silence the Trainer's own printing (MetricsWriter logs each row once) and guard its raw numbers."""
    from transformers.trainer_callback import PrinterCallback

    from align.guards import NumericGuard

    trainer.remove_callback(PrinterCallback)
    guard = NumericGuard(ctx.tracker, loss_scaling=ctx.precision.name == "fp16")
    guard.attach(trainer)
    trainer.add_callback(guard)
    return guard


def summary_metrics(
    stage: Stage,
    trainer: Trainer,
    result: Any,
    before: dict[str, float],
    after: dict[str, float],
    writer: MetricsWriter,
) -> dict[str, Any]:
    """The summary metrics every stage shares (the contract's keys), from the Trainer's state and our rows."""
    from align.guards import best_eval, peak_memory_gb

    state = trainer.state
    best = best_eval(writer.rows)
    train_tokens = int(state.num_input_tokens_seen or 0)
    runtime = float(result.metrics.get("train_runtime", 0.0))
    return {
        "train_loss": result.training_loss,
        "eval_loss": after.get("eval_loss"),
        "eval_loss_before": before.get("eval_loss"),
        "global_step": state.global_step,
        "best_step": best["step"] if best else None,
        "stopped_early": stage.early_stopping is not None and state.global_step < state.max_steps,
        "train_runtime_s": runtime,
        "train_tokens": train_tokens,
        "tokens_per_s": train_tokens / runtime if runtime > 0 else None,
        # Beyond the contract's keys: the wait before training moves (model, data, first step) and peak memory.
        "time_to_first_step_s": writer.first_step_s,
        "peak_memory_gb": peak_memory_gb(),
    }


def metrics_writer(ctx: RunContext, stage: Stage) -> MetricsWriter:
    """The stage's metrics.jsonl writer: main process only, tracked, keeping rows up to a resumed checkpoint."""
    from align.guards import MetricsWriter
    from align.runtime import is_main_process

    path = ctx.stage_dir(stage) / "metrics.jsonl"
    return MetricsWriter(path, is_main_process(), ctx.tracker, ctx.resume_from(stage), ctx.stage_started)


def save_stage_model(
    ctx: RunContext, stage: Stage, trainer: Trainer, tokenizer: Any, input_model: Any
) -> tuple[Path, str]:
    """Save the trained model to `<stage>/model` on the main process; return the directory and what was saved
    (full weights, adapters, or adapters merged), which `summary.json` records."""
    from align.models import save_trained
    from align.runtime import is_main_process

    model_dir = ctx.stage_dir(stage) / "model"
    if not is_main_process():
        return model_dir, "by the main process"
    return model_dir, save_trained(
        trainer.model, tokenizer, model_dir, stage.merge, base_model(ctx, stage, input_model)
    )


def base_model(ctx: RunContext, stage: Stage, model: Any) -> str | None:
    """Where the weights under any adapters come from: a hub id or directory; None when built from scratch."""
    from align.models import is_adapter_dir
    from align.recipe import ScratchModel

    source = ctx.model_ref(stage)
    if isinstance(source, ScratchModel):
        return None
    if is_adapter_dir(source):
        return model.peft_config["default"].base_model_name_or_path
    return source


def capped_max_length(stage: Stage, config: Any) -> int | None:
    """`train.max_length` (TRL's default 1024), capped at the model's positions: longer would crash the model."""
    from align.models import model_positions

    wanted = stage.train.get("max_length", 1024)
    limit = model_positions(config)
    if limit is not None and (wanted is None or wanted > limit):
        logger.info("max_length %d: capped at the model's %d positions (asked: %s)", limit, limit, wanted)
        return limit
    return wanted


def early_stopping_callbacks(stage: Stage) -> list[Any]:
    from transformers import EarlyStoppingCallback

    if stage.early_stopping is None:
        return []
    return [EarlyStoppingCallback(stage.early_stopping.patience, stage.early_stopping.threshold)]


def render_mask(ids: list[int], mask: list[int], tokenizer: Any) -> str:
    """Decode a token sequence with the trained spans wrapped in [[ ]]: the loss mask, visible."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or bool(mask[i]) != bool(mask[start]):
            text = tokenizer.decode(ids[start:i])
            out.append(f"[[{text}]]" if mask[start] else text)
            start = i
    return "".join(out)


def generation_table(ctx: RunContext, prompts: list[Any], before: list[str], after: list[str]) -> list[dict[str, str]]:
    """Greedy answers before and after training, side by side: for summary.json and a wandb table."""
    rows = [{"prompt": show_prompt(p), "before": b, "after": a} for p, b, a in zip(prompts, before, after, strict=True)]
    if rows:
        ctx.tracker.table("generations", ["prompt", "before", "after"], [list(r.values()) for r in rows])
    return rows


def show_prompt(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return prompt
