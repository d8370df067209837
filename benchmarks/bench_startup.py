"""Start-up: `python -m align.run --help` must answer in under 1 s (no heavy imports before they are needed).

Baseline in the same run: a bare `python -c pass`, so the figure shows what align itself adds.
Prints one line: `startup: <seconds> s (target < 1 s, python alone <seconds> s) ok|MISSED`.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

PAIRS = 5


def wall(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    align_times, bare_times = [], []
    for _ in range(PAIRS):  # alternate, so drift on the machine hits both alike
        bare_times.append(wall([sys.executable, "-c", "pass"]))
        align_times.append(wall([sys.executable, "-m", "align.run", "--help"]))
    figure, bare = statistics.median(align_times), statistics.median(bare_times)
    ok = figure < 1.0
    print(f"startup: {figure:.2f} s (target < 1 s, python alone {bare:.2f} s) {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
