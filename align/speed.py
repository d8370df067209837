"""Model FLOPs utilisation (MFU): how much of the accelerator's peak a stage's training used.

FLOPs per trained token are the usual estimate for a decoder (Kaplan et al. 2020; the PaLM paper's appendix B):
6 N for the weights (2 forward, 4 backward) plus 12 L d T for attention over a sequence of T tokens, with N the
parameters outside the embeddings, L layers and d the hidden width, all read from the model's config. The peak is
the device's dense bf16/fp16 tensor throughput from a short table of known GPUs; a device not in it (and every CPU)
gets None: an unknown peak is not guessed.
"""

from __future__ import annotations

from typing import Any

# Dense (no sparsity) bf16/fp16 tensor-core peaks, FLOP/s, from the vendors' data sheets. Matched against the
# device name torch reports, first match wins (so "H100" after the longer names it is part of).
PEAK_FLOPS = (
    ("H200", 989.4e12),
    ("H100", 989.4e12),  # SXM; the PCIe card is lower (756e12) and reports "H100 PCIe"
    ("A100", 312e12),
    ("L40S", 362.05e12),
    ("L4", 121e12),
)
PCIE = {"H100 PCIe": 756e12}


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """The device's dense peak for `precision` (bf16 or fp16), or None: a CPU, fp32, or a device not in the table."""
    if not device_name or precision not in ("bf16", "fp16"):
        return None
    for name, peak in PCIE.items():
        if name in device_name:
            return peak
    return next((peak for name, peak in PEAK_FLOPS if name in device_name), None)


def flops_per_token(config: Any, n_params: int, sequence_length: int | None) -> float | None:
    """6 N + 12 L d T for one trained token (forward and backward), N the parameters outside the embeddings.

    Returns None where the config does not say its layers and width (an architecture this cannot read)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = next((getattr(text, k) for k in ("num_hidden_layers", "n_layer") if getattr(text, k, None)), None)
    width = next((getattr(text, k) for k in ("hidden_size", "n_embd", "d_model") if getattr(text, k, None)), None)
    vocab = getattr(text, "vocab_size", None)
    if layers is None or width is None:
        return None
    embeddings = (vocab or 0) * width
    weights = max(0, n_params - embeddings)
    attention = 12 * layers * width * (sequence_length or 0)
    return 6.0 * weights + attention


def mfu(tokens_per_s: float | None, per_token: float | None, peak: float | None) -> float | None:
    """The share of the peak the run used: tokens/s x FLOPs per token / peak FLOP/s (None where one is unknown)."""
    if not tokens_per_s or not per_token or not peak:
        return None
    return tokens_per_s * per_token / peak


def device_name() -> str | None:
    """The CUDA device's name (None without one)."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None
