"""`kind: sft` — supervised fine-tuning with TRL's SFTTrainer.

Formats `prompt_completion`, `messages` and `text`. The loss falls on completions / assistant turns only
by default; packing is used only where the model's attention keeps packed samples apart.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from align.errors import BadInput
from align.prompt_split import split_all_ids, split_ids
from align.recipe import TrainingStage
from align.stages.base import Figure, TrainingKind
from align.stages.runner import generation_table, max_length_setting, perplexities, render_mask
from align.values import UNKNOWN, HeldOut, Setting, StageParts

if TYPE_CHECKING:
    from datasets import Dataset

    from align.plan import PlanInputs
    from align.recipe import Stage

logger = logging.getLogger(__name__)


class SFTKeys(TrainingStage):
    """An sft stage's recipe keys: those of every training stage."""

    kind: Literal["sft"]
    article: ClassVar[str] = "an"


class SFT(TrainingKind):
    """TRL's SFTTrainer (through the tokenized-data cache) with the planned loss mask, packing where the loaded
    model's attention keeps packed samples apart, and greedy answers to eval prompts before and after."""

    name = "sft"
    keys = SFTKeys
    formats = ("text", "prompt_completion", "messages")
    about = "supervised fine-tuning on completions, conversations or text (TRL's SFTTrainer)"
    figures = (Figure("eval loss", "eval_loss", True), Figure("perplexity", "perplexity", True))
    key_settings = ("packing", "completion_only_loss", "assistant_only_loss", "loss_type")
    config = "trl:SFTConfig"
    trainer_class = "trl:SFTTrainer"
    prepare = ("self", "dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name")
    token_loss = True

    unit = "examples"
    lm_head = True

    def plan_parts(self, stage: Stage, inputs: PlanInputs) -> StageParts:
        """max_length, the chat template and loss mask, packing (decided when the
        model is loaded), and, with the data, the examples `max_length` truncates or leaves nothing to learn.

        A `max_length` that leaves no training (or eval) example a trained token is a problem here, before any stage
        of the recipe trains.
        """
        from align.families import describe_template
        from align.models import ensure_chat_template, marks_assistant_turns
        from align.plan import batch_figures

        data, tokenizer, config, start = inputs.data, inputs.tokenizer, inputs.config, inputs.start
        fmt = inputs.spec.format
        length = max_length_setting(stage, config)
        parts = StageParts(fixed={"max_length": length}, details={"input": start.summary()})
        if "packing" not in stage.train:
            parts.runtime["packing"] = (
                "align default: padding-free only where the loaded model's attention keeps packed samples apart "
                "(probed when the stage starts)"
            )
        if tokenizer is None:
            parts.details["loss_on"] = f"{UNKNOWN} (the chat template decides)" if fmt == "messages" else fmt
            return parts
        template = ensure_chat_template(tokenizer)
        loss = loss_flags(stage, fmt, tokenizer, data["train"] if data is not None else None)
        if fmt == "messages" and data is not None and carries_reasoning(data["train"]):
            from align.thinking import thinking_of

            if thinking_of(tokenizer) is None:
                logger.warning("stages.%s.data: assistant turns carry reasoning (reasoning_content or thinking), but "
                               "the chat template renders none: it is not trained (chat_template: a template that "
                               "thinks, e.g. qwen3, renders it)", stage.name)  # fmt: skip
        parts.fixed.update({k: Setting(v, "align default (loss on answers only)") for k, v in config_flags(loss)})
        marks = None
        if fmt == "messages":
            marks = "derived" if loss.get(DERIVED) else marks_assistant_turns(tokenizer) or bool(loss.get(NO_THOUGHT))
        parts.details.update(
            chat_template=describe_template(stage, tokenizer, marks, template == "default"),
            loss_on=describe_loss(loss, fmt),
        )
        if data is None:
            return parts
        # Conversations stay conversations here: `masked_ids` derives their masks where align derives them.
        train, valid = apply_loss(dict(config_flags(loss)), fmt, data["train"], data["validation"])
        max_length = length.value
        counts = {}
        for split, ds in (("train", train), ("eval", valid)):
            spans = trained_spans(ds, tokenizer, loss)
            untrained = sum(
                1 for _, first in spans if first is None or (max_length is not None and first >= max_length)
            )
            truncated = sum(1 for n, _ in spans if max_length is not None and n > max_length)
            counts[split] = (spans, untrained, truncated)
            if spans and untrained == len(spans):
                parts.problems.append(
                    f"stages.{stage.name}.train.max_length: {max_length} tokens leave no "
                    f"{'training' if split == 'train' else split} example a trained token (prompts fill it)"
                )
                parts.hints.append("raise max_length (align caps it at the model's positions) or shorten the prompts")
        spans, untrained, truncated = counts["train"]
        from align.models import model_positions

        warn_truncation(
            stage, fmt, spans, truncated, max_length, model_positions(config) if config is not None else None
        )
        # Two examples as training sees them: among those that keep a trained token (the dropped ones train nothing).
        kept = [
            i for i, (_, first) in enumerate(spans) if first is not None and (max_length is None or first < max_length)
        ]
        first_rows = train.select(kept[:2])
        used = [min(n, max_length or n) for n, _ in spans]
        parts.details.update(
            train_examples=len(train) - untrained,  # the dropped ones are counted on their own line
            train_tokens=sum(used),
            max_length=max_length,
            truncated=f"{truncated} of {len(spans)} ({truncated / max(1, len(spans)):.1%})",
            truncation_rate=truncated / max(1, len(spans)),
            untrained=f"{untrained} of {len(spans)} left no trained token by max_length (dropped)",
            packing_efficiency=sum(used) / max(1, _padded_tokens(used, _batch_size(stage))),
            examples=[{"rendered": render_example(row, tokenizer, loss, max_length)} for row in first_rows],
        )
        parts.count = lambda effective: batch_figures(effective, len(train) - untrained)
        return parts

    def setup(self) -> None:
        from align.models import ensure_chat_template

        self.format = self.ctx.spec.format
        template = ensure_chat_template(self.tokenizer)
        if getattr(self.stage, "chat_template", None) not in (None, "own"):
            template = self.stage.chat_template
        settings = self.planned.settings
        self.loss = {k: settings[k].value for k in CONFIG_FLAGS if k in settings}
        if not self.loss:  # the masks align makes itself, as the plan decided
            flags = loss_flags(self.stage, self.format, self.tokenizer, self.data["train"])
            self.loss = {k: True for k in flags if k in ALIGN_MASKS}
        self.train, self.eval = self.apply(self.data["train"], self.data["validation"])
        pack, pack_reason = choose_packing(self.stage, self.model)
        logger.info("%s", pack_reason)
        self.at_run_time = {k: v for k, v in pack.items() if k in self.planned.runtime}
        self.prompts = eval_prompts(self.data["validation"], self.stage.generations)  # as written, not tokenized
        self.extra = {"chat_template": template, "loss_on": describe_loss(self.loss, self.format),
                      "packing": pack_reason}  # fmt: skip

    def apply(self, *splits: Dataset) -> list[Dataset]:
        return apply_loss(self.loss, self.format, *splits, tokenizer=self.tokenizer)

    def eval_sets(self, by_source: dict[str, Any]) -> dict[str, Any]:
        return {name: self.apply(rows)[0] for name, rows in by_source.items()}

    def check(self, trainer: Any) -> None:
        max_length = self.planned.settings["max_length"].value
        report_truncation(self.stage, trainer, len(self.train), len(self.eval), max_length, trainer.args.packing)
        example = render_labels(trainer.train_dataset[0], self.tokenizer)
        logger.info("first training example, trained tokens in [[ ]]: %r", example)

    def measure(self, trainer: Any) -> HeldOut:
        from align.verdict import example_losses, greedy_answers

        # Each eval example's loss, for the verdict.
        answers = greedy_answers(trainer.model, self.tokenizer, self.prompts, template_kwargs=self.template_kwargs)
        return HeldOut(example_losses(trainer), answers)

    def summarize(self, before, after, measured_before, measured_after):
        from align.verdict import loss_verdict

        answers = (measured_before.answers, measured_after.answers)
        losses = measured_before.values, measured_after.values
        verdict = loss_verdict("eval loss per example", *losses, answers=answers, **self.trained_with)
        generations = generation_table(self.ctx, self.prompts, measured_before.texts, measured_after.texts)
        return perplexities(before, after), {"generations": generations, "verdict": verdict}


