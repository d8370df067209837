"""The SFT stage: formats, loss masks, chat templates, packing choice, LoRA, chaining, bad rows."""

from __future__ import annotations

import csv
import json
import re

import pytest

from align.errors import BadInput
from tests.conftest import TINY_MODEL, tiny_lm_recipe, write_yaml

SFT_TRAIN = {
    "max_length": 96,
    "max_steps": 24,
    "per_device_train_batch_size": 8,
    "learning_rate": 1.0e-3,
    "logging_steps": 4,
    "eval_steps": 6,
}


def sft_stage(data: dict, **extra) -> dict:
    return {"name": "sft", "kind": "sft", "data": data, "train": dict(SFT_TRAIN), "generations": 2, **extra}


def summary(run_dir, stage="sft") -> dict:
    return json.loads((run_dir / stage / "summary.json").read_text())


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    """lm -> sft on the builtin sets: the offline quickstart in miniature."""
    from align.run import main

    tmp = tmp_path_factory.mktemp("chain")
    recipe = tiny_lm_recipe()
    recipe["stages"].append(sft_stage({"card": "python-docs-instruct", "max_train_rows": 120, "max_eval_rows": 16}))
    code = main([str(write_yaml(tmp / "r.yaml", recipe)), "--output-dir", str(tmp / "run")])
    assert code == 0
    return tmp / "run"


@pytest.mark.slow
def test_sft_takes_the_lm_model_and_lowers_completion_loss(chain_run):
    result = summary(chain_run)
    assert result["status"] == "completed"
    assert result["input_model"].startswith("@lm (") and result["input_model"].endswith("lm/model)")
    metrics = result["metrics"]
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert metrics["perplexity"] < metrics["perplexity_before"]
    assert result["loss_on"] == "completions" and result["chat_template"] == "default"
    assert "packing: off" in result["packing"], "no packing on a CPU attention that cannot keep samples apart cheaply"
    assert "[sft] align.stages.runner: LM head: plain logits (no Triton on cpu" in (chain_run / "align.log").read_text()
    pipeline = json.loads((chain_run / "pipeline.json").read_text())
    assert [s["status"] for s in pipeline["stages"]] == ["completed", "completed"]
    assert pipeline["stages"][1]["input_model"] == result["input_model"]


@pytest.mark.slow
def test_generations_before_and_after_are_recorded(chain_run):
    generations = summary(chain_run)["generations"]
    assert len(generations) == 2
    for g in generations:
        assert g["prompt"].startswith("Continue this passage") and isinstance(g["before"], str)
        assert isinstance(g["after"], str)
    # "after" is the trained model's own greedy answer (a model this small may answer "the the the" both times, so
    # that before and after differing would test the model, not the recording).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.verdict import greedy_answers

    model_dir = chain_run / "sft" / "model"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    answers = greedy_answers(model, tokenizer, [g["prompt"] for g in generations])
    assert [a.text for a in answers] == [g["after"] for g in generations]


@pytest.mark.slow
def test_default_chat_template_is_saved_with_the_model(chain_run):
    from transformers import AutoTokenizer

    from align.models import DEFAULT_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(chain_run / "sft" / "model")
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "### user:\nhi\n### assistant:\n"


def test_dry_run_shows_the_loss_mask(tmp_path, run_cli):
    recipe = tiny_lm_recipe()
    recipe["stages"].append(sft_stage({"card": "python-docs-instruct"}))
    code, out, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert not (tmp_path / "run").exists()
    section = out.split("(sft)")[1]
    assert section.count("rendered:") == 2
    assert "'Continue this passage" in section and "[[" in section, "prompt untrained, completion marked"
    assert "loss_on: completions" in section and "truncation_rate:" in section


@pytest.mark.slow
def test_chat_messages_from_local_jsonl(tmp_path, run_cli):
    rows = []
    for i in range(40):
        rows.append({"conversation": [
            {"role": "system", "content": "You answer with the number after the one given."},
            {"role": "user", "content": f"What comes after {i}?"},
            {"role": "assistant", "content": f"{i + 1}"},
            {"role": "user", "content": f"And after {i + 1}?"},
            {"role": "assistant", "content": f"{i + 2}"},
        ]})  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = {"source": {"files": ["chat.jsonl"]}, "format": "messages", "columns": {"messages": "conversation"}}
    stage = sft_stage(data, model=dict(TINY_MODEL))
    recipe = {"name": "chat", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    result = summary(tmp_path / "run")
    assert result["loss_on"] == "assistant turns"
    assert result["metrics"]["eval_loss"] < result["metrics"]["eval_loss_before"]


@pytest.mark.slow
def test_csv_with_mapped_columns(tmp_path, run_cli):
    with (tmp_path / "qa.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer", "source"])
        for i in range(40):
            writer.writerow([f"What is {i} plus one?", f"It is {i + 1}.", "generated"])
    stage = sft_stage(
        {"source": {"files": ["qa.csv"]}, "format": "prompt_completion",
         "columns": {"prompt": "question", "completion": "answer"}},
        model=dict(TINY_MODEL),
    )  # fmt: skip
    recipe = {"name": "csv", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert summary(tmp_path / "run")["loss_on"] == "completions"


@pytest.mark.slow
def test_lora_adapters_saved_merged_and_continued(tmp_path, run_cli):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]}
    data = {"card": "python-docs-instruct", "max_train_rows": 48, "max_eval_rows": 8}
    recipe = {
        "name": "lora", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}},
        "stages": [
            sft_stage(data, name="adapters", model=dict(TINY_MODEL), peft=lora),
            sft_stage(data, name="more", peft=lora),
            sft_stage(data, name="merged", model="@adapters", peft=lora, merge=True),
        ],
    }  # fmt: skip
    for stage in recipe["stages"]:
        stage["train"]["max_steps"] = 3
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    run = tmp_path / "run"
    assert (run / "adapters/model/adapter_config.json").is_file()
    assert not (run / "adapters/model/model.safetensors").exists(), "adapters only, not a second copy of the model"
    assert summary(run, "adapters")["saved"] == "adapter"
    assert summary(run, "more")["saved"] == "adapter", "the next stage continued on the adapters"
    assert summary(run, "merged")["saved"] == "merged"
    assert (run / "merged/model/model.safetensors").is_file() and not (
        run / "merged/model/adapter_config.json"
    ).exists()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"messages": [{"role": "wizard", "content": "hi"}]},
            "chat.jsonl: line 4: column 'messages': message 0 has unknown role 'wizard'",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "chat.jsonl: line 4: column 'messages': no assistant turn to learn from",
        ),
        (
            {"messages": [{"role": "assistant", "content": 5}]},
            "chat.jsonl: line 4: column 'messages': message 0 content must be a string",
        ),
    ],
)
def test_bad_conversations_name_file_and_row(tmp_path, run_cli, row, message):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in [good, good, good, row, good]))
    files = {"train": ["chat.jsonl"], "validation": ["chat.jsonl"]}
    data = {"source": {"files": files}, "splits": {"validation": "validation"}, "format": "messages"}
    stage = sft_stage(data, model=dict(TINY_MODEL))
    recipe = {"name": "bad", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "run").exists()


