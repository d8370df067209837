"""Stage entry points: each is `run(stage, ctx) -> StageResult`.

Imported lazily so `import align.stages` stays cheap; `from align.stages import run_lm` works as usual.
"""

from __future__ import annotations

from typing import Any

_ENTRY_POINTS = {"run_lm": "align.stages.lm", "run_sft": "align.stages.sft", "run_dpo": "align.stages.dpo"}

__all__ = list(_ENTRY_POINTS)


def __getattr__(name: str) -> Any:
    if name in _ENTRY_POINTS:
        import importlib

        return importlib.import_module(_ENTRY_POINTS[name]).run
    raise AttributeError(f"module 'align.stages' has no attribute {name!r}")
