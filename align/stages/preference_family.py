"""What the preference kinds share (dpo, kto: align/stages/dpo.py, kto.py; orpo, simpo: orpo.py, simpo.py): the
reference model of the kinds that have one, one plan of what max_length does to pairs, their report plots, and
`PairKind`, the reference-free trainers of
`trl.experimental` on pairs (ORPO's, CPO's). TRL tokenizes their data inside the trainer's constructor, with no
preparation step to hook, so align's tokenized-data cache does not cover them.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from align.prompt_split import split_all_ids
from align.recipe import PREFERENCE_FORMATS
from align.stages.base import TrainingKind
from align.stages.runner import generation_table, max_length_setting, pair_examples, warn_most_dropped
from align.values import HeldOut, Setting, StageParts, StartingPoint

if TYPE_CHECKING:
    from transformers import Trainer

    from align.plan import PlanInputs
    from align.recipe import Stage

logger = logging.getLogger(__name__)

PAIR_BATCHES = {
    # TRL's pair collator needs the string columns it keeps beside the token ids; the Trainer's default drops them.
    "remove_unused_columns": Setting(False, "align (managed): TRL's pair collator reads every column"),
    # Its batches hold chosen_input_ids and rejected_input_ids, no input_ids: the Trainer cannot count their tokens
    # (it warns at every step), so the summary's train_tokens and tokens_per_s are null.
    "include_num_input_tokens_seen": Setting("no", "align (managed): pair batches have no input_ids to count"),
}


def with_pair_batches(parts: StageParts) -> StageParts:
    """`parts` with the batch settings TRL's pair collator needs (PAIR_BATCHES)."""
    parts.fixed.update(PAIR_BATCHES)
    return parts


class PairKind(TrainingKind):
    """A reference-free trainer of `trl.experimental` on preference pairs, with preference accuracy (`average`: by
    each completion's mean token log-probability) and greedy answers to held-out prompts before and after."""

    formats = PREFERENCE_FORMATS
    experimental = True
    unit = "pairs"
    method = ""  # as the guards' messages name it
    average = False

    def plots(self, rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, str, str]]:
        return preference_plots(rows)

    def plan_details(self, start: StartingPoint) -> dict[str, str]:
        """What the dry run says of the method: its input, its reference (none), where its loss falls."""
        return {"input": start.summary(), "reference": f"none ({self.method} is reference-free)"}

    def plan_parts(self, stage: Stage, inputs: PlanInputs) -> StageParts:
        return with_pair_batches(plan_pairs(stage, inputs, StageParts(details=self.plan_details(inputs.start))))

    def setup(self) -> None:
        from align.data import first_unique
        from align.models import ensure_chat_template

        ensure_chat_template(self.tokenizer)
        self.extra = {"reference": "none"}
        self.max_length = self.planned.settings["max_length"].value
        self.train, self.eval = (fitting(self.data[split], self.tokenizer, self.max_length, split)
                                 for split in ("train", "validation"))  # fmt: skip
        self.prompts = first_unique(self.eval["prompt"], self.stage.generations)

    def guards(self) -> list[Any]:
        from align.guards import PreferenceGuard

        return [PreferenceGuard(self.ctx.tracker, method=self.method, stuck_loss=None)]

    def measure(self, trainer: Any) -> dict[str, Any]:
        return measure_pairs(self, trainer, self.eval, self.average)

    def check(self, trainer: Any) -> None:
        # What the card and summary.json say it trained with (the method's own settings, as the trainer holds them).
        self.extra.update({k: getattr(trainer.args, k) for k in ("beta", "loss_type", "cpo_alpha", "simpo_gamma")
                           if hasattr(trainer.args, k)})  # fmt: skip

    def summarize(self, before, after, measured_before, measured_after):
        metrics, extra = summarize_pairs(self, after, measured_before, measured_after)
        return {**metrics, **self.own_metrics(after)}, extra

    def own_metrics(self, after: dict[str, Any]) -> dict[str, Any]:
        """The method's own figures from the final evaluation."""
        return {}


