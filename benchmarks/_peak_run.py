"""Run `python -m align.run ARGS` in this process and print the memory the run added to the loaded libraries.

    python benchmarks/_peak_run.py RECIPE --output-dir DIR ...

The libraries every DPO run loads are imported first; their resident memory is the baseline. The figure is
the process's peak resident memory (Linux `ru_maxrss`) minus that baseline: what the run itself took.
"""

from __future__ import annotations

import json
import resource
import sys


def rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**30


def main() -> int:
    import datasets  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import trl  # noqa: F401

    import align.pipeline  # noqa: F401
    import align.stages.dpo  # noqa: F401
    from align.run import main as align_main

    base = rss_gb()
    code = align_main(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"exit": code, "base_gb": base, "peak_gb": peak, "added_gb": peak - base}))
    return code


if __name__ == "__main__":
    sys.exit(main())
