"""The stage runner: the skeleton every training stage runs (`run_stage`) and what it is made of (training
arguments from the plan, the evaluation phases and the token-mean eval loss, the guards, the summary metrics, the
saved model, the verdict's record), what a stage starts from (`starting_point`, `load_start`), and the plan and log
helpers several kinds use (max_length, dropped rows, rendered examples, greedy-answer tables)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.prompt_split import split_ids
from align.recipe import ScratchModel, model_source, stage_ref
from align.values import UNKNOWN, Setting, StageResult, StartingPoint, counted

if TYPE_CHECKING:
    from transformers import Trainer

    from align.context import StageContext
    from align.guards import NumericGuard
    from align.metrics import MetricsWriter
    from align.recipe import Recipe, Stage
    from align.stages.base import TrainingKind

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The stage skeleton: the sequence every training stage runs, written once


def run_stage(stage: Stage, ctx: StageContext, kind: type[TrainingKind]) -> StageResult:
    """Every training stage: seed -> model -> the kind's setup -> training args (the plan's) -> metrics writer ->
    Trainer -> watch -> measure and evaluate -> train -> check -> evaluate and measure -> save -> summary, verdict."""
    from align.guards import raise_if_nonfinite
    from align.patches import install_lm_head, train_after_evaluation
    from align.plan import early_stopping_callbacks
    from align.runtime import seed_everything
    from align.verdict import training_context

    # 1. Seed, model, tokenizer, and the kind's data and pieces --------------------------------------
    seed_everything(ctx.seed)
    model, tokenizer, start = load_start(ctx, stage, kind.reward_head)
    setup = kind()
    setup.bind(stage, ctx, model, tokenizer, start)
    by_source = mix_eval_sets(ctx, setup)

    # 2. Trainer, with the planned arguments -----------------------------------------------------------
    args = training_args(stage, ctx, **setup.at_run_time)
    writer = setup.writer = metrics_writer(ctx, stage)
    if setup.lm_head:
        logger.info("LM head: %s", install_lm_head(args.device))  # align/lm_head.py, installed by align/patches.py
    if by_source:  # each source's rows prepared by the Trainer itself, as its eval split is (TRL takes a dict)
        union, setup.eval = setup.eval, {"eval": setup.eval, **{f"eval {n}": rows for n, rows in by_source.items()}}
    trainer = setup.trainer(args, [writer, *early_stopping_callbacks(stage), *setup.guards()])
    if by_source:
        prepared = {name: trainer.eval_dataset[f"eval {name}"] for name in by_source}
        trainer.eval_dataset, setup.eval = trainer.eval_dataset["eval"], union
        evaluate_by_source(trainer, prepared)
    if setup.token_loss:
        token_mean_evaluation(trainer)
    guard = watch(trainer, ctx, surrogate_loss=setup.surrogate_loss)
    setup.check(trainer)
    order = log_training(args, len(trainer.train_dataset), setup.unit, ctx.seed)

    # 3. Measure and evaluate, train, evaluate and measure ----------------------------------------------
    with keep_random_state():  # outside training: no random number training would draw
        measured_before = setup.measure(trainer)
    before = evaluate(trainer, writer, "before")
    train_after_evaluation(trainer)  # under several processes: else no gradient is averaged (align/patches.py)
    result = trainer.train(resume_from_checkpoint=ctx.resume_from)
    raise_if_nonfinite(ctx, writer, guard)
    after = evaluate(trainer, writer, "final")
    measured_after = setup.measure(trainer)

    # 4. Save, summarise, and say whether it helped (align/verdict.py) ----------------------------------
    model_dir, saved = save_stage_model(ctx, stage, trainer, tokenizer, start)
    setup.trained_with = training_context(trainer)
    metrics, extra = setup.summarize(before, after, measured_before, measured_after)
    metrics = {**summary_metrics(stage, trainer, result, before, after, writer), **metrics}
    extra = {"input": start.input, **setup.extra, "saved": saved, **extra, "data_order": order}
    if getattr(ctx.data, "mix", None) is not None:
        extra["data"] = {"mix": ctx.data.mix}
    if by_source:
        names = list(by_source)
        metrics["eval_loss_by_source"] = {n: after.get(f"eval_{n}_loss") for n in names}
        metrics["eval_loss_by_source_before"] = {n: before.get(f"eval_{n}_loss") for n in names}
    if extra.get("verdict") is not None:
        warnings = source_warnings(metrics) + scratch_warning(start, verdict_status(extra["verdict"]))
        extra["verdict"] = report_verdict(ctx, stage, extra["verdict"], warnings)
    return StageResult(stage.name, stage.kind, "completed", model_dir, ctx.input_label, metrics, extra)


def verdict_status(verdict: Any) -> str:
    """The status of an `align.verdict.Verdict` or of its record (a dict)."""
    return verdict.status if hasattr(verdict, "status") else verdict["status"]


def report_verdict(ctx: StageContext, stage: Stage, verdict: Any, warnings: list[str] | None = None) -> dict:
    """Log the stage's verdict and give it to the trackers: the status in the run's summary, every reason and
    warning in a table, and an alert when the stage did not help. Returns summary.json's `verdict` record.

    `verdict` is an `align.verdict.Verdict` or its record (a dict with `status`, `reasons`, `warnings`); `warnings`
    are added to its own (a mix's source that got worse).
    """
    record = verdict.record() if hasattr(verdict, "record") else dict(verdict)
    record["warnings"] = [*record.get("warnings", []), *(warnings or [])]
    status, reasons, warnings = record["status"], record["reasons"], record["warnings"]
    lines = [("reason", text) for text in reasons] + [("warning", text) for text in warnings]
    say = logger.info if status == "improved" else logger.warning
    say("verdict: %s — %s", status, "; ".join(reasons) or "no reason given")
    for text in warnings:
        logger.warning("verdict warning: %s", text)
    ctx.tracker.summary({"verdict": status})
    if lines:
        # Not under the key `verdict`: in wandb the summary's status would replace the table's summary entry.
        rows = [[status, what, text] for what, text in lines]
        ctx.tracker.table("verdict_reasons", ["status", "kind", "text"], rows)
    if status != "improved":
        ctx.tracker.alert(f"{stage.name}: {status}", "; ".join(reasons))
    return record


def training_args(stage: Stage, ctx: StageContext, **at_run_time: Any) -> Any:
    """The config class instance the stage's Trainer receives: its plan's arguments (align/plan.py), computed
    before any stage trained and shown by `--dry-run`, plus only the decisions the plan left to run time.

    Raises:
        BadInput: the config class rejects the combination (it names the problem).
    """
    return ctx.plan.build_args(**at_run_time)


def report_dropped(stage: Stage, trainer: Trainer, totals: tuple[int, int], reason: str, refusal: str,
                   hint: str, unit: str = "pairs") -> None:  # fmt: skip
    """Say how many pairs (`unit`) a preference trainer's preparation dropped (`reason`: why, with the setting), and
    refuse a split it left empty (`refusal`: the problem, with `{split}` for the split's name; `hint`: the fix).

    Raises:
        BadInput: no training pair (or no eval pair) is left.
    """
    from align.errors import BadInput

    kept = {"train": len(trainer.train_dataset), "eval": len(trainer.eval_dataset)}
    for split, total in zip(("train", "eval"), totals, strict=True):
        if total and not kept[split]:
            raise BadInput(f"stages.{stage.name}.train.max_length: {refusal.format(split=split)}", hint=hint)
        if kept[split] < total:
            logger.warning("%s: %d of %d %s dropped: %s", split, total - kept[split], total, unit, reason)


# A max_length that drops this share of the training pairs or more is named at plan time (`--dry-run` too).
DROP_WARNING = 0.5


def warn_most_dropped(stage: Stage, max_length: int | None, dropped: int, total: int, why: str, fix: str) -> None:
    """A warning when `max_length` drops most training pairs (`why`: what drops one; `fix`: what keeps them): the
    stage then learns from, and its verdict measures, a few pairs, which only a plan line said before."""
    if not total or max_length is None or dropped < DROP_WARNING * total:
        return
    left = total - dropped
    logger.warning(
        "stages.%s.train.max_length: %d tokens drop %d of %d training pairs (%.0f%%: %s), so the stage learns from "
        "%s; %s", stage.name, max_length, dropped, total, 100 * dropped / total, why, counted(left, "pair"), fix,
    )  # fmt: skip


def log_training(args: Any, n_train: int, unit: str, seed: int) -> dict[str, Any]:
    """Log the planned steps and the effective batch of one optimizer step, as the Trainer will run them; return
    the data order's record (summary.json's `data_order`), against which a resumed or rescaled run can be checked."""
    from align.plan import steps_for

    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    logger.info(
        "training: %d steps planned, effective batch %d %s (%d per device x %d accumulation x %d process%s), data "
        "order seed %d", steps_for(args.max_steps, per_step, args.num_train_epochs, n_train), per_step, unit,
        args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size,
        "" if args.world_size == 1 else "es", args.data_seed or seed,
    )  # fmt: skip
    return {
        "seed": args.data_seed if args.data_seed is not None else seed,
        "global_batch": per_step,
        "per_device": args.per_device_train_batch_size,
        "accumulation": args.gradient_accumulation_steps,
        "processes": args.world_size,
        "train_rows": n_train,
        "unit": unit,
    }


def mix_eval_sets(ctx: StageContext, setup: TrainingKind) -> dict[str, Any] | None:
    """A mix's validation rows per source in the kind's eval form (`TrainingKind.eval_sets`), or None: no mix, or a
    kind whose eval is not a loss over rows (then said once)."""
    by_source = ctx.data.validation_by_source() if hasattr(ctx.data, "validation_by_source") else None
    if not by_source:
        return None
    sets = setup.eval_sets(by_source)
    if sets is None:
        logger.info("data mix: %s stages have no per-source eval loss; eval_loss covers every source's rows",
                    ctx.stage.kind)  # fmt: skip
    return sets


def evaluate_by_source(trainer: Trainer, sets: dict[str, Any]) -> None:
    """Make every `trainer.evaluate()` of the whole validation split also measure each source's own loss
    (`eval_<name>_loss`), with the Trainer's own evaluation loop on the rows it prepared (`sets`), so it means what
    `eval_loss` means; the losses join the same logged row (trackers, metrics.jsonl) and the returned metrics.

    `eval_loss` stays the whole split's, which early stopping and the verdict watch. The extra passes leave the
    metrics TRL stores for its next logged row as they were (align/patches.py `stored_metrics_kept`).
    """
    from align.patches import stored_metrics_kept

    original_evaluate, original_log = trainer.evaluate, trainer.log
    pending: dict[str, float] = {}

    def evaluate(eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict:
        if eval_dataset is not None or metric_key_prefix != "eval":
            return original_evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        losses = {}
        with stored_metrics_kept(trainer):
            for name, rows in sets.items():
                out = trainer.evaluation_loop(
                    trainer.get_eval_dataloader(rows), description=f"Evaluation ({name})", prediction_loss_only=True,
                    ignore_keys=ignore_keys, metric_key_prefix=f"eval_{name}",
                )  # fmt: skip
                losses[f"eval_{name}_loss"] = out.metrics.get(f"eval_{name}_loss")
        pending.update(losses)
        return {**original_evaluate(eval_dataset, ignore_keys, metric_key_prefix), **losses}

    def log(logs: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        if "eval_loss" in logs and pending:
            logs = {**logs, **pending}
            pending.clear()
        original_log(logs, *args, **kwargs)

    trainer.evaluate, trainer.log = evaluate, log


def scratch_warning(start: Any, status: str) -> list[str]:
    """A model built from scratch is measured "before" as its random initialisation: any training beats that, so
    its `improved` is true by construction and says little; the warning says so beside it (beside another status it
    would contradict the verdict it explains)."""
    if getattr(start, "input", None) != "scratch" or status != "improved":
        return []
    return ["built from scratch: 'before' is the random initialisation, which any training improves on; judge the "
            "stage by a later stage's or an eval's comparison, not by this improvement"]  # fmt: skip


def source_warnings(metrics: dict[str, Any]) -> list[str]:
    """A warning for each source of a mix whose eval loss rose while the whole split's fell: the mix helped on
    average at its cost."""
    before, after = metrics.get("eval_loss_before"), metrics.get("eval_loss")
    if before is None or after is None or not after < before:
        return []
    out = []
    for name, loss in (metrics.get("eval_loss_by_source") or {}).items():
        was = (metrics.get("eval_loss_by_source_before") or {}).get(name)
        if loss is not None and was is not None and loss > was * (1 + 1e-4):
            out.append(
                f"eval loss improved over the whole mix ({before:.4g} -> {after:.4g}), but source {name} got worse: "
                f"{was:.4g} -> {loss:.4g} (its weight may be too low, or another source's too high)"
            )
    return out


def token_mean_evaluation(trainer: Trainer) -> None:
    """Make every evaluation's loss (`eval_loss`, a mix's `eval_<source>_loss`) the token mean over the validation
    rows, each counted once: the figure metrics.jsonl, the trackers, early stopping and summary.json take. The
    Trainer's own stays beside it as `eval_loss_trainer`: a mean of its batches' means, where under several
    processes the rows that fill a process's last batch enter that batch's mean (1 process and 2 differed by 1e-3).
    One more forward pass over the eval split, without gradients."""
    from align.verdict import example_token_losses, token_mean_loss

    original = trainer.evaluation_loop

    def evaluation_loop(dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: Any = None, metric_key_prefix: str = "eval") -> Any:  # fmt: skip
        out = original(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        key = f"{metric_key_prefix}_loss"
        if key in out.metrics:
            out.metrics[f"{key}_trainer"] = out.metrics[key]
            # Iterating a DataLoader draws a seed from torch's generator: outside training's random numbers, or
            # the dropout masks after an evaluation mid-training would differ from a run without this pass.
            with keep_random_state():
                out.metrics[key] = token_mean_loss(example_token_losses(trainer, dataloader))
        return out

    trainer.evaluation_loop = evaluation_loop


def evaluate(trainer: Trainer, writer: MetricsWriter, phase: str) -> dict[str, float]:
    """Evaluate outside training: `before` lands on the eval curve at step 0; `final` is kept apart."""
    from transformers.integrations import WandbCallback

    writer.phase = None if phase == "before" else f"eval_{phase}"
    wandb_cb = None
    if phase != "before":
        # The final evaluation re-measures the restored model; on the wandb curve it would read as a new point.
        wandb_cb = trainer.pop_callback(WandbCallback)
    try:
        # Outside training, so it must take none of the random numbers training draws (see `keep_random_state`).
        with keep_random_state():
            return trainer.evaluate()
    finally:
        writer.phase = None
        if wandb_cb is not None:
            trainer.add_callback(wandb_cb)


@contextlib.contextmanager
def keep_random_state() -> Iterator[None]:
    """Put Python's, numpy's and torch's (CPU and CUDA) random generators back where they were after the block.

    A measurement before training must leave training as the bare library runs it. `trainer.evaluate()` draws from
    torch's generator (every DataLoader iterator takes a seed from it), so without this the training's dropout masks
    shifted: the final eval loss of tests/test_parity.py's tiny runs moved 4.3e-4 (sft) and 3.2e-3 (lm) from bare
    TRL's and transformers' (now equal). The shuffle is not affected: accelerate seeds it from the seed itself.
    """
    import random

    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 700.0))


def perplexities(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    """`perplexity` and `perplexity_before` (lm and sft summaries): exp of the eval loss after and before."""
    return {"perplexity": perplexity(after.get("eval_loss")), "perplexity_before": perplexity(before.get("eval_loss"))}


def watch(trainer: Trainer, ctx: StageContext, surrogate_loss: bool = False) -> NumericGuard:
    """Silence the Trainer's own printing (MetricsWriter logs each row once), guard its raw numbers, and stop at a
    step's end with a checkpoint when a signal asks (align/signals.py)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from align.guards import NumericGuard
    from align.signals import StopOnSignal

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:  # a terminal: keep the bars, not their copy of each row
        trainer.add_callback(bars_without_rows())
    # Before the guard: on a non-finite step the guard, running after it, cancels the save a signal asked for.
    trainer.add_callback(StopOnSignal())
    guard = NumericGuard(ctx.tracker, loss_scaling=ctx.precision.name == "fp16", surrogate_loss=surrogate_loss)
    guard.attach(trainer)
    trainer.add_callback(guard)
    return guard


