"""TrainerCallbacks that watch a stage: `metrics.jsonl`, throughput, and a stop on a non-finite loss."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Keys the Trainer logs that describe the run, not the model; kept in metrics.jsonl, left out of console lines.
_QUIET = {"epoch", "total_flos", "train_samples_per_second", "train_steps_per_second"}


def split_of(logs: dict[str, Any]) -> str:
    if any(k.startswith("eval_") for k in logs):
        return "eval"
    if "train_loss" in logs:  # the Trainer's closing row: averages over the whole run
        return "train_summary"
    return "train"


def system_metrics() -> dict[str, float]:
    """Memory (GPU allocated/reserved, or the process's RSS on the CPU) and GPU utilisation where readable."""
    import torch

    values: dict[str, float] = {}
    if torch.cuda.is_available():
        values["memory/gpu_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
        values["memory/gpu_reserved_gb"] = torch.cuda.memory_reserved() / 2**30
        with contextlib.suppress(Exception):  # needs pynvml; not every machine has it
            values["gpu/utilization"] = float(torch.cuda.utilization())
    else:
        import psutil

        values["memory/rss_gb"] = psutil.Process().memory_info().rss / 2**30
    return values


def reset_peak_memory() -> None:
    """Start a stage's peak-memory count afresh: the GPU's peak allocation, or on Linux the process's peak
    resident memory (`/proc/self/clear_refs`), so each stage of a pipeline reports its own peak."""
    import sys

    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gb() -> float:
    """The stage's peak GPU memory allocated, or on the CPU the process's peak resident memory (GiB)."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsWriter(TrainerCallback):
    """Appends every logged row to `metrics.jsonl` as `{"step", "epoch", "split", <metric>: value}`.

    `phase` lets the stage tag evaluations made outside training (`eval_final`), so the eval curve holds
    only what the Trainer measured while it trained, plus the step-0 evaluation before it.
    """

    def __init__(
        self,
        path: Path,
        main_process: bool = True,
        tracker: Any = None,
        resume_from: str | None = None,
        started: float | None = None,
    ):
        self.path = path
        # `time.perf_counter()` when the stage began: the wait until its first optimizer step is measured from it.
        self.started = started if started is not None else time.perf_counter()
        self.first_step_s: float | None = None
        self.tracker = tracker
        self.main_process = main_process
        self.rows: list[dict[str, Any]] = []
        if resume_from is not None and path.is_file():
            # Keep what the interrupted run logged up to its checkpoint; the rest will be logged again.
            step = int(Path(resume_from).name.rsplit("-", 1)[-1])
            kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in kept if 0 < r["step"] <= step and r["split"] in ("train", "eval")]
            if main_process:
                path.write_text("".join(json.dumps(r, default=str) + "\n" for r in self.rows))
        self.phase: str | None = None
        self.nonfinite: dict[str, Any] | None = None
        self._last_time: float | None = None
        self._last_tokens = 0
        if main_process:
            path.parent.mkdir(parents=True, exist_ok=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time, self._last_tokens = time.perf_counter(), state.num_input_tokens_seen or 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.started

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        split = self.phase or split_of(logs)
        row: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch, "split": split}
        row.update({k: v for k, v in logs.items() if k != "epoch"})
        if self.tracker is not None and self.phase is None:
            # The Trainer's row for the trackers it has no callback for (align/tracking.py); a phase's evaluation
            # (the restored model measured again) stays off the curves, as it does for wandb.
            self.tracker.log_trainer(logs, state.global_step)
        if split == "train" and self._last_time is not None:
            # Tokens per second over the last logging interval, from the Trainer's own token count.
            now, seen = time.perf_counter(), state.num_input_tokens_seen or 0
            if now > self._last_time and seen > self._last_tokens:
                row["tokens_per_s"] = (seen - self._last_tokens) / (now - self._last_time)
            self._last_time, self._last_tokens = now, seen
            row.update(system_metrics())
            if self.tracker is not None:
                # The Trainer's keys are logged already (its WandbCallback, `log_trainer`); these are ours.
                extra = {
                    k: v
                    for k, v in row.items()
                    if k == "tokens_per_s" or "/" in k and k.split("/")[0] in ("memory", "gpu")
                }
                self.tracker.log({f"train/{k}" if k == "tokens_per_s" else k: v for k, v in extra.items()}
                                 | {"train/global_step": state.global_step})  # fmt: skip
        self.rows.append(row)
        if self.main_process:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row, default=str) + "\n")
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in _QUIET | {"split"} and v is not None)
        logger.info("%s: %s", split, shown)

        loss = logs.get("loss", logs.get("eval_loss"))
        if isinstance(loss, float) and not math.isfinite(loss) and self.nonfinite is None:
            self.nonfinite = {"step": state.global_step, "value": loss, "split": split}
            control.should_training_stop = True
        return control


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def eval_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("split") == "eval" and isinstance(r.get("eval_loss"), float)]


def best_eval(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The in-training evaluation (step > 0) with the lowest eval loss; None without any."""
    during = [r for r in eval_rows(rows) if r["step"] > 0 and math.isfinite(r["eval_loss"])]
    return min(during, key=lambda r: (r["eval_loss"], r["step"])) if during else None


LN2 = math.log(2.0)


class DPOGuard(TrainerCallback):
    """Warnings for the ways DPO fails quietly, each said once.

    - chosen and rejected log-probs both falling steadily: the likelihood of the chosen answers is being
      pushed down along with the rejected ones (a known DPO failure; lower the learning rate or raise beta);
    - the loss stuck at ln 2 with rewards at zero: nothing is learned, often because the reference is the
      policy itself.
    """

    def __init__(self, tracker: Any = None, window: int = 5):
        self.tracker = tracker
        self.window = window
        self.history: list[dict[str, float]] = []
        self.warned: set[str] = set()

    def _warn(self, key: str, message: str) -> None:
        if key in self.warned:
            return
        self.warned.add(key)
        logger.warning(message)
        if self.tracker is not None:
            self.tracker.alert(f"DPO: {key}", message)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "logps/chosen" not in logs or state.global_step == 0:
            return
        row = {k: float(logs[k]) for k in ("logps/chosen", "logps/rejected", "loss") if k in logs}
        row["rewards"] = abs(float(logs.get("rewards/chosen", 0.0))) + abs(float(logs.get("rewards/rejected", 0.0)))
        self.history.append(row)
        recent = self.history[-self.window :]
        if len(recent) < self.window:
            return
        falling = all(
            all(b[k] < a[k] for a, b in zip(recent, recent[1:], strict=False))
            for k in ("logps/chosen", "logps/rejected")
        )
        if falling:
            self._warn(
                "chosen pushed down",
                f"DPO: the log-probabilities of both chosen and rejected answers fell for {self.window} logs in a row "
                f"(chosen now {recent[-1]['logps/chosen']:.2f}): the chosen answers are being made less likely too; "
                "consider a lower learning rate, a higher beta, or loss_type: [sigmoid, sft] (RPO)",
            )
        if all(abs(r.get("loss", 0.0) - LN2) < 1e-3 and r["rewards"] < 1e-6 for r in recent):
            self._warn(
                "nothing learned",
                f"DPO: the loss has stayed at ln 2 = {LN2:.4f} with zero rewards for {self.window} logs: the policy is "
                "not moving away from the reference; check that the reference is not the policy itself, and the "
                "learning rate",
            )


class NumericGuard(TrainerCallback):
    """Watches the raw loss of every micro-batch and the raw grad norm of every step, not the logged averages.

    - non-finite loss or grad norm: training stops at the end of that step; the stage then fails, naming it.
      Under fp16 loss scaling an infinite grad norm is the scaler's business (it skips the step and lowers its
      scale; seen on an H100 at step 20 of a healthy GPT-2 run): only `max_skipped` such steps in a row stop it;
    - a loss spike (over twice the running median of the last 50 steps): a warning, and a wandb alert online;
    - a loss of exactly 0: a warning with the usual causes.
    """

    def __init__(
        self,
        tracker: Any = None,
        spike_factor: float = 2.0,
        window: int = 50,
        loss_scaling: bool = False,
        max_skipped: int = 20,
    ):
        self.tracker = tracker
        self.loss_scaling = loss_scaling
        self.max_skipped = max_skipped  # 20 halvings take the default scale (2**16) below 2**-4: past saving
        self.skipped_in_a_row = 0
        self.skipped = 0
        self.spike_factor = spike_factor
        self.window = window
        self.losses: list[float] = []
        self.pending: list[Any] = []
        self.grad_norm: float | None = None
        self.nonfinite: dict[str, Any] | None = None
        self.last_spike_step = -(10**9)
        self.warned_zero = False
        self.watches_grad_norm = True

    def attach(self, trainer: Any) -> None:
        """Have each raw micro-batch loss and step grad norm pass through the guard (align/patches.py's hook)."""
        from align.patches import watch_raw_numbers

        def on_grad_norm(norm: Any) -> None:
            self.grad_norm = float(norm) if norm is not None else None

        self.watches_grad_norm = watch_raw_numbers(trainer, self.pending.append, on_grad_norm)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Where the raw grad norm cannot be watched (a Trainer without the hook), the logged one still stops a run.
        norm = (logs or {}).get("grad_norm")
        if (
            not self.watches_grad_norm
            and isinstance(norm, float)
            and not math.isfinite(norm)
            and self.nonfinite is None
        ):
            self.nonfinite = {"split": "train", "what": "grad norm", "value": norm, "step": state.global_step}
            control.should_training_stop = True
            control.should_save = False
        return control

    def _skipped_by_scaler(self, step: int) -> None:
        self.skipped_in_a_row += 1
        self.skipped += 1
        log = logger.info if self.skipped == 1 else logger.debug
        log("fp16: the gradients overflowed at step %d; the loss scaler skipped the step and lowered its scale "
            "(normal while the scale settles; %d in a row stop the run)", step, self.max_skipped)  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if not self.pending:
            return control
        loss = float(torch.stack([p.float().mean() for p in self.pending]).mean())
        self.pending.clear()
        step = state.global_step
        bad = None
        if not math.isfinite(loss):
            bad = {"split": "train", "what": "loss", "value": loss}
        elif self.grad_norm is not None and not math.isfinite(self.grad_norm):
            if self.loss_scaling and self.skipped_in_a_row + 1 < self.max_skipped:
                self._skipped_by_scaler(step)
            else:
                bad = {"split": "train", "what": "grad norm", "value": self.grad_norm}
        else:
            self.skipped_in_a_row = 0
        if bad is not None:
            if self.nonfinite is None:
                self.nonfinite = {**bad, "step": step}
            # Stop now, and never save this step: the last checkpoint on disk stays the last good one.
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False
            return control
        if loss == 0.0 and not self.warned_zero:
            self.warned_zero = True
            logger.warning(
                "train loss is exactly 0 at step %d: usually no token carries a label (every label masked), the "
                "answers are in the prompt (leaked), or the data repeats one example",
                step,
            )
        recent = self.losses[-self.window :]
        if len(recent) >= 10:
            median = sorted(recent)[len(recent) // 2]
            if median > 0 and loss > self.spike_factor * median and step - self.last_spike_step >= self.window:
                self.last_spike_step = step
                message = (
                    f"loss spike at step {step}: {loss:.4g}, over {self.spike_factor:g}x the recent median {median:.4g}"
                )
                logger.warning("%s", message)
                if self.tracker is not None:
                    self.tracker.alert("loss spike", message)
        self.losses.append(loss)
        return control


def raise_if_nonfinite(ctx: Any, *watchers: Any) -> None:
    """Stop the pipeline when a watcher saw a non-finite loss or grad norm, naming the likely cause and the last
    good checkpoint.

    Raises:
        GuardStopped: the loss or grad norm went NaN or infinite.
    """
    from transformers.trainer_utils import get_last_checkpoint

    from align.errors import GuardStopped

    bad = next((w.nonfinite for w in watchers if getattr(w, "nonfinite", None)), None)
    if bad is None:
        return
    causes = []
    if ctx.precision.name == "fp16":
        causes.append("fp16 overflow (use precision: bf16 or fp32)")
    lr = ctx.stage.train.get("learning_rate")
    causes.append(f"a learning rate too high{f' ({lr})' if lr is not None else ''}")
    causes.append("a bad batch (empty or corrupt rows)")
    folder = ctx.stage_dir / "checkpoints"
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    raise GuardStopped(
        f"stage {ctx.stage.name}: non-finite {bad['split']} {bad.get('what', 'loss')} ({bad['value']}) at step "
        f"{bad['step']}; likely cause: {', or '.join(causes)}",
        hint=f"the last good checkpoint is kept: {last}"
        if last
        else "no checkpoint had been saved yet; lower the learning rate or fix the data, then rerun",
    )
