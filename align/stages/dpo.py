"""`kind: dpo` — Direct Preference Optimization with TRL's DPOTrainer.

The reference is the stage's input model: with fresh LoRA adapters, the same weights with the adapters off (no
second copy); continuing on an earlier stage's adapters, TRL's frozen copy of them; without LoRA, a frozen copy
(adapters of the input merged first), or its log-probabilities computed once, with `precompute_ref_log_probs`.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from align.stages.common import (
    StageKind,
    StageResult,
    generation_table,
    max_length_setting,
    pair_examples,
    report_dropped,
    run_stage,
    split_all_ids,
    split_ids,
)

if TYPE_CHECKING:
    from datasets import Dataset

    from align.context import StageContext
    from align.plan import StageParts
    from align.recipe import Stage
    from align.stages.common import StartingPoint

logger = logging.getLogger(__name__)


def run(stage: Stage, ctx: StageContext) -> StageResult:
    """Align a model to preference pairs; measure preference accuracy before and after; save."""
    return run_stage(stage, ctx, DPOStage)


class DPOStage(StageKind):
    """TRL's DPOTrainer (through the tokenized-data cache) against the planned reference, with preference accuracy
    and greedy answers to held-out prompts before and after."""

    unit = "pairs"
    lm_head = True

    def setup(self) -> None:
        from align.data import first_unique
        from align.models import ensure_chat_template

        ensure_chat_template(self.tokenizer)
        # Full DPO on SFT adapters merged them first (load_start): policy and reference both start as the SFT model.
        self.ref_model, reference = reference_for(self.stage, self.start, self.model)
        logger.info("reference model: %s", reference)
        self.max_length = self.plan.settings["max_length"].value
        self.train, self.eval = self.data["train"], self.data["validation"]
        self.prompts = first_unique(self.eval["prompt"], self.stage.generations)  # each prompt has several pairs
        self.extra = {"reference": reference}

    def trainer(self, args: Any, callbacks: list[Any]) -> Any:
        from trl import DPOTrainer

        from align.cache import cached_trainer
        from align.guards import DPOGuard
        from align.models import lora_config

        return cached_trainer(DPOTrainer, "dpo", self.ctx.spec.format)(
            model=self.model, ref_model=self.ref_model, args=args, train_dataset=self.train,
            eval_dataset=self.eval, processing_class=self.tokenizer, callbacks=[*callbacks, DPOGuard(self.ctx.tracker)],
            peft_config=lora_config(self.stage.peft) if self.start.lora == "new" else None,
        )  # fmt: skip

    def check(self, trainer: Any) -> None:
        report_dropped(
            self.stage, trainer, (len(self.train), len(self.eval)),
            reason=f"the prompt alone fills max_length={self.max_length}",
            refusal=f"every {{split}} prompt fills {self.max_length} tokens, so no pair is left to learn from",
            hint="raise max_length (align caps it at the model's positions) or shorten the prompts",
        )  # fmt: skip
        self.extra.update(beta=trainer.args.beta, loss_type=trainer.args.loss_type)

    def measure(self, trainer: Any) -> dict[str, Any]:
        from align.verdict import greedy_answers

        correct, chosen = preference_pairs(trainer.model, self.tokenizer, self.eval, self.max_length)
        return {
            "answers": greedy_answers(trainer.model, self.tokenizer, self.prompts),
            "correct": correct,  # per eval pair: 1 where the chosen completion is the likelier
            "chosen_logps": chosen,
            "pref_accuracy": sum(correct) / max(1, len(correct)),
        }

    def summarize(self, before, after, measured_before, measured_after):
        from align.verdict import accuracy_verdict

        metrics = {
            "reward_accuracy": after.get("eval_rewards/accuracies"),
            "reward_margin": after.get("eval_rewards/margins"),
            "pref_accuracy_before": measured_before["pref_accuracy"],
            "pref_accuracy": measured_after["pref_accuracy"],
        }
        answers = (measured_before["answers"], measured_after["answers"])
        verdict = accuracy_verdict(
            "pref_accuracy", measured_before["correct"], measured_after["correct"], unit="pairs",
            dpo_loss=(before.get("eval_loss"), after.get("eval_loss")),
            chosen_logps=(measured_before["chosen_logps"], measured_after["chosen_logps"]), answers=answers,
            **self.trained_with,
        )  # fmt: skip
        texts = ([a.text for a in side] for side in answers)
        return metrics, {"generations": generation_table(self.ctx, self.prompts, *texts), "verdict": verdict}


def reference_plan(stage: Stage, start: StartingPoint) -> str:
    """What the reference model is, in a sentence: for the summary, the log and the dry run alike."""
    if start.lora == "continue":
        return "the input's LoRA adapters, copied by TRL as a frozen 'ref' adapter (no second model)"
    if start.lora == "new":
        return "the input model with the LoRA adapters switched off (no second model in memory)"
    if stage.train.get("precompute_ref_log_probs"):
        return "the input model's log-probabilities, computed once before training (no second model kept)"
    if start.lora == "merge":
        return "a frozen copy of the input model, its LoRA adapters merged into the base"
    return "a frozen copy of the input model"


def reference_for(stage: Stage, start: StartingPoint, model: Any) -> tuple[Any, str]:
    """The reference model (None where TRL needs none) and a sentence saying what it is."""
    reference = reference_plan(stage, start)
    if start.lora in ("new", "continue") or stage.train.get("precompute_ref_log_probs"):
        return None, reference
    # An explicit frozen copy: TRL would otherwise reload the reference from config._name_or_path, which a model
    # built from scratch does not have.
    frozen = copy.deepcopy(model).eval()
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    return frozen, reference


# --------------------------------------------------------------------------------------------------
# Preference accuracy


def completion_logps(model: Any, tokenizer: Any, prompts: list[Any], completions: list[Any], max_length: int | None):
    """Summed log-probability of each completion given its prompt, in batches (prompt cut from the left)."""
    import torch

    device = next(model.parameters()).device
    sequences, starts = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        p, c = split_ids(tokenizer, prompt, completion)
        if max_length is not None and len(p) + len(c) > max_length:
            # Like training: keep the completion (cut at max_length) and as much of the prompt's end as fits.
            c = c[: max_length - 1]
            p = p[len(p) - (max_length - len(c)) :]
        sequences.append(p + c)
        starts.append(len(p))
    totals = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(sequences), 16):
            batch = sequences[i : i + 16]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
            for row, seq in enumerate(batch):
                start = max(starts[i + row], 1)
                totals.append(float(logps[row, start - 1 : len(seq) - 1].sum()))
    finally:
        model.train(was_training)
    return totals


def preference_accuracy(model: Any, tokenizer: Any, pairs: Dataset, max_length: int | None) -> float:
    """Share of pairs where the model gives the chosen completion a higher summed log-probability than the rejected."""
    correct, _ = preference_pairs(model, tokenizer, pairs, max_length)
    return sum(correct) / max(1, len(correct))


def preference_pairs(
    model: Any, tokenizer: Any, pairs: Dataset, max_length: int | None
) -> tuple[list[int], list[float]]:
    """Per pair: 1 where the chosen completion's summed log-probability exceeds the rejected one's, else 0; and the
    chosen completion's summed log-probability. What `preference_accuracy` averages, kept per pair for the verdict's
    paired interval and its falling-chosen warning."""
    chosen = completion_logps(model, tokenizer, pairs["prompt"], pairs["chosen"], max_length)
    rejected = completion_logps(model, tokenizer, pairs["prompt"], pairs["rejected"], max_length)
    return [int(c > r) for c, r in zip(chosen, rejected, strict=True)], chosen


# --------------------------------------------------------------------------------------------------
# Dry run


def plan(stage: Stage, *, spec: Any, data: Any, tokenizer: Any, config: Any, start: StartingPoint) -> StageParts:
    """A DPO stage's part of its plan: max_length, the reference model, and, with the data, the pairs whose prompt
    alone fills `max_length` (TRL drops them; none left in a split is a problem here, before any stage trains)."""
    from align.models import ensure_chat_template
    from align.plan import StageParts, batch_figures

    length = max_length_setting(stage, config)
    parts = StageParts(
        fixed={"max_length": length}, details={"input": start.summary(), "reference": reference_plan(stage, start)}
    )
    if tokenizer is None or data is None:
        return parts
    ensure_chat_template(tokenizer)
    max_length = length.value
    kept, lengths, truncated = {}, [], 0
    for split, pairs in (("train", data["train"]), ("eval", data["validation"])):
        prompts = list(pairs["prompt"])
        sides = [split_all_ids(tokenizer, prompts, list(pairs[side])) for side in ("chosen", "rejected")]
        if split == "train":
            lengths = [len(p) + len(c) for side in sides for p, c in side]
            truncated = sum(max_length is not None and n > max_length for n in lengths)
        # TRL drops a pair whose prompt alone fills max_length: nothing of either answer would be left.
        kept[split] = sum(max_length is None or len(p) < max_length for p, _ in sides[0])
        if len(pairs) and not kept[split]:
            parts.problems.append(
                f"stages.{stage.name}.train.max_length: every {split} prompt fills {max_length} tokens, so no pair "
                "is left to learn from"
            )
            parts.hints.append("raise max_length (align caps it at the model's positions) or shorten the prompts")
    parts.details.update(
        train_pairs=len(data["train"]),
        train_tokens=sum(lengths),
        max_length=max_length,
        truncation_rate=truncated / max(1, len(lengths)),
        dropped=f"{len(data['train']) - kept['train']} of {len(data['train'])} train pairs (prompt fills max_length)",
        examples=pair_examples(tokenizer, data["train"]),
    )
    parts.count = lambda effective: batch_figures(effective, kept["train"])
    return parts
