"""The model families users post-train: Llama 3, Qwen 2.5/3, Gemma 3, Phi-3 and a Qwen3-MoE, each a tiny model with
its real chat template (read from the installed TRL), special tokens, eos/pad/BOS habits and stop ids
(tests/families.py), beside GPT-2. What each family needs is decided by the plan and held in place here: assistant
masks, stopping, pad = eos, BOS, dated templates, router losses and LoRA on experts; and `chat_template:` by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests import families
from tests.conftest import read_jsonl, write_yaml

CHAT_FAMILIES = ("llama3", "qwen2_5", "qwen3", "gemma3", "phi3", "qwen3_moe")
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "red blue"},
    {"role": "assistant", "content": "blue"},
    {"role": "user", "content": "apple"},
    {"role": "assistant", "content": "apple river"},
]


def tokenizer_of(family_models: dict[str, Path], name: str, template: str | None = None) -> Any:
    from align.models import load_tokenizer

    tokenizer = load_tokenizer(str(family_models[name]))
    if template is not None:
        from align.families import apply_template

        apply_template(tokenizer, families.trl_template(template))
    return tokenizer


def trained_runs(ids: list[int], mask: list[int], tokenizer: Any) -> list[str]:
    """The text of each run of trained tokens."""
    runs, current = [], []
    for token, bit in zip(ids, mask, strict=True):
        if bit:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# --------------------------------------------------------------------------------------------------
# Assistant masks


@pytest.mark.parametrize(
    ("name", "template"),
    [*((f, None) for f in CHAT_FAMILIES), ("llama3", "llama3_1"), ("llama3", "llama3_2")],
)
def test_each_chat_family_trains_its_assistant_turns_with_their_end_of_turn_and_nothing_else(
    family_models, name, template
):
    """The mask the plan renders is the one training uses (TRL's training template where it ships one, align's
    derived masks for Llama 3.1/3.2): each assistant turn's content and end-of-turn token, with whitespace around
    them; never a system or user token. Qwen 3's empty thought block sits inside its turn (TRL's training template
    puts it there), and Phi-3's template closes the conversation with eos after the last turn."""
    from align.stages.sft import DERIVED, loss_flags, masked_ids

    tokenizer = tokenizer_of(family_models, name, template)
    loss = loss_flags(SimpleNamespace(train={}, name="sft"), "messages", tokenizer)
    assert loss == ({DERIVED: True} if template else {"assistant_only_loss": True})
    ids, mask = masked_ids({"messages": CONVERSATION}, tokenizer, loss)
    eot = families.FAMILIES[name].eot
    runs = ["".join(run.split()) for run in trained_runs(ids, mask, tokenizer)]
    if name in ("qwen3", "qwen3_moe"):
        runs = [run.removeprefix("<think></think>") for run in runs]
    if name == "phi3":
        runs[-1] = runs[-1].removesuffix(tokenizer.eos_token)
    assert runs == [f"blue{eot}", f"appleriver{eot}"]
    untrained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "red blue" in untrained and "Be brief." in untrained


