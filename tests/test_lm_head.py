"""The CPU LM head (align/lm_head.py) gives TRL's chunked head's outputs and gradients, and takes over only where
it should."""

from __future__ import annotations

import pytest
import torch
import trl.trainer.utils as trl_utils
from transformers import GPT2Config, GPT2LMHeadModel
from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, ChunkedLogProbFunction

from align import lm_head, patches

ALL = ("log_probs", *OPTIONAL_OUTPUTS)


def _inputs(bias: bool) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    hidden = (0.3 * torch.randn(37, 16, generator=generator, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64).requires_grad_()
    b = torch.randn(50, generator=generator, dtype=torch.float64).requires_grad_() if bias else None
    targets = torch.randint(0, 50, (37,), generator=generator)
    targets[:5] = (hidden[:5].detach() @ weight.detach().T).argmax(-1)  # some top-1 hits
    return hidden, weight, b, targets


@pytest.mark.parametrize(("bias", "temperature", "softcap", "scale"), [(False, 1.0, None, 1.0), (True, 0.7, 5.0, 1.3)])
def test_plain_head_matches_trl_values_and_gradients(bias, temperature, softcap, scale):
    results = []
    for implementation in ("trl", "plain"):
        hidden, weight, b, targets = _inputs(bias)
        if implementation == "trl":
            # chunk size 16: the vocabulary of 50 spans four tiles, so TRL's online log-sum-exp is exercised
            out = ChunkedLogProbFunction.apply(hidden, weight, b, targets, temperature, 16, softcap, scale, ALL)
        else:
            out = lm_head.plain_log_probs(hidden, weight, b, targets, temperature, softcap, scale, ALL)
        log_probs, entropy = out[0], out[1]
        # a loss through both differentiable outputs, with unequal weights per token
        weights = torch.linspace(0.5, 1.5, log_probs.numel(), dtype=log_probs.dtype)
        (-(log_probs * weights).sum() + 0.3 * (entropy * weights.flip(0)).sum()).backward()
        grads = [hidden.grad, weight.grad] + ([b.grad] if bias else [])
        results.append((out, grads))
    (trl_out, trl_grads), (plain_out, plain_grads) = results
    assert trl_out[4].any() and not trl_out[4].all()  # the top-1 comparison is not vacuous
    for name, expected, got in zip(ALL, trl_out, plain_out, strict=True):
        if name == "is_top1":
            assert torch.equal(expected, got), name
        else:
            torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-5, msg=name)
    assert all(not t.requires_grad for t in plain_out[2:])  # like TRL's: metrics only
    for expected, got in zip(trl_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_outputs_not_asked_for_are_none():
    hidden, weight, _, targets = _inputs(False)
    out = lm_head.plain_log_probs(hidden, weight, None, targets, outputs=("log_probs",))
    assert out[0].shape == (37,) and out[1:] == (None, None, None, None)


def _model_step(monkeypatch, mode: str) -> tuple[float, torch.Tensor, list[str]]:
    monkeypatch.setenv("ALIGN_LM_HEAD", mode)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=1, n_head=2, n_embd=16, n_positions=32))
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, 64, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt, not scored
    labels[2, 9:] = -100  # padding
    calls: list[str] = []
    chunked = trl_utils._ChunkedLogProbFunction.trl_function
    original = chunked.apply
    monkeypatch.setattr(chunked, "apply", lambda *a: calls.append("trl") or original(*a))
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    out.loss.backward()
    assert float(out.entropy[0, 0].detach()) == 0.0  # masked positions are zeroed on both paths
    return out.loss.item(), model.lm_head.weight.grad.clone(), calls


def test_installed_head_takes_small_cpu_batches_and_matches_trl(monkeypatch):
    said = patches.install_lm_head(torch.device("cpu"))
    assert said.startswith("plain logits (no Triton on cpu") and patches.install_lm_head(torch.device("cpu")) == said
    assert hasattr(trl_utils._ChunkedLogProbFunction, "trl_function")
    assert not hasattr(trl_utils._ChunkedLogProbFunction.trl_function, "trl_function")  # installed once, not nested
    trl_loss, trl_grad, trl_calls = _model_step(monkeypatch, "trl")
    plain_loss, plain_grad, plain_calls = _model_step(monkeypatch, "")
    assert trl_calls == ["trl"] and plain_calls == []
    assert plain_loss == pytest.approx(trl_loss, rel=1e-6)
    torch.testing.assert_close(plain_grad, trl_grad, rtol=1e-4, atol=1e-7)
    monkeypatch.setattr(lm_head, "PLAIN_MAX_LOGITS", 10)  # large logits go back to TRL's memory-saving head
    assert _model_step(monkeypatch, "")[2] == ["trl"]
    monkeypatch.setenv("ALIGN_LM_HEAD", "trl")
    assert patches.install_lm_head(torch.device("cpu")) == "TRL's chunked head (ALIGN_LM_HEAD=trl)"


def test_a_changed_trl_contract_keeps_trls_head(monkeypatch):
    class Changed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, new_argument): ...

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Changed)
    assert patches.install_lm_head(torch.device("cpu")).startswith(
        "TRL's chunked head (its ChunkedLogProbFunction changed"
    )
    assert trl_utils._ChunkedLogProbFunction is Changed
