"""`kind: rloo` — online RL with TRL's RLOOTrainer: like grpo (what they share, align/stages/online_rl.py: the same
rewards, checks, alarms and held-out measure), with REINFORCE's leave-one-out baseline (each answer against the mean
of its group's others) and the KL to the reference as a reward penalty. TRL's defaults differ: beta 0.05 (so a
reference model) and 2 answers per prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from align.stages.base import Figure
from align.stages.common import run_stage
from align.stages.online_rl import OnlineKeys, OnlineKind, OnlineStage, online_plan

if TYPE_CHECKING:
    from align.context import StageContext
    from align.recipe import Stage
    from align.values import StageResult


class RLOOKeys(OnlineKeys):
    kind: Literal["rloo"]
    article = "an"


class RLOOStage(OnlineStage):
    trainer_name = "RLOOTrainer"


def run(stage: Stage, ctx: StageContext) -> StageResult:
    """Train a policy online with leave-one-out baselines; measure its held-out reward before and after; save."""
    return run_stage(stage, ctx, RLOOStage)


KIND = OnlineKind(
    name="rloo",
    keys=RLOOKeys,
    formats=("prompt_only",),
    run=run,
    about="online RL with leave-one-out baselines and a KL penalty in the reward (TRL's RLOO)",
    figures=(Figure("reward", "reward", False),),
    config="trl:RLOOConfig",
    plan_parts=online_plan(lambda: KIND.config_class()),
)
