"""Overhead: align's SFT stage against bare TRL SFTTrainer on identical work; whole-process wall ratio <= 1.05.

Same saved model (the quickstart's GPT-2 shape), same prompt/completion rows (python-docs-instruct written to
JSONL), same `train:` settings, seed, evaluation before and after, and a saved model at the end. align runs the
one-stage recipe as a user would (`python -m align.run`), with everything it adds: recipe checks, preflight,
fingerprints, metrics.jsonl, the numeric guard, summary.json, report.html. Its tokenized-data cache is off
(`ALIGN_CACHE_DIR=off`), so both sides tokenize; wandb is off on both. 3 alternating pairs, medians.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from _shared import REPO, align_cmd, save_small_model, timed, verdict, write_jsonl

PAIRS = 3
TRAIN = {"max_length": 160, "max_steps": 16, "per_device_train_batch_size": 16, "learning_rate": 5.0e-4,
         "warmup_steps": 5, "logging_steps": 4, "eval_steps": 8}  # fmt: skip


def main() -> int:
    from align.builtin import python_docs_instruct

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rows = python_docs_instruct()  # one list per column
        pairs = [{"prompt": p, "completion": c} for p, c in zip(rows["prompt"], rows["completion"], strict=True)]
        train_rows, valid_rows = pairs[64:], pairs[:64]
        train_file = write_jsonl(tmp / "train.jsonl", train_rows)
        valid_file = write_jsonl(tmp / "valid.jsonl", valid_rows)
        model_dir = save_small_model(tmp / "model", [r["prompt"] + r["completion"] for r in train_rows])
        recipe = {
            "name": "overhead", "seed": 42, "tracking": {"wandb": {"mode": "disabled"}},
            "stages": [{
                "name": "sft", "kind": "sft", "model": str(model_dir), "generations": 0,
                "data": {"source": {"files": {"train": [str(train_file)], "validation": [str(valid_file)]}},
                         "format": "prompt_completion", "splits": {"train": "train", "validation": "validation"}},
                "train": TRAIN | {"gradient_checkpointing": False},
            }],
        }  # fmt: skip
        recipe_path = tmp / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        baseline = [sys.executable, str(REPO / "benchmarks/baseline_trl_sft.py"), str(model_dir), str(train_file),
                    str(valid_file), str(tmp / "bare"), json.dumps(TRAIN)]  # fmt: skip

        bare_s, align_s, losses = [], [], []
        for i in range(PAIRS):
            # The order alternates (bare first, then align first, ...) so a drift of the machine hits both sides.
            for side in ("bare", "align") if i % 2 == 0 else ("align", "bare"):
                if side == "bare":
                    seconds, proc = timed(baseline, {"WANDB_MODE": "disabled"})
                    bare_s.append(seconds)
                    bare_loss = json.loads(proc.stdout.strip().splitlines()[-1])["eval_loss"]
                else:
                    seconds, _ = timed(align_cmd(recipe_path, tmp / "align"), {"ALIGN_CACHE_DIR": "off"})
                    align_s.append(seconds)
                    ours = json.loads((tmp / "align" / "sft" / "summary.json").read_text())["metrics"]["eval_loss"]
            losses.append((bare_loss, ours))
    ratio = statistics.median(align_s) / statistics.median(bare_s)
    same = all(abs(a - b) <= 1e-4 * abs(a) for a, b in losses)
    ok = ratio <= 1.05 and same
    print(
        f"overhead: align SFT {statistics.median(align_s):.1f} s vs bare TRL {statistics.median(bare_s):.1f} s = "
        f"{ratio:.3f}x whole process; final eval loss {'identical' if same else 'DIFFERENT'} "
        f"({losses[0][0]:.4f} vs {losses[0][1]:.4f}) (target <= 1.05x) {verdict(ok)}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
