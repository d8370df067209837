"""One plan per stage, computed once before the first stage trains: `--dry-run` prints it, `--print-config`
prints its settings, and the run executes it.

A plan holds what a stage will start from (model source, tokenizer, architecture, chat template), every
training argument with where its value came from (the recipe, `--set`, align's default, the library's default,
a cap), the checks that can be made without training (max_length against the data, options against the
model's capabilities), and the decisions left to run time (packing, which needs the loaded model). Every stage
is planned, and every problem of every stage is reported together, before any stage trains: a later stage whose
model is an earlier stage's output is planned on that stage's planned architecture and tokenizer.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import BadInput
from align.recipe import Recipe, ScratchModel, Stage, model_source, stage_ref
from align.runtime import draws_progress_bars
from align.values import UNKNOWN, Setting, StartingPoint

if TYPE_CHECKING:
    from align.runtime import Precision

logger = logging.getLogger(__name__)

# The settings `--print-config` and `--dry-run` show for every training stage, beyond those the recipe or align set:
# the ones that decide what training does. Each kind adds its own (`Kind.key_settings`: beta, num_generations). The
# rest of the config class is in align.log at the stage's start.
KEY_SETTINGS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim",
    "per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
    "num_train_epochs", "max_steps", "max_length", "eval_strategy", "eval_steps", "save_strategy", "save_steps",
    "save_total_limit", "logging_steps", "load_best_model_at_end", "activation_checkpointing", "bf16", "fp16",
    "seed",
)  # fmt: skip
# Settings align decides itself (the recipe may not set them: recipe.MANAGED_TRAIN_KEYS says where they live).
MANAGED = "align (managed)"


@dataclass(frozen=True)
class PlanInputs:
    """What a kind's plan takes: the recipe, this stage's data spec and data (None for `--print-config`: only
    settings are planned), the earlier stages' plans, every stage's data (`chain`), the run's precision, run
    directory and trackers; and, for a training kind's own part of the plan, the model it starts from (`tokenizer`
    and `config`, None where unknown offline; `start`). A new need is a field here, not a new argument of every
    kind's plan."""

    recipe: Recipe
    spec: Any
    data: Any
    plans: dict[str, StagePlan]
    chain: dict[str, Any]
    precision: Any
    run_dir: Path
    report_to: list[str]
    tokenizer: Any = None
    config: Any = None
    start: StartingPoint | None = None


@dataclass
class StagePlan:
    """Everything decided about a stage before it trains. Read by `--dry-run`, `--print-config` and the stage."""

    name: str
    kind: str
    model: str  # what `--dry-run` says the model is
    source: str  # hub | directory | adapters | @stage | scratch
    start: StartingPoint | None
    config: Any  # the architecture's config (None: unknown until the model is available)
    tokenizer: Any  # None where unknown (print-config of a model not available offline)
    settings: dict[str, Setting] = field(default_factory=dict)  # every argument handed to the config class
    effective: dict[str, Setting] = field(default_factory=dict)  # KEY_SETTINGS as the config class resolved them
    details: dict[str, Any] = field(default_factory=dict)  # kind-specific: loss, reference, data, examples
    runtime: dict[str, str] = field(default_factory=dict)  # setting -> why it is decided when the stage starts
    # Data the plan already prepared to check it (the lm stage's blocks), handed to the stage instead of made twice.
    prepared: dict[str, Any] = field(default_factory=dict, repr=False)
    config_class: type | None = field(default=None, repr=False)  # the kind's (None: it trains nothing)

    def record(self) -> dict[str, Any]:
        """The plan as summary.json keeps it: the model, every key setting with its source, what run time decided."""
        return {
            "model": self.model,
            "settings": {k: {"value": plain(s.value), "source": s.source} for k, s in self.effective.items()},
            "decided_at_run_time": dict(self.runtime),
        }

    def train_kwargs(self, **at_run_time: Any) -> dict[str, Any]:
        """The config class's arguments: the plan's, plus the decisions it left to run time (and only those).

        Raises:
            ValueError: a run-time value for a setting the plan did not leave open (a bug: two decisions).
        """
        unplanned = set(at_run_time) - set(self.runtime)
        if unplanned:
            raise ValueError(f"stage {self.name}: {sorted(unplanned)} were planned, not left to run time")
        return {**{k: s.value for k, s in self.settings.items()}, **at_run_time}

    def build_args(self, **at_run_time: Any) -> Any:
        """The config class instance (TrainingArguments / SFTConfig / DPOConfig) the Trainer receives.

        Raises:
            BadInput: the config class rejects the combination (it names the problem).
        """
        args = instantiate(self.config_class, self.name, self.train_kwargs(**at_run_time))
        # Every argument, once, in align.log: what actually ran, defaults included.
        logger.debug("%s for stage %s:\n%s", type(args).__name__, self.name, args.to_json_string())
        return args


