"""The baseline of bench_grpo_overhead.py: bare TRL GRPOTrainer, the work align's grpo stage does, written by hand.

    python benchmarks/baseline_trl_grpo.py MODEL_DIR TRAIN.jsonl VALID.jsonl OUT_DIR SETTINGS_JSON [TOOLS] [REWARD]

Load the model and tokenizer, the prompt files and the reward (align's `exact_match`, or REWARD as FILE.py:NAME),
train, save: what a user who skips align would write. SETTINGS_JSON holds the recipe's `train:` keys, so both sides
train identically (with a stage's `max_tool_calls` as TRL's `max_tool_calling_iterations`); TOOLS, a comma-separated
list of align's builtin tools or FILE.py:NAME functions, goes to `GRPOTrainer(tools=...)`. Prints the training's own
figures as JSON: train_runtime, steps, and the mean reward of each logged step.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def function(entry: str) -> Any:
    """A FILE.py:NAME entry's function, or align's builtin tool of that name."""
    import importlib.util

    from align.tools import BUILTIN_TOOLS

    path, _, name = entry.rpartition(":")
    if not path:
        return BUILTIN_TOOLS[name]
    spec = importlib.util.spec_from_file_location("baseline_functions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def main(
    model_dir: str, train_file: str, valid_file: str, out: str, settings: str, tools: str = "", reward: str = ""
) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from align.rewards import exact_match

    data = load_dataset("json", data_files={"train": train_file, "validation": valid_file})
    args = GRPOConfig(
        output_dir=f"{out}/checkpoints", report_to=[], seed=42, eval_strategy="steps", save_total_limit=2,
        use_cpu=True, bf16=False, dataloader_pin_memory=False, disable_tqdm=True, disable_dropout=True,
        **json.loads(settings),
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
        reward_funcs=function(reward) if reward and reward != "exact_match" else exact_match(),
        train_dataset=data["train"], eval_dataset=data["validation"],
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        **({"tools": [function(entry) for entry in tools.split(",")]} if tools else {}),
    )  # fmt: skip
    result = trainer.train()
    trainer.save_model(f"{out}/model")
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r and "eval_reward" not in r]
    print(json.dumps({"train_runtime": result.metrics["train_runtime"], "steps": trainer.state.global_step,
                      "rewards": rewards}))  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:8])
