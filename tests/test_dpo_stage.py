"""The DPO stage: preference formats, reference model, metrics of the contract, guards, bad pairs."""

from __future__ import annotations

import json
import re

import pytest

from align.data import load_data
from align.data_rows import split_implicit
from align.errors import BadInput
from align.recipe import DataSpec
from tests.conftest import TINY_MODEL, captured_trainers, tiny_lm_recipe, write_yaml

DPO_TRAIN = {
    "beta": 0.1,
    "max_length": 64,
    "max_steps": 6,
    "per_device_train_batch_size": 8,
    "learning_rate": 3.0e-3,
    "logging_steps": 2,
    "eval_steps": 3,
}


def dpo_stage(data: dict, **extra) -> dict:
    return {"name": "dpo", "kind": "dpo", "data": data, "train": dict(DPO_TRAIN), **extra}


def summary(run_dir, stage="dpo") -> dict:
    return json.loads((run_dir / stage / "summary.json").read_text())


def one_stage(stage: dict) -> dict:
    return {"name": "pref", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}


# The Trainer the builtin run's dpo stage built: what it holds, for the reference test.
BUILTIN_TRAINERS: dict = {}


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    from align.run import main

    tmp = tmp_path_factory.mktemp("dpo")
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"]["max_steps"] = 10
    recipe["stages"].append(dpo_stage({"card": "python-docs-preferences", "max_train_rows": 64, "max_eval_rows": 16}))
    with captured_trainers() as seen:
        assert main([str(write_yaml(tmp / "r.yaml", recipe)), "--output-dir", str(tmp / "run")]) == 0
    BUILTIN_TRAINERS.update(seen)
    return tmp / "run"


@pytest.mark.slow
def test_dpo_summary_has_the_contract_metrics(builtin_run):
    result = summary(builtin_run)
    assert result["status"] == "completed" and result["input_model"].startswith("@lm (")
    metrics = result["metrics"]
    for key in ("reward_accuracy", "reward_margin", "pref_accuracy_before", "pref_accuracy", "eval_loss",
                "eval_loss_before", "train_tokens", "tokens_per_s", "global_step", "best_step"):  # fmt: skip
        assert metrics[key] is not None, key
    assert 0.0 <= metrics["pref_accuracy"] <= 1.0 and 0.0 <= metrics["reward_accuracy"] <= 1.0
    assert metrics["eval_loss_before"] == pytest.approx(0.6931, abs=1e-3), "policy == reference before training"
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert result["reference"] == "a frozen copy of the input model"
    assert (
        "[dpo] align.stages.runner: LM head: plain logits (no Triton on cpu" in (builtin_run / "align.log").read_text()
    )
    assert len(result["generations"]) == 4 and {"prompt", "before", "after"} <= set(result["generations"][0])


@pytest.mark.slow
def test_full_dpo_holds_a_frozen_copy_of_its_input_as_reference(builtin_run):
    from transformers import AutoModelForCausalLM

    trainer = BUILTIN_TRAINERS["dpo"]
    reference = trainer.ref_model
    assert reference is not None and reference is not trainer.model
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    original = AutoModelForCausalLM.from_pretrained(builtin_run / "lm" / "model").state_dict()
    held = reference.state_dict()
    assert all(bool((held[k] == original[k]).all()) for k in original), "the reference is the input (lm) model"


@pytest.mark.slow
def test_dpo_metrics_rows_hold_rewards_at_every_eval(builtin_run):
    rows = [json.loads(line) for line in (builtin_run / "dpo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for key in ("eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_rewards/accuracies",
                "eval_logps/chosen", "eval_logps/rejected"):  # fmt: skip
        assert all(key in r for r in evals), key


@pytest.mark.slow
def test_lora_dpo_uses_adapters_off_as_reference(tmp_path, run_cli, trainers):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]}
    stage = dpo_stage({"card": "python-docs-preferences", "max_train_rows": 32, "max_eval_rows": 8},
                      model=dict(TINY_MODEL), peft=lora)  # fmt: skip
    stage["train"]["max_steps"] = 2
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", one_stage(stage)), "--output-dir", tmp_path / "run")
    assert code == 0, err
    trainer = trainers["dpo"]
    assert trainer.ref_model is None, "no second model: TRL computes the reference with the adapters disabled"
    assert list(trainer.model.peft_config) == ["default"], "fresh adapters, and no frozen 'ref' copy of them"
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    result = summary(tmp_path / "run")
    assert "adapters switched off" in result["reference"] and result["saved"] == "adapter"


@pytest.mark.slow
def test_precomputed_reference_log_probs(tmp_path, run_cli, trainers):
    stage = dpo_stage({"card": "python-docs-preferences", "max_train_rows": 32, "max_eval_rows": 8},
                      model=dict(TINY_MODEL))  # fmt: skip
    stage["train"].update(max_steps=2, precompute_ref_log_probs=True)
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", one_stage(stage)), "--output-dir", tmp_path / "run")
    assert code == 0, err
    trainer = trainers["dpo"]
    assert trainer.ref_model is None and trainer.args.precompute_ref_log_probs
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)
    assert "computed once" in summary(tmp_path / "run")["reference"]


