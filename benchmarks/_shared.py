"""What the benchmarks share: timing a whole process, a small saved model, data written to JSONL, medians."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The quickstart's GPT-2 shape: small enough for 2 CPU cores, big enough that a step is real work.
SMALL_GPT2 = {"model_type": "gpt2", "vocab_size": 4096, "n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 256}


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of a whole process (imports included), and the process; a failure stops the benchmark."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{' '.join(cmd[:4])}... failed (exit {proc.returncode}):\n{tail}")
    return seconds, proc


def align_cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "align.run", str(recipe), "--output-dir", str(out), "--fresh", *extra]


def save_small_model(directory: Path, texts: list[str], spec: dict[str, Any] | None = None) -> Path:
    """A GPT-2 built from config, with a byte-level BPE tokenizer trained on `texts`, saved as a local model."""
    from transformers import AutoModelForCausalLM

    from align.models import ensure_chat_template, scratch_config, train_tokenizer
    from align.recipe import ScratchModel

    spec = spec or SMALL_GPT2
    tokenizer = train_tokenizer(texts, spec["vocab_size"])
    ensure_chat_template(tokenizer)  # saved with the model, so align and the baseline see the same tokenizer
    model = AutoModelForCausalLM.from_config(scratch_config(ScratchModel(**spec), "bench", vocab_size=len(tokenizer)))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def summary(run_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir / stage / "summary.json").read_text())


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"
