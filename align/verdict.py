"""Did a training stage help? A verdict from its held-out measurements before and after training.

The rule (issue #16): the per-example change after - before on the stage's held-out split, with a paired 95%
bootstrap interval of its mean (`align.evaluation.pairwise.bootstrap_interval`, seeded).
- lm, sft: each example's eval loss (lower is better); dpo: each pair's preference correctness; rm: each pair's
  accuracy (higher is better).
- An interval that excludes no change gives `improved` or `got_worse`; one that includes it (low <= 0 <= high)
  gives `did_not_learn`, with the likely causes that can be stated with numbers (a learning rate at or below the
  library's default, few steps, a warmup as long as the run, a DPO eval loss still at ln 2, tiny LoRA adapters, a
  held-out split too small to show a change).
- Falling chosen log-probabilities and shorter, more repetitive or unended answers are warnings only: chosen
  log-probabilities often fall in healthy DPO, and a tiny model's answers change length for many reasons.

Why a paired interval: the same held-out examples are measured before and after, so their difference removes what
varies from example to example (some texts are simply harder); an unpaired comparison of two means would need a
much larger change to show. The training guards (align/guards.py) watch five logs in a row and stay quiet on short
runs; this verdict needs only the two measurements, and says so even when training logged nothing alarming.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from align.evaluation.pairwise import bootstrap_interval

STATUSES = ("improved", "did_not_learn", "got_worse")
# The DPO loss of a policy that has not moved from its reference: -log(sigmoid(0)).
LN2 = math.log(2.0)
# Fewer optimizer steps than this is named as a likely cause of learning nothing.
FEW_STEPS = 20
# Fewer held-out examples than this is named as a likely cause: the interval is too wide to show a small change.
FEW_EXAMPLES = 50
# Fewer held-out examples than this: the bootstrap resamples too few values to be trusted (a warning at any status).
ROUGH_BOOTSTRAP = 10
# LoRA ranks at or below this are named as a likely cause (with the share of weights they train).
TINY_LORA_RANK = 4
# A DPO eval loss this close to ln 2 both before and after training: the policy has not moved.
LN2_TOLERANCE = 0.01
# A learning rate this many times the library's default is named as a likely cause of getting worse.
HIGH_LR_FACTOR = 10.0
# Answer warnings: a mean length down by a quarter (and 2 tokens), repeated 4-grams up by 0.1, eos rate down by 0.1.
SHORTER = 0.25
MORE_REPETITIVE = 0.1
FEWER_ENDED = 0.1
# Repeated 4-grams from which "before" answers count as loops (`be be be ...`).
LOOPING = 0.5


@dataclass(frozen=True)
class Verdict:
    """A stage's verdict.

    Attributes:
        status: `improved`, `did_not_learn` or `got_worse`.
        reasons: the deciding numbers first (the change and its interval), then the likely causes.
        warnings: signs of trouble that do not decide the status (falling chosen log-probabilities, answers that
            got shorter, more repetitive, or end less often).
    """

    status: str
    reasons: list[str]
    warnings: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """summary.json's `verdict`: {"status", "reasons", "warnings"}."""
        return {"status": self.status, "reasons": list(self.reasons), "warnings": list(self.warnings)}


@dataclass(frozen=True)
class Context:
    """What a verdict may cite besides the measurements: every field optional; only those given are used.

    Attributes:
        unit: what a held-out example is, for the text: examples, blocks, pairs.
        learning_rate: the learning rate training ran with.
        default_learning_rate: the library's default for the stage's config class.
        defaults_from: who sets that default, for the text ("TRL DPOConfig").
        steps: optimizer steps run.
        warmup_steps: warmup steps of the schedule.
        lora_r: the LoRA rank, for a stage that trained adapters.
        trainable_weights: weights that trained (with `total_weights`, the LoRA share).
        total_weights: all weights of the model.
        dpo_loss: the DPO eval loss (before, after): both at ln 2 means the policy has not moved.
        chosen_logps: per held-out pair, the chosen completion's summed log-probability (before, after).
        answers: the greedy answers (`align.evaluation.Answer`) to the same prompts (before, after).
        seed: seeds the bootstrap.
        ceiling: the measure's best mean (1 for an accuracy); a measure already there before training cannot rise.
    """

    unit: str = "examples"
    learning_rate: float | None = None
    default_learning_rate: float | None = None
    defaults_from: str | None = None
    steps: int | None = None
    warmup_steps: int | None = None
    lora_r: int | None = None
    trainable_weights: int | None = None
    total_weights: int | None = None
    dpo_loss: tuple[float | None, float | None] | None = None
    chosen_logps: tuple[Sequence[float], Sequence[float]] | None = None
    answers: tuple[Sequence[Any], Sequence[Any]] | None = None
    seed: int = 0
    ceiling: float | None = None


