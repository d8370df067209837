"""TrainerCallbacks that guard a stage: a stop on a non-finite loss or grad norm (the exact first step, named with
its likely cause), loss spikes, a DPO run that learns nothing or makes the chosen answers less likely.
(What a stage records, `metrics.jsonl` and throughput, is align/metrics.py.)"""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# The DPO loss of a policy that has moved nowhere from its reference: -log(sigmoid(0)).
LN2 = math.log(2.0)


class PreferenceGuard(TrainerCallback):
    """Warnings for the ways preference training fails quietly, each said once. `method` names it in the text
    (DPO, KTO, ORPO, SimPO); `stuck_loss` is the loss of a policy that has not moved from its reference, for the
    methods that have one (DPO's ln 2), else None.

    - chosen and rejected log-probs both falling steadily: the likelihood of the chosen answers is being
      pushed down along with the rejected ones (a known DPO failure; lower the learning rate or raise beta);
    - the loss stuck at `stuck_loss` with rewards at zero: nothing is learned, often because the reference is the
      policy itself.
    """

    def __init__(self, tracker: Any = None, window: int = 5, method: str = "DPO", stuck_loss: float | None = LN2):
        self.tracker = tracker
        self.window = window
        self.method = method
        self.stuck_loss = stuck_loss
        self.history: list[dict[str, float]] = []
        self.warned: set[str] = set()

    def _warn(self, key: str, message: str) -> None:
        if key in self.warned:
            return
        self.warned.add(key)
        logger.warning(message)
        if self.tracker is not None:
            self.tracker.alert(f"{self.method}: {key}", message)

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
                f"{self.method}: the log-probabilities of both chosen and rejected answers fell for {self.window} logs "
                "in a row "
                f"(chosen now {recent[-1]['logps/chosen']:.2f}): the chosen answers are being made less likely too; "
                + (
                    "consider a lower learning rate, a higher beta, or loss_type: [sigmoid, sft] (RPO)"
                    if self.method == "DPO"
                    else "consider a lower learning rate or a higher beta"
                ),
            )
        stuck = self.stuck_loss
        if stuck is not None and all(abs(r.get("loss", 0.0) - stuck) < 1e-3 and r["rewards"] < 1e-6 for r in recent):
            self._warn(
                "nothing learned",
                f"{self.method}: the loss has stayed at ln 2 = {stuck:.4f} with zero rewards for {self.window} logs: "
                "the policy is "
                "not moving away from the reference; check that the reference is not the policy itself, and the "
                "learning rate",
            )