def bars_without_rows() -> Any:
    """transformers' progress bars without the raw dict of every logged row they print under the bar: on a terminal
    that doubled each row align.metrics already logs in its own format."""
    from transformers.trainer_callback import ProgressCallback

    class BarsOnly(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            return None

    return BarsOnly()


def summary_metrics(
    stage: Stage,
    trainer: Trainer,
    result: Any,
    before: dict[str, float],
    after: dict[str, float],
    writer: MetricsWriter,
) -> dict[str, Any]:
    """The summary metrics every stage shares (the contract's keys), from the Trainer's state and our rows."""
    from align.metrics import best_eval, peak_memory_gb

    state = trainer.state
    best = best_eval(writer.rows)
    # None where the Trainer could not count them (a batch without input_ids: the pair trainers' own).
    counted = str(getattr(trainer.args, "include_num_input_tokens_seen", "no")) not in ("no", "False")
    train_tokens = int(state.num_input_tokens_seen or 0) if counted else None
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
        "tokens_per_s": train_tokens / runtime if runtime > 0 and train_tokens is not None else None,
        # Beyond the contract's keys: the wait before training moves (model, data, first step) and peak memory.
        "time_to_first_step_s": writer.first_step_s,
        # Where `eval_loss` is align's token mean (token_mean_evaluation), the Trainer's own figure beside it.
        **{
            key: value
            for key, value in (
                ("eval_loss_trainer", after.get("eval_loss_trainer")),
                ("eval_loss_trainer_before", before.get("eval_loss_trainer")),
            )
            if value is not None
        },  # fmt: skip
        "peak_memory_gb": peak_memory_gb(),
        **utilisation(trainer, train_tokens / runtime if runtime > 0 and train_tokens is not None else None),
    }