def loss_verdict(metric: str, before: Sequence[float], after: Sequence[float], **context: Any) -> Verdict:
    """The verdict from per-example losses before and after training (lower is better): lm and sft eval loss.

    `context` takes `Context`'s fields (the learning rate and its default, steps, ...), each optional.

    Raises:
        ValueError: no examples, or before and after of different lengths.
        TypeError: a context key `Context` does not have.
    """
    return _verdict(metric, before, after, lower_is_better=True, context=Context(**context))


def accuracy_verdict(
    metric: str, before: Sequence[float], after: Sequence[float], ceiling: float | None = 1.0, **context: Any
) -> Verdict:
    """The verdict from per-example correctness (0/1) before and after training (higher is better): dpo's
    pref_accuracy, rm's accuracy. `ceiling`: the best mean the measure has (None for a reward without one).

    `context` takes `Context`'s fields (the learning rate and its default, steps, ...), each optional.

    Raises:
        ValueError: no examples, or before and after of different lengths.
        TypeError: a context key `Context` does not have.
    """
    return _verdict(metric, before, after, lower_is_better=False, context=Context(ceiling=ceiling, **context))


def _verdict(
    metric: str, before: Sequence[float], after: Sequence[float], *, lower_is_better: bool, context: Context
) -> Verdict:
    before, after = [float(v) for v in before], [float(v) for v in after]
    if len(before) != len(after):
        raise ValueError(f"{metric}: {len(before)} examples before training but {len(after)} after")
    if not before:
        raise ValueError(f"{metric}: no held-out examples to judge by")
    n, unit = len(before), context.unit
    warnings = answer_warnings(context) + chosen_warnings(context)
    bad = sum(not math.isfinite(v) for v in after)
    if bad:  # a loss that became infinite cannot be averaged; it is worse than any finite one
        reason = f"{metric} is not finite after training on {bad} of {n} held-out {unit}"
        return Verdict("got_worse", [reason], warnings)
    pairs = [(b, a) for b, a in zip(before, after, strict=True) if math.isfinite(b)]
    if not pairs:  # a model that started broken (every loss infinite) and ends finite
        reason = f"{metric} was not finite before training on any of {n} held-out {unit}, and is now"
        return Verdict("improved", [reason], warnings)
    if len(pairs) < ROUGH_BOOTSTRAP:
        # Seen: an SFT eval split of 16 rows of which max_length left 2; an interval over two values decides little.
        warnings.append(f"only {_held_out(len(pairs), unit)}: an interval resampled from so few is rough")
    differences = [a - b for b, a in pairs]
    mean_before = sum(b for b, _ in pairs) / len(pairs)
    mean_after = sum(a for _, a in pairs) / len(pairs)
    low, high = bootstrap_interval(differences, seed=context.seed)
    change = mean_after - mean_before
    digits = _digits(high - low, change)
    numbers = (
        f"{metric} {_number(mean_before, digits)} → {_number(mean_after, digits)}, change {_signed(change, digits)} "
        f"[{_signed(low, digits)}, {_signed(high, digits)}] over {_held_out(len(pairs), unit)}"
    )
    if low <= 0 <= high:
        causes = stuck_causes(context, len(pairs), (high - low) / 2, digits)
        if context.ceiling is not None and mean_before >= context.ceiling:
            causes.insert(0, f"saturated: {metric} was already {_number(mean_before, digits)} before training on "
                          f"every one of {_held_out(len(pairs), unit)}, so it could not rise; a harder held-out set, "
                          "or the eval loss and margins, can show what training did")  # fmt: skip
        return Verdict("did_not_learn", [numbers, *causes], warnings)
    better = (high < 0) == lower_is_better
    if better:
        return Verdict("improved", [numbers], warnings)
    return Verdict("got_worse", [numbers, *worse_causes(context)], warnings)


# --------------------------------------------------------------------------------------------------
# Likely causes: only those that can be stated with numbers


