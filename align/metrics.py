"""The metrics a stage records: `metrics.jsonl` (one row per logged step, with throughput and memory), the
trackers' extra keys, and the summary figures read back from the rows (best eval, peak memory)."""

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
            self.rows = [r for r in kept if 0 < r["step"] <= step and r["split"] in ("train", "eval", "monitor")]
            if main_process:
                path.write_text("".join(json.dumps(r, default=str) + "\n" for r in self.rows))
        self.phase: str | None = None
        self.nonfinite: dict[str, Any] | None = None
        self._last_time: float | None = None
        self._last_tokens = 0
        self._train_start: float | None = None
        self._start_step = 0
        if main_process:
            path.parent.mkdir(parents=True, exist_ok=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time, self._last_tokens = time.perf_counter(), state.num_input_tokens_seen or 0
        self._train_start, self._start_step = self._last_time, state.global_step  # a resumed run: from its step

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
        progress = self.progress(state) if split == "train" and "loss" in logs else ""
        hidden = _QUIET | {"split"} | ({"step"} if progress else set())  # the progress names the step
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in hidden and v is not None)
        logger.info("%s: %s%s", split, progress, shown)

        loss = logs.get("loss", logs.get("eval_loss"))
        if isinstance(loss, float) and not math.isfinite(loss) and self.nonfinite is None:
            self.nonfinite = {"step": state.global_step, "value": loss, "split": split}
            control.should_training_stop = True
        return control

    def progress(self, state: Any) -> str:
        """`step 40/120 (33%), 1m05s elapsed, ETA 2m10s; ` for a training row's log line: where a long run stands in
        a log file, where there is no progress bar (the rate is this run's, since it started or resumed)."""
        total, step = state.max_steps or 0, state.global_step
        if self._train_start is None or total <= 0:
            return ""
        elapsed = time.perf_counter() - self._train_start
        done = step - self._start_step
        eta = f", ETA {_duration(elapsed / done * (total - step))}" if done > 0 and step < total else ""
        return f"step {step}/{total} ({100 * step / total:.0f}%), {_duration(elapsed)} elapsed{eta}; "

    def record(self, row: dict[str, Any]) -> None:
        """A row align measured itself during training (an online stage's `monitor` split): to metrics.jsonl, the
        trackers and the log, as the Trainer's rows go."""
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in row.items() if "/" in k} | {"train/global_step": row["step"]})
        self.rows.append(row)
        if self.main_process:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row, default=str) + "\n")
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in _QUIET | {"split"} and v is not None)
        logger.info("%s: %s", row["split"], shown)


def _duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


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
