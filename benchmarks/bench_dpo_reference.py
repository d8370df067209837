"""DPO reference: peak memory with LoRA (adapters off as the reference) <= 0.7x a separate full reference model;
and the speed effect of `precompute_ref_log_probs`.

Same saved model (GPT-2, 10 layers x 640, 52M parameters: big enough that weights and optimizer state, not
the run's own bookkeeping, set the memory; sequences of 48 tokens keep it fast), same python-docs-preferences
pairs, same steps and batch; three variants per round, 3 rounds (precompute in the first only), medians:
- copy: full DPO with a frozen copy of the model as the reference (policy + its gradients and AdamW state +
  the copy);
- lora: LoRA on the attention and MLP projections, the reference being the same weights with adapters off;
- precompute: full DPO with the reference's log-probabilities computed once before training (no copy kept).
Each run is forked from one process that imported the libraries once (`_shared.forked`): memory is the peak
resident memory the run added to them, speed the Trainer's train_runtime and the stage's wall time, from
summary.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

import yaml
from _shared import align_run, forked, preload, save_small_model, verdict

ROUNDS = 3
MODEL = {"model_type": "gpt2", "vocab_size": 4096, "n_layer": 10, "n_head": 10, "n_embd": 640, "n_positions": 64}
# One step is enough: AdamW's state, the largest piece a full reference run adds, exists from the first step.
TRAIN = {"beta": 0.1, "max_length": 48, "max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 5.0e-5,
         "logging_steps": 1, "eval_steps": 1, "gradient_checkpointing": False}  # fmt: skip
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["c_attn", "c_proj", "c_fc"]}


def main() -> int:
    from align.builtin import python_docs_preferences

    preload()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pairs = python_docs_preferences()["train"]
        texts = [p + c for p, c in zip(pairs["prompt"], pairs["chosen"], strict=True)]
        # built in a child too: this process runs no torch operation before it forks (see `preload`)
        _, built = forked(lambda: {"model": str(save_small_model(tmp / "model", texts, MODEL))}, tmp / "model.log")
        stage = {"name": "dpo", "kind": "dpo", "model": built["model"], "generations": 0, "train": TRAIN,
                 "data": {"card": "python-docs-preferences", "max_train_rows": 8, "max_eval_rows": 2}}  # fmt: skip
        variants = {
            "copy": stage,
            "lora": stage | {"peft": LORA},
            "precompute": stage | {"train": TRAIN | {"precompute_ref_log_probs": True}},
        }
        figures: dict[str, list[dict]] = {name: [] for name in variants}
        for round_ in range(ROUNDS):
            for name, variant in variants.items():
                if name == "precompute" and round_ > 0:
                    continue  # its speed is reported, not a target: one run keeps run_all within 10 minutes
                recipe = {"name": name, "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [variant]}
                path = tmp / f"{name}.yaml"
                path.write_text(yaml.safe_dump(recipe, sort_keys=False))
                out = tmp / name
                _, memory = forked(partial(align_run, path, out, {"ALIGN_CACHE_DIR": "off"}), tmp / f"{name}.log")
                summary = json.loads((out / "dpo" / "summary.json").read_text())
                figures[name].append(memory | {
                    "train_s": summary["metrics"]["train_runtime_s"], "wall_s": summary["wall_time_s"],
                    "reference": summary["reference"]})  # fmt: skip

    def median(name: str, key: str) -> float:
        return statistics.median(f[key] for f in figures[name])

    memory_ratio = median("lora", "added_gb") / median("copy", "added_gb")
    precompute_train = median("precompute", "train_s") / median("copy", "train_s")
    precompute_wall = median("precompute", "wall_s") / median("copy", "wall_s")
    ok = memory_ratio <= 0.7 and "adapters" in figures["lora"][0]["reference"]
    print(
        f"dpo_reference: peak memory added, LoRA {median('lora', 'added_gb'):.3f} GiB vs full reference copy "
        f"{median('copy', 'added_gb'):.3f} GiB = {memory_ratio:.2f}x (target <= 0.7x); precompute_ref_log_probs: "
        f"{median('precompute', 'added_gb'):.3f} GiB, training loop {precompute_train:.2f}x the copy's time, whole "
        f"stage {precompute_wall:.2f}x (one run; reported) {verdict(ok)}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
