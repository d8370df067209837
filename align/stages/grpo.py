"""`kind: grpo` — online RL with TRL's GRPOTrainer: the policy answers each training prompt several times, reward
functions score the answers, and each answer is pushed up or down by how it scored against its group.

Data: `prompt_only` rows (a string or a message list); every other column reaches the reward functions. Rewards:
`rewards:` entries (align/rewards.py), each with its `weight` (TRL's `reward_weights`, which a recipe may not set
beside them). Every function is imported and called on two held-out rows before anything trains; one that raises
or returns a non-finite value during training stops the stage naming it and the step (its last checkpoint resumes).
What grpo shares with rloo (keys, measure, alarms, plan) is in align/stages/online_rl.py.
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


class GRPOKeys(OnlineKeys):
    kind: Literal["grpo"]


class GRPOStage(OnlineStage):
    trainer_name = "GRPOTrainer"


def run(stage: Stage, ctx: StageContext) -> StageResult:
    """Train a policy online against its reward functions; measure its held-out reward before and after; save."""
    return run_stage(stage, ctx, GRPOStage)


KIND = OnlineKind(
    name="grpo",
    keys=GRPOKeys,
    formats=("prompt_only",),
    run=run,
    about="online RL: several answers per prompt scored by reward functions, each against its group (TRL's GRPO)",
    figures=(Figure("reward", "reward", False),),
    config="trl:GRPOConfig",
    plan_parts=online_plan(lambda: KIND.config_class()),
)
