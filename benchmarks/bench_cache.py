"""Preprocessing cache: time to the first training step on a second run >= 3x shorter than on the first.

One SFT stage on 10,000 prompt/completion rows (python-docs-instruct, repeated with numbered prompts, written
to JSONL) and the quickstart-shaped model saved locally. Each pair: a first run with empty caches (align's
tokenized-data cache and datasets' file cache, both in fresh folders), then the same command again into a
fresh output directory (so the stage trains again rather than being skipped as `cached`). 3 pairs, medians.

"Time to first step" is summary.json's `time_to_first_step_s`: from the stage's start (model loading) to the
end of its first optimizer step, so it holds the tokenization, the step-0 evaluation and one step. Each run is
forked from one process that imported the libraries once (`_shared.forked`); the run's whole wall time (the
other fixed costs, which no cache removes, included; the ~7 s of imports not) is reported beside it.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

import yaml
from _shared import align_run, forked, preload, save_small_model, summary, verdict, write_jsonl

PAIRS, ROWS = 3, 10_000
TRAIN = {"max_length": 160, "max_steps": 2, "per_device_train_batch_size": 16, "logging_steps": 1, "eval_steps": 2,
         "gradient_checkpointing": False}  # fmt: skip


def main() -> int:
    from align.builtin import python_docs_instruct

    preload()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        docs = python_docs_instruct()
        pairs = list(zip(docs["prompt"], docs["completion"], strict=True))
        rows = [{"prompt": f"{i}. {p}", "completion": c} for i, (p, c) in
                ((i, pairs[i % len(pairs)]) for i in range(ROWS))]  # fmt: skip
        train_file = write_jsonl(tmp / "train.jsonl", rows)
        valid_file = write_jsonl(tmp / "valid.jsonl", [{"prompt": p, "completion": c} for p, c in pairs[:32]])
        texts = [p + c for p, c in pairs]
        # built in a child too: this process runs no torch operation before it forks (see `preload`)
        _, built = forked(lambda: {"model": str(save_small_model(tmp / "model", texts))}, tmp / "model.log")
        model_dir = built["model"]
        recipe = {
            "name": "cache", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}},
            "stages": [{
                "name": "sft", "kind": "sft", "model": str(model_dir), "generations": 0, "train": TRAIN,
                "data": {"source": {"files": {"train": [str(train_file)], "validation": [str(valid_file)]}},
                         "format": "prompt_completion", "splits": {"train": "train", "validation": "validation"}},
            }],
        }  # fmt: skip
        path = tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        first, second, first_wall, second_wall = [], [], [], []
        for i in range(PAIRS):
            env = {"ALIGN_CACHE_DIR": str(tmp / f"cache{i}"), "HF_DATASETS_CACHE": str(tmp / f"hf{i}")}
            seconds, _ = forked(partial(align_run, path, tmp / "first", env), tmp / "first.log")
            first.append(summary(tmp / "first", "sft")["metrics"]["time_to_first_step_s"])
            first_wall.append(seconds)
            seconds, _ = forked(partial(align_run, path, tmp / "second", env), tmp / "second.log")
            second.append(summary(tmp / "second", "sft")["metrics"]["time_to_first_step_s"])
            second_wall.append(seconds)
            hit = "tokenized data from the cache" in (tmp / "second" / "align.log").read_text()
            if not hit:
                raise SystemExit("the second run did not use the cache")
    ratio = statistics.median(first) / statistics.median(second)
    wall = statistics.median(first_wall) / statistics.median(second_wall)
    ok = ratio >= 3.0
    print(
        f"preprocessing_cache: time to first step {statistics.median(first):.1f} s first run vs "
        f"{statistics.median(second):.1f} s second = {ratio:.1f}x ({ROWS} rows; whole run "
        f"without imports {statistics.median(first_wall):.1f} s vs {statistics.median(second_wall):.1f} s = "
        f"{wall:.2f}x) "
        f"(target >= 3x) {verdict(ok)}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
