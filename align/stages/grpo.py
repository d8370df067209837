"""`kind: grpo` — online RL with TRL's GRPOTrainer: the policy answers each training prompt several times, reward
functions score the answers, and each answer is pushed up or down by how it scored against its group.

Data: `prompt_only` rows (a string or a message list); every other column reaches the reward functions. Rewards:
`rewards:` entries (align/rewards.py), each with its `weight` (TRL's `reward_weights`, which a recipe may not set
beside them). Every function is imported and called on two held-out rows before anything trains; one that raises
or returns a non-finite value during training stops the stage naming it and the step (its last checkpoint resumes).

The held-out measure is the mean total reward per held-out prompt, sampled before and after training with the same
settings and seed, and the verdict a paired bootstrap over prompts. GRPO learns nothing from a group whose answers
all got the same reward (often: every answer truncated, or a reward constant for this model); the health alarms
(`HealthAlarms`) say so while it trains, and the verdict names it. A loss of exactly 0 is normal here (a group
without variance gives none), so that numeric warning is off.

`OnlineStage` is what grpo and rloo (align/stages/rloo.py) share.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from align.errors import BadInput
from align.recipe import Stage, Strict, TrainingStage, reward_model_problems, stage_ref
from align.rewards import RewardEntry, check_reward, guarded, resolve_function
from align.stages.base import Figure, TrainingKind
from align.stages.common import StageKind, generation_table, run_stage, show_prompt
from align.values import Setting, StageParts, StageResult, StartingPoint

if TYPE_CHECKING:
    from align.context import StageContext

logger = logging.getLogger(__name__)

# Held-out prompts the measure samples, and answers per prompt: enough for a paired interval on a CPU.
MEASURE_PROMPTS = 32
MEASURE_SAMPLES = 4


class Alarms(Strict):
    """The health alarms of online RL (each a warning with its numbers; `stop: true` makes them stop the stage)."""

    stop: bool = Field(False, description="an alarm stops the stage (as a non-finite loss does) instead of warning")
    zero_std: float = Field(0.9, ge=0.0, le=1.0, description="share of groups whose answers all got one reward")
    clipped: float = Field(0.9, ge=0.0, le=1.0, description="share of answers cut at max_completion_length")
    collapse: float = Field(0.25, gt=0.0, lt=1.0, description="mean length or entropy below this share of its first")
    kl: float = Field(1.0, gt=0.0, description="KL to the reference above this (with beta > 0)")
    window: int = Field(3, ge=1, description="logged steps in a row an alarm's condition must hold")


class OnlineKeys(TrainingStage):
    """The recipe keys of an online RL stage: those of every training stage, its rewards, and its alarms."""

    rewards: list[RewardEntry] = Field(min_length=1, description="what scores the answers; each has its weight")
    alarms: Alarms = Field(default_factory=Alarms)

    def problems(self, earlier: list[Stage]) -> list[str]:
        problems = super().problems(earlier)
        where = f"stages.{self.name}"
        if "reward_weights" in self.train:
            problems.append(f"{where}.train.reward_weights: each entry of `rewards:` has its own `weight`")
        for n, entry in enumerate(self.rewards):
            problems += reward_model_problems(entry.reward_model, f"{where}.rewards.{n}.reward_model", earlier)
        return problems


class GRPOKeys(OnlineKeys):
    kind: Literal["grpo"]


def run(stage: Stage, ctx: StageContext) -> StageResult:
    """Train a policy online against its reward functions; measure its held-out reward before and after; save."""
    return run_stage(stage, ctx, GRPOStage)


def reward_label(entry: RewardEntry, n: int) -> str:
    return f"rewards[{n}] {entry.name}"


class OnlineStage(StageKind):
    """An online RL trainer of TRL's: reward functions guarded, a reference only where beta > 0, the health alarms,
    and the held-out reward before and after."""

    unit = "completions"
    loss_can_be_zero = True
    trainer_name = ""

    def setup(self) -> None:
        from align.models import ensure_chat_template

        ensure_chat_template(self.tokenizer)
        stage, base = self.stage, self.ctx.recipe.base_dir
        conversational = bool(len(self.data["train"])) and isinstance(self.data["train"][0]["prompt"], list)
        self.entries = list(stage.rewards)
        self.functions, self.reward_tokenizers = [], []
        for n, entry in enumerate(self.entries):
            where = f"stages.{stage.name}.rewards[{n}]"
            if entry.function is not None:
                self.functions.append(guarded(resolve_function(entry, base, where, conversational), entry.name))
                self.reward_tokenizers.append(None)
            else:
                model, tokenizer = self.reward_model(entry, where)
                self.functions.append(model)
                self.reward_tokenizers.append(tokenizer)
        self.weights = [entry.weight for entry in self.entries]
        self.train, self.eval = self.data["train"], self.data["validation"]
        self.held_out = self.eval.select(range(min(MEASURE_PROMPTS, len(self.eval))))
        self.prompts = [self.held_out[i]["prompt"] for i in range(min(self.stage.generations, len(self.held_out)))]
        self.extra = {"rewards": [{"reward": e.name, "weight": e.weight} for e in self.entries]}

    def reward_model(self, entry: RewardEntry, where: str) -> tuple[Any, Any]:
        from align.models import build_model

        ref = stage_ref(entry.reward_model)
        path = str(self.ctx.outputs[ref].model_dir) if ref is not None else entry.reward_model
        model, tokenizer = build_model(path, where, reward_head=True)
        model.config._name_or_path = entry.name  # TRL names its figure after it (a model built here has none)
        return model.eval(), tokenizer

    def trainer(self, args: Any, callbacks: list[Any]) -> Any:
        import trl

        from align.models import lora_config

        self.use_reference(args)
        trainer_class = getattr(trl, self.trainer_name)
        return trainer_class(
            model=self.model, reward_funcs=self.functions, args=args, train_dataset=self.train,
            eval_dataset=self.eval, processing_class=self.tokenizer, reward_processing_classes=self.reward_tokenizers,
            callbacks=callbacks, peft_config=lora_config(self.stage.peft) if self.start.lora == "new" else None,
        )  # fmt: skip

    def use_reference(self, args: Any) -> None:
        """With beta > 0 TRL loads its reference from the model's `_name_or_path`; a model built from scratch here,
        or the input's adapters merged, has no such directory: the starting weights are saved for it."""
        if not args.beta or self.start.lora == "new":
            self.extra["reference"] = "none (beta 0)" if not args.beta else "the input model with its adapters off"
            return
        from align.runtime import is_main_process, wait_for_everyone

        named = str(getattr(self.model.config, "_name_or_path", "") or "")
        if self.start.input == "full" and named and named == str(self.ctx.model_ref):
            self.extra["reference"] = f"the input model, loaded again by TRL from {named}"
            return
        folder = self.ctx.stage_dir / "reference"
        if is_main_process():
            self.model.save_pretrained(folder)
        wait_for_everyone()
        self.model.config._name_or_path = str(folder)
        self.extra["reference"] = f"the input model, saved for TRL to load in {folder}"

    def guards(self) -> list[Any]:
        from align.guards import HealthAlarms

        self.health = HealthAlarms(self.stage.alarms, self.ctx.tracker)
        return [self.health]

    def measure(self, trainer: Any) -> dict[str, Any]:
        """Every held-out prompt answered `MEASURE_SAMPLES` times with the training's own sampling settings and the
        recipe's seed, and scored: the mean total reward per prompt, each function's mean, the share of prompts
        whose answers all scored alike, mean length and the share cut at max_completion_length."""
        from align.evaluation import generate_batched

        args = trainer.args
        rows = self.held_out
        answers = generate_batched(
            trainer.model, self.tokenizer, list(rows["prompt"]), max_new_tokens=args.max_completion_length,
            temperature=args.temperature or 1.0, top_p=args.top_p, num_samples=MEASURE_SAMPLES, seed=self.ctx.seed,
            batch_size=args.per_device_eval_batch_size,
        )  # fmt: skip
        flat = [(i, a) for i, per in enumerate(answers) for a in per]
        columns = {k: [rows[i][k] for i, _ in flat] for k in rows.column_names if k != "prompt"}
        prompts = [rows[i]["prompt"] for i, _ in flat]
        completions = [[{"role": "assistant", "content": a.text}] if isinstance(p, list) else a.text
                       for p, (_, a) in zip(prompts, flat, strict=True)]  # fmt: skip
        per_function = {}
        for entry, fn, tokenizer in zip(self.entries, self.functions, self.reward_tokenizers, strict=True):
            if tokenizer is None:
                ids = [list(a.token_ids) for _, a in flat]
                values = fn(prompts=prompts, completions=completions, completion_ids=ids, **columns)
            else:
                from align.evaluation import reward_model_scores

                texts = [a.text for _, a in flat]
                values = reward_model_scores(fn, tokenizer, prompts, texts, batch_size=args.per_device_eval_batch_size)
            per_function[entry.name] = [float("nan") if v is None else float(v) for v in values]
        totals = [
            sum(
                w * (0.0 if math.isnan(v[k]) else v[k])
                for w, v in zip(self.weights, per_function.values(), strict=True)
            )
            for k in range(len(flat))
        ]
        by_prompt = [totals[i * MEASURE_SAMPLES : (i + 1) * MEASURE_SAMPLES] for i in range(len(rows))]
        return {
            "per_prompt": [sum(g) / len(g) for g in by_prompt],
            "reward": sum(totals) / max(1, len(totals)),
            "rewards": {name: _nanmean(values) for name, values in per_function.items()},
            "zero_std": sum(max(g) - min(g) < 1e-12 for g in by_prompt) / max(1, len(by_prompt)),
            "length": sum(a.tokens for _, a in flat) / max(1, len(flat)),
            "clipped": sum(not a.ended for _, a in flat) / max(1, len(flat)),
            "answers": [per[0] for per in answers[: len(self.prompts)]],
        }

    def summarize(self, before, after, measured_before, measured_after):
        from align.verdict import Verdict, accuracy_verdict

        metrics = {
            "reward_before": measured_before["reward"],
            "reward": measured_after["reward"],
            "rewards": {
                name: {"before": measured_before["rewards"][name], "after": value}
                for name, value in measured_after["rewards"].items()
            },  # fmt: skip
            "completion_length": measured_after["length"],
            "clipped_ratio": measured_after["clipped"],
            "frac_reward_zero_std": after.get("eval_frac_reward_zero_std"),
            "kl": after.get("eval_kl"),
            "entropy": after.get("eval_entropy"),
        }
        verdict = accuracy_verdict("reward", measured_before["per_prompt"], measured_after["per_prompt"],
                                   unit="prompts", **self.trained_with)  # fmt: skip
        causes = []
        if verdict.status != "improved":
            for label, measured in (("before", measured_before), ("after", measured_after)):
                if measured["zero_std"] >= 0.5:
                    causes.append(f"no learning signal: {measured['zero_std']:.0%} of held-out prompts got the same "
                                  f"reward on all {MEASURE_SAMPLES} answers {label} training (GRPO learns only from "
                                  "groups whose rewards differ)")  # fmt: skip
                    break
            if measured_before["clipped"] >= 0.5:
                causes.append(f"truncation: {measured_before['clipped']:.0%} of answers hit max_completion_length "
                              "before training (a truncated answer is often scored alike)")  # fmt: skip
        verdict = Verdict(verdict.status, [*verdict.reasons, *causes], [*verdict.warnings, *self.health.fired])
        answers = ([a.text for a in measured_before["answers"]], [a.text for a in measured_after["answers"]])
        generations = generation_table(self.ctx, [show_prompt(p) for p in self.prompts], *answers)
        return metrics, {"generations": generations, "verdict": verdict}


