"""The stage's `loading:` (attention kernel, weights' dtype, bitsandbytes quantization): passed to transformers,
shown by the plan, refused where this machine or the stage cannot do it, and `train.model_init_kwargs` (which TRL
ignores when align hands it a model) refused with a pointer to it."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_MODEL, tiny_lm_recipe, write_yaml


def sft_recipe(**stage) -> dict:
    """An sft stage on a tiny model built from scratch; with `model: "@lm"`, on the output of an lm stage before it
    (a model with weights: what quantization needs)."""
    recipe = tiny_lm_recipe()
    sft = {"name": "sft", "kind": "sft", "model": dict(TINY_MODEL), "generations": 0,
           "data": {"card": "python-docs-instruct", "max_train_rows": 32}, "train": {"max_steps": 2, "max_length": 64},
           **stage}  # fmt: skip
    recipe["stages"] = [*recipe["stages"], sft] if sft["model"] == "@lm" else [sft]
    return recipe


def test_loading_options_reach_the_model_and_the_plan(tmp_path, run_cli):
    import torch

    from align.models import build_model
    from align.recipe import Loading, ScratchModel

    loading = Loading(attn_implementation="eager", dtype="bfloat16")
    model, _ = build_model(ScratchModel(**TINY_MODEL), "stages.sft.model", texts=lambda: ["some text"] * 50,
                           loading=loading)  # fmt: skip
    assert model.config._attn_implementation == "eager" and model.dtype == torch.bfloat16
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    _.save_pretrained(saved)
    loaded, _ = build_model(
        str(saved), "stages.sft.model", loading=Loading(attn_implementation="sdpa", dtype="float32")
    )
    assert loaded.config._attn_implementation == "sdpa" and loaded.dtype == torch.float32
    default, _ = build_model(str(saved), "stages.sft.model")
    assert default.config._attn_implementation != "eager"

    path = write_yaml(tmp_path / "r.yaml", sft_recipe(loading={"attn_implementation": "eager", "dtype": "float32"}))
    code, out, err = run_cli(path, "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert "  loading: attn_implementation: eager, dtype: float32" in out


def test_an_unset_loading_leaves_the_stage_dump_and_so_its_fingerprint_as_before():
    from align.loader import registry

    kind = registry.get("sft")
    stage = kind.keys.model_validate(sft_recipe()["stages"][0])
    assert "loading" not in stage.model_dump(mode="json")
    with_loading = kind.keys.model_validate(sft_recipe(loading={"dtype": "bfloat16"})["stages"][0])
    assert with_loading.model_dump(mode="json")["loading"] == {"attn_implementation": None, "dtype": "bfloat16",
                                                               "quantization": None}  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ({"loading": {"quantization": "4bit"}, "peft": {}, "model": "@lm"},
         "stages.sft.loading.quantization: bitsandbytes 4bit quantization needs a CUDA GPU, and this machine has none"),
        ({"loading": {"quantization": "4bit"}, "model": "@lm"},
         "stages.sft.loading.quantization: a quantized model trains only through adapters"),
        ({"loading": {"quantization": "8bit"}, "peft": {}},
         "stages.sft.loading.quantization: a model built from scratch has no weights to quantize"),
        ({"loading": {"attn_implementation": "flash_attention_2"}},
         "stages.sft.loading.attn_implementation: flash_attention_2 needs a CUDA GPU"),
        ({"loading": {"dtype": "float8"}}, "stages.sft.loading.dtype"),
        ({"train": {"max_steps": 2, "model_init_kwargs": {"attn_implementation": "eager"}}},
         "stages.sft.train.model_init_kwargs: set by align: align loads the model: use the stage's `loading:"),
    ],
)  # fmt: skip
def test_loading_this_machine_or_stage_cannot_do_is_refused_before_training(tmp_path, run_cli, stage, expected):
    import torch

    if torch.cuda.is_available() and "CUDA GPU" in expected:
        pytest.skip("a GPU machine can do it")
    path = write_yaml(tmp_path / "r.yaml", sft_recipe(**stage))
    code, _, err = run_cli(path, "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 2 and expected in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert any(expected in line for line in errors) and "Traceback" not in err, err
