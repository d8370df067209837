"""The one module that touches private library code.

Everything else in align uses the libraries' public APIs. Each hook here names what it was written against,
checks the installed library (the names and signatures it relies on) when it is used, and where they changed
falls back to the library's own path with one logged line — never silently, and never with a wrong result.
tests/test_patches.py pins each contract, so a release that changes one fails a test that names it.

Hooks (each with the private code it touches, what it buys, and its fallback):
- `install_lm_head`: `trl.trainer.utils._ChunkedLogProbFunction`, `trl.kernels.chunked_logprob._use_triton`;
  1.4x faster SFT/DPO steps on a CPU; else TRL's chunked head.
- `wrap_preparation`: the SFT/DPO trainers' `_prepare_dataset`; the tokenized-data cache; else TRL prepares
  every time.
- `arrow_tables`: `datasets.Dataset._indices`; hashing a row selection without copying it; else
  `flatten_indices()` (a copy).
- `watch_raw_numbers`: `Trainer._get_grad_norm` (and `compute_loss` replaced on the instance); the exact first
  non-finite step; else the grad norm read from the logged rows.
- `set_hub_offline`, `skip_download_counts`: `huggingface_hub.constants`, `datasets.config` module constants;
  offline at once, and no S3 ping per local file; else the environment variables alone.
- `stored_metrics_kept`: the TRL trainers' `_metrics` (what `compute_loss` stores for the next logged row); a
  mix's per-source eval losses without adding their batches to the logged eval row; else TRL's eval row also
  averages the per-source passes (same rows again, so the same means, counted twice).
- `train_after_evaluation`: accelerate's `Accelerator._models` and the `_is_accelerate_prepared` flag; under several
  processes, an evaluation before training (align's "before" figures) prepared the model for evaluation only, and
  `Trainer.train()` then skipped its DDP wrap, so each process trained on its own gradients (measured on
  transformers 5.24 / accelerate 1.16: grad norm 0.7286 against 0.5083 on 1 process); else a refusal to train on
  several processes rather than a silently wrong run.
- `experimental`: TRL's `trl.experimental` trainers and configs (ORPO, CPO for SimPO); the kinds built on them;
  else a refusal at preflight naming the TRL range that has them.
- `environment_factory`: `GRPOTrainer`'s experimental `environment_factory` argument (a grpo stage's
  `environment:`); else a refusal at preflight naming the installed TRL.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)


def _parameters(function: Any) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return ()


@functools.cache
def _fallback(hook: str, why: str) -> None:
    """One line per hook and reason, however often the hook is asked for."""
    logger.warning("%s: the library changed (%s); using its own path instead", hook, why)


# --------------------------------------------------------------------------------------------------
# TRL's chunked LM head (align/lm_head.py holds the replacement's maths)

# The arguments of `_ChunkedLogProbFunction.forward` the replacement was written against (trl 1.16).
LM_HEAD_CONTRACT = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                    "final_logit_softcapping", "logit_scale", "outputs")  # fmt: skip


def install_lm_head(device: Any) -> str:
    """Route TRL's LM head through align's dispatcher (once per process); return, for the log, what `device`'s
    batches will use. Where TRL's function no longer has the arguments the dispatcher was written for, TRL's own
    head stays (a wrong head would train wrongly)."""
    import trl.trainer.utils as trl_utils

    from align.lm_head import PLAIN_MAX_LOGITS, dispatcher, trl_everywhere

    try:
        from trl.kernels.chunked_logprob import _use_triton
    except ImportError:
        _fallback("LM head", "trl.kernels.chunked_logprob._use_triton is gone")
        return "TRL's own (this TRL has no Triton check to route by)"
    current = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if current is None:
        _fallback("LM head", "trl.trainer.utils._ChunkedLogProbFunction is gone")
        return "TRL's own (this TRL has no ChunkedLogProbFunction to stand in for)"
    if not hasattr(current, "trl_function"):
        if _parameters(current.forward) != LM_HEAD_CONTRACT:
            _fallback("LM head", f"ChunkedLogProbFunction.forward takes {_parameters(current.forward)[1:]}")
            return f"TRL's chunked head (its ChunkedLogProbFunction changed its arguments: {LM_HEAD_CONTRACT[1:]} expected)"  # noqa: E501
        trl_utils._ChunkedLogProbFunction = dispatcher(current, _use_triton)
    if _use_triton(device):
        return f"TRL's chunked head (Triton on {device.type})"
    if trl_everywhere():
        return "TRL's chunked head (ALIGN_LM_HEAD=trl)"
    return (
        f"plain logits (no Triton on {device.type}: TRL's chunked head is slower here); TRL's above "
        f"{PLAIN_MAX_LOGITS:,} logits a batch"
    )


# --------------------------------------------------------------------------------------------------
# TRL's data preparation (the tokenized-data cache in align/cache.py stands in front of it)

# A kind declares the `_prepare_dataset` arguments of its trainer it was written against (`TrainingKind.prepare`):
# TRL calls the method positionally, the split's name last.
Prepare = Callable[..., Any]


def wrap_preparation(trainer_cls: type, around: Callable[..., Any], expected: tuple[str, ...]) -> type:
    """`trainer_cls` whose data preparation goes through `around(prepare, trainer, dataset, processing_class,
    args, extra, split)`, where `prepare()` runs TRL's own and `extra` holds the arguments between `args` and the
    split's name (SFT's packing and formatting function). Unwrapped, with one logged line, where TRL's method does
    not take `expected`, the arguments the kind was written against."""
    base = getattr(trainer_cls, "_prepare_dataset", None)
    if base is None or _parameters(base) != expected:
        _fallback(f"tokenized-data cache ({trainer_cls.__name__})", f"_prepare_dataset takes {_parameters(base)}")
        return trainer_cls

    class Prepared(trainer_cls):  # type: ignore[misc, valid-type]
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, *rest: Any) -> Any:
            *extra, split = rest

            def prepare() -> Any:
                return base(self, dataset, processing_class, args, *rest)

            return around(prepare, self, dataset, processing_class, args, tuple(extra), split)

    Prepared.__name__ = Prepared.__qualname__ = f"Cached{trainer_cls.__name__}"
    return Prepared


@functools.cache
def settings_read_by_preparation(trainer_cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The `args.<name>` and `self.<name>` that TRL's preparation reads, found in its source (so a TRL release
    that reads a new setting keys the cache on it too)."""
    source = inspect.getsource(trainer_cls._prepare_dataset)
    return tuple(sorted(set(re.findall(r"\bargs\.(\w+)", source)))), tuple(
        sorted(set(re.findall(r"\bself\.(\w+)", source)))
    )


