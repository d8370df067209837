"""Where a prompt ends and its completion begins in token ids, the way TRL's trainers split them: what the plans
count (truncation, dropped rows), the dry run renders, and the held-out likelihoods measure."""

from __future__ import annotations

from typing import Any


def split_ids(tokenizer: Any, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
    """Prompt and completion token ids the way TRL's SFT and DPO trainers split them: the completion is what the
    full sequence (prompt + completion, eos after a text completion) adds after the prompt's tokens."""
    if isinstance(prompt, list):
        prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=False)
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer(prompt + completion + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    shared = _shared_prefix(prompt_ids, full)
    return full[:shared], full[shared:]


def split_all_ids(tokenizer: Any, prompts: list[Any], completions: list[Any]) -> list[tuple[list[int], list[int]]]:
    """`split_ids` of many rows: string rows tokenized in two batched calls (a per-row loop over every pair of a
    large set costs seconds before training starts), conversations one by one through the chat template."""
    if not prompts or not isinstance(prompts[0], str):
        return [split_ids(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    eos = tokenizer.eos_token or ""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    fulls = tokenizer([p + c + eos for p, c in zip(prompts, completions, strict=True)], add_special_tokens=False)
    out = []
    for p, full in zip(prompt_ids, fulls["input_ids"], strict=True):
        shared = _shared_prefix(p, full)
        out.append((full[:shared], full[shared:]))
    return out


def _shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