def test_sft_plans_say_each_family_trains_assistant_turns_and_what_its_template_does(family_models, run_cli, tmp_path):
    """One dry run, one sft stage per family: the plan says loss on assistant turns, the end-of-turn token, the
    system prompt Qwen 2.5 injects and Llama 3.2's pinned date; the MoE's router loss; what LoRA adapts on it."""
    stages = []
    for name in ("gpt2", *CHAT_FAMILIES, "llama3_2"):
        model = family_models["llama3" if name == "llama3_2" else name]
        stages.append({"name": f"sft_{name}", "kind": "sft", "model": str(model), "generations": 0,
                       "data": {"source": {"files": [str(family_models["conv"])]}, "format": "messages",
                                "valid_fraction": 0.1},
                       "train": {"max_steps": 1}})  # fmt: skip
    stages[-1]["chat_template"] = "llama3_2"
    moe = next(s for s in stages if s["name"] == "sft_qwen3_moe")
    moe["peft"] = {"r": 4}
    named = {**stages[0], "name": "sft_gpt2_named", "chat_template": "qwen2_5", "peft": {"target_modules": ["c_attn"]}}
    stages.append(named)
    recipe = write_yaml(tmp_path / "r.yaml", {"name": "fam", "stages": stages})
    code, out, err = run_cli(recipe, "--output-dir", tmp_path / "run", "--dry-run")
    assert code == 0, err
    plans = {block.split(" (sft)")[0].split("] ")[-1]: block for block in out.split("\n[")[1:]}
    for name in ("gpt2", *CHAT_FAMILIES, "llama3_2"):
        plan = plans[f"sft_{name}"]
        assert "loss_on: assistant turns" in plan, plan
        eot = families.FAMILIES["llama3" if name == "llama3_2" else name].eot
        assert f"end of turn {eot}" in plan
    assert "align's default (### role: headers)" in plans["sft_gpt2"]
    # A model's own template that is one TRL ships is named (an earlier stage's `chat_template:` reads as one here).
    assert "chat_template: own (TRL's qwen2_5); " in plans["sft_qwen2_5"], plans["sft_qwen2_5"]
    assert "(writes when the data has none: 'You are Qwen, created by Alibaba Cloud" in plans["sft_qwen2_5"]
    assert "(always writes: 'Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024')" in plans["sft_llama3_2"]
    assert "date pinned to 26 Jul 2024" in plans["sft_llama3_2"]
    # LoRA on a base given a named template: the turn markers' embeddings train beside the adapters (short names).
    assert ("lora_adapts: attn.c_attn; and the embeddings and head whole (modules_to_save): the template added 6 "
            "tokens" in plans["sft_gpt2_named"])  # fmt: skip
    assert (
        "template_tokens: adds <|im_start|>, <|im_end|>, <tool_call>, </tool_call>, <tool_response>, "
        "</tool_response> (the embeddings grow to 398); eos is <|im_end|>" in plans["sft_gpt2_named"]
    )
    assert "masks align derives from the template" in plans["sft_llama3_2"]
    assert "router_aux_loss: on: TRL adds the config's router_aux_loss_coef 0.01" in plans["sft_qwen3_moe"]
    # peft adapts the fused experts and the router only without dropout: align's default gives way, and says so.
    assert "lora_adapts: mlp.experts.down_proj, mlp.experts.gate_up_proj, mlp.gate.weight" in plans["sft_qwen3_moe"]
    assert "dropout 0 (align: peft adapts an MoE's experts only without dropout)" in plans["sft_qwen3_moe"]
    assert "router_aux_loss" not in plans["sft_llama3"]


# --------------------------------------------------------------------------------------------------
# Tokens: BOS, dates, stops


@pytest.mark.parametrize("name", ["llama3", "gemma3", "phi3"])
def test_no_double_bos_where_the_tokenizer_and_the_template_both_add_one(family_models, name):
    """Llama 3's and Gemma 3's templates write BOS and their tokenizers add it too; Phi-3's tokenizer adds one. The
    ids training, generation and chat read start with exactly one."""
    from align.chat import Conversation
    from align.evaluation.generation import prompt_ids
    from align.prompt_format import PromptFormat
    from align.stages.sft import loss_flags, masked_ids

    tokenizer = tokenizer_of(family_models, name)
    bos = tokenizer.bos_token_id
    assert tokenizer("red")["input_ids"][0] == bos  # the tokenizer adds one itself
    trained, _ = masked_ids({"messages": CONVERSATION}, tokenizer, loss_flags(SimpleNamespace(train={}), "messages",
                                                                               tokenizer))  # fmt: skip
    asked = prompt_ids(tokenizer, CONVERSATION[:2], "chat_template")
    chatted = tokenizer(Conversation(PromptFormat("chat_template"), tokenizer).render("red blue"),
                        add_special_tokens=False)["input_ids"]  # fmt: skip
    for ids in (trained, asked, chatted):
        assert ids.count(bos) <= 1 and ids[1] != bos, tokenizer.convert_ids_to_tokens(ids[:3])


