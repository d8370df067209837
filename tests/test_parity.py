"""align trains through the library and adds only checks and bookkeeping: the same tiny run as an align recipe and
as a bare TRL / transformers script ends at the same eval loss (within 1e-5).

Both sides read one saved model (weights and tokenizer), the same JSONL files and one dict of settings. align's
defaults that change what is computed are given to the bare side (`ALIGN_DEFAULTS`); the bookkeeping ones
(`logging_nan_inf_filter`, `include_num_input_tokens_seen`, progress bars, pinned memory) are left at the
library's there, so the test also shows they change nothing. The models keep GPT-2's dropout (0.1), so anything
align draws from the random generators before training would show: before `runner.keep_random_state`, the eval at
step 0 shifted the dropout masks and the sft and lm runs ended 4.3e-4 and 3.2e-3 from the bare scripts' (dpo
matched anyway: TRL's `disable_dropout` turns dropout off). Measured since: all three equal to the last bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests import families
from tests.conftest import TINY_MODEL, write_yaml

TOLERANCE = 1e-5
SEED = 42
# One set of settings for both sides (align's recipe `train:`, and the bare config class).
SETTINGS: dict[str, Any] = {
    "max_steps": 20,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "learning_rate": 5e-4,
    "eval_steps": 10,  # evaluations while training too: they draw random numbers on both sides alike
}
SFT_SETTINGS = {**SETTINGS, "max_length": 128, "packing": False}
DPO_SETTINGS = {**SETTINGS, "max_length": 128, "beta": 0.1}
KTO_SETTINGS = {**SETTINGS, "max_length": 128, "beta": 0.1}
LM_SETTINGS = {**SETTINGS, "max_length": 64}
# What align sets differently from the library, where it changes what runs (README: "Defaults align changes from
# the library's"): the bare side gets them by hand. fp32 on the CPU: TRL's configs default to bf16 there.
ALIGN_DEFAULTS: dict[str, Any] = {
    "logging_steps": 10,
    "eval_strategy": "steps",
    "save_total_limit": 2,
    "activation_checkpointing": True,  # GPT-2 supports it (transformers 5.25's name for gradient_checkpointing)
    "use_cpu": True,
    "bf16": False,
    "fp16": False,
}


def tiny_gpt2(directory: Path, tokenizer: Any, dropout: float = 0.1) -> Path:
    """The tests' tiny GPT-2 (2 layers, hidden 32, the tokenizer's 512 tokens), 128 positions, saved with its
    tokenizer: what both sides load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        **{**TINY_MODEL, "vocab_size": len(tokenizer), "n_positions": 128},
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the tiny model gains nothing from two, and on a 2-core machine shared with other work, two
    threads spinning for one core made this file take 224 s instead of 26 s (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    return build_world(tmp_path_factory.mktemp("parity"))


def build_world(root: Path) -> dict[str, Any]:
    """The saved models (with dropout, and without for the micro-batch test) and each format's JSONL files."""
    from align.builtin import python_docs, python_docs_feedback, python_docs_instruct, python_docs_preferences
    from align.models import train_tokenizer

    instruct = python_docs_instruct()
    pairs = [{"prompt": p, "completion": c} for p, c in zip(instruct["prompt"], instruct["completion"], strict=True)]
    prefs = python_docs_preferences()
    fields = ("prompt", "chosen", "rejected")
    pref_rows = {
        split: [dict(zip(fields, row, strict=True)) for row in zip(*(cols[f] for f in fields), strict=True)]
        for split, cols in prefs.items()
    }
    feedback = python_docs_feedback()
    labelled = {split: [{f: cols[f][i] for f in ("prompt", "completion", "label")} for i in range(len(cols["prompt"]))]
                for split, cols in feedback.items()}  # fmt: skip
    texts = [{"text": t} for t in python_docs()["text"][:400]]
    files = {
        "sft": (pairs[:200], pairs[200:216]),
        "dpo": (pref_rows["train"][:160], pref_rows["validation"][:16]),
        "lm": (texts[:360], texts[360:]),
        "kto": (labelled["train"][:160], labelled["validation"][:16]),
    }
    paths = {
        kind: {
            "train": write_jsonl(root / f"{kind}_train.jsonl", train),
            "validation": write_jsonl(root / f"{kind}_valid.jsonl", valid),
        }
        for kind, (train, valid) in files.items()
    }
    tokenizer = train_tokenizer([p["prompt"] + p["completion"] for p in pairs[:200]] + [t["text"] for t in texts], 512)
    return {
        "root": root,
        "files": paths,
        "model": tiny_gpt2(root / "model", tokenizer),
        "model_no_dropout": tiny_gpt2(root / "model_no_dropout", tokenizer, dropout=0.0),
    }


# --------------------------------------------------------------------------------------------------
# The two sides


FORMATS = {"sft": "prompt_completion", "dpo": "preference", "lm": "text", "kto": "unpaired_preference"}


def run_align(
    world: dict[str, Any],
    kind: str,
    settings: dict[str, Any],
    name: str,
    model: Path | None = None,
    files: dict[str, str] | None = None,
    fmt: str | None = None,
) -> float:
    """The run as an align recipe (through `run_pipeline`); its final eval loss as the Trainer computes it. `files`
    and `fmt` default to the world's files of the kind and its format."""
    from align.loader import load_recipe
    from align.pipeline import run_pipeline

    root, files = world["root"], files or world["files"][kind]
    stage = {
        "name": kind,
        "kind": kind,
        "model": str(model or world["model"]),
        # Greedy answers before training must take no random numbers either; one prompt shows it as well as four.
        **({"generations": 1} if kind != "lm" else {}),
        "data": {
            "source": {"files": {"train": [files["train"]], "validation": [files["validation"]]}},
            "format": fmt or FORMATS[kind],
            "splits": {"validation": "validation"},
        },
        "train": dict(settings),
    }
    recipe = {
        "name": name,
        "seed": SEED,
        "precision": "fp32",
        "tracking": {"wandb": {"mode": "disabled"}},
        "stages": [stage],
    }
    path = write_yaml(root / f"{name}.yaml", recipe)
    summaries = run_pipeline(load_recipe(path), output_dir=root / "runs" / name, log_level="warning")
    metrics = summaries[0]["metrics"]
    # The bare side's figure is the Trainer's: beside align's token mean (lm, sft), it is `eval_loss_trainer`.
    return metrics.get("eval_loss_trainer", metrics["eval_loss"])


def bare_config(config_class: type, root: Path, name: str, settings: dict[str, Any]) -> Any:
    return config_class(output_dir=str(root / "bare" / name), seed=SEED, report_to="none", **ALIGN_DEFAULTS, **settings)


def bare_data(world: dict[str, Any], kind: str) -> Any:
    from datasets import load_dataset

    return load_dataset("json", data_files=world["files"][kind])


def bare_sft(world: dict[str, Any]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    data = bare_data(world, "sft")
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(world["model"]),
        args=bare_config(SFTConfig, world["root"], "sft", SFT_SETTINGS),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=AutoTokenizer.from_pretrained(world["model"]),
    )
    trainer.train()
    return trainer.evaluate()["eval_loss"]


def bare_dpo(world: dict[str, Any]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    data = bare_data(world, "dpo")
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(world["model"]),
        args=bare_config(DPOConfig, world["root"], "dpo", DPO_SETTINGS),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=AutoTokenizer.from_pretrained(world["model"]),
    )
    trainer.train()
    return trainer.evaluate()["eval_loss"]


def bare_kto(world: dict[str, Any]) -> float:
    """KTOTrainer as its documentation shows it, with the reference a copy of the policy (TRL would otherwise reload
    it from the model's name; align hands it a frozen copy, the same weights)."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    data = bare_data(world, "kto")
    model = AutoModelForCausalLM.from_pretrained(world["model"])
    trainer = KTOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=bare_config(KTOConfig, world["root"], "kto", KTO_SETTINGS),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=AutoTokenizer.from_pretrained(world["model"]),
    )
    trainer.train()
    return trainer.evaluate()["eval_loss"]


def bare_lm(world: dict[str, Any]) -> float:
    """transformers' `run_clm` recipe: tokenize, eos after each row, join every 1,000 rows, cut full blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    size = LM_SETTINGS["max_length"]

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + [tokenizer.eos_token_id] for row in ids]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        stream = [token for row in batch["input_ids"] for token in row]
        blocks = [stream[i : i + size] for i in range(0, len(stream) // size * size, size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    data = bare_data(world, "lm").map(tokenize, batched=True, remove_columns=["text"])
    data = data.map(group, batched=True, batch_size=1000, remove_columns=["input_ids"])
    settings = {k: v for k, v in LM_SETTINGS.items() if k != "max_length"}
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(world["model"]),
        args=bare_config(TrainingArguments, world["root"], "lm", settings),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=default_data_collator,
    )
    trainer.train()
    return trainer.evaluate()["eval_loss"]


# --------------------------------------------------------------------------------------------------
# The comparisons


@pytest.fixture(scope="module")
def sft_align(world) -> float:
    return run_align(world, "sft", SFT_SETTINGS, "sft")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "settings", "bare"),
    [
        ("sft", SFT_SETTINGS, bare_sft),
        ("dpo", DPO_SETTINGS, bare_dpo),
        ("lm", LM_SETTINGS, bare_lm),
        ("kto", KTO_SETTINGS, bare_kto),
    ],  # fmt: skip
)
def test_align_matches_the_bare_library(world, request, kind, settings, bare):
    aligned = request.getfixturevalue("sft_align") if kind == "sft" else run_align(world, kind, settings, kind)
    library = bare(world)
    assert math.isfinite(aligned)
    assert abs(aligned - library) <= TOLERANCE, f"{kind}: align {aligned:.7f}, bare {library:.7f}"