def fits(tokenizer: Any, pairs: Any, max_length: int | None, room: int = 1) -> list[bool]:
    """Per pair, whether its prompt leaves room for an answer in `max_length`: `room` tokens beside it (1: the BOS
    token TRL's ORPO and CPO trainers may add; 0: DPO and KTO, which drop a row whose prompt alone fills it).

    TRL's ORPO and CPO trainers shorten the answers to fit `max_length` but keep a prompt that alone is longer: the
    sequence then runs past the model's positions and fails mid-training (IndexError in the embedding)."""
    if max_length is None:
        return [True] * len(pairs)
    ids = split_all_ids(tokenizer, list(pairs["prompt"]), list(pairs["chosen"]))
    return [len(p) < max_length - room for p, _ in ids]


def fitting(pairs: Any, tokenizer: Any, max_length: int | None, split: str) -> Any:
    """The pairs whose prompt leaves room for an answer (`fits`); the others are dropped, and the log says so."""
    keep = fits(tokenizer, pairs, max_length)
    if all(keep):
        return pairs
    logger.warning("%s: %d of %d pairs dropped: the prompt alone fills max_length=%s", split,
                   len(keep) - sum(keep), len(keep), max_length)  # fmt: skip
    return pairs.select([i for i, k in enumerate(keep) if k])


# What a user does about a max_length that leaves too little of the data: said by every length check of every kind.
LENGTH_HINT = "raise max_length (align caps it at the model's positions) or shorten the prompts"


def plan_pair_lengths(stage: Stage, data: Any, tokenizer: Any, max_length: int | None, room: int) -> StageParts:
    """What `max_length` does to preference pairs, planned once for every pair kind: the answers it cuts (TRL
    shortens each side to fit), the pairs it drops (the prompt alone leaves fewer than `room` tokens: `fits`; none
    left in a split is a problem here, before any stage trains, and most of the train pairs a warning), the train
    tokens as TRL will see them (each side capped at `max_length`), the planned steps and two rendered pairs."""
    from align.plan import batch_figures

    parts = StageParts()
    train = data["train"]
    sides = [split_all_ids(tokenizer, list(train["prompt"]), list(train[side])) for side in ("chosen", "rejected")]
    lengths = [len(p) + len(c) for side in sides for p, c in side]
    truncated = sum(max_length is not None and n > max_length for n in lengths)
    kept = {}
    for split, pairs in (("train", train), ("eval", data["validation"])):
        kept[split] = sum(fits(tokenizer, pairs, max_length, room))
        if len(pairs) and not kept[split]:
            parts.problems.append(f"stages.{stage.name}.train.max_length: every {split} prompt fills {max_length} "
                                  "tokens, so no pair is left to learn from")  # fmt: skip
            parts.hints.append(LENGTH_HINT)
    total = len(train)
    warn_most_dropped(stage, max_length, total - kept["train"], total, "the prompt alone fills it", LENGTH_HINT)
    parts.details.update(
        train_pairs=total,
        train_tokens=sum(min(n, max_length or n) for n in lengths),
        max_length=max_length,
        truncation_rate=truncated / max(1, len(lengths)),
        truncated=f"{truncated} of {len(lengths)} answers (TRL shortens the answer to fit max_length)",
        dropped=f"{total - kept['train']} of {total} train pairs (prompt fills max_length)",
        examples=pair_examples(tokenizer, train),
    )
    parts.count = lambda effective: batch_figures(effective, kept["train"])
    return parts


def plan_pairs(stage: Stage, inputs: PlanInputs, parts: StageParts, room: int = 1) -> StageParts:
    """What a pair stage's plan shares (dpo, orpo, simpo): max_length (capped at the model's positions) and, with
    the data, what it cuts and drops (`plan_pair_lengths`)."""
    from align.models import ensure_chat_template

    length = max_length_setting(stage, inputs.config)
    parts.fixed["max_length"] = length
    if inputs.tokenizer is None or inputs.data is None:
        return parts
    ensure_chat_template(inputs.tokenizer)
    lengths = plan_pair_lengths(stage, inputs.data, inputs.tokenizer, length.value, room)
    parts.details.update(lengths.details)
    parts.problems += lengths.problems
    parts.hints += lengths.hints
    parts.count = lengths.count
    return parts


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
# The held-out measure of the pair kinds (dpo, orpo, simpo; kto on pairs measures as they do)


