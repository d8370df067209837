"""The registry of stage kinds: one line per kind, the class that declares it (an `align.stages.base.Kind`, in a
module named for the kind). Everything else asks the registry about a kind and never names one.

Each entry point is `run(stage, ctx) -> StageResult`, `ctx` a read-only `align.context.StageContext`. From Python,
`align.pipeline.stage_context(recipe, "sft", Path("runs/x"))` builds the context a stage needs (the recipe planned as
a run would, the earlier stages' outputs from that run directory); then `run_sft(ctx.stage, ctx)` (likewise
`run_<kind>` for every kind below).

The modules are imported when first asked for (they import no heavy library at the top), so `import align.stages`
stays cheap.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

from align.errors import BadInput, closest

if TYPE_CHECKING:
    from align.stages.base import Kind

# One line per kind: its module and class (an `align.stages.base.Kind`).
METHODS = (
    "align.stages.lm:LM",
    "align.stages.sft:SFT",
    "align.stages.dpo:DPO",
    "align.stages.kto:KTO",
    "align.stages.orpo:ORPO",
    "align.stages.simpo:SimPO",
    "align.stages.rm:RM",
    "align.stages.grpo:GRPO",
    "align.stages.rloo:RLOO",
    "align.stages.distill:Distill",
    "align.stages.eval:Eval",
)
MODULES = tuple(entry.partition(":")[0] for entry in METHODS)

# Each module is named for its kind (tests/test_registry.py holds it), so help texts list the kinds without
# importing them.
NAMES = tuple(module.rsplit(".", 1)[1] for module in MODULES)


@functools.cache
def kinds() -> dict[str, Kind]:
    """Every registered kind by name, in the registry's order."""
    found = []
    for entry in METHODS:
        module, _, name = entry.partition(":")
        found.append(getattr(importlib.import_module(module), name)())
    return {kind.name: kind for kind in found}


def names() -> list[str]:
    return list(kinds())


def get(name: str) -> Kind:
    """The kind registered under `name`.

    Raises:
        BadInput: no kind of that name (the message lists the registered ones).
    """
    found = kinds().get(name)
    if found is None:
        guess = closest(str(name), names())
        also = f"did you mean '{guess}'? " if guess else ""
        raise BadInput(f"kind: unknown kind {name!r} ({also}kinds: {', '.join(names())})")
    return found


def makes(name: str | None, what: str) -> bool:
    """Whether the kind named `name` saves a model of this sort ("policy", "reward_model"); False for a name no
    kind has (a run made by another version of align)."""
    found = kinds().get(str(name))
    return found is not None and found.makes == what


def a_kind(name: str) -> str:
    """A kind's name with its article ("an sft", "a dpo"), for one that may not be registered."""
    found = kinds().get(str(name))
    return found.a_kind if found is not None else f"a {name}"


def making(what: str) -> list[str]:
    """The names of the kinds whose saved model is `what` ("policy": the ones that generate)."""
    return [kind.name for kind in kinds().values() if kind.makes == what]


def __getattr__(name: str) -> Any:
    entry = name.removeprefix("run_")
    if name.startswith("run_") and entry in kinds():
        return kinds()[entry].run
    raise AttributeError(f"module 'align.stages' has no attribute {name!r}")