# benchmarks/bench_overhead.py's settings (its max_length 160 capped at these models' 128 positions).
BENCH_SETTINGS = {"max_length": 128, "max_steps": 16, "per_device_train_batch_size": 16, "learning_rate": 5.0e-4,
                  "warmup_steps": 5, "logging_steps": 4, "eval_steps": 8, "packing": False}  # fmt: skip


@pytest.mark.slow
def test_sft_matches_a_bare_script_that_evaluates_before_training_at_the_benchmarks_size(world):
    """bench_overhead.py once found align 8.7e-4 from bare TRL: its baseline evaluated before training, and an
    evaluation draws from torch's generator (each DataLoader iterator takes a seed), so the baseline's dropout masks
    were other ones than align's, which measures outside training's random numbers (`keep_random_state`). With the
    generator put back around the bare evaluation too, both end at the same eval loss at the benchmark's settings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    aligned = run_align(world, "sft", BENCH_SETTINGS, "sft_bench")
    data = bare_data(world, "sft")
    args = SFTConfig(output_dir=str(world["root"] / "bare" / "sft_bench"), seed=SEED, report_to="none",
                     **{**ALIGN_DEFAULTS, **BENCH_SETTINGS})  # fmt: skip
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(world["model"]),
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=AutoTokenizer.from_pretrained(world["model"]),
    )
    state = torch.get_rng_state()
    trainer.evaluate()
    torch.set_rng_state(state)
    trainer.train()
    library = trainer.evaluate()["eval_loss"]
    assert abs(aligned - library) <= TOLERANCE, f"align {aligned:.7f}, bare {library:.7f}"


@pytest.mark.slow
def test_micro_batches_do_not_change_the_result(world):
    """8 x 1 and 4 x 2 (gradient accumulation) are one effective batch: the Trainer divides each micro-batch's
    summed token loss by the tokens of the whole effective batch (measured: equal to the last bit; dividing by each
    micro-batch's own tokens instead moves the eval loss 7.9e-5). Without dropout: masks drawn for two batches of
    4 are other random numbers than those drawn for one of 8, in bare torch as in align."""
    model = world["model_no_dropout"]
    one = run_align(world, "sft", SFT_SETTINGS, "micro_8x1", model)
    split = {**SFT_SETTINGS, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    two = run_align(world, "sft", split, "micro_4x2", model)
    assert abs(one - two) <= TOLERANCE, f"8 x 1: {one:.7f}, 4 x 2: {two:.7f}"


@pytest.mark.slow
def test_cpu_lm_head_matches_trls(world, sft_align, monkeypatch):
    """align/lm_head.py's plain-logits head against TRL's chunked head (`ALIGN_LM_HEAD=trl`)."""
    monkeypatch.setenv("ALIGN_LM_HEAD", "trl")
    trl_head = run_align(world, "sft", SFT_SETTINGS, "sft_trl_head")
    assert abs(sft_align - trl_head) <= TOLERANCE, f"plain logits {sft_align:.7f}, TRL's head {trl_head:.7f}"


def test_a_measurement_outside_training_takes_no_random_numbers():
    """What `keep_random_state` guards (every evaluation outside training runs under it): Python's, numpy's and
    torch's generators continue after the block exactly as if it had not run."""
    import random

    import numpy as np
    import torch
    from transformers import set_seed

    from align.stages.runner import keep_random_state

    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    set_seed(SEED)
    expected = draw()
    set_seed(SEED)
    with keep_random_state():
        draw()
        iter(torch.utils.data.DataLoader(range(4)))  # what `trainer.evaluate()` draws: a seed for the iterator
    assert draw() == expected


# --------------------------------------------------------------------------------------------------
# Online RL: the same sampled answers, so the same rewards at every logged step and the same weights

GRPO_REWARD = '''
def near(prompts, completions, answer, **kwargs):
    """Dense: the closer the completion's length in characters to the answer's number, the higher."""
    return [1.0 / (1 + abs(len(c) - int(a))) for c, a in zip(completions, answer)]


def spaces(prompts, completions, **kwargs):
    """Dense too, and not in step with `near`: the share of spaces in the completion."""
    return [c.count(" ") / max(1, len(c)) for c in completions]
'''
# Two rewards with weights other than 1: a run that ignored the weights would sample the same answers but push them
# by other advantages, and its logged reward and weights would part from the bare trainer's.
GRPO_REWARDS = [{"function": "rewards.py:near"}, {"function": "rewards.py:spaces", "weight": -0.4}]
GRPO_SETTINGS: dict[str, Any] = {
    "max_steps": 6, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "num_generations": 4,
    "max_completion_length": 8, "learning_rate": 1e-3, "logging_steps": 1, "eval_steps": 3,
}  # fmt: skip


def grpo_files(world: dict[str, Any]) -> tuple[dict[str, str], Path]:
    root = world["root"]
    rows = [{"prompt": f"What is {a} + {b}? Answer:", "answer": str(a + b)} for a in range(6) for b in range(6)]
    (root / "rewards.py").write_text(GRPO_REWARD)
    files = {"train": write_jsonl(root / "grpo_train.jsonl", rows[:28]),
             "validation": write_jsonl(root / "grpo_valid.jsonl", rows[28:])}  # fmt: skip
    return files, root / "rewards.py"


def assert_same_steps_and_weights(
    aligned: dict[int, float], bare: dict[int, float], steps: int, stage_dir: Path, trainer: Any, what: str
) -> dict[str, Any]:
    """align's logged figure (`what`) at every step against the bare trainer's, within TOLERANCE, and the saved
    weights against the bare trainer's final ones; the saved weights, for more checks."""
    from safetensors.torch import load_file

    assert sorted(aligned) == sorted(bare) == list(range(1, steps + 1))
    assert len(set(bare.values())) > 1, f"the {what} moved: the comparison is not of constants"
    for step, value in bare.items():
        assert abs(aligned[step] - value) <= TOLERANCE, f"step {step}: align {aligned[step]:.7f}, bare {value:.7f}"
    saved = load_file(str(stage_dir / "model" / "model.safetensors"))
    state = trainer.model.state_dict()
    worst = max(float((saved[k] - state[k].detach()).abs().max()) for k in saved if k in state)
    assert worst <= TOLERANCE, f"the final weights differ by {worst:.2e}"
    return saved


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_online_rl_matches_the_bare_trainer_reward_for_reward_and_weight_for_weight(world, kind):
    """align's grpo (rloo) stage against GRPOTrainer (RLOOTrainer) as TRL's documentation shows it, on the same saved
    model, prompts, two weighted reward functions and settings: the mean reward at every logged step and the final
    weights (max absolute difference) agree. The logged loss is often exactly 0 here and would prove nothing.
    align's defaults that change the run are given to the bare side: `disable_dropout` (align's default for online
    stages) and the `ALIGN_DEFAULTS` of every stage; `remove_unused_columns: false` is TRL's default already."""
    import importlib.util

    import torch
    import trl
    from datasets import load_dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.loader import load_recipe
    from align.pipeline import run_pipeline

    files, reward_file = grpo_files(world)
    root = world["root"]
    stage = {"name": kind, "kind": kind, "model": str(world["model"]),
             "data": {"source": {"files": {"train": [files["train"]], "validation": [files["validation"]]}},
                      "format": "prompt_only", "splits": {"validation": "validation"}},
             "rewards": GRPO_REWARDS, "train": dict(GRPO_SETTINGS)}  # fmt: skip
    recipe = {"name": f"{kind}_parity", "seed": SEED, "precision": "fp32",
              "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}  # fmt: skip
    out = root / "runs" / f"{kind}_parity"
    run_pipeline(load_recipe(write_yaml(root / f"{kind}_parity.yaml", recipe)), output_dir=out, log_level="warning")
    rows = [json.loads(line) for line in (out / kind / "metrics.jsonl").read_text().splitlines()]
    aligned = {r["step"]: r["reward"] for r in rows if r["split"] == "train" and "reward" in r}

    spec = importlib.util.spec_from_file_location("bare_rewards", reward_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = load_dataset("json", data_files=files)
    name = {"grpo": "GRPO", "rloo": "RLOO"}[kind]
    config = getattr(trl, f"{name}Config")(
        output_dir=str(root / "bare" / kind), seed=SEED, report_to="none", reward_weights=[1.0, -0.4],
        **{**ALIGN_DEFAULTS, **GRPO_SETTINGS, "disable_dropout": True},
    )  # fmt: skip
    trainer = getattr(trl, f"{name}Trainer")(
        model=AutoModelForCausalLM.from_pretrained(world["model"]), reward_funcs=[module.near, module.spaces],
        args=config, train_dataset=data["train"], eval_dataset=data["validation"],
        processing_class=AutoTokenizer.from_pretrained(world["model"]),
    )  # fmt: skip
    trainer.train()
    bare = {r["step"]: r["reward"] for r in trainer.state.log_history if "reward" in r and "eval_reward" not in r}

    saved = assert_same_steps_and_weights(aligned, bare, GRPO_SETTINGS["max_steps"], out / kind, trainer, "reward")
    assert not torch.equal(saved["transformer.wte.weight"], load_file(str(world["model"] / "model.safetensors"))[
        "transformer.wte.weight"]), "training moved the weights"  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Distillation: the same sampled answers scored by the same teacher, so the same loss at every step

DISTILL_SETTINGS: dict[str, Any] = {
    "max_steps": 6, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "max_completion_length": 8,
    "learning_rate": 1e-3, "logging_steps": 1, "eval_steps": 3, "beta": 0.5,
}  # fmt: skip


@pytest.mark.slow
def test_distill_matches_the_bare_trainer_loss_for_loss_and_weight_for_weight(world):
    """align's distill stage against DistillationTrainer as TRL's documentation shows it, on the same saved student
    and teacher (the tests' tiny GPT-2, the teacher from another seed), prompts and settings: the loss at every
    logged step and the final weights agree. The teacher goes to the bare trainer as a model, frozen in eval mode,
    as align gives it."""
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.loader import load_recipe
    from align.pipeline import run_pipeline

    files, _ = grpo_files(world)
    root = world["root"]
    teacher_dir = root / "teacher"
    if not teacher_dir.exists():  # a teacher that differs from the student: the same config from another seed
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(world["model"]).config)
        model.save_pretrained(teacher_dir)
        AutoTokenizer.from_pretrained(world["model"]).save_pretrained(teacher_dir)
    stage = {"name": "distill", "kind": "distill", "model": str(world["model"]), "teacher": str(teacher_dir),
             "data": {"source": {"files": {"train": [files["train"]], "validation": [files["validation"]]}},
                      "format": "prompt_only", "splits": {"validation": "validation"}},
             "generations": 1, "measure": {"prompts": 4, "max_new_tokens": 4},
             "train": dict(DISTILL_SETTINGS)}  # fmt: skip
    recipe = {"name": "distill_parity", "seed": SEED, "precision": "fp32",
              "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}  # fmt: skip
    out = root / "runs" / "distill_parity"
    run_pipeline(load_recipe(write_yaml(root / "distill_parity.yaml", recipe)), output_dir=out, log_level="warning")
    rows = [json.loads(line) for line in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    aligned = {r["step"]: r["loss"] for r in rows if r["split"] == "train" and "loss" in r}

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    teacher.requires_grad_(False)
    data = load_dataset("json", data_files=files).select_columns(["prompt"])
    config = trl.DistillationConfig(output_dir=str(root / "bare" / "distill"), seed=SEED, report_to="none",
                                    **{**ALIGN_DEFAULTS, **DISTILL_SETTINGS})  # fmt: skip
    trainer = trl.DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(world["model"]), teacher_model=teacher, args=config,
        train_dataset=data["train"], eval_dataset=data["validation"],
        processing_class=AutoTokenizer.from_pretrained(world["model"]),
    )  # fmt: skip
    trainer.train()
    bare = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r and "eval_loss" not in r}

    assert_same_steps_and_weights(aligned, bare, DISTILL_SETTINGS["max_steps"], out / "distill", trainer, "loss")


# --------------------------------------------------------------------------------------------------
# Other families: their real chat templates, message data


@pytest.fixture(scope="module")
def family_world(world, family_models) -> dict[str, Any]:
    """Llama 3 and Qwen 2.5 as tests/families.py builds them (once per session), and their conversations and message
    pairs split into train and validation files."""
    from tests import families

    root = world["root"] / "families"
    root.mkdir(parents=True, exist_ok=True)
    rows = {"sft": families.conversations(), "dpo": families.pairs()}
    files = {kind: {"train": write_jsonl(root / f"{kind}_train.jsonl", r[: len(r) * 9 // 10]),
                    "validation": write_jsonl(root / f"{kind}_valid.jsonl", r[len(r) * 9 // 10 :])}
             for kind, r in rows.items()}  # fmt: skip
    return {"files": files, "llama3": family_models["llama3"], "qwen2_5": family_models["qwen2_5"]}


FAMILY_FORMATS = {"sft": "messages", "dpo": "preference"}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5", "llama3"])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_other_families_match_the_bare_library(world, family_world, family, kind):
    """sft (assistant-only loss on conversations, align's default) and dpo on message pairs, through each family's
    own chat template: align and the bare trainer end at the same eval loss. The bare side loads the tokenizer as
    saved (Llama 3 without a pad token: TRL pads with eos, as align does)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    model, files = family_world[family], family_world["files"][kind]
    settings = {**(SFT_SETTINGS if kind == "sft" else DPO_SETTINGS), "max_steps": 8, "eval_steps": 4}
    aligned = run_align(world, kind, settings, f"{kind}-{family}", model=model, files=files, fmt=FAMILY_FORMATS[kind])
    data = load_dataset("json", data_files=files)
    config_class, trainer_class = (SFTConfig, SFTTrainer) if kind == "sft" else (DPOConfig, DPOTrainer)
    extra = {"assistant_only_loss": True} if kind == "sft" else {}
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(model),
        args=bare_config(config_class, world["root"], f"{kind}-{family}", {**settings, **extra}),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=AutoTokenizer.from_pretrained(model),
    )
    trainer.train()
    library = trainer.evaluate()["eval_loss"]
    assert math.isfinite(aligned)
    assert abs(aligned - library) <= TOLERANCE, f"{kind} on {family}: align {aligned:.7f}, bare {library:.7f}"


TOOL_REWARDS = '''
def near(prompts, completions, answer, **kwargs):
    """Dense: the closer the last turn's length in characters to the answer's number, the higher."""
    return [1.0 / (1 + abs(len(c[-1]["content"]) - int(a))) for c, a in zip(completions, answer)]
'''


@pytest.mark.slow
def test_grpo_with_tools_matches_the_bare_trainer_reward_for_reward_and_weight_for_weight(world, caller):
    """align's grpo with `tools:` against `GRPOTrainer(tools=...)` on Qwen 2.5 (a template TRL parses tool calls of),
    message-list prompts, the same reward and settings: the mean reward at every logged step and the final weights
    agree. The policy calls its tool in every answer (the `caller` fixture), so TRL's loop runs the calls on both
    sides, and the reward reads the answer written after the tool's result."""
    import importlib.util

    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.loader import load_recipe
    from align.pipeline import run_pipeline

    root = world["root"] / "tools"
    root.mkdir(parents=True, exist_ok=True)
    (root / "rewards.py").write_text(TOOL_REWARDS + families.lookup_tool())
    # The fixture's words, which the caller calls on; the reward's target lengths vary, so the groups' rewards do.
    rows = [{**row, "answer": str(4 + i % 6)} for i, row in enumerate(families.prompts(n=36, seed=7))]
    files = {"train": write_jsonl(root / "train.jsonl", rows[:28]),
             "validation": write_jsonl(root / "valid.jsonl", rows[28:])}  # fmt: skip
    settings = {**GRPO_SETTINGS, "max_completion_length": 48, "temperature": 0.5}  # where the caller always calls
    stage = {"name": "grpo", "kind": "grpo", "model": str(caller), "tools": ["rewards.py:lookup"], "max_tool_calls": 1,
             "data": {"source": {"files": {"train": [files["train"]], "validation": [files["validation"]]}},
                      "format": "prompt_only", "splits": {"validation": "validation"}},
             "rewards": [{"function": "rewards.py:near"}], "train": dict(settings)}  # fmt: skip
    recipe = {"name": "tools_parity", "seed": SEED, "precision": "fp32", "tracking": {"wandb": {"mode": "disabled"}},
              "stages": [stage]}  # fmt: skip
    out = root / "runs"
    run_pipeline(load_recipe(write_yaml(root / "r.yaml", recipe)), output_dir=out, log_level="warning")
    logged = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    aligned = {r["step"]: r["reward"] for r in logged if r["split"] == "train" and "reward" in r}

    spec = importlib.util.spec_from_file_location("bare_tool_rewards", root / "rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = trl.GRPOConfig(output_dir=str(root / "bare"), seed=SEED, report_to="none", max_tool_calling_iterations=1,
                            **{**ALIGN_DEFAULTS, **settings, "disable_dropout": True})  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(caller), reward_funcs=[module.near],
        args=config, train_dataset=load_dataset("json", data_files=files)["train"],
        eval_dataset=load_dataset("json", data_files=files)["validation"], tools=[module.lookup],
        processing_class=AutoTokenizer.from_pretrained(caller),
    )  # fmt: skip
    trainer.train()
    bare = {r["step"]: r["reward"] for r in trainer.state.log_history if "reward" in r and "eval_reward" not in r}
    assert_same_steps_and_weights(aligned, bare, settings["max_steps"], out / "grpo", trainer, "reward")
    calls = [r["tools/call_frequency"] for r in logged if r["split"] == "train" and "tools/call_frequency" in r]
    assert len(calls) == settings["max_steps"] and min(calls) >= 0.75, calls  # the tool ran at every step