def utilisation(trainer: Trainer, tokens_per_s: float | None) -> dict[str, Any]:
    """`flops_per_token` (6N + 12LdT at the stage's max_length, align/speed.py) and `mfu`, the share of the GPU's
    dense bf16/fp16 peak the training used: None on a CPU, in fp32, or on a GPU not in align's table."""
    from align.speed import device_name, flops_per_token, mfu, peak_flops

    args = trainer.args
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    per_token = flops_per_token(trainer.model.config, trainer.model.num_parameters(), getattr(args, "max_length", None))
    return {"flops_per_token": per_token, "mfu": mfu(tokens_per_s, per_token, peak_flops(device_name(), precision))}


def metrics_writer(ctx: StageContext, stage: Stage) -> MetricsWriter:
    """The stage's metrics.jsonl writer: main process only, tracked, keeping rows up to a resumed checkpoint."""
    from align.metrics import MetricsWriter
    from align.runtime import is_main_process

    path = ctx.stage_dir / "metrics.jsonl"
    return MetricsWriter(path, is_main_process(), ctx.tracker, ctx.resume_from, ctx.started)


def save_stage_model(
    ctx: StageContext, stage: Stage, trainer: Trainer, tokenizer: Any, start: StartingPoint
) -> tuple[Path, str]:
    """Save the trained model to `<stage>/model` on the main process; return the directory and what was saved
    (full weights, adapters, or adapters merged), which `summary.json` records."""
    from align.models import save_trained
    from align.runtime import is_main_process

    model_dir = ctx.stage_dir / "model"
    if not is_main_process():
        return model_dir, "by the main process"
    saved = save_trained(trainer.model, tokenizer, model_dir, stage.merge, start.base)
    # How this stage's prompts were formatted in training: align chat follows it, the card says it.
    from align.prompt_format import record_prompt_format
    from align.tools import trained_tools

    record_prompt_format(model_dir, stage.name, stage.kind, ctx.spec.format, ctx.data["train"],
                         getattr(stage, "thinking", None), trained_tools(stage, ctx.data["train"],
                                                                         ctx.recipe.base_dir))  # fmt: skip
    return model_dir, saved