@pytest.mark.slow
def test_a_weighted_combination_of_dpo_losses_is_shown_and_trains(tmp_path, run_cli, trainers):
    stage = dpo_stage({"card": "python-docs-preferences", "max_train_rows": 32, "max_eval_rows": 8},
                      model=dict(TINY_MODEL))  # fmt: skip
    stage["train"].update(max_steps=2, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5])
    path = write_yaml(tmp_path / "r.yaml", one_stage(stage))
    code, out, err = run_cli(path, "--print-config")
    assert code == 0, err
    assert "    loss_type:  # recipe\n    - sigmoid\n    - ipo\n" in out
    assert "    loss_weights:  # recipe\n    - 1.0\n    - 0.5\n" in out
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run")
    assert code == 0, err
    args = trainers["dpo"].args
    assert list(args.loss_type) == ["sigmoid", "ipo"] and list(args.loss_weights) == [1.0, 0.5]
    assert summary(tmp_path / "run")["loss_type"] == ["sigmoid", "ipo"]


@pytest.mark.slow
def test_pairs_whose_prompt_fills_max_length_are_counted_and_none_left_is_refused(tmp_path, run_cli):
    stage = dpo_stage({"card": "python-docs-preferences", "max_train_rows": 32, "max_eval_rows": 8},
                      model=dict(TINY_MODEL))  # fmt: skip
    stage["train"]["max_steps"] = 1
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", one_stage(stage)), "--output-dir", tmp_path / "a")
    assert code == 0, err
    assert re.search(r"train: \d+ of 32 pairs dropped: the prompt alone fills max_length=64", err), err

    stage["train"]["max_length"] = 4  # shorter than every prompt
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", one_stage(stage)), "--output-dir", tmp_path / "b")
    assert code == 2 and "every train prompt fills 4 tokens, so no pair is left" in err, err
    assert not (tmp_path / "b" / "dpo" / "model").exists()


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def pairs(n: int, make) -> list[dict]:
    return [make(i) for i in range(n)]


def prepared_pairs(trainer) -> tuple[list[str], list[str], list[str]]:
    """The prompt, chosen and rejected texts of every training pair as the DPO trainer holds them (its token ids)."""
    tokenizer, rows = trainer.processing_class, trainer.train_dataset
    decode = (
        [tokenizer.decode(ids) for ids in rows["prompt_ids"]],
        [tokenizer.decode(ids) for ids in rows["chosen_ids"]],
    )
    return decode[0], decode[1], [tokenizer.decode(ids) for ids in rows["rejected_ids"]]


@pytest.mark.slow
def test_hh_rlhf_shaped_implicit_prompts_train(tmp_path, run_cli, trainers):
    def row(i):
        prompt = f"\n\nHuman: What is {i} plus one?\n\nAssistant:"
        return {"chosen": f"{prompt} It is {i + 1}.", "rejected": f"{prompt} It is {i + 7} maybe maybe."}

    write_jsonl(tmp_path / "hh.jsonl", pairs(40, row))
    stage = dpo_stage({"source": {"files": ["hh.jsonl"]}, "format": "preference_implicit"}, model=dict(TINY_MODEL))
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", one_stage(stage)), "--output-dir", tmp_path / "run")
    assert code == 0, err
    prompts, chosen, rejected = prepared_pairs(trainers["dpo"])
    assert all(p.endswith("Assistant:") and p.startswith("\n\nHuman: What is") for p in prompts), prompts[0]
    assert all("maybe" not in c for c in chosen) and all("maybe maybe." in r for r in rejected)


@pytest.mark.slow
def test_ultrafeedback_shaped_message_lists_with_a_prompt_column_train(tmp_path, run_cli, trainers):
    def row(i):
        user = {"role": "user", "content": f"Name the number after {i}."}
        return {
            "prompt": user["content"],
            "chosen": [user, {"role": "assistant", "content": f"{i + 1}"}],
            "rejected": [user, {"role": "assistant", "content": f"{i} {i} {i}"}],
            "score_chosen": 8.0,
        }

    write_jsonl(tmp_path / "uf.jsonl", pairs(40, row))
    stage = dpo_stage({"source": {"files": ["uf.jsonl"]}, "format": "preference_messages"}, model=dict(TINY_MODEL))
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", one_stage(stage)), "--output-dir", tmp_path / "run")
    assert code == 0, err
    prompts, chosen, rejected = prepared_pairs(trainers["dpo"])
    for prompt, good, bad in zip(prompts, chosen, rejected, strict=True):
        i = int(re.search(r"Name the number after (\d+)\.", prompt).group(1))  # the user turn, in the prompt
        assert good.strip().startswith(str(i + 1)) and bad.strip().startswith(f"{i} {i} {i}"), (prompt, good, bad)