def _nanmean(values: list[float]) -> float | None:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


class GRPOStage(OnlineStage):
    trainer_name = "GRPOTrainer"


# --------------------------------------------------------------------------------------------------
# Plan


def online_plan(config_class: Callable[[], type]) -> Callable[..., StageParts]:
    """The plan of an online stage whose config class `config_class()` gives (GRPOConfig, RLOOConfig)."""

    def plan(stage: Any, *, spec: Any, data: Any, tokenizer: Any, config: Any, start: StartingPoint,
             recipe: Any) -> StageParts:  # fmt: skip
        """An online stage's part of its plan: its rewards (each imported and called on two held-out rows), the
        batch rules TRL enforces only when it starts (at least 2 answers per prompt; the generation batch a multiple
        of them at this process count), vLLM's needs, and the reference."""
        return plan_online(stage, config_class(), data, start, recipe)

    return plan


def plan_online(stage: Any, cls: type, data: Any, start: StartingPoint, recipe: Any) -> StageParts:
    import importlib.util

    from align.plan import batch_figures, world_size

    where = f"stages.{stage.name}"
    fields = cls.__dataclass_fields__
    value = {k: stage.train.get(k, fields[k].default) for k in (
        "num_generations", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
        "steps_per_generation", "generation_batch_size", "max_completion_length", "beta", "use_vllm",
    ) if k in fields}  # fmt: skip
    parts = StageParts(fixed={
        "remove_unused_columns": Setting(False, "align (managed): the data's other columns reach the rewards"),
        # Its batches are prompts, with no input_ids for the Trainer to count (it warns at every step).
        "include_num_input_tokens_seen": Setting("no", "align (managed): online batches hold prompts, not tokens"),
    })  # fmt: skip
    if "disable_dropout" not in stage.train:
        parts.fixed["disable_dropout"] = Setting(True, "align default: policy and reference see the same network")
    g = value["num_generations"]
    if g < 2:
        parts.problems.append(f"{where}.train.num_generations: {g}: a group needs at least 2 answers to compare")
    processes = world_size()
    generation = value.get("generation_batch_size") or value["per_device_train_batch_size"] * processes * (
        value.get("steps_per_generation") or value["gradient_accumulation_steps"]
    )
    if g >= 2 and generation % g:
        parts.problems.append(
            f"{where}.train.per_device_train_batch_size: a generation batch of {generation} "
            f"answers ({processes} processes) does not divide into groups of num_generations {g}"
        )
        parts.hints.append("make per_device_train_batch_size x processes x gradient_accumulation_steps a multiple "
                           "of num_generations (the batch counts answers, not prompts)")  # fmt: skip
    if g >= 2 and (value["per_device_eval_batch_size"] * processes) % g:
        parts.problems.append(f"{where}.train.per_device_eval_batch_size: {value['per_device_eval_batch_size']} x "
                              f"{processes} processes does not divide into groups of {g}")  # fmt: skip
    if value.get("use_vllm"):
        import torch

        if importlib.util.find_spec("vllm") is None:
            parts.problems.append(f"{where}.train.use_vllm: vllm is not installed")
            parts.hints.append('pip install -e ".[vllm]"')
        elif not torch.cuda.is_available():
            parts.problems.append(f"{where}.train.use_vllm: vLLM needs a GPU, and this machine has none")
    if value["beta"] and start.lora == "continue":
        parts.problems.append(f"{where}.peft: with beta > 0 the reference would be the input's base without its "
                              "adapters, not the input model")  # fmt: skip
        parts.hints.append("save the earlier stage with `merge: true`, or keep beta 0")
    parts.details.update(
        input=start.summary(),
        rewards="; ".join(f"{e.name} (weight {e.weight:g})" for e in stage.rewards),
        reference="none (beta 0: no KL term)" if not value["beta"] else f"the input model (beta {value['beta']})",
        answers=f"{g} per prompt, up to {value['max_completion_length']} tokens each",
    )
    if data is not None:
        parts.problems += check_rewards(stage, data["validation"], recipe.base_dir)
        train = data["train"]
        parts.details["train_prompts"] = len(train)
        parts.details["examples"] = [{"prompt": show_prompt(train[i]["prompt"])} for i in range(min(2, len(train)))]
        parts.count = lambda effective: batch_figures(effective, len(train) * g)
    return parts


