"""align/patches.py is the one module that touches private library code: each hook's contract is pinned here
against the installed libraries, and each fallback is taken, with one logged line, where a contract breaks."""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys

import pytest

from tests.conftest import REPO

# As attributes where the name is common (`flatten_indices`, `own_metrics` are public names of datasets and align).
PRIVATE = ("_ChunkedLogProbFunction", "_prepare_dataset", "_get_grad_norm", "_use_triton", r"\._indices\b",
           r"\._metrics\b", r"\._models\b", "_is_accelerate_prepared")  # fmt: skip


def test_private_names_appear_in_one_module_only():
    found = subprocess.run(
        ["grep", "-rlE", "|".join(PRIVATE), "--include=*.py", "align/"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    assert found == ["align/patches.py"]


def test_trl_preparation_has_the_signature_each_kind_declares_for_the_cache():
    from align import stages as registry
    from align.stages.base import library_class

    declared = {k.name: k for k in registry.kinds().values() if getattr(k, "prepare", None) is not None}
    assert {"sft", "dpo", "kto", "rm"} <= set(declared)  # the kinds whose data the tokenized-data cache covers
    for kind in declared.values():
        trainer = library_class(kind.trainer_class, kind.experimental)
        assert tuple(inspect.signature(trainer._prepare_dataset).parameters) == kind.prepare, kind.name


def test_trl_lm_head_has_the_signature_the_cpu_head_replaces():
    import trl.trainer.utils as trl_utils

    from align.patches import LM_HEAD_CONTRACT

    function = getattr(trl_utils._ChunkedLogProbFunction, "trl_function", trl_utils._ChunkedLogProbFunction)
    assert tuple(inspect.signature(function.forward).parameters) == LM_HEAD_CONTRACT


def test_transformers_trainer_still_has_the_grad_norm_the_guard_watches():
    from transformers import Trainer

    assert callable(getattr(Trainer, "_get_grad_norm", None))


def test_a_changed_preparation_is_left_alone_with_one_line(caplog):
    from align.patches import wrap_preparation
    from align.stages.dpo import DPO

    class DPOTrainer:  # named as TRL's, with an argument TRL 1.16 did not have
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name, new_argument): ...

    caplog.set_level(logging.WARNING)
    for _ in range(2):
        assert wrap_preparation(DPOTrainer, lambda *a: None, DPO.prepare) is DPOTrainer
    assert caplog.text.count("tokenized-data cache (DPOTrainer): the library changed") == 1


def test_without_the_grad_norm_hook_the_guard_reads_the_logged_norm(caplog):
    from types import SimpleNamespace

    from align.guards import NumericGuard

    class OldTrainer:
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            return inputs

    guard = NumericGuard()
    guard.attach(OldTrainer())
    assert not guard.watches_grad_norm and "grad-norm guard: the library changed" in caplog.text
    control = SimpleNamespace(should_training_stop=False, should_save=True)
    guard.on_log(None, SimpleNamespace(global_step=7), control, logs={"loss": 1.0, "grad_norm": float("nan")})
    assert control.should_training_stop and not control.should_save
    assert guard.nonfinite == {"split": "train", "what": "grad norm", "value": guard.nonfinite["value"], "step": 7}


def test_a_row_selection_hashes_the_same_through_the_fallback_copy():
    from datasets import Dataset

    from align.cache import dataset_fingerprint

    ds = Dataset.from_dict({"text": [f"row {i}" for i in range(20)]})
    picked = ds.select([3, 1, 4])
    assert dataset_fingerprint(picked) != dataset_fingerprint(ds.select([1, 3, 4])), "the selection counts"
    assert dataset_fingerprint(picked) == dataset_fingerprint(ds.select([3, 1, 4]))


def test_offline_switch_reaches_libraries_already_imported(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from align.patches import set_hub_offline

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    set_hub_offline()
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True
    assert "align.patches" in sys.modules


def test_stored_metrics_kept_puts_back_what_compute_loss_stored():
    from collections import defaultdict
    from types import SimpleNamespace

    import trl

    from align.patches import stored_metrics_kept

    # The shape TRL's trainers build in __init__ (what the hook relies on).
    assert "self._metrics = {" in inspect.getsource(trl.SFTTrainer.__init__)
    trainer = SimpleNamespace(_metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    trainer._metrics["eval"]["entropy"].append(1.5)
    with stored_metrics_kept(trainer):
        trainer._metrics["eval"]["entropy"].append(9.0)  # a per-source pass
        trainer._metrics["eval"]["mean_token_accuracy"].append(0.5)
    assert trainer._metrics["eval"] == {"entropy": [1.5]} and trainer._metrics["train"] == {}
    with stored_metrics_kept(SimpleNamespace()):  # transformers' own Trainer: nothing to keep
        pass


def test_train_after_evaluation_unflags_only_a_model_prepared_for_evaluation_under_several_processes():
    from types import SimpleNamespace

    from accelerate import Accelerator

    from align.patches import train_after_evaluation

    # What accelerate does and the hook undoes: an evaluation-only preparation flags the model, records it, and a
    # flagged model is returned unwrapped by every later preparation.
    source = inspect.getsource(Accelerator.prepare_model)
    assert "evaluation_mode" in source and "_is_accelerate_prepared" in source
    assert isinstance(Accelerator(cpu=True)._models, list)

    def trainer(processes, flagged, models=None):
        model = SimpleNamespace(**({"_is_accelerate_prepared": True} if flagged else {}))
        other = SimpleNamespace()
        accelerator = SimpleNamespace(num_processes=processes, _models=[other, model] if models is None else models)
        return SimpleNamespace(accelerator=accelerator, model=model, model_wrapped=model), other

    one, _ = trainer(1, True)
    train_after_evaluation(one)  # one process: the preparation is the same either way; left as it is
    assert one.model._is_accelerate_prepared and one.model in one.accelerator._models
    two, other = trainer(2, True)
    train_after_evaluation(two)
    assert not hasattr(two.model, "_is_accelerate_prepared") and two.accelerator._models == [other]
    fresh, _ = trainer(2, False)
    train_after_evaluation(fresh)  # never evaluated before training: nothing to undo
    assert len(fresh.accelerator._models) == 2
    with pytest.raises(RuntimeError, match="run it on one process"):
        train_after_evaluation(trainer(2, True, models=())[0])