def plain(value: Any) -> Any:
    """A value JSON and YAML's safe dumper can write (enums and paths as their text)."""
    value = getattr(value, "value", value)
    if isinstance(value, str | int | float | bool | type(None)):
        return value
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


def instantiate(cls: type, name: str, kwargs: dict[str, Any]) -> Any:
    """Build the kind's config class `cls` from `kwargs`.

    Raises:
        BadInput: the class rejects them.
    """
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"stages.{name}.train: {first}") from None


# --------------------------------------------------------------------------------------------------
# Training arguments, with where each came from


# transformers 5.25 renamed gradient_checkpointing to activation_checkpointing (the old name is a deprecated alias, to
# go in v6); a recipe may use either.
CHECKPOINTING_KEYS = ("activation_checkpointing", "gradient_checkpointing")


def checkpointing_key(config_class: type | None) -> str:
    """The name the config class takes the switch by: the new one where it has it, so align's own default raises no
    deprecation warning (TRL's configs default the old one to True, which warns unless the new one is set)."""
    fields = getattr(config_class, "__dataclass_fields__", {})
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def supports_checkpointing(config: Any) -> bool | None:
    """Whether the architecture's model class supports gradient checkpointing (None: unknown)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if config is None:
        return None
    try:
        return bool(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].supports_gradient_checkpointing)
    except KeyError:
        return False


def plan_settings(
    stage: Stage,
    recipe: Recipe,
    precision: Precision,
    run_dir: Path,
    report_to: list[str],
    checkpointing: bool | None,
    fixed: dict[str, Setting],
    config_class: type | None = None,
) -> tuple[dict[str, Setting], list[str]]:
    """The arguments for the stage's config class: the recipe's `train:` keys, align's defaults under them, what
    align manages on top, and the stage's `fixed` decisions (max_length, loss, ...). Returns them and the problems.
    """
    overridden = recipe.overridden
    where = f"stages.{stage.name}.train"

    def given(key: str) -> str:
        return "--set" if f"stages.{stage.name}.train.{key}" in overridden else "recipe"

    out: dict[str, Setting] = {
        "logging_steps": Setting(10, "align default"),
        "eval_strategy": Setting("steps", "align default (evaluate while training)"),
        "save_total_limit": Setting(2, "align default (the best and the last checkpoint)"),
        "disable_tqdm": Setting(not draws_progress_bars(), "align default (progress bars only on a terminal)"),
        "dataloader_pin_memory": Setting(precision.device != "cpu", "align default (pinned memory only on a GPU)"),
        # On a machine without a GPU, several processes (torchrun / accelerate launch) only form one distributed
        # run when the Trainer is told it is on the CPU: it then uses gloo instead of training each rank alone.
        "use_cpu": Setting(precision.device == "cpu", "align default (the CPU when there is no GPU)"),
    }
    out.update({key: Setting(value, given(key)) for key, value in stage.train.items()})
    out.update(
        output_dir=Setting(str(run_dir / stage.name / "checkpoints"), MANAGED),
        report_to=Setting(report_to, MANAGED + " (tracking:)"),
        run_name=Setting(f"{recipe.name}/{stage.name}", MANAGED),
        seed=Setting(recipe.seed, MANAGED + " (seed:)"),
        # A NaN loss must be seen as NaN: the Trainer's filter would log it as 0.
        logging_nan_inf_filter=Setting(False, MANAGED + " (a non-finite loss must show)"),
        include_num_input_tokens_seen=Setting("non_padding", MANAGED + " (tokens/s counts real tokens)"),
        **{k: Setting(v, f"{MANAGED} (precision: {precision.name})") for k, v in precision.train_args.items()},
    )
    out.update(fixed)
    problems = []
    given_key = next((k for k in CHECKPOINTING_KEYS if k in stage.train), None)
    if given_key is None:
        key = checkpointing_key(config_class)
        if checkpointing is None:
            out[key] = Setting(False, f"align default: on where the model supports it ({UNKNOWN})")
        else:
            why = "the model supports it" if checkpointing else "the model does not support it"
            out[key] = Setting(checkpointing, f"align default ({why})")
    elif stage.train[given_key] and checkpointing is False:
        problems.append(f"{where}.{given_key}: this model does not support it")

    logging, steps = out["logging_steps"].value, out.get("max_steps")
    if isinstance(logging, int) and steps is not None and isinstance(steps.value, int) and 0 < steps.value < logging:
        logger.warning("%s.logging_steps: %d (%s) is more than max_steps %d: no training row (loss, grad norm, an "
                       "MoE's aux_loss) will be logged; set logging_steps: %d or less", where, logging,
                       out["logging_steps"].source, steps.value, steps.value)  # fmt: skip
    if stage.early_stopping is not None:
        # The best checkpoint must be on disk to be restored, so saving follows evaluation step for step.
        why = f"early stopping (patience {stage.early_stopping.patience})"
        out.update(
            load_best_model_at_end=Setting(True, why),
            metric_for_best_model=Setting("eval_loss", why),
            greater_is_better=Setting(False, why),
            save_strategy=Setting(out["eval_strategy"].value, why + ": saving follows evaluation"),
        )
        if out.get("eval_steps") is not None:
            out["save_steps"] = Setting(out["eval_steps"].value, why + ": saving follows evaluation")
    return out, problems


def early_stopping_callbacks(stage: Stage) -> list[Any]:
    """The Trainer's early stopping, for a stage with `early_stopping:` (its settings are `plan_settings`'s)."""
    from transformers import EarlyStoppingCallback

    if stage.early_stopping is None:
        return []
    return [EarlyStoppingCallback(stage.early_stopping.patience, stage.early_stopping.threshold)]


def effective_settings(
    cls: type, name: str, settings: dict[str, Setting], runtime: dict[str, str], own: tuple[str, ...] = ()
) -> dict:
    """KEY_SETTINGS, the kind's own key settings (`own`) and every setting align or the recipe gave, as the config
    class `cls` resolves them, each with its source: what was given, the library's default, or the library's value
    derived from another setting."""
    args = instantiate(cls, name, {k: s.value for k, s in settings.items()})
    out = {}
    # The checkpointing switch under the one name it was given (the other, its alias, mirrors it).
    checkpointing = next((k for k in CHECKPOINTING_KEYS if k in settings), None)
    for key in dict.fromkeys([*KEY_SETTINGS, *own, *settings]):
        if key in runtime:
            out[key] = Setting("decided when the stage starts", runtime[key])
            continue
        if not hasattr(args, key) or (key in CHECKPOINTING_KEYS and checkpointing not in (None, key)):
            continue
        value = getattr(args, key)
        value = getattr(value, "value", value)  # enums print as their value
        if key in settings:
            given = settings[key].value
            given = getattr(given, "value", given)
            source = settings[key].source if value == given else f"library (from {settings[key].source}: {given})"
        else:
            source = "library default"
        out[key] = Setting(value, source)
    return out


# --------------------------------------------------------------------------------------------------
# The model a stage starts from


def resolve_model(
    stage: Stage, recipe: Recipe, plans: dict[str, StagePlan], data: Any, *, need_tokenizer: bool
) -> tuple[str, str, Any, Any]:
    """(label, source kind, tokenizer, config) of the stage's input model, without loading weights.

    A from-scratch model's tokenizer is trained here, once: the stage builds its model on this very tokenizer.
    An earlier stage's output is its plan's architecture and a copy of its planned tokenizer (the stage may give
    it a chat template; the earlier stage must not save that).

    Raises:
        BadInput: the model cannot be found (for hub models only when `need_tokenizer`; otherwise its settings
            are shown as unknown).
    """
    from align.models import as_reloaded, hub_config, is_adapter_dir, load_tokenizer, scratch_config, train_tokenizer

    where = f"stages.{stage.name}.model"
    source = model_source(stage, recipe)
    if isinstance(source, ScratchModel):
        if data is None:
            return f"scratch:{source.model_type}", "scratch", None, scratch_config(source, where)
        from align.data_rows import training_texts
        from align.families import read_template, template_texts

        texts = training_texts(data["train"])
        if getattr(stage, "chat_template", None) not in (None, "own"):
            # The text the stage's template writes around each row, so that it tokenizes as a released model's does.
            texts += template_texts(read_template(stage.chat_template, f"stages.{stage.name}.chat_template"),
                                    data["train"])  # fmt: skip
        tokenizer = train_tokenizer(texts, source.vocab_size)
        config = scratch_config(source, where, vocab_size=len(tokenizer))
        tokenizer = as_reloaded(tokenizer, config, texts[:64])
        label = f"scratch:{source.model_type} (tokenizer trained here: {len(tokenizer)} tokens)"
        if len(tokenizer) < source.vocab_size:
            # BPE stops merging when no pair occurs twice: a small corpus gives fewer tokens than asked.
            label = label.replace(" tokens)", f" of the {source.vocab_size} asked)")
            logger.warning("%s.vocab_size: %d asked, but the tokenizer trained on this stage's data has %d tokens (no "
                           "pair of tokens left that occurs twice); the model is built with %d", where,
                           source.vocab_size, len(tokenizer), len(tokenizer))  # fmt: skip
        return label, "scratch", tokenizer, config
    ref = stage_ref(source)
    if ref is not None:
        upstream = plans[ref]
        tokenizer = copy.deepcopy(upstream.tokenizer) if upstream.tokenizer is not None else None
        return f"{source} (the output of stage {ref})", "@stage", tokenizer, upstream.config
    try:
        config = hub_config(source, where, stage.trust_remote_code, recipe.base_dir)
    except BadInput:
        if need_tokenizer:
            raise
        return source, "hub", None, None
    try:
        tokenizer = load_tokenizer(source, stage.trust_remote_code)
    except Exception:
        if need_tokenizer:
            raise
        tokenizer = None  # print-config: its settings show what they can
    kind = "adapters" if is_adapter_dir(source) else "directory" if Path(source).is_dir() else "hub"
    return source, kind, tokenizer, config


def steps_for(max_steps: int | None, per_step: int, epochs: float, n_train: int) -> int:
    """Optimizer steps the Trainer takes: `max_steps` where set, else epochs over `n_train` rows."""
    import math

    if max_steps and max_steps > 0:
        return int(max_steps)
    return max(1, math.ceil(n_train / per_step)) * math.ceil(epochs)


def batch_figures(effective: dict[str, Setting], n_train: int) -> dict[str, int]:
    """The planned steps and the effective batch (per device x accumulation x processes), for `--dry-run`."""
    value = {k: effective[k].value for k in ("per_device_train_batch_size", "gradient_accumulation_steps")}
    per_step = value["per_device_train_batch_size"] * value["gradient_accumulation_steps"] * world_size()
    steps = steps_for(effective["max_steps"].value, per_step, effective["num_train_epochs"].value, n_train)
    return {"planned_steps": steps, "effective_batch": per_step}


def world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


# --------------------------------------------------------------------------------------------------
# Showing a plan


def describe(plans: dict[str, StagePlan]) -> list[str]:
    """The plan as `--dry-run` prints it: per stage, the model, the details, every key setting and its source."""
    lines: list[str] = []
    for i, plan in enumerate(plans.values(), start=1):
        lines += ["", f"[{i}/{len(plans)}] {plan.name} ({plan.kind})", f"  model: {plan.model}"]
        details = dict(plan.details)
        examples = details.pop("examples", [])
        for key, value in details.items():
            if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                lines += [f"  {key}:", *(f"    {v}" for v in value)]  # one line each (a mix's sources)
            else:
                lines.append(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
        lines.append("  settings:")
        for key, setting in plan.effective.items():
            lines.append(f"    {key}: {setting.value!r}  ({setting.source})")
        for n, example in enumerate(examples, start=1):
            lines.append(f"  example {n}:")
            lines += [f"    {k}: {v!r}" for k, v in example.items()]
    return lines


def print_config_settings(plan: StagePlan | None, stage: Stage) -> dict[str, Setting]:
    """The `train:` settings `--print-config` shows for a stage: effective values with sources, or, for a model
    not available, what the recipe and align give, with the rest unknown."""
    if plan is not None and plan.effective:
        return plan.effective
    return {k: Setting(v, "recipe") for k, v in stage.train.items()}
