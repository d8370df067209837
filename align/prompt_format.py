"""How a saved model's prompts were formatted in training (`model/align_prompts.json`), and how its model card shows
it in use.

The tokenizer's chat template alone can mislead: a model trained on plain string prompts still carries align's
default `### user:` template, which it never saw in training, and chatting with it through that template gives it a
format it does not know. So each stage records the format, and `align chat`, the eval stage and the card follow it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.files import read_json, write_text_atomic

PROMPTS_FILE = "align_prompts.json"


# --------------------------------------------------------------------------------------------------
# How prompts were formatted in training


@dataclass(frozen=True)
class PromptFormat:
    """How a model's training prompts were written, so chat and users render theirs the same way.

    `format`: "plain" (strings, the answer appended with nothing between: TRL's convention; text for an lm stage)
    or "chat_template" (message lists rendered by the tokenizer's chat template). `prompt_suffix`: the whitespace
    every sampled training prompt ended with (plain only), which chat adds to a typed turn that lacks it.
    `recorded`: False when the model directory holds no record (saved before align wrote one, or not by align).
    """

    format: str
    data_format: str | None = None
    stage: str | None = None
    kind: str | None = None
    prompt_suffix: str = ""
    example_prompt: str | None = None
    recorded: bool = True
    thinking: bool | None = None  # the stage's `thinking:` (None: the template's default), which chat and eval follow
    # The tools the model was trained to call: their JSON schemas (a grpo stage's tools, an sft stage's transcripts'),
    # and where a grpo stage's can be had again (`tools:` entries, a file's path made absolute) for chat to run.
    tools: tuple[dict[str, Any], ...] | None = None
    tool_entries: tuple[str, ...] | None = None

    def tool_names(self) -> list[str]:
        return [t.get("function", t).get("name", "?") for t in self.tools or ()]

    def describe(self) -> str:
        """One line for chat's banner and the model card."""
        if self.format == "chat_template":
            how = "message lists rendered by the tokenizer's chat template"
        elif self.data_format == "text":
            how = "plain text, no chat template: the model continues the text it is given"
        else:
            end = f", each ending in {self.prompt_suffix!r}" if self.prompt_suffix else ""
            how = f"plain strings, no chat template: the prompt as is{end}, the answer appended with nothing between"
        if not self.recorded:
            return f"{how} (not recorded with the model: guessed from its tokenizer)"
        return f"{how}; as stage {self.stage} ({self.kind}) was trained on {self.data_format} data"


def prompt_format_of(kind: str, data_format: str, sample: list[dict[str, Any]]) -> PromptFormat:
    """How a stage's training rows present prompts: from its data format and whether they are strings or messages."""
    if data_format == "text":
        return PromptFormat("plain", data_format, kind=kind)
    first = sample[0] if sample else {}
    prompt = first.get("prompt", first.get("chosen"))
    if "messages" in first or isinstance(prompt, list) or data_format in ("messages", "preference_messages"):
        return PromptFormat("chat_template", data_format, kind=kind)
    prompts = [row["prompt"] for row in sample if isinstance(row.get("prompt"), str)]
    return PromptFormat("plain", data_format, kind=kind, prompt_suffix=_shared_whitespace_end(prompts),
                        example_prompt=prompts[0][:400] if prompts else None)  # fmt: skip


def _shared_whitespace_end(texts: list[str]) -> str:
    """The trailing whitespace every text ends with ("\\n\\n" for the builtin instruction prompts), or ""."""
    if not texts:
        return ""
    ends = [t[len(t.rstrip()) :] for t in texts]
    shortest = min(ends, key=len)
    while shortest and not all(e.endswith(shortest) for e in ends):
        shortest = shortest[1:]
    return shortest


def record_prompt_format(
    model_dir: Path,
    stage: str,
    kind: str,
    data_format: str,
    rows: Any,
    thinking: bool | None = None,
    tools: dict[str, list] | None = None,
) -> PromptFormat:
    """Write `model_dir/align_prompts.json`: how this stage's training prompts were formatted (from its data
    format and its first training rows), its `thinking:` where it set one, and the tools it was trained to call
    (`tools`: {"tools": schemas, "tool_entries": entries}, align/tools.py `trained_tools`); `align chat`, the eval
    stage and the model card follow it."""
    sample = [rows[i] for i in range(min(32, len(rows)))] if rows is not None else []
    found = prompt_format_of(kind, data_format, sample)
    record = {
        "format": found.format,
        "data_format": data_format,
        "stage": stage,
        "kind": kind,
        "prompt_suffix": found.prompt_suffix,
        "example_prompt": found.example_prompt,
        **({"thinking": thinking} if thinking is not None else {}),
        **(tools or {}),
    }
    write_text_atomic(model_dir / PROMPTS_FILE, json.dumps(record, indent=2) + "\n")
    return _prompt_format(record)


def tool_signature(schema: dict[str, Any]) -> str:
    """`multiply(a: integer, b: integer)`, from a tool's JSON schema (as TRL and transformers build it)."""
    function = schema.get("function", schema)
    arguments = (function.get("parameters") or {}).get("properties") or {}
    shown = ", ".join(f"{name}: {spec.get('type', '?')}" for name, spec in arguments.items())
    return f"{function.get('name', '?')}({shown})"


def _prompt_format(record: dict[str, Any]) -> PromptFormat:
    fields = ("format", "data_format", "stage", "kind", "prompt_suffix", "example_prompt", "thinking", "tools",
              "tool_entries")  # fmt: skip
    found = {k: record[k] for k in fields if record.get(k) is not None}
    for key in ("tools", "tool_entries"):  # tuples: the record is frozen
        if key in found:
            found[key] = tuple(found[key])
    return PromptFormat(**found)


def read_prompt_format(model_dir: Path, has_chat_template: bool | None = None) -> PromptFormat:
    """The recorded prompt format of a saved model; without a record, the tokenizer's chat template if it has one
    (a model from elsewhere), else plain text."""
    record = read_json(Path(model_dir) / PROMPTS_FILE)
    if isinstance(record, dict) and record.get("format") in ("plain", "chat_template"):
        return _prompt_format(record)
    return PromptFormat("chat_template" if has_chat_template else "plain", recorded=False)


# --------------------------------------------------------------------------------------------------
# The model card's usage snippets


def generate_usage(prompts: Any, adapter: bool) -> str:
    """How to generate with a policy, as its model card shows it: load, render a prompt as in training, generate."""
    if adapter:
        load = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            'path = "path/to/model"  # this folder, or its hub repository\n'
            "model = AutoPeftModelForCausalLM.from_pretrained(path)  # LoRA adapters on the base they name\n"
        )
    else:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'path = "path/to/model"  # this folder, or its hub repository\n'
            "model = AutoModelForCausalLM.from_pretrained(path)\n"
        )
    load += "tokenizer = AutoTokenizer.from_pretrained(path)\n"
    if prompts.format == "chat_template":
        render = (
            'messages = [{"role": "user", "content": "What does the assert statement do?"}]\n'
            'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
            "return_dict=True)\n"
        )
    else:
        suffix = prompts.prompt_suffix if prompts.format == "plain" else ""
        render = f'inputs = tokenizer("What does the assert statement do?{_py(suffix)}", return_tensors="pt")\n'
    generate = (
        "output = model.generate(**inputs, max_new_tokens=64)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
    )
    adapters_note = (
        "\nThe adapters name their base model in `adapter_config.json`; where that is a local directory (a base "
        "built from scratch is saved in `base/` beside them), point `base_model_name_or_path` at it.\n"
        if adapter
        else ""
    )
    return (
        f"```python\n{load}{render}{generate}```\n{adapters_note}\nOr in a terminal, prompts rendered as in training "
        "(see above):\n\n```bash\nalign chat path/to/model            # or: align chat RUN_DIR --stage NAME\n```"
    )