def measure_pairs(stage_kind: TrainingKind, trainer: Trainer, pairs: Any, average: bool = False) -> HeldOut:
    """A preference stage's held-out measure, before or after training: per pair whether the policy finds the chosen
    completion likelier (by summed log-probability, or with `average` by its mean per token), the chosen
    completion's log-probability, and greedy answers to the stage's prompts (`stage_kind.prompts`)."""
    from align.evaluation.likelihood import preference_pairs
    from align.verdict import greedy_answers

    model, tokenizer = trainer.model, stage_kind.tokenizer
    correct, chosen = preference_pairs(model, tokenizer, pairs, stage_kind.max_length, average)
    # Per pair: 1 where the chosen completion is the likelier.
    return HeldOut(
        correct,
        greedy_answers(model, tokenizer, stage_kind.prompts, template_kwargs=stage_kind.template_kwargs),
        chosen_logps=chosen,
    )


def summarize_pairs(
    stage_kind: TrainingKind,
    after: dict[str, Any],
    measured_before: HeldOut,
    measured_after: HeldOut,
    **context: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A preference stage's summary metrics (the last eval's reward accuracy and margin, `pref_accuracy` before and
    after) and its verdict and greedy answers, from `measure_pairs`; `context` adds what the verdict may cite."""
    from align.verdict import accuracy_verdict

    metrics = {
        "reward_accuracy": after.get("eval_rewards/accuracies"),
        "reward_margin": after.get("eval_rewards/margins"),
        "pref_accuracy_before": measured_before.figure,
        "pref_accuracy": measured_after.figure,
    }
    verdict = accuracy_verdict(
        "pref_accuracy", measured_before.values, measured_after.values, unit="pairs",
        answers=(measured_before.answers, measured_after.answers),
        chosen_logps=(measured_before.chosen_logps, measured_after.chosen_logps),
        **stage_kind.trained_with, **context,
    )  # fmt: skip
    generations = generation_table(stage_kind.ctx, stage_kind.prompts, measured_before.texts, measured_after.texts)
    return metrics, {"generations": generations, "verdict": verdict}


# --------------------------------------------------------------------------------------------------
# The report's plots of the preference kinds


def preference_plots(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The implicit rewards the preference trainers log (DPO, KTO, ORPO, SimPO), each series on its own steps: KTO
    logs no reward accuracy, and a margin only for evaluations that held both labels."""
    from align.plots import figure, png, series

    plots = []
    rewards = {name: series(rows, "eval", f"eval_rewards/{key}")
               for name, key in (("chosen", "chosen"), ("rejected", "rejected"), ("margin", "margins"))}  # fmt: skip
    if rewards["chosen"][0]:
        fig, (left, right) = figure(9, 3.2, columns=2)
        for (name, (x, y)), style in zip(rewards.items(), (("o-", "#2ca02c"), ("o-", "#d62728"), ("o--", "#7f7f7f")),
                                         strict=True):  # fmt: skip
            if x:
                left.plot(x, y, style[0], label=name, color=style[1])
        left.set_title("implicit rewards (eval)")
        left.legend()
        kept, tied = reward_accuracy_points(rows)
        if kept:
            right.plot([x for x, _ in kept], [y for _, y in kept], "o-", color="#1f77b4")
            right.set_ylim(0, 1.05)
        logged = kept or tied
        title = "reward accuracy (eval)" if logged else "reward accuracy (not logged by this method)"
        right.set_title(title + (", all-tie steps left out" if tied else ""), fontsize=9 if tied else None)
        for ax in (left, right):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        plots.append(("Preference rewards", png(fig),
                      "implicit rewards of chosen and rejected answers, margin, reward accuracy"))  # fmt: skip
    return plots


def reward_accuracy_points(rows: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], set[int]]:
    """The eval reward accuracy's (step, value) points worth drawing, and the steps left out: where the policy is
    still its reference (step 0) every implicit reward is 0, TRL counts those ties as wrong, and the curve would start
    at 0 beside a held-out pref_accuracy of 0.6."""
    from align.plots import series

    margin = dict(zip(*series(rows, "eval", "eval_rewards/margins"), strict=True))
    steps, values = series(rows, "eval", "eval_rewards/accuracies")
    tied = {x for x in steps if margin.get(x) == 0.0}
    return [(x, y) for x, y in zip(steps, values, strict=True) if x not in tied], tied
