"""Answers to many prompts, generated in left-padded batches.

One prompt at a time leaves most of a GPU (and much of a CPU) idle; `benchmarks/bench_generation.py` measures the
gain. Batching a decoder-only model needs the padding on the LEFT, so that every row's last position is its
prompt's last token and new tokens are appended right after it; the attention mask keeps the pads out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Prompt = str | list[dict[str, Any]]
PromptFormat = Literal["plain", "chat_template"]


@dataclass(frozen=True)
class Answer:
    """One generated answer.

    Attributes:
        text: the answer decoded without special tokens (the stop token is not part of it).
        token_ids: the answer's tokens, the stop token excluded.
        ended: True when generation stopped on the end-of-turn/eos token, False when it hit `max_new_tokens`.
        prompt_truncated: True when the prompt lost its start to fit the model's positions.
        reasoning: a thinking template's reasoning, apart from `text` (then the answer after it); None where the
            answer has no reasoning block (`with_reasoning_apart`).
        thought_cut: the reasoning never closed (max_new_tokens cut it mid-thought): `text` is empty.
        turns: an answer reached through tools (align/tools.py `answer_with_tools`): the assistant and tool turns
            after the prompt, as TRL gives them to the rewards; `text` and `token_ids` are then the last turn's.
        tool_calls, tool_failures: its calls, and those whose tool raised.
        failed_tools: the tools that raised (or names the policy made up), each with its count.
        malformed_call: its last turn opens a tool call that does not parse.
        capped: it was still calling when `max_tool_calls` ran out.
        environment_reward: what its environment's `get_reward()` gave it, where it was answered in one.
    """

    text: str
    token_ids: tuple[int, ...]
    ended: bool
    prompt_truncated: bool = False
    reasoning: str | None = None
    thought_cut: bool = False
    turns: list[dict[str, Any]] | None = None
    tool_calls: int = 0
    tool_failures: int = 0
    malformed_call: bool = False
    capped: bool = False
    failed_tools: dict[str, int] = field(default_factory=dict)
    environment_reward: float | None = None

    @property
    def tokens(self) -> int:
        """The answer's length in tokens (the stop token not counted)."""
        return len(self.token_ids)


def with_reasoning_apart(answers: list[list[Answer]], thinking: Any) -> list[list[Answer]]:
    """Each answer's text split into its final answer (`text`) and `reasoning`, for a template that thinks
    (`thinking`: align.families.Thinking; None leaves the answers as they are)."""
    if thinking is None:
        return answers
    import dataclasses

    from align.thinking import split_reasoning

    def apart(answer: Answer) -> Answer:
        text, reasoning, cut = split_reasoning(answer.text, thinking)
        return dataclasses.replace(answer, text=text, reasoning=reasoning, thought_cut=cut)

    return [[apart(a) for a in per] for per in answers]


def resolve_format(prompt: Prompt, prompt_format: PromptFormat | None) -> PromptFormat:
    """The format a prompt is rendered in: given, or read from its type (a string is plain, a message list chat).

    Raises:
        ValueError: a message list asked to be rendered as plain text, or an unknown format.
    """
    if prompt_format is None:
        return "plain" if isinstance(prompt, str) else "chat_template"
    if prompt_format not in ("plain", "chat_template"):
        raise ValueError(f"prompt_format must be 'plain' or 'chat_template', not {prompt_format!r}")
    if prompt_format == "plain" and not isinstance(prompt, str):
        raise ValueError("prompt_format 'plain' takes string prompts; message lists need 'chat_template'")
    return prompt_format


