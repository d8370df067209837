"""What the preference kinds share (dpo, kto: align/stages/dpo.py, kto.py; orpo, simpo: orpo.py, simpo.py): the
reference model of the kinds that have one, and `PairStage` with its plan, the reference-free trainers of
`trl.experimental` on pairs (ORPO's, CPO's). TRL tokenizes their data inside the trainer's constructor, with no
preparation step to hook, so align's tokenized-data cache does not cover them.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from align.prompt_split import split_all_ids
from align.stages.common import (
    StageKind,
    max_length_setting,
    measure_pairs,
    pair_examples,
    summarize_pairs,
    warn_most_dropped,
)
from align.values import Setting, StageParts, StartingPoint

if TYPE_CHECKING:
    from align.recipe import Stage

logger = logging.getLogger(__name__)

PAIR_BATCHES = {
    # TRL's pair collator needs the string columns it keeps beside the token ids; the Trainer's default drops them.
    "remove_unused_columns": Setting(False, "align (managed): TRL's pair collator reads every column"),
    # Its batches hold chosen_input_ids and rejected_input_ids, no input_ids: the Trainer cannot count their tokens
    # (it warns at every step), so the summary's train_tokens and tokens_per_s are null.
    "include_num_input_tokens_seen": Setting("no", "align (managed): pair batches have no input_ids to count"),
}


class PairStage(StageKind):
    """A reference-free trainer of `trl.experimental` on preference pairs, with preference accuracy (`average`: by
    each completion's mean token log-probability) and greedy answers to held-out prompts before and after."""

    unit = "pairs"
    trainer_name = ""  # the class in `trl.experimental`
    method = ""  # as the guards' messages name it
    average = False

    def setup(self) -> None:
        from align.data import first_unique
        from align.models import ensure_chat_template

        ensure_chat_template(self.tokenizer)
        self.extra = {"reference": "none"}
        self.max_length = self.plan.settings["max_length"].value
        self.train, self.eval = (fitting(self.data[split], self.tokenizer, self.max_length, split)
                                 for split in ("train", "validation"))  # fmt: skip
        self.prompts = first_unique(self.eval["prompt"], self.stage.generations)

    def trainer(self, args: Any, callbacks: list[Any]) -> Any:
        from align.models import lora_config
        from align.patches import experimental

        return experimental(self.trainer_name)(
            model=self.model, args=args, train_dataset=self.train, eval_dataset=self.eval,
            processing_class=self.tokenizer, callbacks=callbacks,
            peft_config=lora_config(self.stage.peft) if self.start.lora == "new" else None,
        )  # fmt: skip

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


def fits(tokenizer: Any, pairs: Any, max_length: int | None) -> list[bool]:
    """Per pair, whether its prompt leaves room for an answer in `max_length` (with the BOS token TRL may add).

    TRL's ORPO and CPO trainers shorten the answers to fit `max_length` but keep a prompt that alone is longer: the
    sequence then runs past the model's positions and fails mid-training (IndexError in the embedding)."""
    if max_length is None:
        return [True] * len(pairs)
    ids = split_all_ids(tokenizer, list(pairs["prompt"]), list(pairs["chosen"]))
    return [len(p) < max_length - 1 for p, _ in ids]


def fitting(pairs: Any, tokenizer: Any, max_length: int | None, split: str) -> Any:
    """The pairs whose prompt leaves room for an answer (`fits`); the others are dropped, and the log says so."""
    keep = fits(tokenizer, pairs, max_length)
    if all(keep):
        return pairs
    logger.warning("%s: %d of %d pairs dropped: the prompt alone fills max_length=%s", split,
                   len(keep) - sum(keep), len(keep), max_length)  # fmt: skip
    return pairs.select([i for i, k in enumerate(keep) if k])


def plan_pairs(stage: Stage, *, data: Any, tokenizer: Any, config: Any, parts: StageParts) -> StageParts:
    """What a reference-free pair stage's plan shares: max_length (capped at the model's positions) and, with the
    data, the pairs `max_length` cuts (TRL shortens their answers to fit) or drops (their prompt alone fills it; none
    left in a split is a problem here), the planned steps and two rendered pairs (the compared answer in [[ ]])."""
    from align.models import ensure_chat_template
    from align.plan import batch_figures

    length = max_length_setting(stage, config)
    parts.fixed.update({"max_length": length, **PAIR_BATCHES})
    if tokenizer is None or data is None:
        return parts
    ensure_chat_template(tokenizer)
    max_length = length.value
    train = data["train"]
    sides = [split_all_ids(tokenizer, list(train["prompt"]), list(train[side])) for side in ("chosen", "rejected")]
    lengths = [len(p) + len(c) for side in sides for p, c in side]
    truncated = sum(max_length is not None and n > max_length for n in lengths)
    kept = {}
    for split, pairs in (("train", train), ("eval", data["validation"])):
        kept[split] = sum(fits(tokenizer, pairs, max_length))
        if len(pairs) and not kept[split]:
            parts.problems.append(f"stages.{stage.name}.train.max_length: every {split} prompt fills {max_length} "
                                  "tokens, so no pair is left to learn from")  # fmt: skip
            parts.hints.append("raise max_length (align caps it at the model's positions) or shorten the prompts")
    total = len(train)
    warn_most_dropped(stage, max_length, total - kept["train"], total, "the prompt alone fills it",
                      "raise max_length (align caps it at the model's positions) or shorten the prompts")  # fmt: skip
    parts.details.update(
        train_pairs=len(train),
        train_tokens=sum(min(n, max_length or n) for n in lengths),
        max_length=max_length,
        truncation_rate=truncated / max(1, len(lengths)),
        truncated=f"{truncated} of {len(lengths)} answers (TRL shortens the answer to fit max_length)",
        dropped=f"{len(train) - kept['train']} of {len(train)} train pairs (prompt fills max_length)",
        examples=pair_examples(tokenizer, train),
    )
    parts.count = lambda effective: batch_figures(effective, kept["train"])
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
