"""Chains through LoRA: every input (full weights, adapters, adapters merged) into every next stage (full, LoRA).

One upstream run makes the inputs (lm -> sft full / LoRA / LoRA merged, and LoRA sft on a scratch model). Each
next stage is its own run of the same recipe plus that stage (`model: "@<upstream stage>"`) in a copy of the
upstream run directory, where the upstream stages are cached: a stage trains once, each case stands alone.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import TINY_MODEL, read_jsonl, tiny_lm_recipe, write_yaml

# 128 positions: the instruct prompts are long, and 64 tokens would leave a few rows nothing to train on.
MODEL = dict(TINY_MODEL, n_positions=128)
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]}
# Two steps are enough to move weights; evaluation only before and after.
TRAIN = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 3.0e-3, "logging_steps": 1,
         "eval_steps": 10}  # fmt: skip
INSTRUCT = {"card": "python-docs-instruct", "max_train_rows": 8, "max_eval_rows": 4}
PREFERENCES = {"card": "python-docs-preferences", "max_train_rows": 8, "max_eval_rows": 4}
TEXT = {"card": "python-docs", "max_train_rows": 16, "max_eval_rows": 4}


def stage(name: str, kind: str, model, data: dict, **extra) -> dict:
    train = dict(TRAIN, max_length=128)
    return {"name": name, "kind": kind, "model": model, "data": data, "train": train, "generations": 0, **extra}


def summary(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name / "summary.json").read_text())


def adapter_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "adapter_config.json").read_text())


def load_saved(model_dir: Path, saved: str):
    """Load a stage's saved model as a user would, offline (conftest sets HF_HUB_OFFLINE)."""
    if saved == "adapter":
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir)
        assert list(model.peft_config) == ["default"], "only the trained adapters, not TRL's frozen 'ref' copy"
        return model
    from transformers import AutoModelForCausalLM

    assert not (model_dir / "adapter_config.json").exists()
    return AutoModelForCausalLM.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def upstream_recipe(tmp_path_factory) -> tuple[dict, Path]:
    """lm, then three SFT stages on it (full, LoRA adapters, LoRA merged), and LoRA SFT on a scratch model."""
    from align.run import main

    tmp = tmp_path_factory.mktemp("upstream")
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["model"] = dict(MODEL)
    recipe["stages"][0]["train"].update(max_steps=3, eval_steps=10)
    recipe["stages"][0]["data"].update(max_train_rows=40, max_eval_rows=8)
    recipe["stages"] += [
        stage("sft_full", "sft", "@lm", INSTRUCT),
        stage("sft_adapter", "sft", "@lm", INSTRUCT, peft=LORA),
        stage("sft_merged", "sft", "@lm", INSTRUCT, peft=LORA, merge=True),
        stage("sft_scratch_adapter", "sft", dict(MODEL), INSTRUCT, peft=LORA),
    ]
    assert main([str(write_yaml(tmp / "r.yaml", recipe)), "--output-dir", str(tmp / "run")]) == 0
    return recipe, tmp / "run"


@pytest.fixture(scope="module")
def upstream(upstream_recipe) -> Path:
    return upstream_recipe[1]


def run_next(tmp_path: Path, upstream_recipe: tuple[dict, Path], source: str, kind: str, lora: bool):
    """Run one `kind` stage on the output of upstream stage `source`; return the run directory and its summary."""
    from align.run import main

    recipe, upstream_run = copy.deepcopy(upstream_recipe[0]), upstream_recipe[1]
    recipe["stages"] = [s for s in recipe["stages"] if s["name"] in ("lm", source)]  # the rest is not needed
    data = {"lm": TEXT, "sft": INSTRUCT, "dpo": PREFERENCES}[kind]
    recipe["stages"].append(stage("next", kind, f"@{source}", data, **({"peft": LORA} if lora else {})))
    run = tmp_path / "run"
    shutil.copytree(upstream_run, run)
    assert main([str(write_yaml(tmp_path / "r.yaml", recipe)), "--output-dir", str(run)]) == 0
    statuses = [s["status"] for s in json.loads((run / "pipeline.json").read_text())["stages"]]
    assert statuses == ["cached"] * (len(statuses) - 1) + ["completed"], "only the next stage trains"
    # It trained: a stage without `peft` on merged adapters once kept peft's frozen weights (grad norm 0 throughout).
    norms = [r["grad_norm"] for r in read_jsonl(run / "next" / "metrics.jsonl") if r.get("grad_norm") is not None]
    assert norms and all(n > 0 for n in norms), f"{source} -> {kind}: grad norms {norms}"
    return run, summary(run, "next")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "saved"), [("sft_full", "full"), ("sft_adapter", "adapter"), ("sft_merged", "merged")]
)
def test_lm_then_full_or_lora_sft(upstream, name, saved):
    result = summary(upstream, name)
    assert (result["status"], result["input"], result["saved"]) == ("completed", "full", saved)
    load_saved(upstream / name / "model", saved)
    model_dir = upstream / name / "model"
    (weights,) = model_dir.glob("*.safetensors")  # transformers writes them 0600; align gives them the folder's mode
    assert weights.stat().st_mode & 0o777 == (model_dir / "tokenizer.json").stat().st_mode & 0o777
    if saved == "adapter":
        lm_dir = str((upstream / "lm" / "model").resolve())
        assert adapter_config(upstream / name / "model")["base_model_name_or_path"] == lm_dir


