"""TrainerCallbacks that watch a stage: `metrics.jsonl`, throughput, and a stop on a non-finite loss."""

from __future__ import annotations

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


class MetricsWriter(TrainerCallback):
    """Appends every logged row to `metrics.jsonl` as `{"step", "epoch", "split", <metric>: value}`.

    `phase` lets the stage tag evaluations made outside training (`eval_final`), so the eval curve holds
    only what the Trainer measured while it trained, plus the step-0 evaluation before it.
    """

    def __init__(self, path: Path, main_process: bool = True):
        self.path = path
        self.main_process = main_process
        self.rows: list[dict[str, Any]] = []
        self.phase: str | None = None
        self.nonfinite: dict[str, Any] | None = None
        self._last_time: float | None = None
        self._last_tokens = 0
        if main_process:
            path.parent.mkdir(parents=True, exist_ok=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time, self._last_tokens = time.perf_counter(), state.num_input_tokens_seen or 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        split = self.phase or split_of(logs)
        row: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch, "split": split}
        row.update({k: v for k, v in logs.items() if k != "epoch"})
        if split == "train" and self._last_time is not None:
            # Tokens per second over the last logging interval, from the Trainer's own token count.
            now, seen = time.perf_counter(), state.num_input_tokens_seen or 0
            if now > self._last_time and seen > self._last_tokens:
                row["tokens_per_s"] = (seen - self._last_tokens) / (now - self._last_time)
            self._last_time, self._last_tokens = now, seen
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
