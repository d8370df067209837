"""Quickstart: the whole offline lm -> sft -> dpo chain, wall time of the command, target <= 300 s on 2 cores.

An absolute target (there is no other tool to run the same chain against): one run, --fresh, in a temporary
directory, tracking as the recipe says (wandb offline). Also checks the DPO figures the quickstart promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "align.run", str(REPO / "recipes/quickstart.yaml"), "--output-dir", f"{out}/run"],
            capture_output=True, text=True, cwd=REPO,
            env={**os.environ, "ALIGN_CACHE_DIR": str(Path(out) / "cache")},  # cold: a user's first run
        )  # fmt: skip
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            print(f"quickstart: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1]} MISSED")
            return 1
        run = Path(out) / "run"  # the cache beside it, not in it: a run directory holds only the run
        names = ("lm", "sft", "rm", "dpo", "eval")
        summaries = {stage: json.loads((run / stage / "summary.json").read_text()) for stage in names}
    dpo, rm = summaries["dpo"]["metrics"], summaries["rm"]["metrics"]
    evaluated = summaries["eval"]["metrics"]["models"]["dpo"]
    figures = dpo["pref_accuracy"] >= 0.8 and dpo["pref_accuracy"] > dpo["pref_accuracy_before"]
    figures = figures and dpo["reward_accuracy"] >= 0.8 and rm["accuracy"] >= 0.9
    ok = seconds <= 300 and figures
    stages = ", ".join(f"{name} {s['wall_time_s']:.0f}" for name, s in summaries.items())
    low, high = evaluated["win_rate_ci"]
    print(
        f"quickstart: {seconds:.0f} s ({stages} s) (target <= 300 s); dpo pref_accuracy "
        f"{dpo['pref_accuracy_before']:.3f} -> {dpo['pref_accuracy']:.3f}, reward_accuracy "
        f"{dpo['reward_accuracy']:.3f} (targets >= 0.8); rm accuracy {rm['accuracy_before']:.3f} -> "
        f"{rm['accuracy']:.3f} (target >= 0.9); eval: dpo "
        f"vs sft win rate {evaluated['win_rate']:.2f} [{low:.2f}, {high:.2f}], LC {evaluated['lc_win_rate']:.2f}, "
        f"{evaluated['verdict']['status']} (reported) {'ok' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
