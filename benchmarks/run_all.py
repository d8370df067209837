"""Run every benchmark; one line each (`name: figure (target ...) ok|MISSED`); exit 0 only if all targets are met.

    python benchmarks/run_all.py

Each script alternates its baseline and align (or a first and a second run) and prints its own verdict; a
script that fails prints why. The GPU figures (bench_gpu.py) need a CUDA machine and are not run here.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "bench_startup.py",
    "bench_packing.py",
    "bench_overhead.py",
    "bench_grpo_overhead.py",
    "bench_dpo_reference.py",
    "bench_cache.py",
    "bench_quickstart.py",
]


def main() -> int:
    ok, started, spent = True, time.perf_counter(), []
    for script in SCRIPTS:
        script_started = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True)
        spent.append(f"{script.removeprefix('bench_').removesuffix('.py')} {time.perf_counter() - script_started:.0f}")
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        if lines:
            print(lines[-1], flush=True)
        else:
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{script}: no result (exit {proc.returncode}: {reason}) MISSED", flush=True)
        ok = ok and proc.returncode == 0
    total = time.perf_counter() - started
    within = total <= 600
    verdict = "ok" if within else "MISSED"
    print(f"all benchmarks: {total:.0f} s ({', '.join(spent)} s) (target <= 600 s on 2 cores) {verdict}")
    return 0 if ok and within else 1


if __name__ == "__main__":
    sys.exit(main())
