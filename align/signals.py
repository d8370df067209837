"""A stop asked for from outside — Ctrl-C (SIGINT), or SIGTERM from Slurm, Kubernetes or a launcher — ends the
current optimizer step, saves a checkpoint and stops, so a preempted job loses at most one step and the same
command resumes it. A second signal stops at once (the last checkpoint still resumes).

Under several processes every rank gets the signal (torchrun and `accelerate launch` forward it), but not at the
same moment: the ranks agree at each step's end, so all stop after the same step and none waits in a collective.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from transformers import TrainerCallback

from align.errors import Interrupted

logger = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)


class _StopRequest:
    """The signal received, if any; set by the handler, read by the callback and the pipeline."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            # A second signal: the user means now. The stage records `interrupted`, and its last checkpoint resumes.
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(
            "%s received: finishing this step, saving a checkpoint, then stopping (send it again to stop at once)",
            signal.Signals(signum).name,
        )


STOP = _StopRequest()


def requested() -> int | None:
    """The signal number of a stop asked for during this run, or None."""
    return STOP.signum


def exit_code(signum: int | None) -> int:
    """The shell's convention: 128 + the signal (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + (signum or signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into a stop request for the duration of a run (main thread only: Python delivers
    signals there; elsewhere, as in a notebook's worker thread, the defaults stay)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.signum = None
    previous = {signum: signal.signal(signum, STOP.handle) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def raise_if_requested(where: str) -> None:
    """Between stages: stop here if a signal came while no stage was training.

    Raises:
        Interrupted: a stop was asked for.
    """
    if STOP.signum is not None:
        name = signal.Signals(STOP.signum).name
        raise Interrupted(STOP.signum, f"stopped by {name} {where}", hint="run the same command again to go on")


def _agreed(signum: int | None) -> int | None:
    """The signal any rank received (every rank gets the same answer); alone, this process's own."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return signum
    import torch

    # One tiny all-reduce per step: on a GPU it waits for the step to finish, which the step's end does anyway.
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([signum or 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item()) or None


class StopOnSignal(TrainerCallback):
    """At a step's end after a signal: ask the Trainer to save a checkpoint now, then stop once it is written."""

    def __init__(self) -> None:
        self.stopping = False

    def on_step_end(self, args, state, control, **kwargs):
        signum = _agreed(STOP.signum)
        if signum is not None:
            # Another rank may have got the signal first: this one stops after the same step.
            self.stopping, STOP.signum = True, STOP.signum or signum
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopping:
            name = signal.Signals(STOP.signum or signal.SIGINT).name
            # Every rank says it (off the main process as a warning, the only level they print): all name one step.
            logger.warning(
                "%s: stopping after step %d, checkpoint-%d saved", name, state.global_step, state.global_step
            )
            raise Interrupted(
                STOP.signum or signal.SIGINT,
                f"stopped by {name} after step {state.global_step}; checkpoint-{state.global_step} is saved",
                hint="run the same command again to resume from it (--fresh starts over)",
            )
