"""What an eval stage measures: answers generated in batches, their statistics, judges' scores, pairwise win rates.

A library of plain functions, no stage logic: `kind: eval` (and `kind: rm`, for its held-out scores) call them.

- `generate_batched`: answers per prompt x sample, left-padded batches, deterministic for a seed.
- `answer_statistics` (`mean_length`, `repetition`, `distinct_n`, `eos_rate`): what the answers look like.
- `rouge_l_f1` (reference judge) and `reward_model_scores` (a sequence-classification model as judge).
- `compare_pairwise`: win rate against a baseline, its bootstrap interval, and the length-controlled win rate.
- `loading` (`load_on_device`, `load_policy`, `render_prompt`): a model to evaluate, on the run's device, and its
  prompts as it saw them in training.
- `verdicts` (`model_verdict`, `eval_verdict`, `ranked_models`): each model against the baseline; the eval's verdict.
- `progress`: each model's answers, kept as they are made, which a stopped eval goes on from.

Heavy libraries (torch, transformers, rouge-score) are imported inside the functions that need them.
"""

from __future__ import annotations

from align.evaluation.generation import Answer, generate_batched
from align.evaluation.judges import reward_model_scores, rouge_l_f1
from align.evaluation.pairwise import PairwiseResult, compare_pairwise, length_controlled_win_rate, per_prompt_wins
from align.evaluation.statistics import answer_statistics, distinct_n, eos_rate, mean_length, repetition

__all__ = [
    "Answer",
    "PairwiseResult",
    "answer_statistics",
    "compare_pairwise",
    "distinct_n",
    "eos_rate",
    "generate_batched",
    "length_controlled_win_rate",
    "mean_length",
    "per_prompt_wins",
    "repetition",
    "reward_model_scores",
    "rouge_l_f1",
]