@pytest.mark.slow
def test_lora_sft_on_a_scratch_model_saves_its_base_beside_the_adapters(upstream):
    result = summary(upstream, "sft_scratch_adapter")
    assert (result["input"], result["saved"]) == ("scratch", "adapter")
    model_dir = upstream / "sft_scratch_adapter" / "model"
    assert adapter_config(model_dir)["base_model_name_or_path"] == str((model_dir / "base").resolve())
    load_saved(model_dir, "adapter")


# (upstream stage, its `input` as the next stage records it, next stage with LoRA, what that stage does: the
# reference sentence's telling words and the log's)
DPO_CASES = [
    ("sft_full", "full", False, "a frozen copy of the input model", "every weight trains"),
    ("sft_full", "full", True, "adapters switched off", "fresh LoRA adapters"),
    ("sft_adapter", "adapter", False, "merged into the base", "merged into their base"),
    ("sft_adapter", "adapter", True, "frozen 'ref' adapter", "LoRA adapters train on"),
    ("sft_merged", "merged", False, "a frozen copy of the input model", "every weight trains"),
    ("sft_merged", "merged", True, "adapters switched off", "fresh LoRA adapters"),
    ("sft_scratch_adapter", "adapter", False, "merged into the base", "merged into their base"),
    ("sft_scratch_adapter", "adapter", True, "frozen 'ref' adapter", "LoRA adapters train on"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("source", "input_kind", "lora", "reference", "logged"), DPO_CASES)
def test_dpo_after_each_kind_of_sft(tmp_path, upstream_recipe, source, input_kind, lora, reference, logged):
    upstream = upstream_recipe[1]
    run, result = run_next(tmp_path, upstream_recipe, source, "dpo", lora)
    saved = "adapter" if lora else "full"
    assert (result["status"], result["input"], result["saved"]) == ("completed", input_kind, saved)
    assert reference in result["reference"]
    assert f"input: {input_kind}; " in (run / "align.log").read_text() and logged in (run / "align.log").read_text()
    model_dir = run / "next" / "model"
    load_saved(model_dir, saved)
    if not lora:
        return
    base = adapter_config(model_dir)["base_model_name_or_path"]
    if input_kind == "adapter":
        # The same adapters, trained on: same tensors, new values, on the SFT adapters' own base.
        assert base == adapter_config(upstream / source / "model")["base_model_name_or_path"]
        before = load_file(upstream / source / "model" / "adapter_model.safetensors")
        after = load_file(model_dir / "adapter_model.safetensors")
        assert before.keys() == after.keys()
        assert any(not before[k].equal(after[k]) for k in before)
        assert not (model_dir / "ref").exists() and not (model_dir / "base").exists()
    else:
        # Fresh adapters on the model of the run they are in (this copy of the upstream run), never on the original.
        assert base == str((run / source / "model").resolve())


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_sft_after_lora_sft_adapters(tmp_path, upstream_recipe, lora):
    run, result = run_next(tmp_path, upstream_recipe, "sft_adapter", "sft", lora)
    saved = "adapter" if lora else "full"
    assert (result["status"], result["input"], result["saved"]) == ("completed", "adapter", saved)
    load_saved(run / "next" / "model", saved)


@pytest.mark.slow
def test_lm_after_lora_sft_adapters_merges_them_and_trains_every_weight(tmp_path, upstream_recipe):
    run, result = run_next(tmp_path, upstream_recipe, "sft_adapter", "lm", lora=False)
    assert result["input"] == "adapter"
    assert "merged into their base" in (run / "align.log").read_text()
    load_saved(run / "next" / "model", "full")


@pytest.mark.slow
def test_dry_run_says_what_a_stage_on_adapters_will_do(tmp_path, run_cli):
    """Before anything is saved, the earlier stage's recipe says what the next one starts from."""
    recipe = {"name": "plan", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [
        stage("sft", "sft", dict(MODEL), INSTRUCT, peft=LORA),
        stage("dpo_lora", "dpo", "@sft", PREFERENCES, peft=LORA),
        stage("dpo_full", "dpo", "@sft", PREFERENCES),
    ]}  # fmt: skip
    code, out, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 0, err
    lora_section, full_section = out.split("(dpo)")[1:]
    assert "input: adapter: the input's LoRA adapters train on" in lora_section
    assert "reference: the input's LoRA adapters, copied by TRL as a frozen 'ref' adapter" in lora_section
    assert "input: adapter: the input's LoRA adapters are merged into their base first" in full_section
    assert "reference: a frozen copy of the input model, its LoRA adapters merged into the base" in full_section


@pytest.mark.slow
def test_an_adapter_directory_as_model_path_trains_and_a_missing_base_is_refused(tmp_path, upstream, run_cli):
    adapters = upstream / "sft_adapter" / "model"
    recipe = {"name": "on-adapters", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}},
              "stages": [stage("dpo", "dpo", str(adapters), PREFERENCES, peft=LORA)]}  # fmt: skip
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert summary(tmp_path / "run", "dpo")["input"] == "adapter"

    orphan = tmp_path / "orphan"
    shutil.copytree(adapters, orphan)
    config = adapter_config(orphan)
    config["base_model_name_or_path"] = "nobody/missing-base"
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    recipe["stages"][0]["model"] = str(orphan)
    code, _, err = run_cli(write_yaml(tmp_path / "r2.yaml", recipe), "--output-dir", tmp_path / "run2")
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the base model of the adapters in" in errors[0] and "nobody/missing-base" in errors[0]
    assert not (tmp_path / "run2").exists(), "nothing written"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sft_adapter", "sft_scratch_adapter"])