# --------------------------------------------------------------------------------------------------
# datasets' row selection


def arrow_tables(ds: Any) -> list[Any]:
    """The Arrow tables that make a data set's rows: its table and, after `select`/`shuffle`, the selection
    (hashing both is cheap; the public way, `flatten_indices()`, copies every row)."""
    if not hasattr(ds, "_indices"):
        _fallback("data fingerprint", "datasets.Dataset has no _indices")
        return [ds.flatten_indices().data.table]
    return [ds.data.table] + ([ds._indices.table] if ds._indices is not None else [])


# --------------------------------------------------------------------------------------------------
# The Trainer's raw loss and grad norm (align/guards.py)


def watch_raw_numbers(trainer: Any, on_loss: Callable[[Any], None], on_grad_norm: Callable[[Any], None]) -> bool:
    """Pass every micro-batch's training loss and every step's grad norm, as computed, to the guard: the
    Trainer logs only averages at logging steps, and a NaN there is too late to name the step.

    Returns whether the grad norm is watched; without `_get_grad_norm` (logged once) the guard reads it from the
    logged rows instead."""
    compute_loss = trainer.compute_loss

    def watched_loss(model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
        out = compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if model.training:
            on_loss((out[0] if return_outputs else out).detach())
        return out

    trainer.compute_loss = watched_loss
    get_grad_norm = getattr(trainer, "_get_grad_norm", None)
    if get_grad_norm is None:
        _fallback("grad-norm guard", "transformers' Trainer has no _get_grad_norm")
        return False

    def watched_norm(*args: Any, **kwargs: Any) -> Any:
        norm = get_grad_norm(*args, **kwargs)
        on_grad_norm(norm)
        return norm

    trainer._get_grad_norm = watched_norm
    return True


# --------------------------------------------------------------------------------------------------
# Offline switches the libraries read at import


def set_hub_offline() -> None:
    """Offline mode for libraries already imported: they read HF_HUB_OFFLINE once, into module constants."""
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config as ds_config

        ds_config.HF_HUB_OFFLINE = True


def skip_download_counts() -> None:
    """datasets pings a download counter on S3 for every load, local files too (3 s timeout each on a firewalled
    machine); local files need no network at all."""
    import datasets.config as ds_config

    ds_config.HF_UPDATE_DOWNLOAD_COUNTS = False


# --------------------------------------------------------------------------------------------------
# TRL's experimental trainers

# A kind names the classes it takes from TRL's experimental API by their path there (`TrainingKind.experimental`);
# TRL moves a method out of `trl.experimental` when it promotes it, as it did KTO in 1.16, so each is looked for in
# `trl` too. pyproject.toml pins the range below.
EXPERIMENTAL_RANGE = "trl >= 1.16, < 2"


def experimental(path: str) -> type:
    """A class of TRL's experimental API by its path there (`trl.experimental.orpo:ORPOTrainer`): from there, else
    (promoted since) from `trl` itself.
    TRL warns on every first import of `trl.experimental` that its API may change; align pins the range it was
    written against and silences that warning (TRL's own switch, TRL_EXPERIMENTAL_SILENCE).

    Raises:
        BadInput: neither place has it (a TRL outside the range align supports).
    """
    import importlib
    import os

    from align.errors import BadInput

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pass
    import trl

    promoted = getattr(trl, name, None)
    if isinstance(promoted, type):
        return promoted
    raise BadInput(
        f"TRL {trl.__version__} has no {name} (align uses it from {module}, in {EXPERIMENTAL_RANGE})",
        hint=f'pip install "{EXPERIMENTAL_RANGE.replace(", ", ",").replace(" ", "")}"',
    )


# --------------------------------------------------------------------------------------------------
# The metrics TRL's trainers store for the next logged row (align/stages/runner.py `evaluate_by_source`)


@contextlib.contextmanager
def stored_metrics_kept(trainer: Any) -> Iterator[None]:
    """Put back, after the block, the metrics a TRL trainer's `compute_loss` stored for its next logged row
    (`trainer._metrics[mode][name]`: lists, trl 1.x): extra evaluation passes inside the block leave no trace in it.
    A trainer without them (transformers' own) has nothing to keep; another shape falls back (`_fallback`)."""
    stored = getattr(trainer, "_metrics", None)
    if stored is None:
        yield
        return
    if not (isinstance(stored, dict) and all(isinstance(v, dict) for v in stored.values())):
        _fallback("per-source eval", f"{type(trainer).__name__}._metrics is not {{mode: {{name: [values]}}}}")
        yield
        return
    saved = {mode: {k: list(v) for k, v in values.items()} for mode, values in stored.items()}
    try:
        yield
    finally:
        for mode, values in stored.items():
            values.clear()
            values.update(saved.get(mode, {}))


# --------------------------------------------------------------------------------------------------
# Training after an evaluation, under several processes (align/stages/runner.py `run_stage`)


def train_after_evaluation(trainer: Any) -> None:
    """Undo what an evaluation before training left on the model under several processes, so that `train()` wraps
    it for distributed training.

    `Trainer.evaluation_loop` prepares a model no one prepared yet with `prepare_model(evaluation_mode=True)`, which
    flags it `_is_accelerate_prepared`; `prepare_model` returns such a model as it is, so training never wrapped it
    in DistributedDataParallel and no gradient was averaged across processes (each process trained its own copy on
    its share of the batch). A model prepared for evaluation only is still the bare model: forgetting the flag and
    the registration makes the training's preparation the first, as without the evaluation.

    Raises:
        RuntimeError: several processes and an accelerate without the names relied on (training would be wrong).
    """
    accelerator, model = trainer.accelerator, trainer.model
    if accelerator.num_processes <= 1 or not getattr(model, "_is_accelerate_prepared", False):
        return
    models = getattr(accelerator, "_models", None)
    if not isinstance(models, list) or trainer.model_wrapped is not model:
        raise RuntimeError(
            "accelerate changed how it records prepared models (Accelerator._models); align cannot make sure this "
            "stage trains with gradients averaged across processes: run it on one process, or pin accelerate 1.16"
        )
    del model._is_accelerate_prepared
    models[:] = [m for m in models if m is not model]


# --------------------------------------------------------------------------------------------------
# TRL's experimental environments (a grpo stage's `environment:`)


def environment_factory(trainer_class: type) -> str:
    """The keyword `trainer_class` (TRL's GRPOTrainer) takes an environment factory by: TRL calls it experimental
    and warns on each use; align pins the range it was written against and silences the warning (TRL's own switch).

    Raises:
        BadInput: the installed TRL's trainer takes no environment factory.
    """
    import os

    import trl

    from align.errors import BadInput

    if "environment_factory" not in _parameters(trainer_class.__init__):
        raise BadInput(f"TRL {trl.__version__}'s {trainer_class.__name__} takes no environment_factory (align uses it "
                       f"from {EXPERIMENTAL_RANGE})")  # fmt: skip
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return "environment_factory"
