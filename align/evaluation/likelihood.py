"""How likely a model finds each completion of a prompt, and what that says about held-out preference data: which
of two answers it prefers (`preference_pairs`), and how well its likelihoods separate desirable from undesirable
answers (`label_auc_values`). The held-out measures of the preference stages, before and after training.

Measured on the policy alone, never against a reference: a policy equal to its reference gives DPO's and KTO's
implicit rewards 0 for every answer, a tie by construction before training; its own likelihoods do not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset


def completion_logps(
    model: Any,
    tokenizer: Any,
    prompts: list[Any],
    completions: list[Any],
    max_length: int | None,
    average: bool = False,
) -> list[float]:
    """Log-probability of each completion given its prompt, summed over its tokens (`average`: their mean, the
    length-normalised likelihood SimPO optimises), in batches; a prompt too long is cut from the left."""
    import torch

    from align.prompt_split import split_ids

    device = next(model.parameters()).device
    sequences, starts = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        p, c = split_ids(tokenizer, prompt, completion)
        if max_length is not None and len(p) + len(c) > max_length:
            # Like training: keep the completion (cut at max_length) and as much of the prompt's end as fits.
            c = c[: max_length - 1]
            p = p[len(p) - (max_length - len(c)) :]
        sequences.append(p + c)
        starts.append(len(p))
    totals = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(sequences), 16):
            batch = sequences[i : i + 16]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
            for row, seq in enumerate(batch):
                start = max(starts[i + row], 1)
                tokens = logps[row, start - 1 : len(seq) - 1]
                totals.append(float(tokens.mean() if average else tokens.sum()) if tokens.numel() else 0.0)
    finally:
        model.train(was_training)
    return totals


def preference_accuracy(model: Any, tokenizer: Any, pairs: Dataset, max_length: int | None) -> float:
    """Share of pairs where the model gives the chosen completion a higher summed log-probability than the rejected."""
    correct, _ = preference_pairs(model, tokenizer, pairs, max_length)
    return sum(correct) / max(1, len(correct))


def preference_pairs(
    model: Any, tokenizer: Any, pairs: Dataset, max_length: int | None, average: bool = False
) -> tuple[list[int], list[float]]:
    """Per pair: 1 where the chosen completion's log-probability (summed, or with `average` its per-token mean)
    exceeds the rejected one's, else 0; and the chosen completion's. What `preference_accuracy` averages, kept per
    pair for the verdict's paired interval and its falling-chosen warning."""
    chosen = completion_logps(model, tokenizer, pairs["prompt"], pairs["chosen"], max_length, average)
    rejected = completion_logps(model, tokenizer, pairs["prompt"], pairs["rejected"], max_length, average)
    return [int(c > r) for c, r in zip(chosen, rejected, strict=True)], chosen


def label_auc_values(scores: list[float], labels: list[bool]) -> list[float]:
    """Per row, its share of the rows of the other label that it is ordered correctly against (ties half): a
    desirable row against every undesirable one (its score higher), an undesirable one against every desirable one.
    Their mean is the AUC of the scores separating desirable from undesirable rows (0.5: no separation), and per row
    they give the verdict a paired interval. A label with no row gives every row 0.5: nothing to separate.
    """
    good = sorted(s for s, label in zip(scores, labels, strict=True) if label)
    bad = sorted(s for s, label in zip(scores, labels, strict=True) if not label)
    if not good or not bad:
        return [0.5] * len(scores)
    import bisect

    out = []
    for score, label in zip(scores, labels, strict=True):
        others = bad if label else good
        below, above = bisect.bisect_left(others, score), len(others) - bisect.bisect_right(others, score)
        ties = len(others) - below - above
        wins = below if label else above
        out.append((wins + 0.5 * ties) / len(others))
    return out
