"""The benchmarks' fork helper (benchmarks/_shared.py): a forked run's result comes back, a failed one stops the
benchmark with its log's tail, and the parent's environment is untouched by what a child sets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from _shared import forked  # noqa: E402


def test_a_forked_child_returns_its_result_and_leaves_the_parent_alone(tmp_path):
    def work() -> dict:
        os.environ["ALIGN_BENCH_CHILD"] = "set in the child"
        print("the child's output goes to its log")
        return {"pid": os.getpid(), "value": 42}

    seconds, result = forked(work, tmp_path / "child.log")
    assert result["value"] == 42 and result["pid"] != os.getpid()
    assert seconds >= 0
    assert "ALIGN_BENCH_CHILD" not in os.environ
    assert "the child's output goes to its log" in (tmp_path / "child.log").read_text()


def test_a_failed_child_stops_the_benchmark_with_its_log(tmp_path):
    def work() -> dict:
        raise ValueError("the run broke at step 3")

    with pytest.raises(SystemExit, match="the run broke at step 3"):
        forked(work, tmp_path / "child.log")
