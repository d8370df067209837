"""THE shared setup: logging, precision, seeding, hub reachability and rank.

Everything here is decided once per pipeline run, with the reason logged. Stages never configure logging or
import a tracker themselves: they take what their context hands them (align/context.py; tracking:
align/tracking.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import logging.handlers
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from align.errors import BadInput

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Rank


def rank() -> int:
    """This process's global rank under torchrun/accelerate (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


@contextlib.contextmanager
def main_process_first():
    """Under several processes, the main one goes first (downloads, tokenization caches); the others then reuse
    what it left. Alone, it does nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    import torch
    from accelerate import PartialState

    # Starting the process group here (gloo on a CPU) lets data preparation wait before any Trainer exists.
    state = PartialState(cpu=not torch.cuda.is_available())
    if not state.is_main_process:
        state.wait_for_everyone()
    try:
        yield
    finally:
        # Reached even when the main process found bad input: the others then meet the same problem themselves
        # and exit with it, instead of waiting at a barrier the main process never reaches.
        if state.is_main_process:
            state.wait_for_everyone()


def same_on_every_rank(value: Any) -> Any:
    """The main process's `value` on every process (a picklable object); alone, `value` itself. Under a launcher,
    it starts the process group where nothing has yet (the others must learn a refusal the main process found before
    any Trainer exists)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized()):
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wait_for_everyone() -> None:
    """A barrier across processes when several run (a no-op alone): stages start and end together."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# Logging

CURRENT_STAGE: contextvars.ContextVar[str] = contextvars.ContextVar("align_stage", default="-")
LOG_FORMAT = "%(asctime)s %(levelname)-7s [%(stage)s] %(name)s: %(message)s"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
# Library verbosity follows ours one notch quieter: at `info` transformers would dump every config.
LIBRARY_LEVELS = {"debug": logging.INFO, "info": logging.WARNING, "warning": logging.WARNING}
# lm_eval: the eval stage's harness; absl: rouge-score's ("Using default tokenizer." per scoring call).
LIBRARIES = ("transformers", "datasets", "trl", "peft", "accelerate", "huggingface_hub", "lm_eval", "absl")
# Loggers that speak at DEBUG about their plumbing (font scoring, file locks, connection attempts): thousands
# of lines per run in align.log, and measurable time, for nothing a user reads.
PLUMBING = ("matplotlib", "PIL", "filelock", "fsspec", "httpcore", "httpcore2", "httpx", "urllib3", "asyncio")


class _StageFilter(logging.Filter):
    """Stamps each record with the stage that is running (and the rank off the main process)."""

    def filter(self, record: logging.LogRecord) -> bool:
        stage = CURRENT_STAGE.get()
        record.stage = stage if is_main_process() else f"rank{rank()} {stage}"
        return True


# Library warnings that alarm without cause in align's normal flow; they still reach align.log.
_HARMLESS = (
    "`loss_type=None` was set in the config but it is unrecognized",  # every from-scratch GPT-2
    "There were missing keys in the checkpoint model loaded: ['lm_head.weight']",  # tied weights, restored by tying
    "mtime may not be reliable on this filesystem",  # checkpoint ordering falls back to step numbers: fine
    # generate's decoding steps pass the cache, not the mask, and a finished row's next token is the pad id (often
    # eos): a false alarm at every online stage's first answers. align passes the mask; padded batches answer as
    # single prompts do (align.evaluation.generation).
    "We strongly recommend passing in an `attention_mask` since your input_ids may be padded",
)


class _HarmlessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _HARMLESS)


def draws_progress_bars(stream: Any = None) -> bool:
    """Whether progress bars are shown on `stream` (stderr): a terminal with a width. `script` run without a
    terminal, and some CI runners, give a pseudo-terminal of 0 columns, where every bar came out as a blank line."""
    stream = sys.stderr if stream is None else stream
    if not getattr(stream, "isatty", lambda: False)():
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):  # no file descriptor (a wrapped stream): no bars
        return False


class _AlignHandler(logging.Handler):
    """Marker base so a second setup (tests, notebooks) replaces our handlers instead of adding more."""


class _ConsoleHandler(logging.StreamHandler, _AlignHandler):
    """The console. At a terminal, a record goes through tqdm's `write`, which clears the progress bars first and
    draws them again below it: written to stderr directly, it landed at the end of the bar's line
    (`...1.26it/s]07:08:01 INFO ...`)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not draws_progress_bars(self.stream):
            super().emit(record)
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # a formatting problem: logging's own reporting, as StreamHandler does
            self.handleError(record)