# --------------------------------------------------------------------------------------------------
# What a stage starts from


def starting_point(recipe: Recipe, stage: Stage, outputs: dict[str, Any] | None = None) -> StartingPoint:
    """Decide what the stage starts from (see `StartingPoint`), before its model is loaded.

    `outputs` are the earlier stages' saved outputs (`StageOutput`s by name); an earlier stage not among them (a
    dry run, or planning before anything trains) has saved nothing yet, so its recipe says what it will save.
    """
    from align.models import adapter_base

    source = model_source(stage, recipe)
    ref = stage_ref(source)
    if isinstance(source, ScratchModel):
        kind, base = "scratch", None
    elif ref is not None and ref not in (outputs or {}):
        upstream = next(s for s in recipe.stages if s.name == ref)
        kind, base = planned_output(upstream), None
    else:
        path = str(outputs[ref].model_dir) if ref is not None else source
        kind = input_kind(path)
        base = adapter_base(path) if kind == "adapter" else path
    if kind == "adapter":
        lora = "continue" if stage.peft is not None else "merge"
    else:
        lora = "new" if stage.peft is not None else "none"
    return StartingPoint(kind, lora, base)


def ignored_peft_settings(trained: Any, asked: Any) -> list[str]:
    """What a stage's `peft:` asks that adapters trained on as they are do not do: each setting, the input's and
    this stage's value (the warning once named r and alpha only, and a different target_modules went unsaid)."""
    out = []
    for key, have in (("r", trained.r), ("alpha", trained.lora_alpha), ("dropout", trained.lora_dropout)):
        if have != getattr(asked, key):
            out.append(f"{key} {getattr(asked, key)} is not applied (the input's adapters have {have})")
    wanted = asked.target_modules
    have_modules = sorted(trained.target_modules) if isinstance(trained.target_modules, set | list) else None
    if wanted != "all-linear" and have_modules is not None and sorted(wanted) != have_modules:
        out.append(f"target_modules {sorted(wanted)} are not applied (the input's adapters are on {have_modules})")
    return out


