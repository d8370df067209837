"""Recipes: a strict pydantic schema, where a recipe's local paths are looked for, and cross-field checks.

Every problem is collected and raised once as `BadInput`, each naming its YAML path
(`stages.lm.train.max_steps`) and, for an unknown key, the closest valid one. Reading the YAML, `--set` overrides
and the wording of the schema's errors are in align/recipe_yaml.py.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    StrictBool,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)

from align.errors import misplaced_key_message, unknown_key_message

FORMATS = (
    "text", "prompt_completion", "messages", "preference", "preference_implicit", "preference_messages",
    "unpaired_preference", "prompt_only",
)  # fmt: skip
# The fields each format needs; `columns:` maps them to the source's own column names.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    # `tools` (optional): each conversation's tool schemas, a list or a JSON string, for tool-call transcripts.
    "messages": ("messages", "tools"),
    "preference": ("prompt", "chosen", "rejected"),
    "preference_implicit": ("chosen", "rejected"),
    "preference_messages": ("prompt", "chosen", "rejected"),
    # One answer with a thumbs up or down (KTO's data): `label` is true for a desirable answer.
    "unpaired_preference": ("prompt", "completion", "label"),
    # Prompts to answer online (grpo, rloo): every other column is kept, for the reward functions.
    "prompt_only": ("prompt",),
}
# Formats whose other columns are kept beside their fields (the rest keep only their fields).
KEEPS_COLUMNS = ("prompt_only",)
PREFERENCE_FORMATS = ("preference", "preference_implicit", "preference_messages")
# Training arguments align decides itself; setting them in `train:` would fight it, so they are errors.
MANAGED_TRAIN_KEYS: dict[str, str] = {
    "output_dir": "align writes to <run dir>/<stage>/checkpoints; use --output-dir",
    "report_to": "tracking is set once for all stages under `tracking:`",
    "bf16": "use the recipe's top-level `precision:` (auto | bf16 | fp16 | fp32)",
    "fp16": "use the recipe's top-level `precision:` (auto | bf16 | fp16 | fp32)",
    "run_name": "wandb runs are named <recipe>/<stage>",
    "seed": "use the recipe's top-level `seed:`",
    "load_best_model_at_end": "set `early_stopping:` on the stage; align then restores the best model",
    "metric_for_best_model": "early stopping always watches eval_loss",
    # TRL applies it only when it loads the model from a name; align loads the model itself, and TRL ignores it.
    "model_init_kwargs": "align loads the model: use the stage's `loading: {attn_implementation, dtype, quantization}`",
    "chat_template_path": "use the stage's `chat_template:` (a name TRL ships, a .jinja file, or own)",
    # The Trainer would upload checkpoints while it trains, before align's verdict and model card exist.
    "push_to_hub": "push a finished stage with `align push RUN_DIR --stage NAME --repo-id ID` (its card goes too)",
    # align resumes each stage from its own last checkpoint; a path given here would be overridden in silence.
    "resume_from_checkpoint": "run the same command again: align resumes each stage from its last checkpoint",
}
# The Trainer pickles its arguments into every checkpoint: a credential in `train:` would land on disk.
CREDENTIAL_TRAIN_KEYS = {"hub_token": "HF_TOKEN"}


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are assigned with validation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WandbSettings(Strict):
    project: str = Field("align", description="wandb project the stage runs go to")
    entity: str | None = Field(None, description="wandb team or user; None means your default entity")
    mode: Literal["online", "offline", "disabled"] = Field(
        "offline", description="online falls back to offline, with a warning, without credentials or network"
    )
    tags: list[str] = Field(default_factory=list, description="tags added to every stage's run")


class TrackioSettings(Strict):
    """trackio: a local SQLite database, `<run dir>/trackio/<project>.db` (or under TRACKIO_DIR when set)."""

    project: str = Field("align", description="trackio project the stage runs go to (one database per project)")


class MlflowSettings(Strict):
    """MLflow: a parent run per pipeline run, a child run per stage."""

    experiment: str = Field("align", description="MLflow experiment the runs go to (created when missing)")
    tracking_uri: str | None = Field(
        None, description="where MLflow stores runs; None: a file store at <run dir>/mlruns (no server needed)"
    )


class TensorBoardSettings(Strict):
    """TensorBoard: event files under `<run dir>/tensorboard/<pipeline run>/<stage>`. No settings yet: `{}`."""


class Tracking(Strict):
    wandb: WandbSettings = Field(default_factory=WandbSettings, description="wandb; mode: disabled turns it off")
    trackio: TrackioSettings | None = Field(None, description="trackio, when given (`trackio: {}`); needs .[trackio]")
    mlflow: MlflowSettings | None = Field(None, description="MLflow, when given (`mlflow: {}`); needs .[mlflow]")
    tensorboard: TensorBoardSettings | None = Field(
        None, description="TensorBoard, when given (`tensorboard: {}`); needs .[tensorboard]"
    )
    log_level: Literal["debug", "info", "warning"] = Field("info", description="console log level")


class EarlyStopping(Strict):
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    threshold: float = Field(0.0, ge=0.0, description="smallest eval-loss drop that counts as an improvement")


class Source(Strict):
    hub: str | None = Field(None, description="a Hugging Face Hub dataset id")
    config: str | None = Field(None, description="the hub dataset's configuration name")
    revision: str | None = Field(None, description="a hub revision (branch, tag or commit)")
    builtin: str | None = Field(None, description="an offline data set align generates (see align/builtin.py)")
    files: list[str] | dict[str, list[str]] | None = Field(
        None, description="local files (jsonl, json, csv, parquet, txt); a list, or {split: [files]}"
    )
    disk: str | None = Field(
        None, description="a folder written by datasets' save_to_disk: a Dataset (train) or a DatasetDict (splits)"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [k for k in ("hub", "builtin", "files", "disk") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of hub, builtin, files, disk (got {', '.join(given) or 'none'})")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return later_keys_left_out(handler(self), self, ("disk",))


class Splits(Strict):
    train: str = Field("train", description="the source split to train on")
    validation: str | None = Field(None, description="the source split to evaluate on; null cuts one from train")
    test: str | None = Field(None, description="a held-out split no stage trains on: an eval stage's prompts")


# A mix's rows: how many times a source may be repeated to give the rows `mix_rows` asks of it.
MAX_REPEATS = 100


def later_keys_left_out(data: dict[str, Any], model: BaseModel, keys: tuple[str, ...]) -> dict[str, Any]:
    """A dump without `keys` where they are unset (None): keys added after runs were fingerprinted (`source.disk`,
    a stage's `loading`); the fingerprints of those runs hash the dump, and must not change."""
    for key in keys:
        if getattr(model, key) is None:
            data.pop(key, None)
    return data


def _without_unset_mix(data: dict[str, Any], mix: Any) -> dict[str, Any]:
    """A dump without the mix's keys when there is no mix: the fingerprints of stages written before mixing existed
    (align 0.1) hash the dump, and must not change."""
    if mix is None:
        data.pop("mix", None)
        data.pop("mix_rows", None)
    return data


class DataSpec(Strict):
    """A data card's front matter, or the same fields given inline in a stage's `data:`; or a mix of such sources
    (`mix:`, each with its weight), whose `format` is the one format its rows are brought to."""

    name: str | None = None
    source: Source | None = None
    format: Literal[FORMATS]  # type: ignore[valid-type]
    columns: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description="format field -> source column; a list joins several columns' non-empty values with blank lines",
    )
    splits: Splits = Field(default_factory=Splits)
    valid_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="held-out share cut from train (seeded)")
    max_train_rows: int | None = Field(None, ge=1, description="keep at most this many training rows")
    max_eval_rows: int | None = Field(None, ge=1, description="keep at most this many validation rows")
    license: str | None = None
    stages: list[str] = Field(default_factory=list, description="stage kinds this data set suits")

    mix: list[MixedSource] | None = Field(None, description="several sources, each with its weight (see DataRef)")
    mix_rows: int | None = Field(None, ge=1, description="rows of the mixed train split (see DataRef)")

    @model_validator(mode="after")
    def _columns_match_format(self) -> DataSpec:
        fields = FORMAT_FIELDS[self.format]
        for key in self.columns:
            if key not in fields:
                raise ValueError(unknown_key_message(f"columns (format {self.format})", key, fields))
        if (self.source is None) == (self.mix is None):
            raise ValueError("give a `source:` or a `mix:` of sources")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = _without_unset_mix(handler(self), self.mix)
        if self.source is None:
            data.pop("source", None)
        return data


