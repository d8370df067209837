"""Value types every layer shares: a setting with its source, what a kind's plan decides, what a stage starts
from, what it returns, and what it hands on. Plain data: this module imports nothing of align's."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNKNOWN = "unknown until the model is available"


@dataclass(frozen=True)
class Setting:
    """A training argument's value and where it came from."""

    value: Any
    source: str  # recipe | --set | align default | align (managed) | early stopping | capped ... | model ...


@dataclass
class StageParts:
    """What a stage module's `plan()` decides: fixed arguments, details to show, problems, run-time decisions."""

    fixed: dict[str, Setting] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    runtime: dict[str, str] = field(default_factory=dict)
    prepared: dict[str, Any] = field(default_factory=dict)
    # Figures that need the effective arguments (planned steps, effective batch): computed once they are known.
    count: Any = None

    def counted(self, effective: dict[str, Setting]) -> dict[str, Any]:
        return self.count(effective) if self.count is not None else {}


@dataclass(frozen=True)
class StartingPoint:
    """What a stage starts from and what it does with LoRA adapters: decided from the recipe and the files on
    disk before any model is loaded, so nothing later has to ask a model object what it used to be.

    `input` (recorded in summary.json): "scratch" (built from a config in this stage), "full" (full weights: a hub
    id, a directory, an earlier stage trained without LoRA), "adapter" (an earlier stage's LoRA adapters, not
    merged) or "merged" (an earlier stage's adapters merged into its base, as that stage's summary.json says).
    `lora`: "none" (every weight trains), "new" (fresh adapters on the input), "continue" (the input's adapters
    train on) or "merge" (the input's adapters are folded into their base first, then every weight trains).
    `base`: where the weights under this stage's adapters come from, written into the saved adapter config: a hub
    id or directory; None for a model built from scratch here (saved beside the adapters) or not yet known (dry run).
    """

    input: str
    lora: str
    base: str | None

    def describe(self) -> str:
        on = f" ({self.base})" if self.base else ""
        return {
            "none": "every weight trains",
            "new": "fresh LoRA adapters on the input model; only they train",
            "continue": f"the input's LoRA adapters train on, on their base{on}",
            "merge": f"the input's LoRA adapters are merged into their base{on} first; every weight trains",
        }[self.lora]

    def summary(self) -> str:
        """What `--dry-run` shows: `adapter: the input's LoRA adapters train on, ...`."""
        return f"{self.input}: {self.describe()}"


@dataclass(frozen=True)
class HeldOut:
    """A kind's held-out measure at one point, before or after training, as its `measure` returns it and its
    `summarize` reads it: `values`, one score per unit (pair, row, example, prompt) that the verdict's bootstrap
    resamples; `answers`, greedy answers to the stage's prompts (`align.evaluation.Answer`); `chosen_logps`, per pair
    the chosen answer's log-probability (the verdict warns when it falls); `extra`, the kind's other figures (a
    reward model's margin)."""

    values: list[float]
    answers: list[Any] = field(default_factory=list)
    chosen_logps: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def figure(self) -> float:
        """The summary's figure: the mean of `values`."""
        return sum(self.values) / max(1, len(self.values))

    @property
    def texts(self) -> list[str]:
        return [answer.text for answer in self.answers]


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


@dataclass(frozen=True)
class StageOutput:
    """What a finished stage hands on: where its model is and what produced it."""

    name: str
    kind: str
    model_dir: Path | None  # None: the stage saves no model (eval)
    fingerprint: str
    status: str = "completed"


def saved_model_dir(stage_dir: Path, summary: dict[str, Any]) -> Path | None:
    """Where a completed stage's model is: `<stage>/model` of the run directory it is read from, where its summary
    says it saved one. Never the summary's `model_dir` as written: that path is as the run's working directory
    spelt it (`runs/x/sft/model`), so read from another directory, or from a copied run, it named nothing (every
    stage "changed" and would train again) or the original run's model."""
    return stage_dir / "model" if summary.get("model_dir") else None


def same_decimals(*values: float) -> list[str]:
    """Numbers shown side by side (before → after) with one number of decimals: as many as four significant digits
    give the smallest of them, at most six. `0.4848 → 1` and `5.97 → 5.902` (each `.4g` alone) read as figures of
    different precision; they are `0.4848 → 1.0000` and `5.970 → 5.902`."""
    finite = [abs(v) for v in values if isinstance(v, int | float) and math.isfinite(v) and v != 0]
    decimals = min(6, max((max(0, 3 - math.floor(math.log10(v))) for v in finite), default=0))
    if finite and min(finite) < 1e-3:  # tiny figures keep their significant digits
        return [f"{v:.4g}" for v in values]
    return [f"{v:.{decimals}f}" if isinstance(v, int | float) and math.isfinite(v) else str(v) for v in values]


def counted(n: int, noun: str) -> str:
    """`1 stage`, `2 stages`: a count with its noun in the number it needs (`noun` singular, plural by `s`)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