def planned_output(stage: Stage) -> str:
    """What a stage will save, from its recipe: adapters (with `peft`), merged (with `merge`), else full weights.

    An adapter input without `peft` is merged and trained in full, so `peft` alone decides."""
    if stage.peft is None:
        return "full"
    return "merged" if stage.merge else "adapter"


def input_kind(ref: str) -> str:
    """What a local directory or hub id holds: LoRA adapters ("adapter"), an earlier stage's adapters merged
    ("merged": its summary.json, beside `model/`, says so; the weights alone cannot tell), else "full"."""
    from align.files import read_json
    from align.models import is_adapter_dir

    if is_adapter_dir(ref):
        return "adapter"
    local = Path(ref).expanduser()
    upstream = read_json(local.parent / "summary.json") if local.is_dir() else None
    if isinstance(upstream, dict) and upstream.get("saved") == "merged":
        return "merged"
    return "full"


def load_start(ctx: StageContext, stage: Stage, reward_head: bool = False) -> tuple[Any, Any, StartingPoint]:
    """Load the stage's input model and tokenizer (`reward_head`: with a new one-output score head) and bring its
    LoRA adapters to where the stage starts: merged for a stage that trains every weight, kept trainable for a LoRA
    stage. Logs what it did.

    A model built from scratch is built on its plan's config and tokenizer (trained once, when planning).

    Raises:
        BadInput: the model cannot be found or its config is wrong.
    """
    from align.models import build_model

    plan = ctx.plan
    start = starting_point(ctx.recipe, stage, ctx.outputs)
    model, tokenizer = build_model(
        ctx.model_ref,
        f"stages.{stage.name}.model",
        trust_remote_code=stage.trust_remote_code,
        planned=(plan.tokenizer, plan.config) if plan.source == "scratch" else None,
        reward_head=reward_head,
        loading=stage.loading,
    )
    from align.families import use_stage_template

    use_stage_template(stage, tokenizer, model)
    if start.lora == "merge":
        # A stage without `peft` trains every weight: it starts from the model the adapters make, merged. peft froze
        # the base's weights under its adapters, and merging keeps them frozen: without this nothing trained
        # (grad norm 0 at every step, the saved model the input unchanged).
        model = model.merge_and_unload()
        model.requires_grad_(True)
    elif start.lora == "continue":
        ignored = ignored_peft_settings(model.peft_config["default"], stage.peft)
        if ignored:
            logger.warning(
                "stages.%s.peft: the input's adapters train on as they are, so this stage's %s (to start fresh "
                "adapters, save the earlier stage with `merge: true`)", stage.name, "; ".join(ignored),
            )  # fmt: skip
    logger.info("input: %s; %s", start.input, start.describe())
    return model, tokenizer, start


