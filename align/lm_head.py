"""The LM head of SFT and DPO on a device without Triton: plain logits where they are small, TRL's head elsewhere.

TRL's SFT and DPO trainers score tokens through a chunked LM head (`ChunkedLogProbFunction`) that never holds the
[tokens, vocabulary] logits: on a GPU a Triton kernel that saves gigabytes on large vocabularies. Without Triton
(the CPU) it falls back to torch ops that score every position, prompt and padding included, and recompute each
tile in the backward pass: a forward and backward of the quickstart's SFT model (16 x 160 tokens, vocabulary
4,096) took 0.82-0.87 s with it, 0.58-0.61 s with `plain_log_probs` below (1.4x), 0.51 s with transformers'
own loss (which computes no entropy or top-1 hits). The quickstart's SFT stage went from 87 s to 55 s, its DPO
stage from 112 s to 64 s.

So on such a device, and only while the logits stay small (`PLAIN_MAX_LOGITS`), align computes the same per-token
outputs (log-probabilities, entropy, top-1 hits, mean logit, log sum of squared probabilities) from plain logits;
larger ones, and every Triton device, keep TRL's function. `ALIGN_LM_HEAD=trl` keeps TRL's everywhere.
Installing it touches TRL's private module, so that is done in align/patches.py (`install_lm_head`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

# Above this many logits (tokens x vocabulary) a batch keeps TRL's chunked head: plain logits hold about five
# tensors of that size through the backward pass (logits, log-softmax, probabilities and their gradients), so
# 2**25 fp32 logits cost ~0.7 GiB at most — the quickstart's DPO batch is 21M, a 150k-vocabulary model's 2k-token
# batch 300M.
PLAIN_MAX_LOGITS = 2**25


def plain_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    final_logit_softcapping: float | None = None,
    logit_scale: float = 1.0,
    outputs: tuple[str, ...] = ("log_probs",),
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """TRL's `ChunkedLogProbFunction` outputs from the full logits, differentiable through autograd.

    Returns (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each of shape [N] and `None` unless
    named in `outputs`; like TRL's, the last three carry no gradient and everything is computed in fp32.
    """
    z = torch.nn.functional.linear(hidden, weight, bias).float()
    # Each transform is a pass over [N, vocabulary] and its backward: skipped where it is the identity
    if logit_scale != 1.0:
        z = z * logit_scale
    if final_logit_softcapping is not None:
        z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
    if temperature != 1.0:
        z = z / temperature
    log_p = z.log_softmax(-1)
    log_probs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1) if "entropy" in outputs else None
    with torch.no_grad():
        log_sum_sq_probs = torch.logsumexp(2 * log_p, -1) if "log_sum_sq_probs" in outputs else None
        mean_logits = z.mean(-1) if "mean_logits" in outputs else None
        # `argmax` takes the first maximum, as TRL's does: a tie with an earlier token is not a top-1 hit
        is_top1 = z.argmax(-1) == targets if "is_top1" in outputs else None
    return log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1


def trl_everywhere() -> bool:
    """`ALIGN_LM_HEAD=trl`: TRL's head for every batch (read on every call, so it can be set at any time)."""
    return os.environ.get("ALIGN_LM_HEAD", "").lower() == "trl"


def dispatcher(chunked: Any, use_triton: Any) -> type:
    """A stand-in for TRL's `ChunkedLogProbFunction` (installed by `align.patches.install_lm_head`): `apply` sends a
    batch to `plain_log_probs` on a device without Triton while its logits are small, to TRL's function otherwise."""

    class LogProbs:
        trl_function = chunked

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                  logit_scale=1.0, outputs=("log_probs",)):  # fmt: skip
            small = hidden.shape[0] * weight.shape[0] <= PLAIN_MAX_LOGITS
            if use_triton(hidden.device) or not small or trl_everywhere():
                return chunked.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                     final_logit_softcapping, logit_scale, outputs)  # fmt: skip
            return plain_log_probs(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale,
                                   outputs)  # fmt: skip

    return LogProbs