def test_align_merge_saves_plain_weights_whose_logits_are_the_adapters(upstream, tmp_path, name, capsys):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from align.cli import main

    out = tmp_path / "merged"
    assert main(["merge", str(upstream), str(out), "--stage", name]) == 0
    if name == "sft_scratch_adapter":  # without --stage: the run's last stage that saved adapters, this one
        assert main(["merge", str(upstream), str(tmp_path / "default")]) == 0
        assert "stage sft_scratch_adapter (sft)" in capsys.readouterr().out
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert (out / "align_prompts.json").is_file() and "## Merged" in card
    # The card is the merged model's: plain transformers, no peft usage, the chain's last row says merged.
    assert "library_name: transformers" in card and "AutoPeftModel" not in card and "merged (align merge)" in card
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir() if f.is_file()}
    assert modes["model.safetensors"] == 0o666 & ~umask == modes["config.json"], "weights readable as the rest"
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    adapters = AutoPeftModelForCausalLM.from_pretrained(upstream / name / "model").eval()
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, adapters(ids).logits, atol=1e-5)
    # Nothing overwritten, and nothing to merge in full weights.
    assert main(["merge", str(upstream), str(out), "--stage", name]) == 2
    assert "exists and is not empty: nothing overwritten" in capsys.readouterr().err
    assert main(["merge", str(upstream), str(tmp_path / "other"), "--stage", "sft_full"]) == 2
    assert "full weights, not LoRA adapters: nothing to merge" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_push_and_merge_take_a_reward_model_stage_and_name_a_stage_that_saves_none(tmp_path):
    """`align push --stage rm` was refused with chat's "only lm, sft, dpo stages generate"."""
    from align.errors import BadInput
    from align.saved import find_model

    run = tmp_path / "run"
    (run / "rm" / "model").mkdir(parents=True)
    (run / "rm" / "model" / "config.json").write_text("{}")
    (run / "rm" / "summary.json").write_text(json.dumps({"stage": "rm", "kind": "rm", "status": "completed"}))
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps({"stage": "eval", "kind": "eval", "status": "completed"}))
    (run / "pipeline.json").write_text(json.dumps({"stages": [{"name": "rm", "kind": "rm"},
                                                              {"name": "eval", "kind": "eval"}]}))  # fmt: skip
    assert find_model(run, "rm", any_model=True).path == run / "rm" / "model"
    with pytest.raises(BadInput, match="only .* stages generate"):
        find_model(run, "rm")  # chat: a reward model does not generate
    with pytest.raises(BadInput, match="--stage eval: an eval stage, which saves no model"):
        find_model(run, "eval", any_model=True)


def test_peft_settings_adapters_trained_on_do_not_take_are_each_named():
    """A stage with `peft:` on an earlier stage's adapters trains those adapters on as they are: the warning once
    named r and alpha only, so a different target_modules was ignored without a word."""
    from types import SimpleNamespace

    from align.recipe import PeftSettings
    from align.stages.runner import ignored_peft_settings

    trained = SimpleNamespace(r=8, lora_alpha=16, lora_dropout=0.05, target_modules={"c_attn", "c_proj", "c_fc"})
    same = PeftSettings(r=8, alpha=16, target_modules=["c_fc", "c_attn", "c_proj"])
    assert ignored_peft_settings(trained, same) == []
    assert ignored_peft_settings(trained, PeftSettings(r=8, alpha=16)) == [], "all-linear: whatever they are on"
    other = PeftSettings(r=4, alpha=16, target_modules=["c_attn"])
    assert ignored_peft_settings(trained, other) == [
        "r 4 is not applied (the input's adapters have 8)",
        "target_modules ['c_attn'] are not applied (the input's adapters are on ['c_attn', 'c_fc', 'c_proj'])",
    ]
