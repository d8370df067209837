"""A candidate model against a baseline, prompt by prompt, from a judge's score of every answer.

- Per prompt: win 1, tie 0.5, loss 0; with several samples per prompt, the mean over every candidate x baseline
  sample pair.
- `win_rate`: the mean over prompts. `win_rate_ci`: a 95% percentile bootstrap interval, resampling prompts.
- `lc_win_rate`: the length-controlled win rate of AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled AlpacaEval:
  A Simple Way to Debias Automatic Evaluators"): what the win rate would be if both answers had the same length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Scores this close count as a tie: one answer scored in two batches can differ in the last float bits.
TIE_TOLERANCE = 1e-6
# The ridge penalty of the length-controlled fit (on both coefficients, the per-prompt wins summed, not averaged):
# far too weak to move a fit that has an answer, it keeps the coefficients finite where the data have none
# (every prompt won or lost, or wins perfectly separated by length).
LC_PENALTY = 1e-3


@dataclass(frozen=True)
class PairwiseResult:
    """A candidate against a baseline over the same prompts.

    Attributes:
        prompts: the number of prompts compared.
        win_rate: the mean per-prompt win (win 1, tie 0.5, loss 0): 0.5 is a draw, above favours the candidate.
        win_rate_ci: the 95% percentile bootstrap interval of `win_rate`, prompts resampled with replacement.
        lc_win_rate: the win rate the length-controlled fit predicts at zero length difference.
        length_coefficient: that fit's slope on the normalized length difference (log-odds of a win per unit of
            tanh(difference / scale)); positive when the longer answer tends to win, i.e. the judge favours length.
        wins: the per-prompt wins, in the prompts' order.
    """

    prompts: int
    win_rate: float
    win_rate_ci: tuple[float, float]
    lc_win_rate: float
    length_coefficient: float
    wins: list[float] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """The eval summary's figures: `win_rate`, `win_rate_ci` ([low, high]) and `lc_win_rate`."""
        return {"win_rate": self.win_rate, "win_rate_ci": list(self.win_rate_ci), "lc_win_rate": self.lc_win_rate}


