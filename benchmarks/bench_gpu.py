"""On a CUDA GPU: bf16 vs fp16 vs fp32, the guard on a run that goes non-finite, and DPO's reference choices.

    python benchmarks/bench_gpu.py [--out results.json]

Not part of `run_all.py` (the 2-core machine has no GPU); run it where one is lent and copy the figures into
benchmarks/README.md. Every figure comes from align's own run directories (summary.json, metrics.jsonl):

1. `lm` on a GPT-2-small-sized model built from config (12 layers, 12 heads, 768 wide, 1024 positions, a
   byte-level BPE vocabulary trained on python-docs), blocks of 1024 tokens, batch 8, the same steps in fp32,
   fp16 and bf16 (`--set precision=...`): median tokens/s over the logged intervals after the first, peak GPU
   memory allocated, final eval loss. And what `precision: auto` chooses on this GPU.
2. The same model in fp16 with learning_rate=1e6: the run must stop with exit 1 and a summary naming a
   non-finite loss and its likely cause.
3. `dpo` on the same model size: a separate frozen reference vs LoRA (adapters off as the reference) vs
   `precompute_ref_log_probs` — peak GPU memory and wall time of training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GPT2_SMALL = {"model_type": "gpt2", "vocab_size": 8192, "n_layer": 12, "n_head": 12, "n_embd": 768,
              "n_positions": 1024}  # fmt: skip
LM_TRAIN = {"max_length": 1024, "per_device_train_batch_size": 8, "max_steps": 60, "learning_rate": 3.0e-4,
            "warmup_steps": 10, "logging_steps": 10, "eval_steps": 60, "gradient_checkpointing": False}  # fmt: skip
DPO_TRAIN = {"max_length": 512, "per_device_train_batch_size": 8, "max_steps": 20, "learning_rate": 5.0e-6,
             "logging_steps": 5, "eval_steps": 20, "gradient_checkpointing": False, "beta": 0.1}  # fmt: skip
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["c_attn", "c_proj", "c_fc"]}


def recipe(stage: dict) -> dict:
    return {"name": "gpu", "seed": 0, "precision": "auto", "tracking": {"wandb": {"mode": "disabled"}},
            "stages": [stage]}  # fmt: skip


ONLY: set[str] = set()


def run(tmp: Path, name: str, stage: dict, *sets: str) -> dict | None:
    if ONLY and name not in ONLY:
        return None
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe(stage), sort_keys=False))
    out = tmp / name
    cmd = [sys.executable, "-m", "align.run", str(path), "--output-dir", str(out)]
    for item in sets:
        cmd += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    summary_path = out / stage["name"] / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    rows = []
    metrics_path = out / stage["name"] / "metrics.jsonl"
    if metrics_path.is_file():
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    speeds = [r["tokens_per_s"] for r in rows if r.get("split") == "train" and "tokens_per_s" in r][1:]
    log = (out / "align.log").read_text() if (out / "align.log").is_file() else ""
    precision_line = next((line for line in log.splitlines() if "align.pipeline: precision " in line), "")
    metrics = summary.get("metrics") or {}
    result = {
        "name": name,
        "exit": proc.returncode,
        "wall_s": round(wall, 1),
        "status": summary.get("status"),
        "error": summary.get("error"),
        "tokens_per_s": round(statistics.median(speeds)) if speeds else None,
        "peak_memory_gb": metrics.get("peak_memory_gb"),
        "train_runtime_s": metrics.get("train_runtime_s"),
        "eval_loss": metrics.get("eval_loss"),
        "eval_loss_before": metrics.get("eval_loss_before"),
        "reference": summary.get("reference"),
        "precision_log": precision_line.split("align.pipeline: ")[-1] if precision_line else None,
        "stderr_tail": proc.stderr[-1500:] if proc.returncode not in (0, 1) else proc.stderr[-400:],
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default="", help="comma-separated run names (lm_fp16, dpo_lora, ...) to run alone")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, few steps, on the CPU: checks the script")
    options = parser.parse_args()

    import torch

    global GPT2_SMALL
    ONLY.update(filter(None, options.only.split(",")))
    precisions, guard_precision = ("auto", "fp32", "fp16", "bf16"), "fp16"
    if options.smoke:
        GPT2_SMALL = GPT2_SMALL | {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 128}
        LM_TRAIN.update(max_steps=20, max_length=128, logging_steps=5, eval_steps=20)
        DPO_TRAIN.update(max_steps=4, max_length=128, logging_steps=2, eval_steps=4)
        precisions, guard_precision = ("auto", "fp32"), "fp32"
    elif not torch.cuda.is_available():
        print("gpu: skipped (no CUDA GPU on this machine)")
        return 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, torch {torch.__version__}", flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        lm = {"name": "lm", "kind": "lm", "model": GPT2_SMALL, "data": {"card": "python-docs"}, "train": LM_TRAIN}
        for precision in precisions:
            results.append(run(tmp, f"lm_{precision}", lm, f"precision={precision}"))
        results.append(
            run(
                tmp,
                f"lm_{guard_precision}_lr1e6",
                lm,
                f"precision={guard_precision}",
                "stages.lm.train.learning_rate=1e6",
            )
        )

        dpo = {"name": "dpo", "kind": "dpo", "model": GPT2_SMALL, "generations": 0,
               "data": {"card": "python-docs-preferences"}, "train": DPO_TRAIN}  # fmt: skip
        results.append(run(tmp, "dpo_copy", dpo))
        results.append(run(tmp, "dpo_lora", dpo | {"peft": LORA}))
        results.append(run(tmp, "dpo_precompute", dpo, "stages.dpo.train.precompute_ref_log_probs=true"))
    if options.out:
        Path(options.out).write_text(json.dumps({"device": device, "results": [r for r in results if r]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
