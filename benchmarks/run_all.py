"""Run every benchmark; one line each (`name: figure (target ...) ok|MISSED`); exit 0 only if all targets are met.

    python benchmarks/run_all.py                 # also writes benchmarks/RESULTS.md
    python benchmarks/run_all.py --results FILE  # writes FILE instead

Each script alternates its baseline and align (or a first and a second run) and prints its own verdict; a
script that fails prints why. The GPU figures (bench_gpu.py) need a CUDA machine and are not run here.
RESULTS.md is the one place measured figures live: the README and the docs link to it, and each run replaces it
with its own figures, the date, the commit and the machine they were measured on.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
# The whole run on 2 idle cores: short enough to run every session. 600 s until grpo overhead measured a case with
# tools (5 rounds of two processes, about 170 s more: the run of 2026-12-07 took 658 s).
BUDGET = 720
LIBRARIES = ("torch", "transformers", "trl", "datasets", "peft", "accelerate")
SCRIPTS = [
    "bench_startup.py",
    "bench_packing.py",
    "bench_overhead.py",
    "bench_grpo_overhead.py",
    "bench_dpo_reference.py",
    "bench_cache.py",
    "bench_quickstart.py",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every benchmark and write the results file.")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write them (default: %(default)s)")
    args = parser.parse_args(argv)
    ok, started, spent, results = True, time.perf_counter(), [], []
    for script in SCRIPTS:
        script_started = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True)
        spent.append(f"{script.removeprefix('bench_').removesuffix('.py')} {time.perf_counter() - script_started:.0f}")
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        # A script's figures: each line that ends in its verdict (one script may measure several cases), else its last.
        found = [line for line in lines if line.rstrip().endswith((" ok", " MISSED"))] or lines[-1:]
        if not found:
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            found = [f"{script}: no result (exit {proc.returncode}: {reason}) MISSED"]
        results += found
        print("\n".join(found), flush=True)
        ok = ok and proc.returncode == 0
    total = time.perf_counter() - started
    within = total <= BUDGET
    verdict = "ok" if within else "MISSED"
    print(f"all benchmarks: {total:.0f} s ({', '.join(spent)} s) (target <= {BUDGET} s on 2 cores) {verdict}")
    args.results.write_text(results_page(results, total, ok and within))
    print(f"wrote {args.results}")
    return 0 if ok and within else 1


def results_page(lines: list[str], total_s: float, ok: bool, when: datetime.datetime | None = None) -> str:
    """RESULTS.md: each benchmark's line as a table row, with when, at which commit and on what it was measured."""
    when = when or datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for line in lines:
        name, _, rest = line.partition(":")
        figure, _, verdict = rest.strip().rpartition(" ")
        rows.append(f"| {name} | {figure.replace('|', '/')} | {verdict} |")
    return "\n".join(
        [
            "# Benchmark results",
            "",
            f"Written by `python benchmarks/run_all.py` on {when:%Y-%m-%d %H:%M} UTC at commit {commit()}: "
            f"{total_s:.0f} s, {'every target met' if ok else 'a target MISSED'}. What each benchmark compares is in "
            "benchmarks/README.md.",
            "",
            f"Machine: {machine()}.",
            "",
            "| benchmark | figure (target) | |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )


def commit() -> str:
    """The commit measured, and whether the work tree differed from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True)
    except OSError:
        return "unknown (no git)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def machine() -> str:
    import psutil

    gpus = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    versions = []
    for name in LIBRARIES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {memory:.0f} GiB, {gpus}; "
        f"Python {platform.python_version()}, {', '.join(versions)}"
    )


if __name__ == "__main__":
    sys.exit(main())