# --------------------------------------------------------------------------------------------------
# The pieces, in the order `run` uses them


# The loss flags SFTConfig takes; `DERIVED` marks conversations whose assistant masks align derives from the template,
# `NO_THOUGHT` those trained with `thinking: false`, whose empty reasoning block align moves out of the mask.
CONFIG_FLAGS = ("assistant_only_loss", "completion_only_loss")
DERIVED = "derived_masks"
NO_THOUGHT = "empty_thought_untrained"
TRANSCRIPTS = "tool_transcripts"  # conversations with tool calls: tokenized by align, their arguments parsed
ALIGN_MASKS = (DERIVED, NO_THOUGHT, TRANSCRIPTS)


def config_flags(loss: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in loss.items() if k in CONFIG_FLAGS]


def loss_flags(stage: Stage, fmt: str, tokenizer: Any, rows: Dataset | None = None) -> dict[str, Any]:
    """Where the loss falls: completions (prompt_completion), assistant turns (messages), everything (text).

    Assistant turns are marked by the template's `{% generation %}` marks or TRL's training variant of it; where
    there is neither (Llama 3.1/3.2), align derives the masks from what the template renders (`DERIVED`,
    align/families.py `derived_masks`). Only where neither works (a template that renders earlier turns differently
    as the conversation grows) are conversations trained on their last assistant turn, completion-only
    (`apply_loss` splits them), and the log says so.
    """
    from align.families import derives_masks
    from align.models import marks_assistant_turns
    from align.thinking import thinking_of

    if fmt == "messages" and stage.train.get("assistant_only_loss", True):
        if rows is not None and carries_tool_calls(rows) and marks_assistant_turns(tokenizer):
            # Tool-call arguments stored as JSON strings (Arrow holds no dicts of varying shape) are parsed back
            # before rendering, which TRL's own tokenization would not do: align tokenizes these conversations.
            return {TRANSCRIPTS: True}
        if getattr(stage, "thinking", None) is False and thinking_of(tokenizer) is not None:
            return {NO_THOUGHT: True}
        if marks_assistant_turns(tokenizer):
            return {"assistant_only_loss": True}
        if derives_masks(tokenizer):
            return {DERIVED: True}
        logger.warning(
            "the chat template cannot mark assistant turns: training on each conversation's last assistant turn, "
            "with the earlier turns as its prompt (completion-only loss)"
        )
        return {"completion_only_loss": True}
    return {}