def stuck_causes(context: Context, n: int, half_width: float, digits: int) -> list[str]:
    """Why a stage may have learned nothing, from the settings it trained with and the size of its eval split."""
    causes = []
    lr, default = context.learning_rate, context.default_learning_rate
    if lr is not None and default is not None and lr <= default:
        who = context.defaults_from or "the library"
        if lr == default:
            causes.append(f"the learning rate ({format_lr(lr)}, {who}'s default) may be too low")
        else:
            causes.append(
                f"the learning rate ({format_lr(lr)}, {_times(default / lr)} below {who}'s default "
                f"{format_lr(default)}) may be too low"
            )
    if context.dpo_loss is not None:
        loss_before, loss_after = context.dpo_loss
        if (
            loss_before is not None
            and loss_after is not None
            and abs(loss_before - LN2) < LN2_TOLERANCE
            and abs(loss_after - LN2) < LN2_TOLERANCE
        ):
            causes.append(
                f"eval loss stays at ln 2 ({loss_before:.4f} → {loss_after:.4f}): the policy has hardly moved "
                "from its reference"
            )
    steps, warmup = context.steps, context.warmup_steps
    if steps is not None and warmup and warmup * 2 >= steps:
        causes.append(f"warmup takes {warmup} of the {steps} steps: the learning rate was below its set value "
                      "for most of the run")  # fmt: skip
    if steps is not None and steps < FEW_STEPS:
        causes.append(f"only {steps} optimizer step{'s' if steps != 1 else ''}")
    if context.lora_r is not None and context.lora_r <= TINY_LORA_RANK:
        share = ""
        if context.trainable_weights and context.total_weights:
            share = (
                f": {context.trainable_weights:,} of {context.total_weights:,} weights "
                f"({context.trainable_weights / context.total_weights:.2%}) train"
            )
        causes.append(f"LoRA rank r={context.lora_r}{share}")
    if n < FEW_EXAMPLES and half_width > 0:  # (an interval without width: not one example changed, whatever n)
        causes.append(
            f"only {_held_out(n, context.unit)}: the interval is ±{half_width:.{digits}f} wide, so a smaller change "
            "cannot show"
        )
    return causes


def worse_causes(context: Context) -> list[str]:
    """Why a stage may have made things worse: a learning rate far above the library's default."""
    lr, default = context.learning_rate, context.default_learning_rate
    if lr is not None and default and lr >= HIGH_LR_FACTOR * default:
        who = context.defaults_from or "the library"
        return [
            f"the learning rate ({format_lr(lr)}, {_times(lr / default)} {who}'s default {format_lr(default)}) "
            "may be too high"
        ]
    return []


# --------------------------------------------------------------------------------------------------
# Warnings: attached to any status, never deciding it


def chosen_warnings(context: Context) -> list[str]:
    """The chosen completions' log-probability fell (its paired interval below zero): the chosen answers became
    less likely along with the rejected ones. Common in healthy DPO, so a warning; alarming with the answer
    warnings."""
    if context.chosen_logps is None:
        return []
    before, after = (list(map(float, side)) for side in context.chosen_logps)
    if not before or len(before) != len(after):
        return []
    differences = [a - b for b, a in zip(before, after, strict=True)]
    low, high = bootstrap_interval(differences, seed=context.seed)
    if high >= 0:
        return []
    mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
    change = _signed(mean_after - mean_before, 1)
    return [
        f"chosen log-probability fell {_number(mean_before, 1)} → {_number(mean_after, 1)} (change {change} "
        f"[{_signed(low, 1)}, {_signed(high, 1)}] over {_held_out(len(before), 'pairs')}): the chosen answers became "
        "less likely too (common in healthy preference training; a concern together with worse answers)"
    ]


def answer_warnings(context: Context) -> list[str]:
    """Greedy answers that got shorter, more repetitive, or end on their own less often (eos rate), from
    `answer_statistics` of the same prompts' answers before and after training."""
    if context.answers is None:
        return []
    from align.evaluation import answer_statistics

    answers_before, answers_after = (list(side) for side in context.answers)
    if not answers_before or not answers_after:
        return []
    before, after = answer_statistics(answers_before), answer_statistics(answers_after)
    n = len(answers_after)
    out = []
    drop = before["mean_length"] - after["mean_length"]
    # Answers that looped before and loop less now are shorter because the loop broke: no warning for that.
    loops_broke = before["repetition"] >= LOOPING and before["repetition"] - after["repetition"] >= MORE_REPETITIVE
    if before["mean_length"] > 0 and drop >= 2 and drop / before["mean_length"] >= SHORTER and not loops_broke:
        out.append(f"answers got shorter: {before['mean_length']:.1f} → {after['mean_length']:.1f} tokens on average "
                   f"over {n} greedy answers")  # fmt: skip
    if after["repetition"] - before["repetition"] >= MORE_REPETITIVE:
        out.append(f"answers got more repetitive: repeated 4-grams {before['repetition']:.2f} → "
                   f"{after['repetition']:.2f} over {n} greedy answers")  # fmt: skip
    if before["eos_rate"] - after["eos_rate"] >= FEWER_ENDED:
        out.append(f"fewer answers end on their own: {before['eos_rate']:.0%} → {after['eos_rate']:.0%} of {n} "
                   "greedy answers end with eos (the rest hit the token limit)")  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# What a stage trained with, for the likely causes


