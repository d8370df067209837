"""`kind: grpo` — online RL with TRL's GRPOTrainer: the policy answers each training prompt several times, reward
functions score the answers, and each answer is pushed up or down by how it scored against its group.

Data: `prompt_only` rows (a string or a message list); every other column reaches the reward functions. Rewards:
`rewards:` entries (align/rewards.py), each with its `weight` (TRL's `reward_weights`, which a recipe may not set
beside them). Every function is imported and called on two held-out rows before anything trains; one that raises
or returns a non-finite value during training stops the stage naming it and the step (its last checkpoint resumes).
What grpo shares with rloo (keys, measure, alarms, plan) is in align/stages/online_rl.py.
"""

from __future__ import annotations

from typing import Literal

from align.stages.online_rl import OnlineKeys, OnlineKind


class GRPOKeys(OnlineKeys):
    kind: Literal["grpo"]


class GRPO(OnlineKind):
    name = "grpo"
    keys = GRPOKeys
    about = "online RL: several answers per prompt scored by reward functions, each against its group (TRL's GRPO)"
    key_settings = ("beta", "loss_type", "num_generations", "max_completion_length", "temperature", "scale_rewards")
    config = "trl:GRPOConfig"
    trainer_class = "trl:GRPOTrainer"
