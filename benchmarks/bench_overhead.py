"""Overhead: align's SFT stage against bare TRL SFTTrainer on identical work; whole-process wall ratio <= 1.05.

Same saved model (the quickstart's GPT-2 shape), same prompt/completion rows (python-docs-instruct written to
JSONL), same `train:` settings, seed, evaluation before and after, and a saved model at the end. align runs the
one-stage recipe as a user would (`python -m align.run`), with everything it adds: recipe checks, preflight,
fingerprints, metrics.jsonl, the numeric guard, summary.json, report.html. Its tokenized-data cache is off
(`ALIGN_CACHE_DIR=off`), so both sides tokenize; wandb is off on both.

align is run twice per round: as shipped (on a CPU its LM head computes plain logits, align/lm_head.py), and
with TRL's own chunked LM head (`ALIGN_LM_HEAD=trl`), the very computation bare TRL runs, so that second ratio is
what align's checks, bookkeeping and report alone cost. 3 rounds in rotating order, medians; the target applies
to align as shipped.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from _shared import REPO, align_cmd, save_small_model, summary, timed, verdict, write_jsonl

PAIRS = 3
TRAIN = {"max_length": 160, "max_steps": 16, "per_device_train_batch_size": 16, "learning_rate": 5.0e-4,
         "warmup_steps": 5, "logging_steps": 4, "eval_steps": 8}  # fmt: skip


def main() -> int:
    from align.builtin import python_docs_instruct

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rows = python_docs_instruct()  # one list per column
        pairs = [{"prompt": p, "completion": c} for p, c in zip(rows["prompt"], rows["completion"], strict=True)]
        train_rows, valid_rows = pairs[64:], pairs[:32]  # 32 rows held out: 4 evaluations a run stay cheap
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

        # align as a user runs it; and with TRL's own chunked LM head (`ALIGN_LM_HEAD=trl`), the very computation
        # bare TRL runs, so that ratio is what align's checks, bookkeeping and report alone cost.
        sides = {
            "bare": (baseline, {"WANDB_MODE": "disabled"}),
            "align": (align_cmd(recipe_path, tmp / "align"), {"ALIGN_CACHE_DIR": "off"}),
            "align_trl_head": (
                align_cmd(recipe_path, tmp / "align"),
                {"ALIGN_CACHE_DIR": "off", "ALIGN_LM_HEAD": "trl"},
            ),
        }
        seconds: dict[str, list[float]] = {side: [] for side in sides}
        losses: dict[str, float] = {}
        for i in range(PAIRS):
            # The order rotates (bare first, then align first, ...) so a drift of the machine hits every side.
            for side in list(sides)[i:] + list(sides)[:i]:
                cmd, env = sides[side]
                wall, proc = timed(cmd, env)
                seconds[side].append(wall)
                if side == "bare":
                    losses[side] = json.loads(proc.stdout.strip().splitlines()[-1])["eval_loss"]
                else:
                    # The bare script's figure is the Trainer's: beside align's token mean, `eval_loss_trainer`.
                    losses[side] = summary(tmp / "align", "sft")["metrics"]["eval_loss_trainer"]
    median = {side: statistics.median(values) for side, values in seconds.items()}
    ratio, like_for_like = median["align"] / median["bare"], median["align_trl_head"] / median["bare"]
    # Equal to the Trainer's last printed digits: the baseline keeps its evaluation before training out of the random
    # numbers training draws, as align does (before that, 8.7e-4 apart: other dropout masks).
    same = all(abs(loss - losses["bare"]) <= 1e-5 for loss in losses.values())
    ok = ratio <= 1.05 and same
    spread = {side: f"{min(values):.1f}-{max(values):.1f}" for side, values in seconds.items()}
    print(
        f"overhead: align SFT {median['align']:.1f} s ({spread['align']}) vs bare TRL {median['bare']:.1f} s "
        f"({spread['bare']}) = {ratio:.3f}x whole process; with TRL's LM head {median['align_trl_head']:.1f} s "
        f"({spread['align_trl_head']}) = {like_for_like:.3f}x; final eval loss "
        f"{'identical' if same else 'DIFFERENT'} ({losses['bare']:.5f} bare, {losses['align']:.5f}, "
        f"{losses['align_trl_head']:.5f}) (target <= 1.05x) {verdict(ok)}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
