"""Thinking models: a template's reasoning block read from what it renders (Qwen 3's `<think>...</think>`, an R1
distill's generation prompt that opens one), its switch, a completion's answer and reasoning apart, and the masks of
sft with `thinking: false`. Stages use it through `thinking:` (align/stages/base.py, online_rl.py, sft.py, eval.py),
the rewards through `answers_apart` (align/rewards.py), and `align chat --thinking`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from align.families import PROBE_ANSWER, PROBE_USER, render, training_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# The template variables that switch a reasoning block on or off in the generation prompt (Qwen 3's
# `enable_thinking`; others name it `thinking`): kept only where flipping one changes what the template renders.
THINKING_SWITCHES = ("enable_thinking", "thinking")
_REASONING = "Zq4reasoning"
# The share of answers whose reasoning never closed from which the cut-thoughts alarm fires and the verdict names it
# (`alarms.cut_thoughts` sets another).
CUT_THOUGHTS = 0.5
_TAG = re.compile(r"<[^<>\s]+>")


@dataclass(frozen=True)
class Thinking:
    """How a template writes reasoning, read from what it renders: the tags around it (`<think>`, `</think>`), the
    variable that switches it in the generation prompt (None: it has none), and whether the generation prompt itself
    opens the block under the stage's setting (then a completion holds only the closing tag)."""

    opens: str
    closes: str
    switch: str | None
    prompt_opens: bool

    def kwargs(self, thinking: bool | None) -> dict[str, Any]:
        """The template's arguments for a stage's `thinking:` (none where it is unset or the template has no
        switch)."""
        return {} if thinking is None or self.switch is None else {self.switch: thinking}


def thinking_of(tokenizer: PreTrainedTokenizerBase, setting: bool | None = None) -> Thinking | None:
    """The template's reasoning block, or None for a template that does not think: one that renders an assistant's
    `reasoning_content` between two tags, or writes a reasoning block into its generation prompt under a switch.
    `setting`: the stage's `thinking:`, which decides whether the generation prompt opens the block (Qwen 3.5's
    thinking template opens it, and closes it empty under `enable_thinking: false`)."""
    user = [{"role": "user", "content": PROBE_USER}]
    try:
        turn = {"role": "assistant", "content": PROBE_ANSWER, "reasoning_content": _REASONING}
        text = render(tokenizer, [*user, turn])
        prompts = {
            name: tuple(render(tokenizer, user, prompt=True, **{name: on}) for on in (True, False))
            for name in THINKING_SWITCHES
        }
        plain = render(tokenizer, user, prompt=True)
    except Exception:  # a template that needs fields the probe lacks
        return None
    switch = next((name for name, (on, off) in prompts.items() if on != off), None)
    opens = closes = None
    if _REASONING in text and PROBE_ANSWER in text:
        before, after = text.split(_REASONING, 1)
        tags_before, tags_after = _TAG.findall(before), _TAG.findall(after.split(PROBE_ANSWER, 1)[0])
        if tags_before and tags_after:
            opens, closes = tags_before[-1], tags_after[0]
    if opens is None and switch is not None:
        on, off = prompts[switch]
        block = _TAG.findall(off[len(on) :] if off.startswith(on) else off[len(os.path.commonprefix([on, off])) :])
        if len(block) >= 2:
            opens, closes = block[0], block[1]
    ending = _TAG.findall(plain.rstrip()[-40:])
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if opens is None and ending and plain.rstrip().endswith(ending[-1]) and "</" + ending[-1][1:] in template:
        # The generation prompt opens a block the answer closes (R1 distills' `<think>\n`, `</think>` in the text).
        opens, closes = ending[-1], "</" + ending[-1][1:]
    # A pair of tags (`<think>`, `</think>`); channel formats (gpt-oss's `<|channel|>analysis<|message|>`) are not.
    if opens is None or closes != "</" + opens[1:]:
        return None
    if switch is not None and setting is not None:
        plain = prompts[switch][0 if setting else 1]
    return Thinking(opens, closes, switch, plain.rstrip().endswith(opens))