def max_length_setting(stage: Stage, config: Any, default: int | None = 1024) -> Setting:
    """`train.max_length` (the library's default 1024), capped at the model's positions: longer would crash the
    model. With the model unknown (print-config, offline), the cap is unknown too, and says so."""
    from align.models import model_positions

    given = "max_length" in stage.train
    wanted = stage.train.get("max_length", default)
    source = "recipe" if given else "library default"
    if config is None:
        return Setting(wanted, f"{source}; the cap at the model's positions is {UNKNOWN}")
    limit = model_positions(config)
    if limit is not None and (wanted is None or wanted > limit):
        return Setting(limit, f"capped at the model's {limit} positions (asked: {wanted})")
    return Setting(wanted, source)


def pair_examples(tokenizer: Any, pairs: Any, n: int = 2) -> list[dict[str, str]]:
    """The first `n` preference pairs as `--dry-run` shows them: chosen and rejected rendered after their prompt,
    the answer (what is compared) in [[ ]]."""
    examples = []
    for row in pairs.select(range(min(n, len(pairs)))):
        rendered = {}
        for side in ("chosen", "rejected"):
            p, c = split_ids(tokenizer, row["prompt"], row[side])
            rendered[side] = render_mask(p + c, [0] * len(p) + [1] * len(c), tokenizer)
        examples.append(rendered)
    return examples