def per_prompt_wins(
    candidate_scores: Sequence[Sequence[float]],
    baseline_scores: Sequence[Sequence[float]],
    *,
    tie_tolerance: float = TIE_TOLERANCE,
) -> np.ndarray:
    """The candidate's win on each prompt, in [0, 1]: over every pair of one candidate and one baseline sample, the
    mean of 1 (candidate scores higher), 0.5 (within `tie_tolerance`) or 0 (lower).

    Raises:
        ValueError: the two sides have different numbers of prompts, or a prompt without a score.
    """
    if len(candidate_scores) != len(baseline_scores):
        raise ValueError(
            f"{len(candidate_scores)} prompts for the candidate but {len(baseline_scores)} for the baseline"
        )
    wins = np.empty(len(candidate_scores))
    for i, (cand, base) in enumerate(zip(candidate_scores, baseline_scores, strict=True)):
        if len(cand) == 0 or len(base) == 0:
            raise ValueError(f"prompt {i} has no score for the {'candidate' if len(cand) == 0 else 'baseline'}")
        diff = np.asarray(cand, dtype=float)[:, None] - np.asarray(base, dtype=float)[None, :]
        wins[i] = np.where(np.abs(diff) <= tie_tolerance, 0.5, (diff > 0).astype(float)).mean()
    return wins


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean (Efron & Tibshirani 1993, ch. 13): `resamples` resamples of the
    values with replacement, the interval between the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of
    their means. Seeded: the same values give the same interval.

    Raises:
        ValueError: no values.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("a bootstrap interval needs at least one value")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def length_controlled_win_rate(
    wins: Sequence[float], length_difference: Sequence[float], *, penalty: float = LC_PENALTY
) -> tuple[float, float]:
    """The length-controlled win rate, as AlpacaEval 2 computes it, and the fit's length coefficient.

    A logistic regression of the per-prompt win (a probability in [0, 1]: ties and sample averages are soft
    targets) on the normalized length difference, `tanh(d / sd(d))`, with `d` = candidate length - baseline length
    per prompt. AlpacaEval 2 uses this very feature (Dubois et al. 2024): the scale makes the fit unit-free, tanh
    bounds the pull of a few very long answers. `d` is divided by its standard deviation but NOT centred: zero must
    stay "the same length", where the LC win rate is read (sigmoid of the intercept). AlpacaEval's fit also has a
    per-instruction difficulty term; with one candidate and one baseline it drops out.

    Fitted by Newton's method (IRLS) with a weak ridge penalty (`penalty`, see LC_PENALTY) so that it stays finite
    where the data give no finite answer. Cases with nothing to fit are answered directly:
    - every prompt the same win (all won, all lost, all tied): that win, and coefficient 0;
    - no length difference varies (sd 0): the raw win rate, and coefficient 0.
    The fit can only extrapolate to zero difference from differences it has seen: when every candidate answer is
    much longer than its baseline, the LC win rate rests on the logistic shape alone.

    Returns:
        (lc_win_rate, length_coefficient).

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    y = np.asarray(wins, dtype=float)
    d = np.asarray(length_difference, dtype=float)
    if y.shape != d.shape or y.size == 0:
        raise ValueError(f"{y.size} wins and {d.size} length differences: need as many, at least one")
    if np.ptp(y) == 0:
        return float(y[0]), 0.0
    scale = d.std(ddof=1) if d.size > 1 else 0.0
    if scale == 0:
        return float(y.mean()), 0.0
    x = np.column_stack([np.ones_like(d), np.tanh(d / scale)])

    def objective(beta: np.ndarray) -> float:
        z = x @ beta
        # -log-likelihood of soft targets, written stably: log(1 + e^z) - y z.
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * penalty * beta @ beta)

    beta = np.zeros(2)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))
        gradient = x.T @ (p - y) + penalty * beta
        hessian = (x * (p * (1 - p))[:, None]).T @ x + penalty * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        # Step halving keeps each Newton step downhill where a nearly separable fit overshoots.
        size, current = 1.0, objective(beta)
        while objective(beta - size * step) > current and size > 1e-6:
            size /= 2
        beta = beta - size * step
        if np.max(np.abs(size * step)) < 1e-10:
            break
    return float(1.0 / (1.0 + np.exp(-beta[0]))), float(beta[1])


def compare_pairwise(
    candidate_scores: Sequence[Sequence[float]],
    baseline_scores: Sequence[Sequence[float]],
    candidate_lengths: Sequence[Sequence[float]],
    baseline_lengths: Sequence[Sequence[float]],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    tie_tolerance: float = TIE_TOLERANCE,
) -> PairwiseResult:
    """The candidate against the baseline: win rate, its bootstrap interval and the length-controlled win rate.

    Args:
        candidate_scores: per prompt, a judge's score of each of the candidate's samples (higher is better).
        baseline_scores: the same for the baseline, on the same prompts in the same order.
        candidate_lengths: per prompt, each candidate sample's length (tokens); the LC fit uses the per-prompt
            mean difference.
        baseline_lengths: the same for the baseline.
        resamples: bootstrap resamples of the prompts.
        confidence: the interval's coverage.
        seed: seeds the bootstrap.
        tie_tolerance: scores this close count as a tie.

    Raises:
        ValueError: the four lists do not cover the same prompts, or a prompt has no sample.
    """
    wins = per_prompt_wins(candidate_scores, baseline_scores, tie_tolerance=tie_tolerance)
    if not len(candidate_lengths) == len(baseline_lengths) == wins.size:
        raise ValueError(
            f"lengths for {len(candidate_lengths)} and {len(baseline_lengths)} prompts, scores for {wins.size}"
        )
    if any(len(c) == 0 or len(b) == 0 for c, b in zip(candidate_lengths, baseline_lengths, strict=True)):
        raise ValueError("every prompt needs at least one answer length on each side")
    difference = [np.mean(c) - np.mean(b) for c, b in zip(candidate_lengths, baseline_lengths, strict=True)]
    lc_win_rate, coefficient = length_controlled_win_rate(wins, difference)
    return PairwiseResult(
        prompts=int(wins.size),
        win_rate=float(wins.mean()),
        win_rate_ci=bootstrap_interval(wins, resamples=resamples, confidence=confidence, seed=seed),
        lc_win_rate=lc_win_rate,
        length_coefficient=coefficient,
        wins=wins.tolist(),
    )