def training_context(trainer: Any) -> dict[str, Any]:
    """The `Context` fields a Trainer can tell after training: its learning rate and the config class's default,
    steps run, warmup steps, and for LoRA adapters their rank and the share of weights they train."""
    args = trainer.args
    default, defaults_from = library_default(type(args), "learning_rate")
    steps = int(trainer.state.global_step)
    out: dict[str, Any] = {
        "learning_rate": float(args.learning_rate),
        "default_learning_rate": default,
        "defaults_from": defaults_from,
        "steps": steps,
    }
    # transformers' own reading of warmup_steps (a count, or below 1 a share of the planned steps).
    with contextlib.suppress(AttributeError, TypeError, ValueError):  # without the helper the warmup is not cited
        out["warmup_steps"] = int(args.get_warmup_steps(max(1, trainer.state.max_steps or steps)))
    model = trainer.model
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        adapter = peft_config.get("default") or next(iter(peft_config.values()))
        out["lora_r"] = getattr(adapter, "r", None)
        parameters = list(model.parameters())
        out["trainable_weights"] = sum(p.numel() for p in parameters if p.requires_grad)
        out["total_weights"] = sum(p.numel() for p in parameters)
    return out


def library_default(config_class: type, name: str) -> tuple[float | None, str | None]:
    """A config class's default for a field, and who sets it ("TRL DPOConfig", "transformers TrainingArguments"):
    read from the class that declares the field (align's LMConfig inherits transformers' learning rate), so the
    verdict follows the library's default when the library changes it."""
    import dataclasses

    for cls in config_class.__mro__:
        if name in vars(cls) and dataclasses.is_dataclass(cls):
            default = next((f.default for f in dataclasses.fields(cls) if f.name == name), None)
            library = {"trl": "TRL", "transformers": "transformers"}.get(cls.__module__.split(".")[0], "align")
            return (float(default) if isinstance(default, int | float) else None), f"{library} {cls.__name__}"
    return None, None


# --------------------------------------------------------------------------------------------------
# The measurements verdicts take, before and after training


def example_losses(trainer: Any) -> list[float]:
    """Each held-out example's eval loss: the mean token cross-entropy over its labelled tokens (labels != -100),
    each position predicting the next token as the model's own loss does, over the Trainer's eval dataloader (the
    batches `trainer.evaluate()` sees). One forward pass over the eval split, no gradients.

    Their mean weighs every example alike; summary.json's `eval_loss` (`token_mean_loss`) weighs every token alike,
    so long examples count more. The Trainer's own figure (`eval_loss_trainer`) differs again: on models whose loss
    transformers 5 does not recognise as shifted (GPT-2: `loss_type` None) it divides the summed loss by every label,
    the first of each row too, which no position predicts: 63/64 of the true mean on a 64-token block (measured:
    6.1456 against 6.2431 here). The verdict says "eval loss per example" for that reason.
    """
    return [total / count for total, count in example_token_losses(trainer)]


def token_mean_loss(pairs: Sequence[tuple[float, int]]) -> float | None:
    """The eval loss as a token mean over the held-out examples: every labelled token's cross-entropy weighs alike,
    each example counted once whatever the process count (`example_token_losses`)."""
    tokens = sum(count for _, count in pairs)
    return sum(total for total, _ in pairs) / tokens if tokens else None