class _FileHandler(logging.FileHandler, _AlignHandler):
    pass


class _Buffer(logging.handlers.MemoryHandler, _AlignHandler):
    """Holds records from before the run directory exists, so align.log starts at the command's start."""


_buffer: _Buffer | None = None


def setup_logging(level: str = "info", log_file: Path | None = None) -> None:
    """Install align's logging, once per process: a console at `level` (main process; others warnings only), the
    libraries routed through it, and records held until `log_to_file` names align.log (so the file starts at the
    command's start). Called again (tests, notebooks), it replaces its own handlers instead of adding more."""
    global _buffer
    root = logging.getLogger()
    held = _buffer.buffer if _buffer is not None else []
    for handler in [h for h in root.handlers if isinstance(h, _AlignHandler)]:
        root.removeHandler(handler)
        if not isinstance(handler, _Buffer):
            handler.close()
    root.setLevel(logging.DEBUG)
    console = _ConsoleHandler(sys.stderr)
    console.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    console.addFilter(_StageFilter())
    console.addFilter(_HarmlessFilter())
    root.addHandler(console)
    _buffer = _Buffer(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    _buffer.buffer = list(held)
    _buffer.addFilter(_StageFilter())
    root.addHandler(_buffer)
    logging.captureWarnings(True)
    set_console_level(level)
    if log_file is not None:
        log_to_file(log_file)


def set_console_level(level: str) -> None:
    """The console's level (the recipe's `log_level`, or `--log-level`), and the libraries' one notch quieter."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _ConsoleHandler):
            handler.setLevel(LEVELS[level] if is_main_process() else logging.WARNING)
    # The libraries' records flow into our handlers: one format, one file, one level policy.
    for name in LIBRARIES:
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
        lib.setLevel(LIBRARY_LEVELS[level])
    _quiet_library_handlers(level)
    for name in PLUMBING:
        logging.getLogger(name).setLevel(logging.INFO if level == "debug" else logging.WARNING)
    logging.getLogger("py.warnings").setLevel(logging.ERROR if level != "debug" else logging.WARNING)


def log_to_file(log_file: Path) -> None:
    """Everything at DEBUG into `log_file` (align.log) from now on, the records held since the start first; on the
    main process only (the others' warnings reach the console, tagged with their rank)."""
    global _buffer
    root = logging.getLogger()
    if not any(isinstance(h, _ConsoleHandler) for h in root.handlers):
        setup_logging()  # run_pipeline called from Python, without the command line's setup
    if not is_main_process():
        return
    for handler in [h for h in root.handlers if isinstance(h, _FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = _FileHandler(log_file, encoding="utf-8")
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    for record in _buffer.buffer if _buffer is not None else []:
        file_handler.handle(record)
    file_handler.addFilter(_StageFilter())
    if _buffer is not None:
        root.removeHandler(_buffer)
        _buffer = None
    root.addHandler(file_handler)


def close_log_file() -> None:
    """Stop writing to the run's align.log: what a Python session logs after a run is not that run's."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _FileHandler)]:
        root.removeHandler(handler)
        handler.close()


class _NoTensorParallelNotes(logging.Filter):
    """transformers 5 checks a model's tensor-parallel plan on every load, parallel or not, and warns that "the
    following layers were not sharded" (every layer, twice for a reward model): align never shards by tensor
    parallelism, so the note says nothing about its runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("The following layers were not sharded")
                    or message.startswith("The following TP rules were not applied"))  # fmt: skip


def _quiet_library_handlers(level: str) -> None:
    """transformers and datasets install their own stderr handlers on import; route them through ours."""
    from datasets.utils import logging as ds_logging
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity(LIBRARY_LEVELS[level])
    ds_logging.get_logger().handlers.clear()
    ds_logging.get_logger().propagate = True
    ds_logging.set_verbosity(LIBRARY_LEVELS[level])
    tensor_parallel = logging.getLogger("transformers.distributed.tensor_parallel")
    if not any(isinstance(f, _NoTensorParallelNotes) for f in tensor_parallel.filters):
        tensor_parallel.addFilter(_NoTensorParallelNotes())
    if not draws_progress_bars():
        # Progress bars are noise in logs and CI; people at a terminal keep them.
        ds_logging.disable_progress_bar()
        hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------------
# Hub reachability

TRUTHY = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUTHY


def go_offline(reason: str) -> None:
    """Switch the Hugging Face libraries to offline mode, so a missing file fails at once, not after retries."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # The libraries read these at import: their module constants follow (align/patches.py).
    from align.patches import set_hub_offline

    set_hub_offline()
    logger.debug("hub offline: %s", reason)


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_hub(offline_flag: bool) -> None:
    """Decide once whether the hub is usable; if not, go offline so the cache still serves what it has."""
    if offline_flag:
        go_offline("--offline")
    elif hub_offline():
        go_offline("HF_HUB_OFFLINE is set")
    elif not reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
        logger.warning("the Hugging Face Hub is not reachable: using only what is in the local cache")
        go_offline("hub unreachable")


# --------------------------------------------------------------------------------------------------
# Precision


@dataclass(frozen=True)
class Precision:
    """The numeric precision of training, with the reason it was chosen."""

    name: str  # bf16 | fp16 | fp32
    reason: str
    device: str

    @property
    def train_args(self) -> dict[str, bool]:
        return {"bf16": self.name == "bf16", "fp16": self.name == "fp16"}


def choose_precision(requested: str) -> Precision:
    """Pick the training precision from the hardware.

    `auto`: bf16 where the GPU supports it; fp16 only where it does not (its overflow is the usual cause
    of NaN losses); fp32 on the CPU.

    Raises:
        BadInput: an explicit choice this hardware cannot run.
    """
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
        bf16_ok = torch.cuda.is_bf16_supported()
    else:
        device, bf16_ok = "cpu", False
        warn_if_sharding_ignored()
    on_gpu = device != "cpu"

    if requested == "auto":
        if on_gpu and bf16_ok:
            return Precision("bf16", f"{device} supports bf16: fp32's range at half the memory", device)
        if on_gpu:
            logger.warning(
                "%s has no bf16: using fp16, whose narrow range can overflow into NaN losses; "
                "if the loss turns NaN, use precision: fp32",
                device,
            )
            return Precision("fp16", f"{device} lacks bf16; fp16 is the fastest it has (NaN risk)", device)
        return Precision("fp32", "no GPU: mixed precision brings no speed on the CPU", device)
    if requested == "fp16" and not on_gpu:
        raise BadInput("precision: fp16 needs a CUDA GPU and none is available", hint="use precision: auto or fp32")
    if requested == "bf16" and on_gpu and not bf16_ok:
        raise BadInput(f"precision: bf16: {device} does not support bf16", hint="use precision: auto (fp16) or fp32")
    if requested == "bf16" and not on_gpu:
        return Precision(
            "bf16", "requested; on the CPU bf16 runs through autocast and is often slower than fp32", device
        )
    return Precision(requested, "requested in the recipe", device)


_sharding_warned = False


def warn_if_sharding_ignored() -> None:
    """Say once (main process) that an accelerate FSDP config shards nothing here, on a machine without a GPU.

    accelerate 1.15 turns FSDP on only for GPU-like devices (`AcceleratorState`: the FSDP switch sits in the branch
    for MULTI_GPU, MULTI_XPU, ...; MULTI_CPU is not among them) and says nothing: `accelerate launch --config_file
    recipes/accelerate/fsdp.yaml` on the CPU trains as plain data parallelism over gloo (DDP), every process holding
    the whole model and optimizer. Found by running it (tests/test_distributed.py pins it); torch's own FSDP2
    (`fully_shard`) does shard on the CPU with gloo, so the gap is accelerate's.
    """
    global _sharding_warned
    if _sharding_warned or os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return
    _sharding_warned = True
    if is_main_process():
        from importlib.metadata import version

        logger.warning(
            "accelerate is asked for FSDP, but there is no GPU: accelerate %s shards only on GPUs, so these "
            "%s processes train as plain data parallelism (DDP over gloo), each holding the whole model",
            version("accelerate"), os.environ.get("WORLD_SIZE", "1"),
        )  # fmt: skip


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)