def score_usage(prompts: Any, adapter: bool) -> str:
    """How to score with a reward model: one number per (prompt, answer), higher is better; only differences
    between answers to the same prompt mean something (it was trained on pairs)."""
    if adapter:
        load = (
            "from peft import AutoPeftModelForSequenceClassification\nfrom transformers import AutoTokenizer\n\n"
            'path = "path/to/model"  # this folder, or its hub repository\n'
            "model = AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1)\n"
        )
    else:
        load = (
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            'path = "path/to/model"  # this folder, or its hub repository\n'
            "model = AutoModelForSequenceClassification.from_pretrained(path)\n"
        )
    load += "tokenizer = AutoTokenizer.from_pretrained(path)\n"
    if prompts.format == "chat_template":
        render = (
            'messages = [{"role": "user", "content": "What does assert do?"}, {"role": "assistant", "content": '
            '"It raises AssertionError when its condition is false."}]\n'
            'inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)\n'
        )
    else:
        suffix = prompts.prompt_suffix if prompts.format == "plain" else ""
        render = (
            f'text = "What does assert do?{_py(suffix)}" + "It raises AssertionError when its condition is false." '
            "+ tokenizer.eos_token\n"
            'inputs = tokenizer(text, return_tensors="pt")\n'
        )
    return (
        "A reward model: it scores an answer to a prompt (one number, higher is better); compare the scores of "
        f"answers to the same prompt. It does not generate text.\n\n```python\n{load}{render}"
        "score = model(**inputs).logits[0, 0].item()\n```\n\nIn a recipe, it judges an eval stage's answers: "
        '`judges: [{reward_model: "path/to/model"}]`.'
    )


def _py(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")