def example_token_losses(trainer: Any, dataloader: Any = None) -> list[tuple[float, int]]:
    """Each held-out example's summed token cross-entropy and its count of labelled tokens (labels != -100), each
    position predicting the next token as the model's own loss does, over `dataloader` (default: the Trainer's eval
    dataloader, the batches `trainer.evaluate()` sees). One forward pass, no gradients.

    A padding-free (packed) batch holds several examples in one row: they are told apart by `position_ids`, which
    restart at 0 with every example (TRL's collator also masks each example's first label, so no position predicts
    across a boundary). A row without `position_ids` (wrapped packing, which cuts examples mid-sequence) counts as
    one example: its loss is a block's, not an example's. Examples without a labelled token are left out.
    Under several processes every process measures its share and the shares are gathered, in order, each example
    once (the rows `even_batches` repeats to fill a process's last batch are dropped).
    """
    import torch
    import torch.nn.functional as F

    model, accelerator = trainer.model, trainer.accelerator
    sums: list[float] = []
    counts: list[float] = []
    was_training = model.training
    model.eval()
    try:
        # no_grad, not inference_mode: before training, a tensor a model caches in inference mode (a lazily built
        # rotary table) could not be used by the backward pass later.
        with torch.no_grad():
            for batch in dataloader if dataloader is not None else trainer.get_eval_dataloader():
                labels = batch["labels"]
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                logits = model(**inputs, use_cache=False).logits
                positions = batch.get("position_ids")
                row_sums, row_counts = [], []
                for row in range(labels.shape[0]):
                    # One row at a time in fp32: a whole batch's fp32 logits can hold gigabytes on a large vocabulary.
                    token_loss = F.cross_entropy(
                        logits[row, :-1].float(), labels[row, 1:], ignore_index=-100, reduction="none"
                    )
                    labelled = labels[row, 1:] != -100
                    if positions is None:
                        example = torch.zeros_like(labelled, dtype=torch.long)
                    else:
                        example = torch.cumsum(positions[row] == 0, dim=0)[1:]  # which example each target is in
                    parts = [labelled & (example == index) for index in torch.unique(example[labelled]).tolist()]
                    row_sums.append([float(token_loss[part].sum()) for part in parts])
                    row_counts.append([float(part.sum()) for part in parts])
                sums.extend(_gathered(accelerator, row_sums))
                counts.extend(_gathered(accelerator, row_counts))
    finally:
        model.train(was_training)
    return [(total, int(count)) for total, count in zip(sums, counts, strict=True)]


def _gathered(accelerator: Any, rows: list[list[float]]) -> list[float]:
    """A batch's example losses (a list per row of the batch) from every process, each example once: with
    `even_batches`, the rows that fill the last batch of a process's share repeat earlier ones, and
    `gather_for_metrics` drops them (gathering every process's list as it was counted 16 examples where the eval
    split had 6)."""
    if accelerator.num_processes == 1:
        return [x for row in rows for x in row]
    import torch

    width = max([len(r) for r in rows] + [1])
    table = torch.full((len(rows), width), float("nan"), device=accelerator.device)
    for i, row in enumerate(rows):
        table[i, : len(row)] = torch.tensor(row, device=accelerator.device)
    table = accelerator.pad_across_processes(table, dim=1, pad_index=float("nan"))
    flat = accelerator.gather_for_metrics(table).flatten().tolist()
    return [x for x in flat if x == x]  # NaN: padding


