"""A method is one class: what a kind of stage declares about itself and what it does, read top to bottom.

`Kind` is what every kind declares; `TrainingKind` is a kind that trains a model with a Trainer (its plan, its TRL
contracts, and the steps `run_stage` calls: setup, trainer, guards, check, measure, summarize). A kind's module
defines its class, and the registry (`align/stages/__init__.py`) has one line naming it. Recipe validation, the
pipeline, `--print-config`, the report, the model card, the console table, `align chat` and `align push` ask the
kind, never its name: adding a method is its module, its tests, its README section and one registry line.

One instance of each class (the registry's) answers the questions asked before a stage runs; `run` makes a fresh
instance for each run of a stage, which holds that run's model, data and measurements.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from align.errors import BadInput, Problems
from align.plan import PlanInputs, StagePlan, effective_settings, plan_settings, resolve_model, supports_checkpointing
from align.prompt_format import generate_usage
from align.recipe import Recipe, Stage, model_source, stage_ref
from align.stages.runner import starting_point
from align.values import HeldOut, StageOutput, StageParts, StageResult, StartingPoint, same_decimals, saved_model_dir

if TYPE_CHECKING:
    from transformers import Trainer

    from align.context import StageContext
    from align.metrics import MetricsWriter


@dataclass(frozen=True)
class Figure:
    """A summary metric a kind is judged by: its label, its key (`<key>_before` is the same measure before the
    stage), and whether lower is better. A kind's first figure is its headline (the console's closing table)."""

    label: str
    key: str
    lower_is_better: bool


class Kind:
    """Everything particular to a kind of stage that the rest of align needs to know, as class attributes.

    `name`: the recipe's `kind:`. `keys`: its recipe keys, a pydantic class (`kind: Literal[<name>]`) that also says
    what the kind's saved model is (`makes`), holds its own cross-field checks, and marks its model-valued fields
    (`MODEL_REF`: the offline check, the run-directory check and the fingerprint reach them by that alone).
    `formats`: the data formats it accepts. `figures`: what the report's stages table, the model card and the
    console show for it. `key_settings`: its config class's settings that `--print-config` shows beside those
    every training stage shows (plan.KEY_SETTINGS). `compares_models`: the report shows its models side by side
    ("Did it help?"). `keeps_progress`: after a stop it goes on from the work it kept, without a checkpoint.
    `prompts_only`: its data is one `test` split of prompts to answer. `pipeline_tag`: the hub task of its saved
    model. `about`: one line.
    """

    name: ClassVar[str]
    keys: ClassVar[type[Stage]]
    formats: ClassVar[tuple[str, ...]]
    about: ClassVar[str]
    figures: ClassVar[tuple[Figure, ...]] = ()
    key_settings: ClassVar[tuple[str, ...]] = ()
    compares_models: ClassVar[bool] = False
    keeps_progress: ClassVar[bool] = False
    prompts_only: ClassVar[bool] = False
    pipeline_tag: ClassVar[str] = "text-generation"
    # Its loss is a token cross-entropy (lm, sft): the `eval_loss` align records is the token mean over the
    # validation rows, the same on any process count (runner.token_mean_evaluation); else the Trainer's figure.
    token_loss: ClassVar[bool] = False

    @property
    def eval_loss_label(self) -> str:
        """What its `eval_loss` is, as the console and the card say beside it."""
        return "token mean" if self.token_loss else "Trainer: batch mean"

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

    def run(self, stage: Any, ctx: StageContext) -> StageResult:
        """Run the stage: `ctx` is the read-only context the pipeline built (align/context.py)."""
        raise NotImplementedError

    def plan(self, stage: Any, inputs: PlanInputs) -> tuple[StagePlan | None, Problems]:
        """Its plan, before any stage trains, and every problem found."""
        raise NotImplementedError

    def resolve(self, entry: dict[str, Any], stage: Any, recipe: Recipe) -> None:
        """Fill in, in the resolved recipe's entry for `stage` (recipe.yaml, `--print-config`), what the recipe left
        to a default: an omitted model spelled as the stage it comes from."""

    def input_identity(self, stage: Any, recipe: Recipe, outputs: Mapping[str, StageOutput]) -> str:
        """What its fingerprint takes from its inputs beyond the stage as written (which the fingerprint holds):
        the model it starts from, and the fingerprint of every earlier stage a declared model-valued field names
        (`teacher: '@sft'`), so retraining that stage runs this one again."""
        others = [f"{value}:{outputs[stage_ref(value)].fingerprint}" for key, value in stage.model_refs().items()
                  if key != "model" and stage_ref(value) is not None]  # fmt: skip
        return "|".join([self.model_identity(stage, recipe, outputs), *others])

    def model_identity(self, stage: Any, recipe: Recipe, outputs: Mapping[str, StageOutput]) -> str:
        """The model it starts from: an earlier stage's fingerprint, a hub id or path as written, nothing for a
        model built from scratch (its config is in the stage's own)."""
        source = model_source(stage, recipe)
        ref = stage_ref(source)
        if ref is not None:
            return outputs[ref].fingerprint
        return source if isinstance(source, str) else ""

    def input_label(self, stage: Any, recipe: Recipe, outputs: Mapping[str, StageOutput]) -> str:
        """Its input as summary.json records it: `@lm (runs/x/lm/model)`, a hub id, `scratch:gpt2`."""
        source = model_source(stage, recipe)
        ref = stage_ref(source)
        if ref is not None:
            return f"{source} ({outputs[ref].model_dir})"
        if isinstance(source, str):
            return source
        return f"scratch:{source.model_type}"

    def output_complete(self, stage_dir: Path, summary: dict[str, Any]) -> bool:
        """Whether a completed run of it left its output in place (so an unchanged stage is `cached`)."""
        model_dir = saved_model_dir(stage_dir, summary)
        return model_dir is not None and model_dir.is_dir()

    def card_usage(self, prompt_format: Any, adapters: bool) -> str:
        """The model card's usage snippet, from the model's prompt format and whether it is adapters."""
        return generate_usage(prompt_format, adapters)

    def plots(self, rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, str, str]]:
        """The report's plots of its own (title, base64 PNG, alt text), beyond the loss, learning rate and grad norm
        every training stage has (align/report.py draws those)."""
        return []

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
        # The eval loss is a token mean (or the Trainer's mean over eval batches); the verdict's line below it is a
        # mean over examples, and differs a little: said, so the two figures do not read as one number printed twice.
        return f"{figure} ({self.eval_loss_label})" if key == "eval_loss" else figure