def test_a_dated_template_renders_the_same_day_every_day(family_models):
    """Llama 3.2's template renders today's date: pinned, a prompt's tokens (and every cache and fingerprint hashed
    from them) do not change at midnight. Unpinned, it renders today."""
    import datetime

    from align.families import PINNED_DATE, pin_date, render, template_facts

    tokenizer = tokenizer_of(family_models, "llama3")
    tokenizer.chat_template = families.trl_template("llama3_2")
    today = datetime.date.today().strftime("%d %b %Y")
    assert today in render(tokenizer, CONVERSATION[:2])
    assert pin_date(tokenizer) and template_facts(tokenizer).pinned
    text = render(tokenizer, CONVERSATION[:2])
    assert PINNED_DATE in text and today not in text
    assert render(tokenizer, CONVERSATION[:2], date_string="1 Jan 2025").count("1 Jan 2025") == 1  # still settable
    saved = tokenizer_of(family_models, "llama3", "llama3_2")  # as a stage's `chat_template: llama3_2` sets it
    assert template_facts(saved).pinned


@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_generation_stops_at_every_stop_id_and_the_end_of_turn(family_models, name):
    """The loaded model's generation config (which chat, the eval stage, grpo rollouts and the held-out answers
    read) holds every stop id the release had and the template's end-of-turn token."""
    from align.evaluation.generation import stop_token_ids
    from align.models import build_model

    model, tokenizer = build_model(str(family_models[name]), "stages.x.model")
    family = families.FAMILIES[name]
    stops = stop_token_ids(model, tokenizer)
    assert set(tokenizer.convert_ids_to_tokens(stops)) == {*family.stops, family.eot}


# --------------------------------------------------------------------------------------------------
# Bad input


def sft_stage(family_models: dict[str, Path], model: str, **extra: Any) -> dict[str, Any]:
    return {"name": "sft", "kind": "sft", "model": str(family_models[model]), "generations": 0,
            "data": {"source": {"files": [str(family_models["conv"])]}, "format": "messages", "valid_fraction": 0.1},
            "train": {"max_steps": 1}, **extra}  # fmt: skip


@pytest.mark.parametrize(
    ("model", "extra", "error", "hint"),
    [
        (
            "gpt2",
            {"chat_template": "qwen25"},
            "stages.sft.chat_template: 'qwen25' is not a chat template TRL ships (closest: qwen2_5",
            "a .jinja file, or own",
        ),
        (
            "gpt2",
            {"chat_template": "qwen2_5", "train": {"chat_template_path": "x.jinja"}},
            "stages.sft.train.chat_template_path: set by align: use the stage's `chat_template:`",
            None,
        ),
        ("gpt2", {"chat_template": "missing.jinja"}, "stages.sft.chat_template: 'missing.jinja': no such file", None),
        (
            "qwen3_moe",
            {"peft": {"target_modules": ["gate_proj", "up_proj"]}},
            "stages.sft.peft.target_modules: 'gate_proj', 'up_proj': no module of Qwen3MoeForCausalLM is named so",
            "target_modules: [k_proj, o_proj, q_proj, v_proj] (or all-linear); its experts are parameters, not layers: "
            "peft.target_parameters: [mlp.experts.down_proj, mlp.experts.gate_up_proj]",
        ),
        (
            "qwen3_moe",
            {"peft": {"dropout": 0.1}},
            "stages.sft.peft.dropout: 0.1: peft adapts this MoE's experts only without dropout",
            "peft.dropout: 0",
        ),
    ],  # fmt: skip
)
def test_bad_template_and_moe_lora_input_stops_before_stage_one(
    family_models, run_cli, tmp_path, model, extra, error, hint
):
    stages = [{"name": "first", "kind": "lm", "model": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32},
               "data": {"card": "python-docs", "max_train_rows": 40, "max_eval_rows": 8},
               "train": {"max_steps": 1, "max_length": 32}},
              {**sft_stage(family_models, model), **extra}]  # fmt: skip
    if "train" in extra:
        stages[1]["train"] = {"max_steps": 1, **extra["train"]}
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", {"name": "bad", "stages": stages}), "--output-dir",
                           tmp_path / "run")  # fmt: skip
    assert code == 2, err
    assert f".yaml: {error}" in err and err.count("error:") == 1, err
    if hint is not None:
        assert hint in err, err
    assert not (tmp_path / "run" / "first").exists()  # nothing trained


# --------------------------------------------------------------------------------------------------
# Whole chains (slow)


