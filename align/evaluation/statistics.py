"""What answers look like, judge-free: length, repetition, diversity, and how often they end on their own.

These catch the failures a tiny DPO run really produces (answers that loop, stutter or never stop) without any
judge. n-gram figures are counted on the model's tokens, not on words: a loop inside one "word" (a run of dashes,
`----------`) is a loop of tokens, and whitespace would hide it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

from align.evaluation.generation import Answer


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    """The n-grams of a sequence, in order (none when it is shorter than n)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repetition(sequences: Iterable[Sequence[Hashable]], n: int = 4) -> float:
    """The share of repeated n-grams: per answer, 1 - distinct n-grams / n-grams; the mean over answers.

    This is seq-rep-n of Welleck et al. 2020, "Neural Text Degeneration with Unlikelihood Training" (n = 4 there
    and here). 0 means no n-gram occurs twice in an answer; an answer that repeats one phrase approaches 1.
    Answers shorter than n tokens hold no n-gram and are left out of the mean; with none left it is 0.0.
    """
    shares = []
    for tokens in sequences:
        grams = ngrams(tokens, n)
        if grams:
            shares.append(1.0 - len(set(grams)) / len(grams))
    return sum(shares) / len(shares) if shares else 0.0


def distinct_n(sequences: Iterable[Sequence[Hashable]], n: int = 2) -> float:
    """Distinct-n: the number of distinct n-grams over the number of n-grams, all answers pooled.

    Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models" (distinct-1 and
    distinct-2). 1 means no n-gram ever repeats across the answers; a model that says the same thing to every
    prompt scores low. The figure falls as the answers grow longer or more numerous, so compare models on the
    same prompts and generation settings only. With no n-gram at all it is 0.0.
    """
    seen: set[tuple[Hashable, ...]] = set()
    total = 0
    for tokens in sequences:
        grams = ngrams(tokens, n)
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def eos_rate(answers: Iterable[Answer]) -> float:
    """The share of answers that ended with the end-of-turn/eos token rather than at the length limit (0.0 for
    none). A model that never stops (loops, rambles) scores near 0; a chat model that learned its turns, near 1."""
    flags = [answer.ended for answer in answers]
    return sum(flags) / len(flags) if flags else 0.0


def mean_length(answers: Iterable[Answer]) -> float:
    """The mean answer length in tokens, the stop token not counted (0.0 for no answers)."""
    lengths = [answer.tokens for answer in answers]
    return sum(lengths) / len(lengths) if lengths else 0.0


def answer_statistics(answers: Iterable[Answer]) -> dict[str, float]:
    """The eval summary's answer figures for one model, over all its answers (every prompt x sample):
    `mean_length`, `repetition` (repeated 4-grams), `distinct_2` and `eos_rate`, as defined above."""
    answers = list(answers)
    tokens = [answer.token_ids for answer in answers]
    return {
        "mean_length": mean_length(answers),
        "repetition": repetition(tokens, 4),
        "distinct_2": distinct_n(tokens, 2),
        "eos_rate": eos_rate(answers),
    }