def carries_reasoning(ds: Dataset, rows: int = 32) -> bool:
    """Whether the first conversations' assistant turns carry reasoning (`reasoning_content` or `thinking`)."""
    return any(m.get("reasoning_content") or m.get("thinking")
               for row in ds.select(range(min(rows, len(ds)))) for m in row["messages"])  # fmt: skip


def reasoning_named(ds: Dataset) -> Dataset:
    """Conversations whose assistant turns carry their reasoning as `thinking` get it as `reasoning_content`, the
    name chat templates render (Qwen 3's, R1 distills')."""
    feature = ds.features.get("messages") if len(ds) else None
    inner = getattr(feature, "feature", feature[0] if isinstance(feature, list) and feature else None)
    if not isinstance(inner, dict) or "thinking" not in inner:
        return ds

    def renamed(row: dict[str, Any]) -> dict[str, Any]:
        messages = []
        for m in row["messages"]:
            m = dict(m)
            thought = m.pop("thinking", None)
            if thought is not None and m.get("reasoning_content") is None:
                m["reasoning_content"] = thought
            messages.append(m)
        return {"messages": messages}

    return ds.map(renamed)


def apply_loss(loss: dict[str, Any], fmt: str, *splits: Dataset, tokenizer: Any = None) -> list[Dataset]:
    """The splits as the loss needs them: conversations become prompt (every turn before the last assistant
    turn) and completion (that turn) where the loss falls on completions only; with masks align derives, token ids
    and `assistant_masks` (TRL takes tokenized rows as they are and builds labels from that mask)."""
    if fmt == "messages":
        splits = tuple(reasoning_named(ds) for ds in splits)
    if fmt == "messages" and any(loss.get(k) for k in ALIGN_MASKS):

        def tokenized(row: dict[str, Any]) -> dict[str, Any]:
            ids, mask = align_masks(row, tokenizer, loss)
            return {"input_ids": ids, "assistant_masks": mask}

        return [ds.map(tokenized, remove_columns=ds.column_names) for ds in splits]
    if fmt != "messages" or not loss.get("completion_only_loss"):
        return list(splits)
    split = {"prompt": _before_last_assistant, "completion": _last_assistant}

    def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
        return {key: fn(row["messages"]) for key, fn in split.items()}

    return [ds.map(to_prompt_completion, remove_columns=["messages"]) for ds in splits]