def chain(family_models: dict[str, Path], model: str, lora_stage: str) -> dict[str, Any]:
    """The issue's recipe: sft -> dpo -> grpo on message data, LoRA on one stage."""
    data = {k: str(v) for k, v in family_models.items() if k in ("conv", "pairs", "prompts")}
    stages = [
        {"name": "sft", "kind": "sft", "model": str(family_models[model]), "generations": 2,
         "data": {"source": {"files": [data["conv"]]}, "format": "messages", "valid_fraction": 0.1},
         "train": {"max_steps": 4, "per_device_train_batch_size": 8, "logging_steps": 2, "eval_steps": 2,
                   "learning_rate": 0.001}},
        {"name": "dpo", "kind": "dpo", "generations": 0,
         "data": {"source": {"files": [data["pairs"]]}, "format": "preference", "valid_fraction": 0.1},
         "train": {"max_steps": 2, "per_device_train_batch_size": 8, "logging_steps": 1, "eval_steps": 2}},
        {"name": "grpo", "kind": "grpo", "generations": 0,
         "data": {"source": {"files": [data["prompts"]]}, "format": "prompt_only", "valid_fraction": 0.1},
         "rewards": [{"function": "exact_match"}],
         "train": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4,
                   "max_completion_length": 8, "logging_steps": 1}},
    ]  # fmt: skip
    next(s for s in stages if s["name"] == lora_stage)["peft"] = {"r": 4, "alpha": 8}
    return {"name": f"chain-{model}", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": stages}


@pytest.fixture(scope="module")
def moe_chain(family_models, tmp_path_factory) -> Path:
    from align.loader import load_recipe
    from align.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("moe-chain")
    recipe = load_recipe(write_yaml(root / "r.yaml", chain(family_models, "qwen3_moe", "sft")))
    run_pipeline(recipe, output_dir=root / "run", log_level="warning")
    return root / "run"


@pytest.mark.slow
def test_the_moe_trains_sft_dpo_grpo_with_its_router_loss_logged(moe_chain):
    """A Qwen3-MoE (4 experts, 2 per token) through sft (LoRA on its attention, experts and router) -> dpo -> grpo:
    every stage completes, and each logs the router's load-balancing loss while it trains."""
    for stage in ("sft", "dpo", "grpo"):
        summary = json.loads((moe_chain / stage / "summary.json").read_text())
        assert summary["status"] == "completed", stage
        rows = read_jsonl(moe_chain / stage / "metrics.jsonl")
        aux = [r.get("aux_loss", r.get("eval_aux_loss")) for r in rows]
        assert any(isinstance(a, float) and a > 0 for a in aux), (stage, rows[:2])
    adapter = json.loads((moe_chain / "sft" / "model" / "adapter_config.json").read_text())
    assert {"gate_up_proj", "down_proj"} <= set(adapter["target_parameters"])  # all-linear took the experts
    assert adapter["lora_dropout"] == 0.0
    # TRL turned the router logits on to train the router: saved off, as the family releases it, so that generate
    # on the saved model does not fail at its first cached step (align's own generation turns them off too).
    assert json.loads((moe_chain / "grpo" / "model" / "config.json").read_text())["output_router_logits"] is False
    generation = json.loads((moe_chain / "grpo" / "model" / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(moe_chain / "grpo" / "model")
    assert set(tokenizer.convert_ids_to_tokens(generation["eos_token_id"])) == {"<|im_end|>", "<|endoftext|>"}


@pytest.mark.slow
def test_llama3_chain_trains_the_end_of_turn_label_though_pad_is_eos(family_models, tmp_path):
    """Llama 3 has no pad token; align sets pad = eos = <|eot_id|>. The end-of-turn label is still trained in
    every padded batch, no sequence starts with two BOS, and the saved model stops where the release did."""
    from align.loader import load_recipe
    from align.pipeline import run_pipeline
    from tests.conftest import captured_trainers

    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", chain(family_models, "llama3", "dpo")))
    with captured_trainers() as trainers:
        run_pipeline(recipe, output_dir=tmp_path / "run", log_level="warning")
    sft = trainers["sft"]
    tokenizer = sft.processing_class
    eot, bos = tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.bos_token_id
    assert tokenizer.pad_token_id == eot
    batch = sft.data_collator([sft.train_dataset[i] for i in range(8)])
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # rows of different lengths: padding with the eot id happened
    for row, length in zip(batch["labels"], lengths, strict=True):
        labels = row[:length].tolist()
        assert labels[-1] == eot  # the turn's end is trained...
        assert all(label == -100 for label in row[length:].tolist())  # ...the padding after it is not
    for ids in (*(sft.train_dataset[i]["input_ids"] for i in range(4)),
                *(trainers["dpo"].train_dataset[i]["prompt_ids"] for i in range(4))):  # fmt: skip
        assert ids[0] == bos and ids[1] != bos
    for stage in ("sft", "dpo", "grpo"):
        assert json.loads((tmp_path / "run" / stage / "summary.json").read_text())["status"] == "completed"
    saved = json.loads((tmp_path / "run" / "grpo" / "model" / "generation_config.json").read_text())
    assert set(tokenizer.convert_ids_to_tokens(saved["eos_token_id"])) == set(families.FAMILIES["llama3"].stops)


@pytest.mark.slow
def test_lora_on_a_named_template_trains_the_new_tokens_and_merge_keeps_the_end_of_turn_stop(
    family_models, tmp_path, run_cli
):
    """LoRA with `chat_template: qwen2_5` on a base GPT-2: the embeddings and head train whole beside the adapters
    (else `<|im_end|>` keeps its initial row), the adapters' folder says where generation stops, and `align merge`
    keeps `<|im_end|>` as a stop (a merged model once stopped only at GPT-2's eos)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.merge import main as merge

    stage = sft_stage(family_models, "gpt2", chat_template="qwen2_5", peft={"r": 4, "target_modules": ["c_attn"]},
                      train={"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 0.01})  # fmt: skip
    recipe = {"name": "named-lora", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    adapters = tmp_path / "run" / "sft" / "model"
    tokenizer = AutoTokenizer.from_pretrained(adapters)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert "wte" in config["modules_to_save"] and config["ensure_weight_tying"]  # the tied head with it
    assert end in json.loads((adapters / "generation_config.json").read_text())["eos_token_id"]
    assert merge([str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    stops = merged.generation_config.eos_token_id
    assert end in (stops if isinstance(stops, list) else [stops]) and merged.config.eos_token_id == end
    from safetensors.torch import load_file

    saved = load_file(adapters / "adapter_model.safetensors")
    rows = next(v for k, v in saved.items() if "wte" in k)  # the whole embedding, saved with the adapters
    assert rows.shape[0] == len(tokenizer)
    assert torch.equal(merged.get_input_embeddings().weight[end], rows[end])  # merged as trained
    base = AutoModelForCausalLM.from_pretrained(family_models["gpt2"]).get_input_embeddings().weight
    word = tokenizer("red", add_special_tokens=False)["input_ids"][0]
    assert not torch.equal(rows[word], base[word])  # the embeddings trained


@pytest.mark.slow
def test_a_named_template_on_a_gpt2_base_trains_assistant_turns_stops_and_chats(family_models, tmp_path, run_cli):
    """`chat_template: qwen2_5` on a base GPT-2: its turn markers become single tokens (the embeddings grow), eos and
    the generation config follow `<|im_end|>`, sft trains the assistant turns, and chat renders with the template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.chat import Conversation
    from align.prompt_format import read_prompt_format

    recipe = {"name": "named", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}},
              "stages": [sft_stage(family_models, "gpt2", chat_template="qwen2_5",
                                   train={"max_steps": 2, "per_device_train_batch_size": 8})]}  # fmt: skip
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    saved = tmp_path / "run" / "sft" / "model"
    summary = json.loads((tmp_path / "run" / "sft" / "summary.json").read_text())
    assert summary["loss_on"] == "assistant turns" and summary["chat_template"] == "qwen2_5"
    tokenizer = AutoTokenizer.from_pretrained(saved)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"] == [end]
    assert tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    stops = model.generation_config.eos_token_id
    assert end in (stops if isinstance(stops, list) else [stops])
    chat = Conversation(read_prompt_format(saved, True), tokenizer)
    assert chat.render("red blue").endswith("<|im_start|>user\nred blue<|im_end|>\n<|im_start|>assistant\n")


def test_a_from_scratch_tokenizer_is_the_one_every_later_load_reads_back(tmp_path):
    """transformers 5 rebuilds a saved qwen2 tokenizer with Qwen2's own pre-tokenizer (digits one by one), whatever
    its tokenizer.json holds: the tokenizer a from-scratch stage trains on is the one AutoTokenizer reads back. For
    GPT-2 the two agree and the trained one is kept."""
    from transformers import AutoTokenizer

    from align.models import build_model, train_tokenizer
    from align.recipe import ScratchModel

    texts = [f"What is {a} * {b}? It is {a * b}." for a in range(100, 400, 3) for b in (117, 530, 876)]
    prose = [f"the {word} is here" for word in ("cat", "dog", "sun")] * 22  # 66, no digit: only the probe sees them
    line = "What is 876 * 530? It is 464280."
    specs = {
        "qwen2": ("Qwen2Tokenizer", {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                     "num_key_value_heads": 2, "intermediate_size": 64}),
        "gpt2": ("TokenizersBackend", {"n_layer": 1, "n_embd": 32, "n_head": 2}),
    }  # fmt: skip
    for model_type, (kind, size) in specs.items():
        spec = ScratchModel(model_type=model_type, vocab_size=600, **size)
        model, tokenizer = build_model(spec, "m", texts=lambda: prose + texts)
        model.save_pretrained(tmp_path / model_type)
        tokenizer.save_pretrained(tmp_path / model_type)
        reloaded = AutoTokenizer.from_pretrained(tmp_path / model_type)
        assert tokenizer(line)["input_ids"] == reloaded(line)["input_ids"], model_type
        assert type(tokenizer).__name__ == kind, model_type
    # The tokenizer as trained reads the line otherwise than the reloaded qwen2 one.
    qwen2 = AutoTokenizer.from_pretrained(tmp_path / "qwen2")
    assert train_tokenizer(texts, 600)(line)["input_ids"] != qwen2(line)["input_ids"]


def test_a_from_scratch_tokenizer_learns_the_text_its_template_writes():
    """With a named template, a from-scratch tokenizer trains on the rows as the template writes them too: Qwen
    2.5's tool instructions and the schemas become word-sized tokens, not bytes, in every row."""
    from datasets import Dataset

    from align.builtin import multiplication
    from align.data_rows import training_texts
    from align.families import read_template, template_texts
    from align.models import train_tokenizer

    rows = Dataset.from_dict({k: v[:300] for k, v in multiplication()["train"].items() if k in ("messages", "tools")})
    template = read_template("qwen2_5", "t")
    (rendered,) = template_texts(template, rows, rows=1)
    assert "# Tools" in rendered and '"name": "calculator"' in rendered and "<|im_start|>" not in rendered
    plain = train_tokenizer(training_texts(rows), 1024)
    taught = train_tokenizer(training_texts(rows) + template_texts(template, rows), 1024)
    assert len(taught(rendered)["input_ids"]) < 0.6 * len(plain(rendered)["input_ids"])


def test_the_plan_of_a_from_scratch_model_with_a_named_template_tokenizes_as_its_saved_model_will(run_cli, tmp_path):
    """The plan's tokenizer for a from-scratch qwen2 with Qwen 2.5's template: trained on the rows as the template
    writes them (a transcript with its tool instructions in about 260 tokens, not 500; one in eight carries them, the
    others about 60), and the tokenizer qwen2 reloads with (each digit a token)."""
    stage = {"name": "sft", "kind": "sft", "chat_template": "qwen2_5",
             "model": {"model_type": "qwen2", "vocab_size": 1024, "num_hidden_layers": 1, "hidden_size": 32,
                       "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64,
                       "max_position_embeddings": 512},
             "data": {"card": "multiplication", "format": "messages", "columns": {"messages": "messages",
                      "tools": "tools"}, "max_train_rows": 400, "max_eval_rows": 8},
             "train": {"max_steps": 1}}  # fmt: skip
    recipe = write_yaml(tmp_path / "r.yaml", {"name": "t", "stages": [stage]})
    code, out, err = run_cli(recipe, "--output-dir", tmp_path / "run", "--dry-run")
    assert code == 0, err
    tokens = int(next(line for line in out.splitlines() if "train_tokens:" in line).split(":")[1])
    assert 100 * 400 < tokens < 180 * 400, tokens
    rendered = next(line for line in out.splitlines() if "rendered:" in line)
    assert '"arguments": {"expression": ' in rendered and "[[" in rendered