def test_empty_completions_are_dropped_with_a_count(tmp_path, caplog):
    from align.data import load_data
    from align.recipe import DataSpec

    rows = [{"prompt": f"q{i}", "completion": "" if i % 4 == 0 else f"a{i}"} for i in range(40)]
    (tmp_path / "pc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = DataSpec.model_validate({"source": {"files": ["pc.jsonl"]}, "format": "prompt_completion"})
    with caplog.at_level("WARNING"):
        data = load_data(spec, seed=0, base_dir=tmp_path)
    assert len(data["train"]) + len(data["validation"]) == 30
    assert "rows skipped" in caplog.text and "empty completion" in caplog.text


def test_packing_is_refused_where_samples_would_see_each_other():
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    from align.models import attention_separates_sequences
    from align.stages.sft import SFTKeys, choose_packing

    # openai-gpt's attention is a fixed causal mask: a packed sample sees the one before it.
    model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert attention_separates_sequences(model) is False
    stage = SFTKeys(name="s", kind="sft", data={"card": "x"}, train={"packing": True})
    with pytest.raises(BadInput, match="cannot keep packed samples apart"):
        choose_packing(stage, model)
    auto = SFTKeys(name="s", kind="sft", data={"card": "x"})
    assert choose_packing(auto, model)[0] == {"packing": False}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_packing_probe_answers_as_training_runs_whatever_the_config_says_of_the_cache(attention):
    """One architecture, one answer: the probe once followed the config's `use_cache`, so a GPT-2 align saved
    (`use_cache: false`) separated packed samples and the same GPT-2 from the hub (`true`) did not, and two
    stages on one model gave two different reasons for packing being off."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from align.models import attention_separates_sequences
    from align.stages.sft import SFTKeys, choose_packing

    auto = SFTKeys(name="s", kind="sft", data={"card": "x"})
    answers = set()
    for use_cache in (True, False):
        torch.manual_seed(0)
        config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0,
                            use_cache=use_cache)  # fmt: skip
        model = GPT2LMHeadModel(config)
        model.config._attn_implementation = attention
        # transformers reads packed boundaries from position_ids when there is no cache, as TRL's SFT trains.
        assert attention_separates_sequences(model) is True
        answers.add(choose_packing(auto, model)[1])
    assert len(answers) == 1 and "keeps packed samples apart" in answers.pop()


def test_render_mask_marks_trained_spans():
    from align.models import train_tokenizer
    from align.stages.runner import render_mask

    tokenizer = train_tokenizer(["question answer"] * 50, 260)
    ids = tokenizer("question answer", add_special_tokens=False)["input_ids"]
    mask = [0] * (len(ids) - 1) + [1]
    assert render_mask(ids, mask, tokenizer).endswith("]]") and render_mask(ids, mask, tokenizer).count("[[") == 1


def test_run_sft_is_importable():
    from align.stages import run_sft
    from align.stages.sft import SFT

    assert isinstance(run_sft.__self__, SFT) and run_sft.__func__ is SFT.run


@pytest.mark.slow
def test_truncation_is_counted_and_a_max_length_that_leaves_nothing_is_refused(tmp_path, run_cli):
    data = {"card": "python-docs-instruct", "max_train_rows": 32, "max_eval_rows": 8}
    stage = sft_stage(data, model=dict(TINY_MODEL))
    stage["train"]["max_steps"] = 1
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", one_stage_recipe(stage)), "--output-dir", tmp_path / "a")
    assert code == 0, err
    assert re.search(r"train: \d+ of \d+ examples were truncated to max_length=64", err), "capped at 64 positions"

    stage["train"]["max_length"] = 8  # shorter than every prompt: no completion token survives
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", one_stage_recipe(stage)), "--output-dir", tmp_path / "b")
    assert code == 2 and "8 tokens leave no training example a trained token" in err, err


def one_stage_recipe(stage: dict) -> dict:
    return {"name": "one", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}