def split_reasoning(text: str, thinking: Thinking | None) -> tuple[str, str | None, bool]:
    """(answer, reasoning, cut) of one completion: the answer after the closing tag, the reasoning before it; a
    block opened and never closed (`max_completion_length` cut it mid-thought) leaves no answer and `cut` True.
    Reasoning None: the completion has no reasoning block (thinking off, or a template that does not think)."""
    if thinking is None:
        return text, None, False
    if thinking.closes in text:
        head, _, answer = text.partition(thinking.closes)
        return answer.strip(), head.split(thinking.opens, 1)[-1].strip(), False
    if thinking.opens in text:
        return "", text.split(thinking.opens, 1)[1].strip(), True
    if thinking.prompt_opens:  # the generation prompt opened the block: all of it is thought, cut
        return "", text.strip(), True
    return text.strip(), None, False


def cut_thoughts_share(alarms: Any) -> float:
    return CUT_THOUGHTS if getattr(alarms, "cut_thoughts", None) is None else alarms.cut_thoughts


def cut_thoughts_cause(share: float, of: str, limit: Any, switch: bool = True) -> str:
    """What a high share of cut thoughts means and what fixes it (the alarm's and the verdict's words, after their
    `cut thoughts: `); `switch`: the template has one (`thinking: false` is a fix)."""
    fix = "raise max_completion_length" + (", or set thinking: false" if switch else "")
    return (f"{share:.0%} of {of} never closed their reasoning within max_completion_length={limit}, so they have "
            f"no answer to score: {fix}")  # fmt: skip


def masks_without_thought(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], thinking: Thinking
) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of a conversation trained with `thinking: false`: rendered without reasoning (a
    message's `reasoning_content` or `thinking` dropped), with TRL's assistant masks, and the empty reasoning block
    the template still writes into an assistant turn moved to the prompt side of the mask: the model is not taught
    to write it, since the generation prompt writes it under `thinking: false`."""
    template = training_template(tokenizer)
    plain = [{k: v for k, v in m.items() if k not in ("reasoning_content", "thinking")} for m in messages]
    out = tokenizer.apply_chat_template(plain, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        chat_template=template)  # fmt: skip
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    pieces = [tokenizer.decode([token]) for token in ids]
    i = 0
    while i < len(ids):
        if mask[i] and (i == 0 or not mask[i - 1]):  # an assistant turn starts: does it open with an empty block?
            text, j = "", i
            while j < len(ids) and mask[j] and thinking.closes not in text:
                text, j = text + pieces[j], j + 1
            head, _, _ = text.partition(thinking.closes)
            if thinking.closes in text and not head.replace(thinking.opens, "").strip() and thinking.opens in head:
                while j < len(ids) and mask[j] and not pieces[j].strip():
                    j += 1  # the whitespace after the block goes with it
                mask[i:j] = [0] * (j - i)
            i = j
        else:
            i += 1
    return ids, mask


def thinking_problem(stage: Any, thinking: Thinking | None) -> str | None:
    """Why a stage's `thinking:` cannot be had with its template: true on one that does not think, or a setting a
    template without a switch cannot follow (its generation prompt always or never opens the block)."""
    asked, where = getattr(stage, "thinking", None), f"stages.{stage.name}.thinking"
    if thinking is None:
        return (f"{where}: true: the chat template does not think (it renders no reasoning block, in its turns or its "
                "generation prompt)") if asked else None  # fmt: skip
    if asked is not None and thinking.switch is None and asked != thinking.prompt_opens:
        opens = "opens" if thinking.prompt_opens else "never opens"
        return (f"{where}: {str(asked).lower()}: the chat template has no switch for it (its generation prompt "
                f"{opens} the reasoning block)")  # fmt: skip
    return None


THINKING_HINT = "remove thinking: (the template decides), or use a template that thinks, with a switch for it"


def refuse_unfollowable(stage: Any, tokenizer: Any, found: Any) -> None:
    """A stage's `thinking:` its template cannot follow, among a plan's `found` problems (every training kind)."""
    if tokenizer is None or getattr(stage, "thinking", None) is None:
        return
    problem = thinking_problem(stage, thinking_of(tokenizer) if tokenizer.chat_template else None)
    if problem is not None:
        found.add([problem])
        found.hints.append(THINKING_HINT)


def thought_figures(parts: list[tuple[str, str | None, bool]]) -> dict[str, float]:
    """Over completions split by `split_reasoning`: the share whose reasoning never closed (`cut_thought_rate`) and
    the mean reasoning length in characters (`reasoning_length`)."""
    n = max(1, len(parts))
    return {"cut_thought_rate": sum(cut for _, _, cut in parts) / n,
            "reasoning_length": sum(len(r or "") for _, r, _ in parts) / n}  # fmt: skip