def render_mask(ids: list[int], mask: list[int], tokenizer: Any) -> str:
    """Decode a token sequence with the trained spans wrapped in [[ ]]: the loss mask, visible."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or bool(mask[i]) != bool(mask[start]):
            text = tokenizer.decode(ids[start:i])
            out.append(f"[[{text}]]" if mask[start] else text)
            start = i
    return "".join(out)


def generation_table(
    ctx: StageContext, prompts: list[Any], before: list[str], after: list[str]
) -> list[dict[str, str]]:
    """Greedy answers before and after training, side by side: for summary.json and a wandb table."""
    rows = [{"prompt": show_prompt(p), "before": b, "after": a} for p, b, a in zip(prompts, before, after, strict=True)]
    if rows:
        ctx.tracker.table("generations", ["prompt", "before", "after"], [list(r.values()) for r in rows])
    return rows


def show_prompt(prompt: Any) -> str:
    """A prompt as a person reads it: a conversation one turn a line, an assistant's tool calls shown as calls."""
    if isinstance(prompt, list):
        lines = []
        for m in prompt:
            calls = [c.get("function", c) for c in m.get("tool_calls") or []]
            shown = "; ".join(f"-> {f.get('name')}({f.get('arguments')})" for f in calls)
            lines.append(f"{m['role']}: {m.get('content') or ''}{' ' if m.get('content') and shown else ''}{shown}")
        return "\n".join(lines)
    return prompt
