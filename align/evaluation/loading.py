"""The models an eval runs, each loaded on the run's device in the run's precision (adapters merged into their base),
and a prompt rendered the way the model saw prompts in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_on_device(path: str, where: str, precision: Any, reward_head: bool = False) -> tuple[Any, Any]:
    """A model to run (adapters merged into their base) and its tokenizer, on the run's device, in the run's
    precision (bf16 or fp16 weights on a GPU that trains in them; fp32 elsewhere)."""
    import torch

    from align.models import build_model

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision.name)
    model, tokenizer = build_model(path, where, dtype=dtype, reward_head=reward_head)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.to(precision.device).eval(), tokenizer


def load_policy(path: str, where: str, precision: Any) -> tuple[Any, Any, Any]:
    """A model that answers, its tokenizer, and how its prompts were formatted in training (align_prompts.json; a
    model from elsewhere: its chat template if it has one)."""
    from align.prompt_format import read_prompt_format

    model, tokenizer = load_on_device(path, where, precision)
    local = Path(path)
    prompt_format = read_prompt_format(local if local.is_dir() else Path("-"), tokenizer.chat_template is not None)
    return model, tokenizer, prompt_format


def render_prompt(prompt: Any, prompt_format: Any) -> Any:
    """A prompt the way the model saw prompts in training: a plain string (with the trained prompts' common
    ending, where it lacks it) or chat messages."""
    if prompt_format.format == "chat_template":
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if isinstance(prompt, str) and prompt_format.prompt_suffix and not prompt.endswith(prompt_format.prompt_suffix):
        return prompt.rstrip() + prompt_format.prompt_suffix
    return prompt
