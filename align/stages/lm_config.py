"""`LMConfig`: the training arguments of an `lm` stage — transformers' `TrainingArguments` plus the block length.

The LM stage trains with transformers' `Trainer` (the `run_clm` recipe) rather than TRL's `SFTTrainer`: on
plain text blocks there is nothing for SFT's machinery to do, and its fused LM head, which saves memory on
large vocabularies, made small-model training 2.3x slower on the CPU (measured here: 20 steps, 16.3 s vs 7.2 s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class LMConfig(TrainingArguments):
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Block length: text is joined and cut into blocks of this many tokens (capped at the "
            "model's positions)."
        },  # fmt: skip
    )
