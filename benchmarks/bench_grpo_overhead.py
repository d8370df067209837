"""Online RL overhead: align's grpo stage against bare TRL GRPOTrainer on identical work; per-step ratio <= 1.05.

Same saved model (the quickstart's GPT-2 shape), same prompts (the builtin arithmetic task written to JSONL), the
same reward (align's `exact_match`) and `train:` settings and seed. align runs the one-stage recipe as a user would
(`python -m align.run`), with everything it adds to each step: the guarded reward wrapper, the health alarms, the
metrics writer and the numeric guard. The figure is the Trainer's own `train_runtime` over its steps on each side:
a step's cost. align's held-out measure before and after training is work bare TRL does not do, and is not in it
(the whole process's ratio is printed beside it). 3 rounds in rotating order, medians. The mean reward of every
logged step must match too, or the two sides did not do the same work.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from _shared import REPO, align_cmd, save_small_model, summary, timed, verdict, write_jsonl

ROUNDS = 3
TRAIN = {"max_steps": 12, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 16, "num_generations": 8,
         "max_completion_length": 8, "learning_rate": 1.0e-4, "logging_steps": 2, "eval_steps": 12,
         "gradient_checkpointing": False}  # fmt: skip


def main() -> int:
    from align.builtin import arithmetic

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        splits = arithmetic()
        rows = {s: [{"prompt": p, "answer": a} for p, a in zip(splits[s]["prompt"], splits[s]["answer"], strict=True)]
                for s in ("train", "validation")}  # fmt: skip
        train_file = write_jsonl(tmp / "train.jsonl", rows["train"][:400])
        valid_file = write_jsonl(tmp / "valid.jsonl", rows["validation"][:16])
        model_dir = save_small_model(tmp / "model", [r["prompt"] + " " + r["answer"] for r in rows["train"]])
        recipe = {
            "name": "grpo_overhead", "seed": 42, "tracking": {"wandb": {"mode": "disabled"}},
            "stages": [{
                "name": "grpo", "kind": "grpo", "model": str(model_dir), "generations": 0,
                "data": {"source": {"files": {"train": [str(train_file)], "validation": [str(valid_file)]}},
                         "format": "prompt_only", "splits": {"train": "train", "validation": "validation"}},
                "rewards": [{"function": "exact_match"}], "measure": {"prompts": 2, "samples": 1},
                "train": TRAIN,
            }],
        }  # fmt: skip
        recipe_path = tmp / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        baseline = [sys.executable, str(REPO / "benchmarks/baseline_trl_grpo.py"), str(model_dir), str(train_file),
                    str(valid_file), str(tmp / "bare"), json.dumps(TRAIN)]  # fmt: skip
        sides = {"bare": (baseline, {"WANDB_MODE": "disabled"}), "align": (align_cmd(recipe_path, tmp / "align"), {})}
        per_step: dict[str, list[float]] = {side: [] for side in sides}
        whole: dict[str, list[float]] = {side: [] for side in sides}
        rewards: dict[str, list[float]] = {}
        for i in range(ROUNDS):
            for side in list(sides)[i % 2 :] + list(sides)[: i % 2]:  # the order alternates: a drift hits both
                cmd, env = sides[side]
                wall, proc = timed(cmd, env)
                whole[side].append(wall)
                if side == "bare":
                    figures = json.loads(proc.stdout.strip().splitlines()[-1])
                    per_step[side].append(figures["train_runtime"] / figures["steps"])
                    rewards[side] = figures["rewards"]
                else:
                    metrics = summary(tmp / "align", "grpo")["metrics"]
                    per_step[side].append(metrics["train_runtime_s"] / metrics["global_step"])
                    logged = (tmp / "align" / "grpo" / "metrics.jsonl").read_text().splitlines()
                    rewards[side] = [r["reward"] for r in map(json.loads, logged) if r["split"] == "train"
                                     and "reward" in r]  # fmt: skip
    step = {side: statistics.median(values) for side, values in per_step.items()}
    wall = {side: statistics.median(values) for side, values in whole.items()}
    ratio = step["align"] / step["bare"]
    same = len(rewards["align"]) == len(rewards["bare"]) and all(
        abs(a - b) <= 1e-6 for a, b in zip(rewards["align"], rewards["bare"], strict=True))  # fmt: skip
    ok = ratio <= 1.05 and same
    print(
        f"grpo overhead: align {1000 * step['align']:.0f} ms/step vs bare TRL GRPOTrainer {1000 * step['bare']:.0f} "
        f"ms/step = {ratio:.3f}x per step (whole process {wall['align']:.1f} s vs {wall['bare']:.1f} s, align's "
        f"held-out measure and report included); rewards at every logged step {'identical' if same else 'DIFFERENT'}"
        f" (target <= 1.05x per step) {verdict(ok)}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