def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    max_new_tokens: int = 48,
    template_kwargs: dict[str, Any] | None = None,
) -> list[Any]:
    """Greedy answers (`align.evaluation.Answer`: text, tokens, whether it ended on eos) to the stage's eval
    prompts, at most `max_new_tokens` and half the model's positions (room for the prompt), in batches;
    `template_kwargs`: the chat template's (a thinking switch)."""
    from align.evaluation import generate_batched
    from align.models import model_positions

    if not prompts:
        return []
    limit = model_positions(model.config)
    if limit is not None:
        max_new_tokens = max(1, min(max_new_tokens, limit // 2))
    answers = generate_batched(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                               template_kwargs=template_kwargs)  # fmt: skip
    return [sample[0] for sample in answers]


# --------------------------------------------------------------------------------------------------
# The eval stage's side-by-side answers


def shown_answer(row: dict[str, Any]) -> Any:
    """A generations.jsonl row's answer as a person reads it: where it was reached through tools, its transcript,
    each call (`-> multiply(a=3, b=4)`) and result (`<- 12`) on a line, the final answer last."""
    turns = row.get("turns")
    if not turns:
        return row.get("answer")
    lines = []
    for turn in turns:
        if turn.get("role") == "tool":
            lines.append(f"<- {turn.get('content')}")
            continue
        if turn.get("content"):
            lines.append(str(turn["content"]))
        for call in turn.get("tool_calls") or []:
            function = call.get("function", call)
            arguments = function.get("arguments")
            shown = (", ".join(f"{k}={v!r}" for k, v in arguments.items()) if isinstance(arguments, dict)
                     else str(arguments or ""))  # fmt: skip
            lines.append(f"-> {function.get('name')}({shown})")
    return "\n".join(lines)


def regressions(
    rows: Sequence[dict[str, Any]], baseline: str, candidate: str, n: int = 10, *, judge: str | None = None
) -> list[dict[str, Any]]:
    """The prompts where the candidate fell furthest behind the baseline, by the judge's score, largest first.

    `rows` are the eval stage's generations.jsonl rows ({"prompt_index", "prompt", "reference", "model", "sample",
    "answer", "scores": {judge: score}, ...}). Per prompt, each model's score is the mean over its samples and its
    shown answer is sample 0 (the lowest sample). `judge` defaults to the first judge of the first scored row.

    Returns:
        Up to `n` dicts, most negative `difference` (candidate - baseline) first: {"prompt_index", "prompt",
        "reference", "baseline", "candidate" (answers), "baseline_score", "candidate_score", "difference"}. Prompts
        not answered and scored by both models are left out.
    """
    if judge is None:
        judge = next((next(iter(r["scores"])) for r in rows if r.get("scores")), None)
        if judge is None:
            return []
    by_prompt: dict[Any, dict[str, Any]] = {}
    for row in rows:
        if row.get("model") not in (baseline, candidate):
            continue
        score = (row.get("scores") or {}).get(judge)
        if not isinstance(score, int | float) or not math.isfinite(score):
            continue
        fresh = {"prompt": row.get("prompt"), "reference": row.get("reference"), "models": {}}
        entry = by_prompt.setdefault(row["prompt_index"], fresh)
        side = entry["models"].setdefault(row["model"], {"scores": [], "answer": None, "sample": None})
        side["scores"].append(float(score))
        sample = row.get("sample", 0)
        if side["sample"] is None or sample < side["sample"]:
            side["sample"], side["answer"] = sample, shown_answer(row)
    out = []
    for index, entry in by_prompt.items():
        sides = entry["models"]
        if baseline not in sides or candidate not in sides:
            continue
        base = sum(sides[baseline]["scores"]) / len(sides[baseline]["scores"])
        cand = sum(sides[candidate]["scores"]) / len(sides[candidate]["scores"])
        out.append({
            "prompt_index": index, "prompt": entry["prompt"], "reference": entry["reference"],
            "baseline": sides[baseline]["answer"], "candidate": sides[candidate]["answer"],
            "baseline_score": base, "candidate_score": cand, "difference": cand - base,
        })  # fmt: skip
    out.sort(key=lambda r: (r["difference"], str(r["prompt_index"])))
    return out[: max(0, n)]


# --------------------------------------------------------------------------------------------------
# Numbers in text


def format_lr(value: float) -> str:
    """A learning rate as people write it: 1e-6, 3e-3, 2.5e-5, 1e-4, 0.01."""
    if not 0 < abs(value) < 1e-2:
        return f"{value:g}"
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def short(verdict: dict[str, Any] | None, width: int = 70) -> str:
    """A verdict in one short line, for the console table: its status and its first reason, cut at `width`."""
    if not verdict:
        return "-"
    reasons = verdict.get("reasons") or []
    text = f"{verdict.get('status', '?')}: {reasons[0]}" if reasons else str(verdict.get("status", "?"))
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _times(ratio: float) -> str:
    """A ratio as "10x", "2.5x", "5,000x"."""
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.3g}x"


def _digits(width: float, change: float) -> int:
    """Decimals enough to tell the interval's ends apart: 2 for a width of 0.08, 3 for one of 0.003 (the change
    sets it only where the interval has no width)."""
    scale = abs(width) if width > 0 else abs(change)
    if scale == 0:
        return 2
    return int(min(6, max(2, -math.floor(math.log10(scale)))))


def _held_out(n: int, unit: str) -> str:
    """`66 held-out pairs`, `1 held-out pair`."""
    return f"{n} held-out {unit if n != 1 else unit.removesuffix('s')}"


def _number(value: float, digits: int) -> str:
    """A number with a true minus sign where negative (as `_signed` writes it), none where positive."""
    return _signed(value, digits).lstrip("+")


def _signed(value: float, digits: int) -> str:
    """A signed number with a true minus sign; zero (or what rounds to it) unsigned."""
    text = f"{abs(value):.{digits}f}"
    if float(text) == 0:
        return text
    return ("−" if value < 0 else "+") + text
