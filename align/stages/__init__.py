"""Stage entry points: each is `run(stage, ctx) -> StageResult`, `ctx` a read-only `align.context.StageContext`.

From Python, `align.pipeline.stage_context(recipe, "sft", Path("runs/x"))` builds the context a stage needs (the
recipe planned as a run would, the earlier stages' outputs from that run directory); then `run_sft(ctx.stage, ctx)`
(likewise `run_lm`, `run_dpo`, `run_rm` and `run_eval`).
Imported lazily so `import align.stages` stays cheap; `from align.stages import run_lm` works as usual.
"""

from __future__ import annotations

from typing import Any

_ENTRY_POINTS = {f"run_{kind}": f"align.stages.{kind}" for kind in ("lm", "sft", "dpo", "rm", "eval")}

__all__ = list(_ENTRY_POINTS)


def __getattr__(name: str) -> Any:
    if name in _ENTRY_POINTS:
        import importlib

        return importlib.import_module(_ENTRY_POINTS[name]).run
    raise AttributeError(f"module 'align.stages' has no attribute {name!r}")