def describe_loss(loss: dict[str, Any], fmt: str) -> str:
    if loss.get("assistant_only_loss"):
        return "assistant turns"
    if loss.get(DERIVED):
        return "assistant turns (masks align derives from the template: it has no generation marks)"
    if loss.get(NO_THOUGHT):
        return "assistant turns, without the empty reasoning block (thinking: false)"
    if loss.get(TRANSCRIPTS):
        return "assistant turns (their tool calls included; tool results never)"
    if fmt == "prompt_completion" or loss.get("completion_only_loss"):
        return "completions" if loss.get("completion_only_loss", True) else "whole sequences"
    return "whole sequences"


def _last_assistant_index(messages: list[dict[str, Any]]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def _before_last_assistant(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return messages[: _last_assistant_index(messages)]


def _last_assistant(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [messages[_last_assistant_index(messages)]]


def trained_spans(ds: Dataset, tokenizer: Any, loss: dict[str, Any]) -> list[tuple[int, int | None]]:
    """(length, index of the first trained token or None) of each example as TRL will tokenize it: the figures
    that say, before any trainer exists, which examples `max_length` truncates and which it leaves nothing to learn.
    String rows are tokenized in batches (a Python loop over 30,000 rows costs seconds)."""
    if len(ds) and "text" in ds.column_names:
        eos = tokenizer.eos_token or ""
        ids = tokenizer([t + eos for t in list(ds["text"])], add_special_tokens=False)["input_ids"]
        return [(len(row), 0 if row else None) for row in ids]
    if len(ds) and "prompt" in ds.column_names and isinstance(ds[0]["prompt"], str):
        trained = loss.get("completion_only_loss", True)
        spans = []
        for p, c in split_all_ids(tokenizer, list(ds["prompt"]), list(ds["completion"])):
            start = len(p) if trained else 0
            spans.append((len(p) + len(c), start if start < len(p) + len(c) else None))
        return spans
    spans = []
    for row in ds:
        ids, mask = masked_ids(row, tokenizer, loss)
        spans.append((len(ids), next((i for i, m in enumerate(mask) if m), None)))
    return spans


def report_truncation(stage: Stage, trainer: Any, n_train: int, n_eval: int, max_length: int | None, packed: bool):
    """Say what TRL's preparation cut: examples truncated to `max_length`, and examples it dropped because
    truncation left them no trained token. Counted on TRL's own output, so nothing is tokenized twice.

    Raises:
        BadInput: no training example keeps a trained token (max_length shorter than the prompts).
    """
    if packed or max_length is None:
        return
    train, where = trainer.train_dataset, f"stages.{stage.name}.train.max_length"
    for split, kept, total in (("training", len(train), n_train), ("eval", len(trainer.eval_dataset), n_eval)):
        if total and not kept:
            raise BadInput(
                f"{where}: {max_length} tokens leave no {split} example a trained token (prompts fill it)",
                hint="raise max_length (align caps it at the model's positions) or shorten the prompts",
            )
    import pyarrow.compute as pc

    # Counted in Arrow: materialising every row as a Python list cost 1.5 s on 30,000 examples.
    lengths = pc.list_value_length(train.with_format("arrow")["input_ids"])
    truncated = int(pc.sum(pc.greater_equal(lengths, max_length)).as_py() or 0)
    if truncated:
        logger.warning("train: %d of %d examples were truncated to max_length=%d", truncated, len(train), max_length)
    dropped = {"train": n_train - len(train), "eval": n_eval - len(trainer.eval_dataset)}
    for split, count in dropped.items():
        if count:
            logger.warning("%s: %d examples dropped: truncation at %d tokens left them nothing to learn", split,
                           count, max_length)  # fmt: skip


def choose_packing(stage: Stage, model: Any) -> tuple[dict[str, Any], str]:
    """Padding-free packing where the attention keeps packed samples apart; otherwise none. Says which and why.

    Raises:
        BadInput: `packing: true` (best-fit) asked of a model that would let samples attend to each other.
    """
    from align.models import attention_separates_sequences

    asked = stage.train.get("packing")
    strategy = stage.train.get("packing_strategy", "bfd")
    separates = attention_separates_sequences(model)
    attention = str(getattr(model.config, "_attn_implementation", None) or "eager")
    if asked is None:
        if separates and "flash" in attention:
            return {"packing": True}, f"packing: padding-free ({attention} keeps packed samples apart)"
        if separates:
            # Measured on the CPU: sdpa separates packed samples only through a dense mask over the whole packed
            # row, which made a step 10x slower than padded batches.
            return {"packing": False}, (
                f"packing: off — {attention} keeps packed samples apart only with a dense mask over the whole "
                "packed row, which costs more than padding; batches are padded to their longest example"
            )
        return {"packing": False}, (
            f"packing: off — this model's attention ({attention}) would let packed samples see each other; "
            "batches are padded to their longest example"
        )
    if asked and strategy == "wrapped":
        logger.warning("packing_strategy: wrapped cuts samples mid-sequence and lets them attend to each other")
        return {}, "packing: wrapped, as the recipe asks (samples attend across boundaries)"
    if asked and not separates:
        raise BadInput(
            f"stages.{stage.name}.train.packing: this model's attention cannot keep packed samples apart "
            "(it would let them attend to each other)",
            hint="remove `packing` (align then pads each batch instead), or use a model with flash attention",
        )
    return {}, f"packing: {'padding-free, as the recipe asks' if asked else 'off, as the recipe asks'}"


def eval_prompts(ds: Dataset, count: int) -> list[Any]:
    """The first `count` eval prompts: the prompt field, or a conversation up to its last assistant turn."""
    prompts = []
    for row in ds.select(range(min(count, len(ds)))):
        if "prompt" in row:
            prompts.append(row["prompt"])
        elif "messages" in row:  # a transcript's tool-call arguments parsed, as training renders them
            from align.families import parsed_arguments

            prompts.append([parsed_arguments(m) for m in _before_last_assistant(row["messages"])])
        else:
            prompts.append(row["text"][:200])
    return prompts


def render_labels(example: dict[str, Any], tokenizer: Any) -> str:
    """An example as TRL prepared it, with the tokens that carry a loss marked."""
    ids = example["input_ids"]
    if "labels" in example:
        mask = [int(label != -100) for label in example["labels"]]
    else:
        mask = example.get("assistant_masks") or example.get("completion_mask") or [1] * len(ids)
    return render_mask(ids, mask, tokenizer)


def masked_ids(row: dict[str, Any], tokenizer: Any, loss: dict[str, Any]) -> tuple[list[int], list[int]]:
    """One row's token ids as TRL will tokenize it, and which of them carry a loss (1) — without a trainer."""
    from align.families import training_template

    eos = tokenizer.eos_token or ""
    if "messages" in row and any(loss.get(k) for k in ALIGN_MASKS):
        return align_masks(row, tokenizer, loss)
    if "messages" in row:
        template = training_template(tokenizer) if loss.get("assistant_only_loss") else tokenizer.chat_template
        out = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=template
        )
        mask = out["assistant_masks"] if loss.get("assistant_only_loss") else [1] * len(out["input_ids"])
        return list(out["input_ids"]), list(mask)
    if "prompt" in row:
        prompt, completion = split_ids(tokenizer, row["prompt"], row["completion"])
        trained = loss.get("completion_only_loss", True)
        return prompt + completion, [0] * len(prompt) + [int(trained)] * len(completion)
    ids = tokenizer(row["text"] + eos, add_special_tokens=False)["input_ids"]
    return ids, [1] * len(ids)


def align_masks(row: dict[str, Any], tokenizer: Any, loss: dict[str, Any]) -> tuple[list[int], list[int]]:
    """A conversation's ids and assistant mask where align makes them (`ALIGN_MASKS`), not TRL."""
    from align.families import derived_masks
    from align.thinking import masks_without_thought, thinking_of

    if loss.get(TRANSCRIPTS):
        from align.tools import transcript_masks

        return transcript_masks(tokenizer, row["messages"], row.get("tools"))
    if loss.get(NO_THOUGHT):
        return masks_without_thought(tokenizer, row["messages"], thinking_of(tokenizer))
    return derived_masks(tokenizer, row["messages"])


def carries_tool_calls(ds: Dataset, rows: int = 32) -> bool:
    """Whether the first conversations call tools (an assistant turn's `tool_calls`, a `tool` turn or a `tools`
    column)."""
    if "tools" in ds.column_names:
        return True
    return any(m.get("tool_calls") or m["role"] == "tool"
               for row in ds.select(range(min(rows, len(ds)))) for m in row["messages"])  # fmt: skip


def render_example(row: dict[str, Any], tokenizer: Any, loss: dict[str, Any], max_length: int | None = None) -> str:
    """How TRL will tokenize one row and where its loss falls, without building a trainer (for --dry-run): cut at
    `max_length` as training cuts it, and saying so."""
    ids, mask = masked_ids(row, tokenizer, loss)
    if max_length is None or len(ids) <= max_length:
        return render_mask(ids, mask, tokenizer)
    cut = render_mask(ids[:max_length], mask[:max_length], tokenizer)
    return f"{cut} [... {len(ids) - max_length} more tokens cut at max_length={max_length}: never trained]"


# From this share of truncated training examples on, the plan warns: most completions lose their end.
TRUNCATION_WARNING = 0.5


def warn_truncation(
    stage: Stage,
    fmt: str,
    spans: list[tuple[int, Any]],
    truncated: int,
    max_length: int | None,
    positions: int | None = None,
) -> None:
    """A warning when `max_length` cuts most training examples: their ends, and the end-of-sequence token that
    teaches the model to stop, are never trained (where every example is cut, no example teaches it). The fix it
    names stays within the model's `positions`: past them, only shorter examples help."""
    if not spans or max_length is None or truncated < TRUNCATION_WARNING * len(spans):
        return
    lengths = sorted(n for n, _ in spans)
    covers = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    end = "end-of-sequence token" if fmt == "text" else "answer's end and end-of-turn token"
    cut = "every training example" if truncated == len(spans) else f"{truncated} of {len(spans)} training examples"
    if positions is not None and covers > positions:
        fix = (f"max_length %d would keep 95%% whole, past the model's {positions} positions: shorten the examples "
               "(or take a model with more positions)")  # fmt: skip
    else:
        fix = "max_length %d keeps 95%% whole"
    logger.warning(
        "stages.%s.train.max_length: %d tokens cut %s (%.0f%%): the %s of a cut example is never "
        "trained, so the model learns less where to stop; the longest is %d tokens, " + fix,
        stage.name, max_length, cut, 100 * truncated / len(spans), end, lengths[-1], covers,
    )  # fmt: skip


def _batch_size(stage: Stage) -> int:
    from trl import SFTConfig

    return int(stage.train.get("per_device_train_batch_size", SFTConfig.per_device_train_batch_size))


def _padded_tokens(lengths: list[int], batch_size: int) -> int:
    """Token slots when each batch (in data order) is padded to its longest example: the no-packing cost."""
    return sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
    )