class MixedSource(DataSpec):
    """One source of a mix, resolved: its own card fields, format, columns and splits, and its weight."""

    weight: float = Field(gt=0, description="its share of the mixed train split, before normalising")


class SourceRef(Strict):
    """What a stage's `data:` and each source of a mix take: a card by name with fields overridden, or an inline
    source (every field optional here; the resolved spec, `DataSpec`, checks that enough are given)."""

    card: str | None = None
    name: str | None = None
    source: Source | None = None
    format: Literal[FORMATS] | None = None  # type: ignore[valid-type]
    columns: dict[str, str | list[str]] | None = None
    splits: Splits | None = None
    valid_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    max_train_rows: int | None = Field(None, ge=1)
    max_eval_rows: int | None = Field(None, ge=1)
    license: str | None = None
    stages: list[str] | None = None


class MixRef(SourceRef):
    """One source of a `data: {mix: [...]}`: a card by name (with fields overridden) or an inline source, and its
    weight. Every field a stage's `data:` takes, but no mix of its own."""

    name: str | None = Field(None, description="the source's name in the summary, the plan and eval_<name>_loss")
    weight: float = Field(
        gt=0, allow_inf_nan=False, description="a positive number: its share of the mixed train split, normalised"
    )


class DataRef(SourceRef):
    """`data:` in a stage: a card by name, optionally with fields overridden, or a whole inline spec; or a `mix:` of
    such sources with weights.

    A mix's train split takes from each source its weight's share (normalised), each source shuffled with the
    recipe's seed first. Without `mix_rows` it is the largest mix that repeats no source's row; with it, a source
    asked for more rows than it has is repeated (the plan says so; never more than MAX_REPEATS times). Its
    validation split is every source's own, unweighted, each also evaluated on its own (`eval_<name>_loss`).
    """

    mix: list[MixRef] | None = Field(None, description="several sources, each a card or an inline source + weight")
    mix_rows: int | None = Field(
        None, ge=1, description="rows of the mixed train split; default: the most that repeat no source's row"
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_unset_mix(handler(self), self.mix)


class ScratchModel(BaseModel):
    """A model built from a config: `model_type` plus any size overrides of that config class.

    The overrides are checked against the config class when the stage is validated, since which keys exist
    depends on `model_type`.
    """

    model_config = ConfigDict(extra="allow")
    model_type: str = Field(description="a transformers model type, e.g. gpt2, llama, openai-gpt")
    vocab_size: int = Field(4096, ge=256, description="vocabulary of the byte-level BPE tokenizer trained on the data")


class PeftSettings(Strict):
    """LoRA adapters through peft: only the adapters train; the base model stays frozen."""

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: str | list[str] = Field(
        "all-linear", description="module names to adapt, or 'all-linear' for every linear layer but the head"
    )
    target_parameters: list[str] | None = Field(
        None,
        description="parameters to adapt that are not linear layers: an MoE's experts (peft's target_parameters, "
        "e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj])",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return later_keys_left_out(handler(self), self, ("target_parameters",))


class ModelRefMark:
    """Marks a recipe field whose value names a model (a hub id, a directory or `@stage`): `Annotated[..., MODEL_REF]`.
    `Stage.model_refs` collects every marked field, so the offline and run-directory checks reach a new model-valued
    field (a reward model, a teacher) by its declaration alone; tests/test_registry.py holds every kind to it."""

    def __repr__(self) -> str:
        return "MODEL_REF"


MODEL_REF = ModelRefMark()


def declared_model_refs(node: BaseModel) -> dict[str, str]:
    """Every model named in `node`'s fields marked `MODEL_REF` (strings only: a from-scratch config names none), by
    its dotted key (`model`, `models.sft`, `rewards.1.reward_model`), found through nested models, lists and dicts."""
    found: dict[str, str] = {}

    def visit(value: Any, at: str, marked: bool) -> None:
        if isinstance(value, BaseModel):
            if marked:
                return  # a model built from a config ({model_type: ...}) names no model to find
            for name, info in type(value).model_fields.items():
                visit(getattr(value, name), f"{at}.{name}" if at else name, MODEL_REF in info.metadata)
        elif isinstance(value, dict | list):
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                visit(item, f"{at}.{key}", marked)
        elif marked and isinstance(value, str):
            found[at] = value

    visit(node, "", False)
    return found


class Stage(Strict):
    """The shape every stage shares. Each kind's module declares its own recipe keys as a subclass (with `kind` a
    literal of its name), and the loader (align/loader.py) validates a stage with its kind's class."""

    name: str = Field(description="stage name: its directory in the run and its key in --set paths")
    kind: str = Field(description="what the stage does: one of the registered kinds (align/stages/__init__.py)")
    # What the kind's saved model is: "policy" (it generates: a later stage without `model:`, an eval stage and
    # `align chat` take it), "reward_model" (a judge), or None (it saves no model).
    makes: ClassVar[str | None] = None
    article: ClassVar[str] = "a"  # as a sentence says the kind: "an sft stage", "a dpo stage"

    def problems(self, earlier: list[Stage]) -> list[str]:
        """The kind's own checks, against the stages before it. Returns every problem found."""
        return []

    def model_refs(self) -> dict[str, str]:
        """Every model this stage reads, as written (hub ids, directories, @stage references), by its key under
        the stage (`model`, `models.sft`, `judges.0.reward_model`): its fields marked `MODEL_REF`."""
        return declared_model_refs(self)

    def a_kind(self) -> str:
        """The kind with its article, as a sentence says it: "an sft", "a dpo"."""
        return f"{self.article} {self.kind}"


class Loading(Strict):
    """How the stage's input model is loaded (transformers' `from_pretrained` options); unset: transformers' own
    choices (its default attention, float32 weights that `precision:` trains in mixed precision)."""

    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] | None = (
        Field(None, description="the attention kernel; flash_attention_* need the flash-attn package and a GPU")
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = Field(
        None, description="the weights' dtype as loaded (auto: the checkpoint's); half the memory in bf16/fp16"
    )
    quantization: Literal["4bit", "8bit"] | None = Field(
        None, description="bitsandbytes quantization of the frozen base (QLoRA: 4bit NF4); needs peft: and a CUDA GPU"
    )


class TrainingStage(Stage):
    """The recipe keys of a stage that trains a model: what every training kind takes (each adds its own)."""

    makes: ClassVar[str | None] = "policy"
    # Keys added after runs were fingerprinted: left out of the dump (and the fingerprint) while unset.
    later_keys: ClassVar[tuple[str, ...]] = ("loading", "chat_template", "thinking")
    model: Annotated[str | ScratchModel | None, MODEL_REF] = Field(
        None, description="hub id, local directory, @<stage>, or {model_type: ...}; omitted: the previous stage"
    )
    data: DataRef
    train: dict[str, Any] = Field(default_factory=dict, description="keys of the TRL config class of this kind")
    early_stopping: EarlyStopping | None = None
    peft: PeftSettings | None = Field(None, description="train LoRA adapters instead of every weight")
    merge: bool = Field(False, description="with peft: save the adapters merged into the model, for the next stage")
    generations: int = Field(4, ge=0, description="eval prompts answered greedily before and after training")
    trust_remote_code: bool = Field(
        False, description="run Python code shipped in the model's hub repository (only for models you trust)"
    )
    loading: Loading | None = Field(None, description="how the input model is loaded: attention, dtype, quantization")
    thinking: StrictBool | None = Field(
        None,
        description="a thinking template's switch (Qwen 3's enable_thinking) wherever the stage renders a generation "
        "prompt; unset: the template's default. true on a template that does not think is refused",
    )
    chat_template: str | None = Field(
        None,
        description="the chat template: a name TRL ships (qwen2_5, llama3, gemma3, ...), a .jinja file, or own (the "
        "model's; align's own for a model without one). A named one adds its special tokens to the tokenizer and "
        "makes its end-of-turn token the eos",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return later_keys_left_out(handler(self), self, self.later_keys)

    def problems(self, earlier: list[Stage]) -> list[str]:
        where = f"stages.{self.name}"
        problems = []
        ref = stage_ref(self.model)
        by_name = {s.name: s for s in earlier}
        if ref is not None and ref not in by_name:
            problems.append(f"{where}.model: '@{ref}' is not an earlier stage (earlier stages: "
                            f"{', '.join(by_name) or '-'})")  # fmt: skip
        elif ref is not None and by_name[ref].makes != "policy":
            problems.append(
                f"{where}.model: '@{ref}' is {by_name[ref].a_kind()} stage, whose output is not a "
                f"language model to train on (name a stage that makes one: {policy_list(earlier)})"
            )
        if self.model is None and not any(s.makes == "policy" for s in earlier):
            problems.append(f"{where}.model: the first stage needs a model (hub id, path or {{model_type: ...}})")
        if self.merge and self.peft is None:
            problems.append(f"{where}.merge: merging needs adapters; add `peft:` or remove `merge: true`")
        if self.loading is not None and self.loading.quantization is not None:
            if self.peft is None:
                problems.append(f"{where}.loading.quantization: a quantized model trains only through adapters; "
                                "add `peft:` (QLoRA) or remove the quantization")  # fmt: skip
            if isinstance(self.model, ScratchModel):
                problems.append(f"{where}.loading.quantization: a model built from scratch has no weights to quantize")
        return problems


def reward_model_problems(ref: str | None, where: str, earlier: list[Stage]) -> list[str]:
    """A problem when `ref` (a `reward_model:` as written) names a stage that is not an earlier reward-model stage."""
    name = stage_ref(ref)
    by_name = {s.name: s for s in earlier}
    if name is None or (name in by_name and by_name[name].makes == "reward_model"):
        return []
    what = f"{by_name[name].a_kind()} stage" if name in by_name else "not an earlier stage"
    return [f"{where}: '@{name}' is {what}; a reward model comes from an earlier stage that trains one, a directory "
            "or a hub id"]  # fmt: skip


def policy_list(stages: list[Stage]) -> str:
    names = [s.name for s in stages if s.makes == "policy"]
    return ", ".join(names) or "none yet"


class Recipe(Strict):
    name: str = Field(description="run directory name under runs/")
    seed: int = 42
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    tracking: Tracking = Field(default_factory=Tracking)
    # Each stage is its kind's own class (align/loader.py validates it): dumped as that class, not as `Stage`.
    stages: list[SerializeAsAny[Stage]] = Field(min_length=1)
    # Where the recipe was read from: relative data paths resolve against its directory.
    _path: Path | None = PrivateAttr(None)
    # The dotted paths `--set` gave (`stages.lm.train.learning_rate`): `--print-config` says where a value came from.
    _overridden: frozenset[str] = PrivateAttr(frozenset())

    @property
    def base_dir(self) -> Path:
        return self._path.parent if self._path is not None else Path.cwd()

    @property
    def overridden(self) -> frozenset[str]:
        return self._overridden


def stage_ref(model: Any) -> str | None:
    """The stage a `model: "@<stage>"` reference names, or None for anything else (hub id, path, scratch)."""
    if isinstance(model, str) and model.startswith("@"):
        return model[1:]
    return None


def model_source(stage: Stage, recipe: Recipe) -> str | ScratchModel:
    """The stage's `model` as written, an omitted one read as `@<previous policy stage>` (a stage whose kind makes a
    policy: never a reward model or an eval, so in lm -> sft -> rm -> dpo the dpo stage trains on the sft model)."""
    if getattr(stage, "model", None) is not None:
        return stage.model
    return f"@{policies_before(stage, recipe)[-1].name}"


def policies_before(stage: Stage, recipe: Recipe) -> list[Stage]:
    """The stages before `stage` whose saved model is a policy, in recipe order."""
    names = [s.name for s in recipe.stages]
    return [s for s in recipe.stages[: names.index(stage.name)] if s.makes == "policy"]


# --------------------------------------------------------------------------------------------------
# Local paths


def search_paths(name: str, base_dir: Path) -> list[Path]:
    """Where a path written in a recipe is looked for, in order: the recipe's folder, then the working directory.

    Data files and local model directories follow this one rule. An absolute or `~` path is only itself. The
    places are absolute, so an error can name exactly where it looked.
    """
    path = Path(os.path.expanduser(name))
    places = [path] if path.is_absolute() else [base_dir / path, Path.cwd() / path]
    return list(dict.fromkeys(Path(os.path.abspath(p)) for p in places))


def resolve_local_models(recipe: Recipe) -> None:
    """Make each stage's local model directory (and `.jinja` chat template) absolute, found by `search_paths` (the
    recipe's folder first).

    Done once, at load, so every consumer (preflight, the stages, fingerprints, `--print-config`) sees the same
    directory whatever the working directory. Hub ids, and paths found in neither place, stay as written:
    preflight reports a missing one, naming both places.
    """
    for stage in recipe.stages:
        model = getattr(stage, "model", None)  # a stage that trains a model names it; an eval names several
        if isinstance(model, str) and model.strip() and stage_ref(model) is None:
            found = next((p for p in search_paths(model, recipe.base_dir) if p.is_dir()), None)
            if found is not None:
                stage.model = str(found)
        template = getattr(stage, "chat_template", None)
        if isinstance(template, str) and template.endswith(".jinja"):
            found = next((p for p in search_paths(template, recipe.base_dir) if p.is_file()), None)
            if found is not None:
                stage.chat_template = str(found)


# --------------------------------------------------------------------------------------------------
# Cross-field checks


# Recipe names, stage names and card names become one folder or file name each: a name made only of dots, or one
# with a separator, would point outside the run directory (a stage named `..` once deleted the user's files).
NAME_PATTERN = re.compile(r"(?!\.+$)[A-Za-z0-9_.-]+")


def path_component_problems(name: str, where: str, names: str = "a directory") -> list[str]:
    """A problem when `name` is not one safe path component: letters, digits, '_', '-', '.', never only dots."""
    if NAME_PATTERN.fullmatch(name):
        return []
    return [f"{where}: {name!r} is not a valid name: use letters, digits, '_', '-' or '.', not only dots (it names "
            f"{names})"]  # fmt: skip


def check_recipe(recipe: Recipe) -> list[str]:
    """Checks that involve several fields, all in one place: the names, then each stage's own checks against the
    stages before it (its kind's class). Returns every problem found."""
    problems: list[str] = path_component_problems(recipe.name, "name", "the run directory")
    seen: set[str] = set()
    for i, stage in enumerate(recipe.stages):
        where = f"stages.{stage.name}"
        if stage.name in seen:
            problems.append(f"{where}.name: two stages are named '{stage.name}'")
        problems += path_component_problems(stage.name, f"{where}.name")
        card = getattr(stage, "data", None) and stage.data.card
        if card is not None:
            problems += path_component_problems(card, f"{where}.data.card", "a data card's file")
        problems += stage.problems(recipe.stages[:i])
        seen.add(stage.name)
    return problems


def _train_field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a hint that does not resolve: fall back to names only
        return {f: Any for f in cls.__dataclass_fields__}


def check_train(
    cls: type, train: dict[str, Any], early_stopping: bool, where: str, stage_keys: Iterable[str] = ()
) -> list[str]:
    """Check `train:` keys and value types against the kind's config class `cls`; coerce values in place.
    `stage_keys`: the stage's own keys, named as such where one is written under `train:` (`peft`, `merge`).

    Returns every problem, each naming `<where>.<key>`.
    """
    hints = _train_field_types(cls)
    fields = {name for name, f in cls.__dataclass_fields__.items() if f.init}
    problems = []
    for key, value in list(train.items()):
        if key in CREDENTIAL_TRAIN_KEYS:
            env = CREDENTIAL_TRAIN_KEYS[key]
            problems.append(f"{where}.{key}: credentials stay out of recipes (they are saved with the run); set {env}")
            continue
        if key in MANAGED_TRAIN_KEYS:
            problems.append(f"{where}.{key}: set by align: {MANAGED_TRAIN_KEYS[key]}")
            continue
        if key not in fields and key in stage_keys:
            problems.append(misplaced_key_message(f"{where}.{key}", f"{where.rsplit('.', 1)[0]}.{key}"))
            continue
        if key not in fields:
            problems.append(unknown_key_message(where, key, fields) + f" ({cls.__name__} has no such field)")
            continue
        hint = hints.get(key, Any)
        try:
            checked = TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True)).validate_python(value)
            # Keep the value as written where it was already right (20, not 20.0); take the coerced one where
            # YAML got it wrong (`1e-4` without a dot is a string to YAML, a float to us).
            if checked != value:
                train[key] = checked
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"]
            problems.append(f"{where}.{key}: {msg} (got {value!r})")
        except Exception:  # a type pydantic cannot build a validator for: TRL checks it when the stage starts
            pass
    if early_stopping and str(train.get("eval_strategy", "steps")) in ("no", "IntervalStrategy.NO"):
        problems.append(f"{where}.eval_strategy: early_stopping needs evaluations; remove eval_strategy: no")
    return problems