@pytest.mark.slow
def test_explicit_prompt_chosen_rejected_with_mapped_columns(tmp_path, run_cli, trainers):
    write_jsonl(
        tmp_path / "p.jsonl", pairs(40, lambda i: {"q": f"Count from {i}:", "good": f" {i + 1}", "bad": " zzz"})
    )
    data = {"source": {"files": ["p.jsonl"]}, "format": "preference",
            "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"}}  # fmt: skip
    stage = dpo_stage(data, model=dict(TINY_MODEL))
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", one_stage(stage)), "--output-dir", tmp_path / "run")
    assert code == 0, err
    prompts, chosen, rejected = prepared_pairs(trainers["dpo"])
    for prompt, good, bad in zip(prompts, chosen, rejected, strict=True):
        i = int(re.fullmatch(r"Count from (\d+):", prompt).group(1))  # `q` read as the prompt
        assert good.startswith(f" {i + 1}") and bad.startswith(" zzz"), (prompt, good, bad)  # `good` as chosen


def spec(**fields) -> DataSpec:
    return DataSpec.model_validate(fields)


def test_identical_pairs_are_dropped_with_a_count(tmp_path, caplog):
    rows = pairs(40, lambda i: {"prompt": f"p{i}", "chosen": "same" if i < 10 else f"c{i}", "rejected": "same"})
    write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level("WARNING"):
        data = load_data(spec(source={"files": ["p.jsonl"]}, format="preference"), seed=0, base_dir=tmp_path)
    assert len(data["train"]) + len(data["validation"]) == 30
    assert "10 chosen equals rejected" in caplog.text


@pytest.mark.parametrize(
    ("rows", "fmt", "message"),
    [
        ([{"prompt": "p", "chosen": "c"}], "preference", "column 'rejected' is missing or null"),
        ([{"prompt": "p", "chosen": "", "rejected": "r"}], "preference", None),
        ([{"chosen": "abc", "rejected": "xyz"}], "preference_implicit", "share no prompt at their start"),
        ([{"prompt": "", "chosen": "c", "rejected": "r"}], "preference", "column 'prompt' is empty"),
    ],
)
def test_bad_pairs_name_file_row_and_column(tmp_path, rows, fmt, message):
    good = (
        {"prompt": "p", "chosen": "c", "rejected": "r"}
        if fmt == "preference"
        else {"chosen": "Q: x A: y", "rejected": "Q: x A: z"}
    )
    all_rows = [good] * 3 + rows + [good]
    write_jsonl(tmp_path / "p.jsonl", all_rows)
    files = {"train": ["p.jsonl"], "validation": ["p.jsonl"]}
    card = spec(source={"files": files}, splits={"validation": "validation"}, format=fmt)
    if message is None:  # an empty response is dropped (counted), not fatal
        data = load_data(card, seed=0, base_dir=tmp_path)
        assert len(data["train"]) == 4
        return
    with pytest.raises(BadInput) as info:
        load_data(card, seed=0, base_dir=tmp_path)
    problem = info.value.problems[0]
    assert "p.jsonl: line 4: " in problem and message in problem  # the file's line, not a place in a shuffled split


def test_implicit_string_prompts_split_after_the_last_turn_marker():
    prompt, chosen, rejected = split_implicit(
        "\n\nHuman: hi\n\nAssistant: I think so", "\n\nHuman: hi\n\nAssistant: I do not"
    )
    assert prompt == "\n\nHuman: hi\n\nAssistant:" and chosen == " I think so" and rejected == " I do not"


def test_dpo_guard_warns_when_chosen_is_pushed_down_and_when_nothing_is_learned(caplog):
    from types import SimpleNamespace

    from align.guards import LN2, PreferenceGuard

    guard = PreferenceGuard(window=3)
    state = SimpleNamespace(global_step=1)
    with caplog.at_level("WARNING"):
        for step in range(1, 5):
            state.global_step = step
            logs = {"loss": 0.5, "logps/chosen": -10.0 - step, "logps/rejected": -12.0 - 2 * step,
                    "rewards/chosen": -0.1, "rewards/rejected": -0.3}  # fmt: skip
            guard.on_log(None, state, None, logs=logs)
    assert "chosen and rejected answers fell" in caplog.text
    caplog.clear()
    guard = PreferenceGuard(window=3)
    with caplog.at_level("WARNING"):
        for step in range(1, 5):
            state.global_step = step
            logs = {"loss": LN2, "logps/chosen": -10.0, "logps/rejected": -12.0, "rewards/chosen": 0.0,
                    "rewards/rejected": 0.0}  # fmt: skip
            guard.on_log(None, state, None, logs=logs)
    assert "stayed at ln 2" in caplog.text and caplog.text.count("stayed at ln 2") == 1


def test_dry_run_renders_two_pairs(tmp_path, run_cli):
    recipe = one_stage(dpo_stage({"card": "python-docs-preferences"}, model=dict(TINY_MODEL)))
    code, out, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 0, err
    section = out.split("(dpo)")[1]
    assert section.count("chosen: ") == 2 and section.count("rejected: ") == 2 and "[[" in section


def test_run_dpo_is_importable():
    from align.stages import run_dpo
    from align.stages.dpo import DPO

    assert isinstance(run_dpo.__self__, DPO) and run_dpo.__func__ is DPO.run