def library_class(path: str, experimental: bool = False) -> type:
    """A class by its import path, `module:Class` (imported only when asked: TRL is heavy to import). An
    experimental one comes through align/patches.py, which knows where TRL moves such classes."""
    if experimental:
        from align.patches import experimental as from_experimental

        return from_experimental(path)
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class TrainingKind(Kind):
    """A kind that trains a model: its declarations, its plan, and what it brings to `run_stage` (the sequence every
    training stage runs, align/stages/runner.py): its data and Trainer, the checks on what the Trainer prepared, its
    measurements before and after training, and its summary metrics.

    Its library contracts: `config` and `trainer_class` are import paths, `module:Class` (`experimental`: under
    `trl.experimental`, found through align/patches.py wherever TRL keeps it now); `prepare` is the signature of the
    trainer's data-preparation method it was written against (align/patches.py `wrap_preparation`), through which
    the tokenized-data cache (align/cache.py) stands in front of TRL's preparation (None: no such step to hook).

    A run's instance sets itself up in `setup()` from the loaded model (`self.model`, `self.tokenizer`,
    `self.start`), with the stage's plan (`self.planned`) deciding everything that was decided before any stage
    trained.
    """

    config: ClassVar[str] = ""
    trainer_class: ClassVar[str] = ""
    experimental: ClassVar[bool] = False
    prepare: ClassVar[tuple[str, ...] | None] = None
    trainer_format: ClassVar[str | None] = None  # the rows' format the trainer gets, where the kind changes it
    unit: ClassVar[str] = "rows"  # what a training row is, for the log: blocks, examples, pairs
    lm_head: ClassVar[bool] = False  # TRL's chunked LM head, which align/patches.py routes on a CPU
    reward_head: ClassVar[bool] = False  # a reward model: the input's body with a new one-output head
    surrogate_loss: ClassVar[bool] = False  # online RL: the loss is a policy-gradient surrogate (guards.NumericGuard)

    @property
    def trains(self) -> bool:
        return True

    def config_class(self) -> type:
        return library_class(self.config, self.experimental)

    def trainer_cls(self, data_format: str | None = None) -> type:
        """Its Trainer class, through the tokenized-data cache where the kind declares TRL's preparation step
        (`data_format`: the format of the rows it is given, where the kind changed the data's own)."""
        cls = library_class(self.trainer_class, self.experimental)
        if self.prepare is None:
            return cls
        from align.cache import cached_trainer

        return cached_trainer(cls, self.name, data_format or self.ctx.spec.format, self.prepare)

    # ----------------------------------------------------------------------------------------------
    # Before any stage trains

    def plan_parts(self, stage: Any, inputs: PlanInputs) -> StageParts:
        """Its part of the plan, on top of the training arguments every training stage shares: fixed arguments,
        details to show, problems found against the data (`inputs.data`, None for `--print-config`). `inputs` holds
        the model it starts from (`tokenizer`, `config`, `start`) and the earlier stages' plans."""
        return StageParts(details={"input": inputs.start.summary()})

    def plan(self, stage: Any, inputs: PlanInputs) -> tuple[StagePlan | None, Problems]:
        recipe, data = inputs.recipe, inputs.data
        found = Problems()
        try:
            label, source, tokenizer, config = resolve_model(
                stage, recipe, inputs.plans, data, need_tokenizer=data is not None
            )
            from align.families import use_stage_template

            added = use_stage_template(stage, tokenizer)
        except BadInput as exc:
            found.absorb(exc)
            return None, found
        loading = getattr(stage, "loading", None)
        if loading is not None:
            from align.models import loading_problems

            bad = loading_problems(loading, f"stages.{stage.name}.loading")
            if bad is not None:
                found.absorb(bad)
        peft, adapts = getattr(stage, "peft", None), None
        if peft is not None:
            from align.models import lora_target_problems

            task = "SEQ_CLS" if stage.makes == "reward_model" else "CAUSAL_LM"
            bad = lora_target_problems(peft, config, f"stages.{stage.name}.peft.target_modules", task)
            if bad is not None:
                found.absorb(bad)
            elif config is not None:
                from align.models import lora_adapts

                try:  # what the adapters cover, by name: on an MoE, whether the experts and router are among them
                    adapts = lora_adapts(peft, config, task, f"stages.{stage.name}.peft")
                except BadInput as exc:
                    found.absorb(exc)
                    adapts = None
        start = starting_point(recipe, stage)
        parts = self.plan_parts(stage, replace(inputs, tokenizer=tokenizer, config=config, start=start))
        cls = self.config_class()
        settings, problems = plan_settings(
            stage, recipe, inputs.precision, inputs.run_dir, inputs.report_to,
            supports_checkpointing(config), parts.fixed, cls,
        )  # fmt: skip
        found.add(problems + parts.problems)
        found.hints += parts.hints
        plan = StagePlan(stage.name, self.name, label, source, start, config, tokenizer, settings,
                         details=parts.details, runtime=parts.runtime, prepared=parts.prepared,
                         config_class=cls)  # fmt: skip
        if not problems:
            try:
                plan.effective = effective_settings(cls, stage.name, settings, parts.runtime, self.key_settings)
            except BadInput as exc:
                found.absorb(exc)
        from align.families import plan_family
        from align.models import DEFAULT_CHAT_TEMPLATE
        from align.thinking import refuse_unfollowable

        default = tokenizer is not None and tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
        plan_family(stage, plan, added, adapts, default)
        refuse_unfollowable(stage, tokenizer, found)
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

    # ----------------------------------------------------------------------------------------------
    # A run of the stage (a fresh instance each time: `bind` gives it the run's model and context)

    def run(self, stage: Any, ctx: StageContext) -> StageResult:
        from align.stages.runner import run_stage

        return run_stage(stage, ctx, type(self))

    def bind(self, stage: Stage, ctx: StageContext, model: Any, tokenizer: Any, start: StartingPoint) -> None:
        """Give this run's instance its stage, context and loaded model, then set it up."""
        self.stage, self.ctx, self.model, self.tokenizer, self.start = stage, ctx, model, tokenizer, start
        self.planned = ctx.plan  # the stage's StagePlan
        from align.thinking import thinking_of

        # A thinking template's switch as the stage sets it, wherever the stage generates (held-out answers).
        thinking = thinking_of(tokenizer) if getattr(tokenizer, "chat_template", None) else None
        self.template_kwargs = thinking.kwargs(getattr(stage, "thinking", None)) if thinking else {}
        self.data = ctx.data
        self.at_run_time: dict[str, Any] = {}  # the decisions the plan left to run time
        self.extra: dict[str, Any] = {}  # summary.json fields known before training
        # What training ran with (learning rate and the library's default, steps, LoRA rank), set by `run_stage`
        # before `summarize`: the likely causes a verdict cites (align/verdict.py `training_context`).
        self.trained_with: dict[str, Any] = {}
        self.writer: MetricsWriter | None = None  # the stage's metrics.jsonl writer, set by `run_stage`
        self.setup()

    def setup(self) -> None:
        """The kind's data and pieces, from the loaded model and the plan."""

    def trainer(self, args: Any, callbacks: list[Any], **own: Any) -> Trainer:
        """Its Trainer (`trainer_cls`) on the run's train and eval rows (`self.train`, `self.eval`, set by `setup`),
        with the LoRA adapters the plan decided; `own`: the kind's own arguments (a reference model, a teacher,
        reward functions)."""
        from align.families import embedding_modules
        from align.models import lora_config

        task = "SEQ_CLS" if self.reward_head else "CAUSAL_LM"
        peft = None
        if self.start.lora == "new":
            embeddings = embedding_modules(self.model) if self.planned.prepared.get("train_embeddings") else None
            peft = lora_config(self.stage.peft, task, embeddings)
        return self.trainer_cls(self.trainer_format)(
            model=self.model, args=args, train_dataset=self.train, eval_dataset=self.eval,
            processing_class=self.tokenizer, callbacks=callbacks, peft_config=peft, **own,
        )  # fmt: skip

    def guards(self) -> list[Any]:
        """The kind's own guards (TrainerCallbacks), beyond the numeric guard every training stage has (a
        non-finite loss stops it; spikes and a loss of exactly 0 are warnings)."""
        return []

    def check(self, trainer: Trainer) -> None:
        """After the Trainer prepared the data: say (or refuse) what its preparation cut."""

    def eval_sets(self, by_source: dict[str, Any]) -> dict[str, Any] | None:
        """A mix's validation rows of each source (`by_source`) in the form this kind gives its Trainer as
        `eval_dataset` (what `self.eval` holds for the whole split), for the per-source eval losses; None where the
        kind's Trainer has no eval loss to take per source (online RL scores generations)."""
        return None

    def measure(self, trainer: Trainer) -> HeldOut:
        """Its held-out measure, before and after training, outside it (per-example losses, preference accuracy,
        greedy answers)."""
        return HeldOut([])

    def summarize(
        self, before: dict[str, Any], after: dict[str, Any], measured_before: HeldOut, measured_after: HeldOut
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The kind's summary metrics and summary.json fields, from the evaluations and measurements; a `verdict`
        field (an `align.verdict.Verdict`) is logged, tracked and recorded by `run_stage`."""
        return {}, {}
