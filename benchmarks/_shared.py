"""What the benchmarks share: timing a whole process, runs forked from a preloaded process, a small saved model,
data written to JSONL, medians."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The quickstart's GPT-2 shape: small enough for 2 CPU cores, big enough that a step is real work.
SMALL_GPT2 = {"model_type": "gpt2", "vocab_size": 4096, "n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 256}


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of a whole process (imports included), and the process; a failure stops the benchmark."""
    # Bytecode caching on, as in any installed environment (a shell with PYTHONDONTWRITEBYTECODE set would make
    # every run recompile align's own modules, a cost bare TRL, whose .pyc files came with its wheel, never pays).
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | (env or {})
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=full_env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{' '.join(cmd[:4])}... failed (exit {proc.returncode}):\n{tail}")
    return seconds, proc


def preload() -> None:
    """Import, once, what every align run imports, so that `forked` runs start from here (no ~7 s of imports each).

    Imports only: no torch operation runs in this process, since a child forked after one may hang in OpenMP."""
    import datasets  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import peft  # noqa: F401
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: F401  (TRL imports these lazily)

    import align.pipeline  # noqa: F401
    import align.report  # noqa: F401
    import align.stages.dpo  # noqa: F401
    import align.stages.sft  # noqa: F401


def forked(work: Callable[[], dict[str, Any]], log: Path) -> tuple[float, dict[str, Any]]:
    """Run `work` in a forked child of this (preloaded) process, its output going to `log`: wall seconds and what
    `work` returned. A child that fails stops the benchmark with its log's tail."""
    read_end, write_end = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 1
        try:
            os.close(read_end)
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            # Python's own streams too: they may not be file descriptors 1 and 2 (pytest replaces them)
            sys.stdout = sys.stderr = os.fdopen(out, "w", buffering=1)
            result = work()
            os.write(write_end, json.dumps(result).encode())
            status = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - started
    if status != 0 or not payload:
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
        raise SystemExit(f"forked run failed (status {status}):\n{tail}")
    return seconds, json.loads(payload)


def align_run(recipe: Path, out: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`python -m align.run RECIPE --output-dir OUT --fresh` in this process, for `forked` (a failed run stops
    the benchmark): the resident memory the run added to the loaded libraries (peak after a reset at its start,
    minus the memory held at its start)."""
    import datasets

    from align.metrics import peak_memory_gb, reset_peak_memory
    from align.run import main

    os.environ.update(env or {})
    if env and "HF_DATASETS_CACHE" in env:
        datasets.config.HF_DATASETS_CACHE = Path(env["HF_DATASETS_CACHE"])  # read at import, so set it here
    reset_peak_memory()
    base = peak_memory_gb()
    code = main(align_args(recipe, out))
    if code != 0:
        raise SystemExit(f"align.run exited {code}")
    peak = peak_memory_gb()
    return {"base_gb": base, "peak_gb": peak, "added_gb": peak - base}


def align_args(recipe: Path, out: Path) -> list[str]:
    return [str(recipe), "--output-dir", str(out), "--fresh"]


def align_cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "align.run", *align_args(recipe, out)]


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
