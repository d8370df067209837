"""`kind: kto` — Kahneman-Tversky Optimization with TRL's KTOTrainer: learns from single answers marked desirable or
not, no pairs needed.

Data: `unpaired_preference` rows (`prompt`, `completion`, `label`: true for a desirable answer), or any preference
format, each pair giving one desirable and one undesirable row.

KTO estimates its KL term from mismatched prompt/completion pairs inside a batch (TRL pairs each row's prompt with
the next row's completion), so a batch of one is refused (TRL does, and align says so before any stage trains), and
the rows train in the order given (TRL's sampler is sequential). So align splits pairs itself: TRL's own split
writes every chosen row before every rejected one, which gives batches of one label, whose KL estimate and reward
margins say nothing; and a pair's two rows side by side would make each "mismatched" pair a matched one. align
alternates desirable and undesirable rows, the undesirable ones from the pairs half the data set away. Unpaired rows
train as given; the plan warns where neighbouring rows share a prompt. The reference follows DPO's rules
(align/stages/dpo.py).

The held-out measure must not be a tie by construction: a policy equal to its reference gives every answer KTO's
implicit reward 0. On unpaired rows it is `label_auc`, how well the policy's mean token log-probability of a
completion separates desirable from undesirable ones (0.5: not at all); on pairs, `pref_accuracy`.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Literal

from align.prompt_split import split_all_ids, split_ids
from align.recipe import PREFERENCE_FORMATS, TrainingStage
from align.stages.base import Figure, TrainingKind
from align.stages.preference_family import LENGTH_HINT, preference_plots, reference_for, reference_plan
from align.stages.runner import generation_table, max_length_setting, render_mask, report_dropped
from align.values import HeldOut, StageParts

if TYPE_CHECKING:
    from datasets import Dataset

    from align.plan import PlanInputs
    from align.recipe import Stage

logger = logging.getLogger(__name__)

UNPAIRED = "unpaired_preference"


def unpaired(pairs: Dataset) -> Dataset:
    """Preference pairs as KTO's rows: desirable and undesirable alternating, pair i's chosen answer (label true)
    followed by the rejected answer of pair i + n/2, so that no row's neighbour answers the same prompt (KTO's KL
    estimate pairs a row's prompt with its neighbour's completion)."""
    from datasets import Dataset

    n = len(pairs)
    prompts, chosen, rejected = list(pairs["prompt"]), list(pairs["chosen"]), list(pairs["rejected"])
    rows: dict[str, list] = {"prompt": [], "completion": [], "label": []}
    for i in range(n):
        j = (i + n // 2) % n
        rows["prompt"] += [prompts[i], prompts[j]]
        rows["completion"] += [chosen[i], rejected[j]]
        rows["label"] += [True, False]
    return Dataset.from_dict(rows)


def shared_neighbours(prompts: list[Any]) -> int:
    """How many rows answer the same prompt as the row after them."""
    keys = [json.dumps(p, sort_keys=True) for p in prompts]
    return sum(a == b for a, b in zip(keys, keys[1:], strict=False))


class KTOKeys(TrainingStage):
    """A kto stage's recipe keys: those of every training stage."""

    kind: Literal["kto"]