def as_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """A prompt as chat messages: a string becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    prompt_format: PromptFormat | None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """The prompt's tokens as the model reads them before its answer.

    Plain prompts are tokenized as they are, with the tokenizer's own special tokens (as TRL tokenizes a plain
    prompt); chat prompts are rendered with the tokenizer's chat template and the generation prompt (the
    assistant header), whose text already holds any special tokens, so none are added again.
    """
    if resolve_format(prompt, prompt_format) == "plain":
        return list(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template(
        as_messages(prompt), tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end an answer: the tokenizer's eos and the model's generation eos (often the end-of-turn
    token of a chat model, e.g. `<|im_end|>`, which the tokenizer may not call eos)."""
    ids: list[int] = []
    candidates = [tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    for value in candidates:
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return ids


def generate_batched(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    prompt_format: PromptFormat | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[list[Answer]]:
    """Answers to every prompt, `num_samples` each, generated `batch_size` rows at a time with left padding.

    Args:
        model: a causal LM (`generate` is called on it; it is put in eval mode and restored after).
        tokenizer: its tokenizer; its pad token is used for padding, else its eos.
        prompts: strings, or chat message lists (`[{"role": "user", "content": ...}, ...]`).
        max_new_tokens: the longest answer, in tokens (the stop token included).
        temperature: 0 is greedy decoding; above 0 samples from the model's distribution at that temperature.
        top_p: nucleus sampling's probability mass (1.0: off); used only when sampling.
        num_samples: answers per prompt. Greedy answers are all the same, so at temperature 0 each prompt is
            generated once and its answer repeated.
        batch_size: rows per `generate` call (prompt x sample pairs, sorted by prompt length to pad less).
        seed: seeds the sampling; the same call (same prompts, settings, batch size, hardware) gives the same
            answers. The caller's random state is left as it was.
        prompt_format: `plain` renders string prompts as they are; `chat_template` renders messages (a string
            becomes one user turn) with the tokenizer's chat template and its generation prompt. None: read from
            each prompt's type.
        template_kwargs: the chat template's arguments (a thinking switch: `{"enable_thinking": False}`).

    Only these settings shape the decoding: the model's own generation defaults (top_k, repetition penalty,
    ...) are switched off, so that models compared on one eval decode alike.

    A prompt longer than the model's positions allow (less `max_new_tokens`) keeps its END, where the question
    and the generation prompt are, and is marked `prompt_truncated`.

    Returns:
        One list per prompt, in the prompts' order, of `num_samples` answers.

    Raises:
        ValueError: a setting out of range, `max_new_tokens` leaving no room for a prompt in the model's positions,
            a prompt that does not fit `prompt_format`, or one that renders to no tokens.
    """
    import torch

    from align.families import generation_kwargs
    from align.models import model_positions

    if max_new_tokens < 1 or num_samples < 1 or batch_size < 1:
        raise ValueError("max_new_tokens, num_samples and batch_size must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1]; got {temperature}, {top_p}")
    limit = model_positions(model.config)
    if limit is not None and max_new_tokens >= limit:
        raise ValueError(
            f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's {limit} positions"
        )

    # 1. Render and tokenize every prompt; keep the end of those that do not fit.
    encoded, truncated, longest = [], [], 0
    for index, prompt in enumerate(prompts):
        ids = prompt_ids(tokenizer, prompt, prompt_format, template_kwargs)
        if not ids:
            raise ValueError(f"prompt {index} renders to no tokens: there is nothing to answer")
        room = None if limit is None else limit - max_new_tokens
        truncated.append(room is not None and len(ids) > room)
        longest = max(longest, len(ids))
        encoded.append(ids[-room:] if truncated[-1] else ids)
    if any(truncated):
        logger.warning(
            "%d of %d prompts are longer than the model's positions allow with %d new tokens: their start was cut "
            "(where a system prompt or the tools' schemas are): the longest has %d tokens, the model %d positions; "
            "ask for at most %d new tokens to keep it whole",
            sum(truncated),
            len(prompts),
            max_new_tokens,
            longest,
            limit,
            max(1, limit - longest),
        )

    # 2. One row per prompt x sample (one per prompt when greedy), longest prompts first: rows of a batch then
    #    have similar lengths, and the first batch shows at once whether the longest fit in memory.
    sampling = temperature > 0
    copies = num_samples if sampling else 1
    rows = sorted(((p, s) for p in range(len(prompts)) for s in range(copies)), key=lambda r: -len(encoded[r[0]]))

    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sampling,
        "eos_token_id": stops or None,
        "pad_token_id": pad_id,
        # The model's generation_config fills every setting left unset: pin those that change the distribution.
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
    }
    settings |= generation_kwargs(model)  # an MoE's router logits off (align/families.py says why)
    if sampling:
        settings |= {"temperature": temperature, "top_p": top_p, "top_k": 0, "typical_p": 1.0, "min_p": 0.0}

    device = next(model.parameters()).device
    results: dict[tuple[int, int], Answer] = {}
    was_training = model.training
    model.eval()
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
            torch.manual_seed(seed)
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                # 3. Left padding: every row's prompt ends at the last column, where generation continues.
                width = max(len(encoded[p]) for p, _ in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, (p, _) in enumerate(batch):
                    ids = encoded[p]
                    input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[i, width - len(ids) :] = 1
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **settings
                )
                # 4. Each row's answer runs to its first stop token (rows that finished early are padded after it).
                for i, (p, s) in enumerate(batch):
                    new = output[i, width:].tolist()
                    end = next((k for k, token in enumerate(new) if token in stops), None)
                    answer_ids = tuple(new if end is None else new[:end])
                    text = tokenizer.decode(answer_ids, skip_special_tokens=True)
                    if end is None:  # cut at max_new_tokens, perhaps inside a character's bytes: no U+FFFD for it
                        text = cut_character(text)
                    results[p, s] = Answer(text, answer_ids, ended=end is not None, prompt_truncated=truncated[p])
    finally:
        model.train(was_training)
    return [[results[p, s if sampling else 0] for s in range(num_samples)] for p in range(len(prompts))]


def cut_character(text: str) -> str:
    """An answer cut at the token limit, without the U+FFFD that a byte-level tokenizer decodes from the first bytes
    of a character whose last bytes were never generated (at most three: a UTF-8 character has four bytes)."""
    stripped = text.rstrip("\ufffd")
    return stripped if len(text) - len(stripped) <= 3 else text
