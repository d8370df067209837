"""`kind: rloo` — online RL with TRL's RLOOTrainer: like grpo (what they share, align/stages/online_rl.py: the same
rewards, checks, alarms and held-out measure), with REINFORCE's leave-one-out baseline (each answer against the mean
of its group's others) and the KL to the reference as a reward penalty. TRL's defaults differ: beta 0.05 (so a
reference model) and 2 answers per prompt.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from align.recipe import Stage
from align.stages.online_rl import OnlineKeys, OnlineKind


class RLOOKeys(OnlineKeys):
    kind: Literal["rloo"]
    article: ClassVar[str] = "an"

    def problems(self, earlier: list[Stage]) -> list[str]:
        problems = super().problems(earlier)
        for key in ("tools", "environment"):
            if getattr(self, key):
                problems.append(f"stages.{self.name}.{key}: TRL's RLOOTrainer takes no {key.rstrip('s')}s (its "
                                "GRPOTrainer does): use kind: grpo for a policy that calls tools")  # fmt: skip
        return problems


class RLOO(OnlineKind):
    name = "rloo"
    keys = RLOOKeys
    about = "online RL with leave-one-out baselines and a KL penalty in the reward (TRL's RLOO)"
    key_settings = ("beta", "num_generations", "max_completion_length", "temperature")
    config = "trl:RLOOConfig"
    trainer_class = "trl:RLOOTrainer"
