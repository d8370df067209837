"""The baseline of bench_grpo_overhead.py: bare TRL GRPOTrainer, the work align's grpo stage does, written by hand.

    python benchmarks/baseline_trl_grpo.py MODEL_DIR TRAIN.jsonl VALID.jsonl OUT_DIR SETTINGS_JSON [TOOLS]

Load the model and tokenizer, the prompt files and align's `exact_match` reward, train, save: what a user who skips
align would write. SETTINGS_JSON holds the recipe's `train:` keys, so both sides train identically (with a stage's
`max_tool_calls` as TRL's `max_tool_calling_iterations`); TOOLS, a comma-separated list of align's builtin tools,
goes to `GRPOTrainer(tools=...)`. Prints the training's own figures as JSON: train_runtime, steps, and the mean
reward of each logged step.
"""

from __future__ import annotations

import json
import sys


def main(model_dir: str, train_file: str, valid_file: str, out: str, settings: str, tools: str = "") -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from align.rewards import exact_match
    from align.tools import BUILTIN_TOOLS

    data = load_dataset("json", data_files={"train": train_file, "validation": valid_file})
    args = GRPOConfig(
        output_dir=f"{out}/checkpoints", report_to=[], seed=42, eval_strategy="steps", save_total_limit=2,
        use_cpu=True, bf16=False, dataloader_pin_memory=False, disable_tqdm=True, disable_dropout=True,
        **json.loads(settings),
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=exact_match(), args=args,
        train_dataset=data["train"], eval_dataset=data["validation"],
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        **({"tools": [BUILTIN_TOOLS[name] for name in tools.split(",")]} if tools else {}),
    )  # fmt: skip
    result = trainer.train()
    trainer.save_model(f"{out}/model")
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r and "eval_reward" not in r]
    print(json.dumps({"train_runtime": result.metrics["train_runtime"], "steps": trainer.state.global_step,
                      "rewards": rewards}))  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:7])
