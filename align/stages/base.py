"""What a kind of stage declares about itself, in one place: `Kind` for every kind, `TrainingKind` for a kind that
trains a model with a Trainer.

A kind's module makes one instance, `KIND`, and the registry (`align/stages/__init__.py`) lists the module. Recipe
validation, the pipeline, the report, the model card, the console table, `align chat` and `align push` ask the
kind, never its name: adding a method is its module, its tests, its README section and one registry line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import BadInput, Problems
from align.plan import StagePlan, effective_settings, plan_settings, resolve_model, supports_checkpointing
from align.prompt_format import generate_usage
from align.recipe import Recipe, Stage, model_source, stage_ref
from align.stages.common import starting_point
from align.values import StageOutput, StageParts, StageResult, same_decimals, saved_model_dir


@dataclass(frozen=True)
class Figure:
    """A summary metric a kind is judged by: its label, its key (`<key>_before` is the same measure before the
    stage), and whether lower is better. A kind's first figure is its headline (the console's closing table)."""

    label: str
    key: str
    lower_is_better: bool


@dataclass(frozen=True)
class Kind:
    """Everything particular to a kind of stage that the rest of align needs to know.

    `keys`: its recipe keys, a pydantic class (`kind: Literal[<name>]`) that also says what the kind's saved model
    is (`makes`) and holds its own cross-field checks. `formats`: the data formats it accepts. `run`: its entry
    point, `run(stage, ctx) -> StageResult`. `figures`: what the report's stages table, the model card and the
    console show for it. `compares_models`: the report shows its models side by side ("Did it help?").
    `keeps_progress`: after a stop it goes on from the work it kept, without a checkpoint. `prompts_only`: its data
    is one `test` split of prompts to answer. `pipeline_tag`: the hub task of its saved model. `card_usage`: the
    model card's usage snippet, from the model's prompt format and whether it is adapters. `about`: one line.
    """

    name: str
    keys: type[Stage]
    formats: tuple[str, ...]
    run: Callable[[Any, Any], StageResult]
    about: str
    figures: tuple[Figure, ...] = ()
    compares_models: bool = False
    keeps_progress: bool = False
    prompts_only: bool = False
    pipeline_tag: str = "text-generation"
    card_usage: Callable[[Any, bool], str] = generate_usage

    @property
    def makes(self) -> str | None:
        """What its saved model is: "policy", "reward_model", or None (it saves none)."""
        return self.keys.makes

    @property
    def a_kind(self) -> str:
        """The kind with its article, as a sentence says it: "an sft", "a dpo"."""
        return f"{self.keys.article} {self.name}"

    @property
    def trains(self) -> bool:
        return False

    def config_class(self) -> type | None:
        """The config class whose fields its `train:` takes (imported only when asked); None: it trains nothing."""
        return None

    def plan(self, stage: Any, **inputs: Any) -> tuple[StagePlan | None, Problems]:
        """Its plan, before any stage trains, and every problem found. `inputs`: `recipe`, `spec`, `data` (this
        stage's, None for `--print-config`), `plans` (the earlier stages'), `chain` (every stage's data),
        `precision`, `run_dir`, `report_to`."""
        raise NotImplementedError

    def resolve(self, entry: dict[str, Any], stage: Any, recipe: Recipe) -> None:
        """Fill in, in the resolved recipe's entry for `stage` (recipe.yaml, `--print-config`), what the recipe left
        to a default: an omitted model spelled as the stage it comes from."""

    def input_identity(self, stage: Any, recipe: Recipe, outputs: Mapping[str, StageOutput]) -> str:
        """What its fingerprint takes from its inputs (an earlier stage's fingerprint, a model as written)."""
        raise NotImplementedError

    def input_label(self, stage: Any, recipe: Recipe, outputs: Mapping[str, StageOutput]) -> str:
        """Its input as summary.json records it: `@lm (runs/x/lm/model)`, a hub id, `scratch:gpt2`."""
        raise NotImplementedError

    def output_complete(self, stage_dir: Path, summary: dict[str, Any]) -> bool:
        """Whether a completed run of it left its output in place (so an unchanged stage is `cached`)."""
        model_dir = saved_model_dir(stage_dir, summary)
        return model_dir is not None and model_dir.is_dir()

    def headline(self, summary: dict[str, Any]) -> str:
        """Its headline figure for the console's closing table: before -> after of its first figure."""
        metrics = summary.get("metrics") or {}
        # The first figure the summary has: a kind may measure one of several (kto: label_auc or pref_accuracy).
        key = next((f.key for f in self.figures if f.key in metrics), "eval_loss")
        after, before = metrics.get(key), metrics.get(f"{key}_before")
        if not isinstance(after, int | float):
            return "-"
        if isinstance(before, int | float):
            shown = same_decimals(before, after)
            figure = f"{key} {shown[0]} → {shown[1]}"
        else:
            figure = f"{key} {after:.4g}"
        # The Trainer's eval loss is a mean over eval batches; the verdict's line below it is a mean over examples,
        # and differs a little: said, so the two figures do not read as one number printed twice.
        return f"{figure} (Trainer: batch mean)" if key == "eval_loss" else figure


@dataclass(frozen=True)
class TrainingKind(Kind):
    """A kind that trains a model: `config` names its config class as `module:Class`, or is a function that returns
    it (both are called only when the class is needed: TRL is heavy to import); `plan_parts(stage, spec=, data=,
    tokenizer=, config=, start=) -> StageParts` is its part of the plan, on top of the training arguments every
    training stage shares."""

    config: str | Callable[[], type] = ""
    plan_parts: Callable[..., StageParts] | None = None

    @property
    def trains(self) -> bool:
        return True

    def config_class(self) -> type:
        if callable(self.config):
            return self.config()
        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(module), name)

    def plan(self, stage: Any, **inputs: Any) -> tuple[StagePlan | None, Problems]:
        recipe, data = inputs["recipe"], inputs["data"]
        found = Problems()
        try:
            label, source, tokenizer, config = resolve_model(
                stage, recipe, inputs["plans"], data, need_tokenizer=data is not None
            )
        except BadInput as exc:
            found.absorb(exc)
            return None, found
        loading = getattr(stage, "loading", None)
        if loading is not None:
            from align.models import loading_problems

            bad = loading_problems(loading, f"stages.{stage.name}.loading")
            if bad is not None:
                found.absorb(bad)
        peft = getattr(stage, "peft", None)
        if peft is not None:
            from align.models import lora_target_problems

            task = "SEQ_CLS" if stage.makes == "reward_model" else "CAUSAL_LM"
            bad = lora_target_problems(peft, config, f"stages.{stage.name}.peft.target_modules", task)
            if bad is not None:
                found.absorb(bad)
        start = starting_point(recipe, stage)
        parts = self.plan_parts(stage, spec=inputs["spec"], data=data, tokenizer=tokenizer, config=config, start=start,
                                recipe=recipe)  # fmt: skip
        cls = self.config_class()
        settings, problems = plan_settings(
            stage, recipe, inputs["precision"], inputs["run_dir"], inputs["report_to"],
            supports_checkpointing(config), parts.fixed, cls,
        )  # fmt: skip
        found.add(problems + parts.problems)
        found.hints += parts.hints
        plan = StagePlan(stage.name, self.name, label, source, start, config, tokenizer, settings,
                         details=parts.details, runtime=parts.runtime, prepared=parts.prepared,
                         config_class=cls)  # fmt: skip
        if not problems:
            try:
                plan.effective = effective_settings(cls, stage.name, settings, parts.runtime)
            except BadInput as exc:
                found.absorb(exc)
        if loading is not None:  # what the stage loads its model with, as the plan shows it
            plan.details["loading"] = ", ".join(f"{k}: {v}" for k, v in loading.model_dump().items() if v is not None)
        if data is not None and hasattr(data, "describe"):  # a mix: what each source gives
            plan.details["data_mix"] = data.describe(tokenizer)
        if data is not None and plan.effective:  # the config class took the arguments
            plan.details.update(parts.counted(plan.effective))
        return plan, found

    def resolve(self, entry: dict[str, Any], stage: Any, recipe: Recipe) -> None:
        if entry.get("model") is None:
            entry["model"] = model_source(stage, recipe)

    def input_identity(self, stage: Any, recipe: Recipe, outputs: Mapping[str, StageOutput]) -> str:
        """An earlier stage's fingerprint, a hub id or path as written, nothing for a model built from scratch (its
        config is in the stage's own)."""
        source = model_source(stage, recipe)
        ref = stage_ref(source)
        if ref is not None:
            return outputs[ref].fingerprint
        return source if isinstance(source, str) else ""

    def input_label(self, stage: Any, recipe: Recipe, outputs: Mapping[str, StageOutput]) -> str:
        source = model_source(stage, recipe)
        ref = stage_ref(source)
        if ref is not None:
            return f"{source} ({outputs[ref].model_dir})"
        if isinstance(source, str):
            return source
        return f"scratch:{source.model_type}"