class KTO(TrainingKind):
    """TRL's KTOTrainer (through the tokenized-data cache) against the planned reference, with the label AUC (or,
    on pairs, preference accuracy) and greedy answers to held-out prompts before and after."""

    name = "kto"
    keys = KTOKeys
    formats = (UNPAIRED, *PREFERENCE_FORMATS)
    about = "Kahneman-Tversky Optimization on answers marked desirable or not, or on pairs (TRL's KTOTrainer)"
    figures = (
        Figure("label AUC", "label_auc", False),
        Figure("pref accuracy", "pref_accuracy", False),
        Figure("eval loss (KTO)", "eval_loss", True),
    )
    key_settings = ("beta", "loss_type", "precompute_ref_log_probs", "desirable_weight", "undesirable_weight")
    config = "trl:KTOConfig"
    trainer_class = "trl:KTOTrainer"
    prepare = ("self", "dataset", "processing_class", "args", "dataset_name")
    unit = "rows"
    trainer_format = UNPAIRED  # pairs reach TRL split into desirable and undesirable rows

    def plots(self, rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, str, str]]:
        return preference_plots(rows)

    def plan_parts(self, stage: Stage, inputs: PlanInputs) -> StageParts:
        """max_length, the reference, the batch its KL estimate needs and, with the data, the rows whose prompt alone
        fills `max_length` (TRL drops them; none left in a split is a problem here)."""
        from align.models import ensure_chat_template
        from align.plan import batch_figures

        data, tokenizer, start = inputs.data, inputs.tokenizer, inputs.start
        length = max_length_setting(stage, inputs.config)
        pairs = inputs.spec.format != UNPAIRED
        parts = StageParts(fixed={"max_length": length}, details={
            "input": start.summary(),
            "reference": reference_plan(stage, start),
            "rows": "each pair split into a desirable and an undesirable row, alternating" if pairs else (
                "in the training split's order (a valid_fraction cut shuffles them; a file's validation split does "
                "not)"),
            "held-out measure": "pref_accuracy (pairs)" if pairs else "label_auc (mean token log-probability)",
        })  # fmt: skip
        batch = stage.train.get("per_device_train_batch_size", self.config_class().per_device_train_batch_size)
        if stage.train.get("loss_type", "kto") == "kto" and batch < 2:
            parts.problems.append(
                f"stages.{stage.name}.train.per_device_train_batch_size: KTO estimates its KL term "
                f"from other rows of the same batch, so it needs at least 2 per device (got {batch})"
            )
            parts.hints.append(
                "raise per_device_train_batch_size (lower gradient_accumulation_steps to keep the "
                "effective batch), or use loss_type: apo_zero_unpaired, which has no KL term"
            )
        if tokenizer is None or data is None:
            return parts
        ensure_chat_template(tokenizer)
        max_length = length.value
        kept, lengths, truncated, labels = {}, [], 0, []
        for split, ds in (("train", data["train"]), ("eval", data["validation"])):
            rows = unpaired(ds) if pairs else ds
            ids = split_all_ids(tokenizer, list(rows["prompt"]), list(rows["completion"]))
            if split == "train":
                lengths = [len(p) + len(c) for p, c in ids]
                truncated = sum(max_length is not None and n > max_length for n in lengths)
                labels = list(rows["label"])
                first = rows.select(range(min(2, len(rows))))
            kept[split] = sum(max_length is None or len(p) < max_length for p, _ in ids)
            if len(rows) and not kept[split]:
                parts.problems.append(f"stages.{stage.name}.train.max_length: every {split} prompt fills {max_length} "
                                      "tokens, so no row is left to learn from")  # fmt: skip
                parts.hints.append(LENGTH_HINT)
        desirable = sum(labels)
        if not pairs:
            same = shared_neighbours(list(data["train"]["prompt"]))
            if same > len(labels) // 4:
                logger.warning(
                    "stages.%s.data: %d of %d training rows answer the same prompt as the next row; KTO trains rows "
                    "in the order given and estimates its KL term from each row's prompt with the next row's "
                    "completion, so those pairs are not mismatched: shuffle the file's rows", stage.name, same,
                    len(labels),
                )  # fmt: skip
        parts.details.update(
            train_rows=len(lengths),
            desirable=f"{desirable} of {len(labels)} rows ({desirable / max(1, len(labels)):.0%})",
            train_tokens=sum(min(n, max_length or n) for n in lengths),
            max_length=max_length,
            truncation_rate=truncated / max(1, len(lengths)),
            dropped=f"{len(lengths) - kept['train']} of {len(lengths)} train rows (prompt fills max_length)",
            examples=[unpaired_example(tokenizer, row) for row in first],
        )
        parts.count = lambda effective: batch_figures(effective, kept["train"])
        return parts

    def setup(self) -> None:
        from align.data import first_unique
        from align.models import ensure_chat_template

        ensure_chat_template(self.tokenizer)
        self.ref_model, reference = reference_for(self.stage, self.start, self.model)
        logger.info("reference model: %s", reference)
        self.max_length = self.planned.settings["max_length"].value
        self.pairs = self.ctx.spec.format != UNPAIRED
        train, valid = self.data["train"], self.data["validation"]
        self.held_out = valid  # measured as given: pairs, or labelled rows
        self.train, self.eval = (unpaired(train), unpaired(valid)) if self.pairs else (train, valid)
        self.prompts = first_unique(self.eval["prompt"], self.stage.generations)
        self.extra = {"reference": reference, "measure": "pref_accuracy" if self.pairs else "label_auc"}

    def eval_sets(self, by_source: dict[str, Any]) -> dict[str, Any]:
        return {name: unpaired(rows) if self.pairs else rows for name, rows in by_source.items()}

    def trainer(self, args: Any, callbacks: list[Any]) -> Any:
        return super().trainer(args, callbacks, ref_model=self.ref_model)

    def guards(self) -> list[Any]:
        from align.guards import PreferenceGuard

        # KTO's loss starts at 0.5 per row, not at a fixed value of "nothing learned": only the falling-chosen check.
        return [PreferenceGuard(self.ctx.tracker, method="KTO", stuck_loss=None)]

    def check(self, trainer: Any) -> None:
        report_dropped(
            self.stage, trainer, (len(self.train), len(self.eval)),
            reason=f"the prompt alone fills max_length={self.max_length}",
            refusal=f"every {{split}} prompt fills {self.max_length} tokens, so no row is left to learn from",
            hint=LENGTH_HINT, unit="rows",
        )  # fmt: skip
        args = trainer.args
        self.extra.update(beta=args.beta, loss_type=args.loss_type, desirable_weight=args.desirable_weight,
                          undesirable_weight=args.undesirable_weight)  # fmt: skip

    def measure(self, trainer: Any) -> HeldOut:
        from align.evaluation.likelihood import completion_logps, label_auc_values, preference_pairs
        from align.verdict import greedy_answers

        answers = greedy_answers(trainer.model, self.tokenizer, self.prompts, template_kwargs=self.template_kwargs)
        rows = self.held_out
        if self.pairs:
            correct, chosen = preference_pairs(trainer.model, self.tokenizer, rows, self.max_length)
            return HeldOut(correct, answers, chosen_logps=chosen)
        scores = completion_logps(trainer.model, self.tokenizer, rows["prompt"], rows["completion"], self.max_length,
                                  average=True)  # fmt: skip
        return HeldOut(label_auc_values(scores, list(rows["label"])), answers)

    def summarize(self, before, after, measured_before, measured_after):
        from align.verdict import accuracy_verdict

        key = self.extra["measure"]
        metrics = {
            "kl": after.get("eval_kl"),
            "reward_margin": after.get("eval_rewards/margins"),
            f"{key}_before": measured_before.figure,
            key: measured_after.figure,
        }
        answers = (measured_before.answers, measured_after.answers)
        chosen = (measured_before.chosen_logps, measured_after.chosen_logps) if self.pairs else None
        verdict = accuracy_verdict(key, measured_before.values, measured_after.values,
                                   unit="pairs" if self.pairs else "rows", answers=answers, chosen_logps=chosen,
                                   **self.trained_with)  # fmt: skip
        table = generation_table(self.ctx, self.prompts, measured_before.texts, measured_after.texts)
        return metrics, {"generations": table, "verdict": verdict}


def unpaired_example(tokenizer: Any, row: dict[str, Any]) -> dict[str, str]:
    """A row as `--dry-run` shows it: the completion (what the loss falls on) in [[ ]] after its prompt, and its
    label."""
    p, c = split_ids(tokenizer, row["prompt"], row["completion"])
    rendered = render_mask(p + c, [0] * len(p) + [1] * len(c), tokenizer)
    return {"label": "desirable" if row["label"] else "undesirable", "rendered": rendered}