class NumericGuard(TrainerCallback):
    """Watches the raw loss of every micro-batch and the raw grad norm of every step, not the logged averages.

    - non-finite loss or grad norm: training stops at the end of that step; the stage then fails, naming it.
      Under fp16 loss scaling an infinite grad norm is the scaler's business (it skips the step and lowers its
      scale; seen on an H100 at step 20 of a healthy GPT-2 run): only `max_skipped` such steps in a row stop it;
    - a loss spike (over twice the running median of the last 50 steps): a warning, and a wandb alert online;
    - a loss of exactly 0: a warning with the usual causes;
    - a grad norm of exactly 0 under a loss that is not: nothing trains (frozen weights); a warning with the causes.

    `surrogate_loss` (online RL): the loss is a policy-gradient surrogate near 0, not a measure of fit. Exactly 0 (a
    group without reward variance), a zero gradient and jumps against a near-zero median are all normal there, so
    only the non-finite checks apply; the RL health alarms watch what matters instead.
    """

    def __init__(
        self,
        tracker: Any = None,
        spike_factor: float = 2.0,
        window: int = 50,
        loss_scaling: bool = False,
        max_skipped: int = 20,
        surrogate_loss: bool = False,
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
        self.surrogate_loss = surrogate_loss
        self.warned_zero = self.warned_zero_grad = surrogate_loss  # nothing to warn of: as if already warned
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
        if self.grad_norm == 0.0 and loss > 0.0 and not self.warned_zero_grad:
            self.warned_zero_grad = True
            logger.warning(
                "grad norm is exactly 0 at step %d while the loss is %.4g: no weight receives a gradient, so nothing "
                "trains; usually every weight is frozen (requires_grad False: adapters merged without unfreezing, "
                "a frozen base without adapters) or the loss is detached from the model",
                step, loss,
            )  # fmt: skip
        if loss == 0.0 and not self.warned_zero:
            self.warned_zero = True
            logger.warning(
                "train loss is exactly 0 at step %d: usually no token carries a label (every label masked), the "
                "answers are in the prompt (leaked), or the data repeats one example",
                step,
            )
        recent = self.losses[-self.window :]
        if len(recent) >= 10 and not self.surrogate_loss:
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


class HealthAlarms(TrainerCallback):
    """The ways online RL fails quietly, from what TRL logs at each training log, each said once with its numbers
    and likely cause (thresholds: the stage's `alarms:`, align/stages/grpo.py `Alarms`). Each must hold for
    `window` logged steps in a row. With `stop: true` an alarm stops the stage instead (a `GuardStopped`).

    - groups with no reward variance (`frac_reward_zero_std`): nothing to learn from them;
    - truncation (`completions/clipped_ratio`): answers cut at max_completion_length, often all scored alike;
    - completion length or entropy collapsing below a share of its first logged value;
    - KL to the reference above a threshold (with beta > 0);
    - cut thoughts (`thinking/cut_rate`, a thinking template's): answers whose reasoning never closed;
    - reward hacking (`fire`d by the online stage's monitor): the held-out reward up, a `monitor:` judge flat.
    """

    def __init__(self, settings: Any, tracker: Any = None, tool_calls: Any = None):
        self.settings = settings
        self.tracker = tracker
        self.tool_calls = tool_calls  # align.tools.ToolCalls of a stage with tools (None: no tool alarms)
        self.rows: list[dict[str, float]] = []
        self.first: dict[str, float] = {}
        self.fired: list[str] = []
        self.said: set[str] = set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs or state.global_step == 0:
            return
        row = {k: float(v) for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self.rows.append(row)
        for key in ("completions/mean_length", "entropy"):
            if key in row and key not in self.first:
                self.first[key] = row[key]
        recent = self.rows[-self.settings.window :]
        if len(recent) < self.settings.window:
            return
        s = self.settings

        def held(key: str, test: Any) -> bool:
            return all(key in r and test(r[key]) for r in recent)

        if held("frac_reward_zero_std", lambda v: v >= s.zero_std):
            self.fire("zero reward variance", f"{recent[-1]['frac_reward_zero_std']:.0%} of groups got the same "
                       f"reward on every answer for {len(recent)} logs: GRPO learns nothing from them; usually every "
                       "answer was truncated, or a reward is constant for this model (too hard, too easy, or "
                       "reading the wrong column)", control)  # fmt: skip
        if held("completions/clipped_ratio", lambda v: v >= s.clipped):
            self.fire("truncation", f"{recent[-1]['completions/clipped_ratio']:.0%} of answers hit "
                       f"max_completion_length={args.max_completion_length} for {len(recent)} logs: raise it, or "
                       "reward answers that end", control)  # fmt: skip
        for key, what in (("completions/mean_length", "completion length"), ("entropy", "entropy")):
            start = self.first.get(key)
            if start and held(key, lambda v, start=start: v < s.collapse * start):
                self.fire(f"{what} collapse", f"{what} fell from {start:.3g} to {recent[-1][key]:.3g} (below "
                           f"{s.collapse:.0%} of its first value) for {len(recent)} logs: the policy is collapsing "
                           "onto a few answers; lower the learning rate or raise beta", control)  # fmt: skip
        from align.thinking import cut_thoughts_cause, cut_thoughts_share

        if held("thinking/cut_rate", lambda v: v >= cut_thoughts_share(s)):
            of = f"answers for {len(recent)} log{'s' if len(recent) != 1 else ''}"
            self.fire("cut thoughts", cut_thoughts_cause(recent[-1]["thinking/cut_rate"], of,
                                                         args.max_completion_length), control)  # fmt: skip
        if self.tool_calls is not None:
            self.tool_alarms(recent, held, control)
        if getattr(args, "beta", 0) and held("kl", lambda v: v > s.kl):
            self.fire("KL", f"KL to the reference is {recent[-1]['kl']:.3g}, above {s.kl:g}, for {len(recent)} "
                       "logs: the policy is drifting far from where it started; lower the learning rate or raise "
                       "beta", control)  # fmt: skip

    def tool_alarms(self, recent: list[dict[str, float]], held: Any, control: Any) -> None:
        """A policy that stopped calling its tools (or never did), and tools that raise: from TRL's
        `tools/call_frequency` and `tools/failure_frequency`, the tools named from align's own count."""
        from align.tools import TOOL_CALLS, TOOL_FAILURES

        s = self.settings
        calls = TOOL_CALLS if s.tool_calls is None else s.tool_calls
        failures = TOOL_FAILURES if s.tool_failures is None else s.tool_failures
        logs = f"{len(recent)} log{'s' if len(recent) != 1 else ''}"
        if held("tools/call_frequency", lambda v: v <= calls):
            self.fire("tool calls collapsed", f"{recent[-1]['tools/call_frequency']:.0%} of answers called a tool "
                      f"for {logs}: the policy does not call its tools; warm it up with sft on tool-call transcripts, "
                      "or reward the answers that call", control)  # fmt: skip
        if held("tools/failure_frequency", lambda v: v >= failures):
            self.fire("tool failures", f"{recent[-1]['tools/failure_frequency']:.0%} of tool calls raised for {logs}: "
                      f"{self.tool_calls.worst()}", control)  # fmt: skip

    def fire(self, key: str, message: str, control: Any) -> None:
        """Say an alarm once (log, tracker alert, the verdict's warnings); with `stop: true`, and `control` given
        (during training), stop the stage."""
        if key in self.said:
            return
        self.said.add(key)
        self.fired.append(f"{key}: {message}")
        logger.warning("alarm: %s: %s", key, message)
        if self.tracker is not None:
            self.tracker.alert(f"RL: {key}", message)
        if self.settings.stop and control is not None:
            from align.errors import GuardStopped

            raise GuardStopped(f"alarm: {key}: {message}", hint="set `alarms: {stop: false}` to warn instead")


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
