"""MFU arithmetic (align/speed.py): FLOPs per token from the config, the peak from the device table, None where
unknown."""

from __future__ import annotations

import pytest

from align.speed import flops_per_token, mfu, peak_flops


def test_flops_per_token_is_6n_plus_12ldt_without_the_embeddings():
    from transformers import GPT2Config

    config = GPT2Config(n_layer=12, n_embd=768, vocab_size=8192, n_positions=1024)
    n_params = 85_000_000 + 8192 * 768  # what num_parameters() would say: the body and the (tied) embedding
    assert flops_per_token(config, n_params, 1024) == 6 * 85_000_000 + 12 * 12 * 768 * 1024
    assert flops_per_token(config, n_params, None) == 6 * 85_000_000


def test_peak_is_known_only_for_listed_gpus_in_half_precision():
    assert peak_flops("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312e12)
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") is None  # tf32's peak differs: not guessed
    assert peak_flops("Some Future GPU", "bf16") is None and peak_flops(None, "bf16") is None


def test_mfu_is_the_share_of_the_peak_and_none_when_anything_is_unknown():
    # The speed issue's GPT-2-small figure: 338,043 tok/s on an H200 at 6N + 12LdT per token was 22.6% MFU.
    per_token = 6 * 85_000_000 + 12 * 12 * 768 * 1024
    assert mfu(338_043, per_token, 989.4e12) == pytest.approx(338_043 * per_token / 989.4e12)
    assert 0.2 < mfu(338_043, per_token, 989.4e12) < 0.25
    assert mfu(None, per_token, 989.4e12) is None and mfu(1000.0, per_token, None) is None