def check_rewards(stage: Any, rows: Any, base_dir: Path) -> list[str]:
    """Every `function:` reward imported and called on two held-out rows, with their reference column as the
    completions where one is named (exact_match's `answer` by default), else empty completions."""
    sample = [rows[i] for i in range(min(2, len(rows)))]
    conversational = bool(sample) and isinstance(sample[0]["prompt"], list)
    problems = []
    for n, entry in enumerate(stage.rewards):
        if entry.function is None:
            continue
        where = f"stages.{stage.name}.rewards[{n}]"
        try:
            fn = resolve_function(entry, base_dir, where, conversational)
            column = entry.column or ("answer" if entry.function == "exact_match" else None)
            completions = [row[column] if column and column in row else "" for row in sample]
            if conversational:
                completions = [[{"role": "assistant", "content": str(c)}] for c in completions]
            check_reward(fn, entry.function, sample, where, completions)
        except BadInput as exc:
            problems += exc.problems
    return problems


KIND = TrainingKind(
    name="grpo",
    keys=GRPOKeys,
    formats=("prompt_only",),
    run=run,
    about="online RL: several answers per prompt scored by reward functions, each against its group (TRL's GRPO)",
    figures=(Figure("reward", "reward", False),),
    config="trl:GRPOConfig",
    plan_parts=online_plan(lambda: KIND.config_class()),
)
