"""What the online RL kinds (grpo, rloo: align/stages/grpo.py, rloo.py) share: their recipe keys (rewards, monitor
judges, alarms, the held-out measure), the stage that wires TRL's trainer (reward functions guarded, a reference only
where beta > 0, the health alarms, the held-out reward before and after), and their plan.

The held-out measure is the mean total reward per held-out prompt, sampled before and after training with the same
settings and seed, and the verdict a paired bootstrap over prompts. Online RL learns nothing from a group whose answers
all got the same reward (often: every answer truncated, or a reward constant for this model); the health alarms
(`HealthAlarms`) say so while it trains, and the verdict names it. The loss is a policy-gradient surrogate: exactly 0
(a group without variance gives none) and jumps against a median near 0 are normal, so the numeric guard warns of
neither (it still stops a non-finite loss).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from align.recipe import Stage, Strict, TrainingStage, later_keys_left_out, reward_model_problems, stage_ref
from align.rewards import (
    Judge,
    RewardEntry,
    answers_apart,
    check_functions,
    entries_identity,
    guarded,
    resolve_function,
)
from align.stages.base import Figure, TrainingKind, library_class
from align.stages.runner import generation_table, render_mask, show_prompt
from align.thinking import CUT_THOUGHTS, cut_thoughts_cause, cut_thoughts_share
from align.tools import TOOL_CALLS, TOOL_FAILURES, tool_figures
from align.values import HeldOut, Setting, StageParts, StartingPoint

if TYPE_CHECKING:
    from align.plan import PlanInputs

logger = logging.getLogger(__name__)


class Measure(Strict):
    """The held-out measure before and after training (and at each evaluation, with a `monitor:`)."""

    prompts: int = Field(32, ge=2, description="held-out prompts (the validation split's first), the bootstrap's units")
    samples: int = Field(4, ge=1, description="answers sampled per prompt, with the training's sampling settings")


class Alarms(Strict):
    """The health alarms of online RL (each a warning with its numbers; `stop: true` makes them stop the stage)."""

    stop: bool = Field(False, description="an alarm stops the stage (as a non-finite loss does) instead of warning")
    zero_std: float = Field(0.9, ge=0.0, le=1.0, description="share of groups whose answers all got one reward")
    hacking: float = Field(
        0.1, gt=0.0, description="held-out reward rise past which a monitor that did not rise warns (reward hacking)"
    )
    monitor_rise: float = Field(0.01, ge=0.0, description="a monitor's held-out rise below this counts as flat")
    clipped: float = Field(0.9, ge=0.0, le=1.0, description="share of answers cut at max_completion_length")
    collapse: float = Field(0.25, gt=0.0, lt=1.0, description="mean length or entropy below this share of its first")
    kl: float = Field(1.0, gt=0.0, description="KL to the reference above this (with beta > 0)")
    window: int = Field(3, ge=1, description="logged steps in a row an alarm's condition must hold")
    cut_thoughts: float | None = Field(
        None, ge=0.0, le=1.0, description="share of answers whose reasoning never closed (a thinking template's); "
        f"unset: {CUT_THOUGHTS}"
    )  # fmt: skip
    tool_calls: float | None = Field(
        None, ge=0.0, le=1.0, description=f"share of answers calling a tool at or below which calls have collapsed "
        f"(with tools:); unset: {TOOL_CALLS}"
    )  # fmt: skip
    tool_failures: float | None = Field(
        None, ge=0.0, le=1.0, description=f"share of tool calls that raised from which the alarm names the tools; "
        f"unset: {TOOL_FAILURES}"
    )  # fmt: skip

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return later_keys_left_out(handler(self), self, ("cut_thoughts", "tool_calls", "tool_failures"))


class OnlineKeys(TrainingStage):
    """The recipe keys of an online RL stage: those of every training stage, its rewards, and its alarms."""

    rewards: list[RewardEntry] = Field(
        default_factory=list, description="what scores the answers; each has its weight (at least one, unless a grpo "
        "stage's environment: scores them with its get_reward())"
    )  # fmt: skip
    monitor: list[Judge] = Field(
        default_factory=list,
        description="independent judges of the held-out answers, "
        "scored at each evaluation: proxy reward up while they stay flat is reward hacking",
    )
    alarms: Alarms = Field(default_factory=Alarms)
    measure: Measure = Field(default_factory=Measure)
    tools: list[str] | None = Field(
        None, description="functions the policy may call while it answers: FILE.py:NAME, module:NAME or a builtin "
        "(calculator); each needs type hints and a docstring (grpo only: TRL's GRPOTrainer takes tools)"
    )  # fmt: skip
    max_tool_calls: int | None = Field(None, ge=1, description="tool-calling turns per answer at most (with tools:)")
    environment: str | None = Field(
        None, description="FILE.py:Class or module:Class: TRL's environment_factory (grpo only). reset(**row) starts "
        "each rollout, its public methods are tools, and its get_reward() (if any) a reward TRL adds at weight 1"
    )  # fmt: skip
    later_keys: ClassVar[tuple[str, ...]] = (*TrainingStage.later_keys, "tools", "max_tool_calls", "environment")

    def problems(self, earlier: list[Stage]) -> list[str]:
        problems = super().problems(earlier)
        where = f"stages.{self.name}"
        if "reward_weights" in self.train:
            problems.append(f"{where}.train.reward_weights: each entry of `rewards:` has its own `weight`")
        if "max_tool_calling_iterations" in self.train:
            problems.append(f"{where}.train.max_tool_calling_iterations: set by align: use the stage's "
                            "`max_tool_calls:`")  # fmt: skip
        if self.max_tool_calls is not None and not self.tools and self.environment is None:
            problems.append(f"{where}.max_tool_calls: caps tool calls, and the stage has no `tools:` or `environment:`")
        if not self.rewards and self.environment is None:  # with one, the plan checks that it has get_reward()
            problems.append(
                f"{where}.rewards: nothing scores the answers: give at least one entry, e.g. "
                "[{function: exact_match}] (or, in grpo, an environment: whose class has get_reward())"
            )
        for n, entry in enumerate(self.rewards):
            problems += reward_model_problems(entry.reward_model, f"{where}.rewards.{n}.reward_model", earlier)
        for n, judge in enumerate(self.monitor):
            problems += reward_model_problems(judge.reward_model, f"{where}.monitor.{n}.reward_model", earlier)
        names = [judge.name for judge in self.monitor]
        if len(set(names)) < len(names):
            problems.append(f"{where}.monitor: two judges of the same name ({', '.join(names)}); keep one of each")
        return problems


class OnlineKind(TrainingKind):
    """An online RL trainer of TRL's: reward functions guarded, a reference only where beta > 0, the health alarms,
    and the held-out reward before and after. Its output also depends on its reward files and reward models, and
    its monitor's (`input_identity`)."""

    formats = ("prompt_only",)
    figures = (Figure("reward", "reward", False),)
    unit = "completions"
    surrogate_loss = True

    def plan_parts(self, stage: Any, inputs: PlanInputs) -> StageParts:
        from align.thinking import thinking_of

        tokenizer = inputs.tokenizer
        thinking = thinking_of(tokenizer, stage.thinking) if tokenizer is not None and tokenizer.chat_template else None
        parts = plan_online(stage, self.config_class(), inputs.data, inputs.start, inputs.recipe, thinking)
        plan_thinking(stage, tokenizer, thinking, inputs.data, parts)
        if stage.tools or stage.environment:
            plan_tools(stage, tokenizer, inputs.data, inputs.recipe.base_dir, parts, inputs.config)
        return parts

    def input_identity(self, stage: Any, recipe: Any, outputs: Any) -> str:
        pinned = entries_identity([*stage.rewards, *stage.monitor], recipe.base_dir, outputs)
        if stage.tools or stage.environment:  # an edited tool or environment file trains again
            from align.tools import tools_identity

            pinned += tools_identity([*(stage.tools or []), *([stage.environment] if stage.environment else [])],
                                     recipe.base_dir)  # fmt: skip
        return "|".join([self.model_identity(stage, recipe, outputs), *pinned])

    def plots(self, rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, str, str]]:
        return online_plots(rows)

    def setup(self) -> None:
        from align.models import ensure_chat_template
        from align.thinking import thinking_of

        ensure_chat_template(self.tokenizer)
        stage = self.stage
        # A template that thinks: rewards get the answer and the reasoning apart, and the health of thoughts is logged
        # (its switch, `self.template_kwargs`, is set for every kind by `bind`).
        self.thinking = thinking_of(self.tokenizer, stage.thinking) if self.tokenizer.chat_template else None
        self.conversational = bool(len(self.data["train"])) and isinstance(self.data["train"][0]["prompt"], list)
        self.entries = list(stage.rewards)
        self.scorers = [self.scorer(e, f"stages.{stage.name}.rewards[{n}]") for n, e in enumerate(self.entries)]
        self.functions = [fn for fn, _ in self.scorers]
        self.reward_tokenizers = [tokenizer for _, tokenizer in self.scorers]
        self.monitors = [self.scorer(j, f"stages.{stage.name}.monitor[{n}]") for n, j in enumerate(stage.monitor)]
        self.weights = [entry.weight for entry in self.entries]
        self.train, self.eval = self.data["train"], self.data["validation"]
        self.held_out = self.eval.select(range(min(stage.measure.prompts, len(self.eval))))
        self.prompts = [self.held_out[i]["prompt"] for i in range(min(self.stage.generations, len(self.held_out)))]
        self.before: HeldOut | None = None  # the held-out measure before training, which monitors compare with
        from align.tools import ToolCalls, resolve_tools

        # The policy's tools, each call counted (the failure alarm names the tools that raised).
        self.tool_calls = ToolCalls()
        where = f"stages.{stage.name}.tools"
        self.tools = [self.tool_calls.counted(fn) for fn in resolve_tools(stage.tools or [], self.ctx.recipe.base_dir,
                                                                          where)]  # fmt: skip
        # An environment (grpo's `environment:`): the held-out measure answers in it too, and its get_reward() scores.
        self.environment, self.environment_rewards = None, False
        if stage.environment:
            from align.tools import resolve_environment

            self.environment, _, self.environment_rewards = resolve_environment(
                stage.environment, self.ctx.recipe.base_dir, f"stages.{stage.name}.environment"
            )
        self.extra = {"rewards": [{"reward": e.name, "weight": e.weight} for e in self.entries]}
        if stage.monitor:
            self.extra["monitor"] = [j.name for j in stage.monitor]

    def scorer(self, entry: RewardEntry | Judge, where: str) -> tuple[Any, Any]:
        """What scores answers for one entry: a guarded function (tokenizer None), a reward model and its
        tokenizer, or (a `reference: rouge_l` monitor) the string "rouge_l"."""
        if entry.function is not None:
            fn = resolve_function(entry, self.ctx.recipe.base_dir, where, self.conversational)
            first = bool(self.stage.rewards) and entry is self.stage.rewards[0]  # one logs the health of thoughts
            fn = answers_apart(fn, self.thinking, bool(getattr(entry, "raw", False)), health=first)
            return guarded(fn, entry.name), None
        if getattr(entry, "reference", None) is not None:
            return "rouge_l", None
        return self.reward_model(entry, where)

    def reward_model(self, entry: RewardEntry | Judge, where: str) -> tuple[Any, Any]:
        from align.models import build_model

        ref = stage_ref(entry.reward_model)
        path = str(self.ctx.outputs[ref].model_dir) if ref is not None else entry.reward_model
        model, tokenizer = build_model(path, where, reward_head=True)
        model.config._name_or_path = entry.name  # TRL names its figure after it (a model built here has none)
        return model.eval(), tokenizer

    def trainer(self, args: Any, callbacks: list[Any]) -> Any:
        self.use_reference(args)
        tools: dict[str, Any] = {"tools": self.tools} if self.tools else {}  # grpo's only: rloo refuses them
        if self.environment is not None:
            from align.patches import environment_factory

            tools[environment_factory(self.trainer_cls())] = self.environment
        return super().trainer(args, callbacks, reward_funcs=self.functions,
                               reward_processing_classes=self.reward_tokenizers, **tools)  # fmt: skip

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

        # The tool alarms watch TRL's figures, which count an environment's methods too (align names only `tools:`).
        calls = self.tool_calls if self.tools or self.environment is not None else None
        self.health = HealthAlarms(self.stage.alarms, self.ctx.tracker, calls)
        return [self.health, *([monitor_callback(self)] if self.monitors else [])]

    def measure(self, trainer: Any) -> HeldOut:
        measured = self.measure_model(trainer.model, trainer.args)
        if self.before is None:
            self.before = measured
        return measured

    def measure_model(self, model: Any, args: Any) -> HeldOut:
        """Every held-out prompt answered `measure.samples` times with the training's own sampling settings and the
        recipe's seed, and scored: the mean total reward per prompt, each function's mean, each monitor's mean, the
        share of prompts whose answers all scored alike, mean length and the share cut at max_completion_length."""
        from align.evaluation import generate_batched

        rows = self.held_out
        settings = dict(max_new_tokens=args.max_completion_length, temperature=args.temperature or 1.0,
                        top_p=args.top_p, seed=self.ctx.seed, batch_size=args.per_device_eval_batch_size)  # fmt: skip
        transcripts = None
        if self.tools or self.environment:  # answered through the tools, as TRL's loop answers while training
            from align.tools import answer_with_tools

            answers = answer_with_tools(model, self.tokenizer, list(rows["prompt"]), self.tools,
                                        self.stage.max_tool_calls, num_samples=self.stage.measure.samples,
                                        template_kwargs=self.template_kwargs, environment=self.environment,
                                        rows=[dict(row) for row in rows], **settings)  # fmt: skip
            transcripts = [a for per in answers for a in per]
        else:
            samples = self.stage.measure.samples
            answers = generate_batched(model, self.tokenizer, list(rows["prompt"]), num_samples=samples,
                                       template_kwargs=self.template_kwargs, **settings)  # fmt: skip
        flat = [(i, a) for i, per in enumerate(answers) for a in per]
        turns = [a.turns for a in transcripts] if transcripts is not None else None
        per_function = {entry.name: self.score(scorer, flat, args, turns)
                        for entry, scorer in zip(self.entries, self.scorers, strict=True)}  # fmt: skip
        weights = list(self.weights)
        if self.environment is not None and self.environment_rewards:  # TRL's extra reward source, at weight 1
            per_function[self.environment.__name__] = [
                math.nan if a.environment_reward is None else a.environment_reward for _, a in flat
            ]
            weights.append(1.0)
        monitors = {judge.name: _nanmean(self.score(scorer, flat, args, turns))
                    for judge, scorer in zip(self.stage.monitor, self.monitors, strict=True)}  # fmt: skip
        totals = [
            sum(w * (0.0 if math.isnan(v[k]) else v[k]) for w, v in zip(weights, per_function.values(), strict=True))
            for k in range(len(flat))
        ]
        n = self.stage.measure.samples
        by_prompt = [totals[i * n : (i + 1) * n] for i in range(len(rows))]
        # The held-out reward is the mean of the per-prompt means (every prompt has as many answers).
        return HeldOut(
            [sum(g) / len(g) for g in by_prompt],
            [per[0] for per in answers[: len(self.prompts)]],
            extra={
                "rewards": {name: _nanmean(values) for name, values in per_function.items()},
                "monitor": monitors,
                "zero_std": sum(max(g) - min(g) < 1e-12 for g in by_prompt) / max(1, len(by_prompt)),
                "length": sum(a.tokens for _, a in flat) / max(1, len(flat)),
                "clipped": sum(not a.ended for _, a in flat) / max(1, len(flat)),
                **thought_figures([a.text for _, a in flat], self.thinking),
                **(tool_figures(transcripts) if transcripts is not None else {}),
            },
        )

    def score(
        self, scorer: tuple[Any, Any], flat: list[tuple[int, Any]], args: Any, turns: list[list[dict]] | None = None
    ) -> list[float]:
        """One scorer's value for each held-out (prompt index, answer): NaN where a function had no opinion.
        `turns`: with tools, each answer's assistant and tool turns, which a function gets as its completion (as
        TRL gives them); the rest score the final answer."""
        fn, tokenizer = scorer
        rows = self.held_out
        prompts = [rows[i]["prompt"] for i, _ in flat]
        from align.thinking import split_reasoning

        # A thinking model's answer after its reasoning is what a reward model or ROUGE-L scores (the functions
        # split it themselves: `answers_apart`).
        answers = [split_reasoning(a.text, self.thinking)[0] for _, a in flat]
        if fn == "rouge_l":
            from align.evaluation import rouge_l_f1

            return rouge_l_f1(answers, [str(rows[i].get("completion") or "") for i, _ in flat])
        if tokenizer is not None:
            from align.evaluation import reward_model_scores

            texts = answers
            return reward_model_scores(fn, tokenizer, prompts, texts, batch_size=args.per_device_eval_batch_size)
        columns = {k: [rows[i][k] for i, _ in flat] for k in rows.column_names if k != "prompt"}
        completions = [[{"role": "assistant", "content": a.text}] if self.conversational else a.text for _, a in flat]
        if turns is not None:
            completions = turns
        from transformers import TrainerState

        # The keywords TRL gives a reward while training (a reward may require them): a fresh state, no logging.
        extras = {"trainer_state": TrainerState(), "log_extra": lambda *a, **k: None,
                  "log_metric": lambda *a, **k: None}  # fmt: skip
        values = fn(prompts=prompts, completions=completions, completion_ids=[list(a.token_ids) for _, a in flat],
                    **columns, **extras)  # fmt: skip
        return [float("nan") if v is None else float(v) for v in values]

    def hacking(self, measured: dict[str, Any]) -> str | None:
        """The reward-hacking warning, where the held-out reward rose by `alarms.hacking` or more since before
        training while a monitor rose by less than `alarms.monitor_rise` (flat or down)."""
        if self.before is None or not measured.extra["monitor"]:
            return None
        a = self.stage.alarms
        rise = measured.figure - self.before.figure
        before = self.before.extra["monitor"]
        flat = [(name, before[name], value) for name, value in measured.extra["monitor"].items()
                if value is not None and before.get(name) is not None
                and value - before[name] < a.monitor_rise]  # fmt: skip
        if rise < a.hacking or not flat:
            return None
        monitors = ", ".join(f"{name} {b:.3f} → {v:.3f}" for name, b, v in flat)
        return (f"the held-out reward rose {self.before.figure:.3f} → {measured.figure:.3f} while the monitor "
                f"did not ({monitors}): the policy is learning what the reward pays for, not the task; check what "
                "the reward function rewards, or give the monitor's function a weight among the rewards")  # fmt: skip

    def summarize(self, before, after, measured_before, measured_after):
        from align.verdict import Verdict, accuracy_verdict

        metrics = {
            "reward_before": measured_before.figure,
            "reward": measured_after.figure,
            "rewards": {
                name: {"before": measured_before.extra["rewards"][name], "after": value}
                for name, value in measured_after.extra["rewards"].items()
            },  # fmt: skip
            "completion_length": measured_after.extra["length"],
            "clipped_ratio": measured_after.extra["clipped"],
            "frac_reward_zero_std": after.get("eval_frac_reward_zero_std"),
            "kl": after.get("eval_kl"),
            "entropy": after.get("eval_entropy"),
        }
        if self.thinking is not None:
            for key in ("cut_thought_rate", "reasoning_length"):
                metrics[f"{key}_before"], metrics[key] = measured_before.extra[key], measured_after.extra[key]
        if self.tools or self.environment is not None:
            for key in ("tool_call_rate", "calls_per_answer", "tool_failure_rate", "malformed_call_rate"):
                metrics[f"{key}_before"], metrics[key] = measured_before.extra[key], measured_after.extra[key]
        if measured_after.extra["monitor"]:
            metrics["monitor"] = {name: {"before": measured_before.extra["monitor"][name], "after": value}
                                  for name, value in measured_after.extra["monitor"].items()}  # fmt: skip
            hacking = self.hacking(measured_after)
            if hacking is not None:
                self.health.fire("reward hacking", hacking, None)
        verdict = accuracy_verdict("reward", measured_before.values, measured_after.values,
                                   ceiling=None, unit="prompts", **self.trained_with)  # fmt: skip
        causes = []
        if verdict.status != "improved":
            for label, measured in (("before", measured_before), ("after", measured_after)):
                zero_std = measured.extra["zero_std"]
                if zero_std >= 0.5:
                    causes.append(f"no learning signal: {zero_std:.0%} of held-out prompts got the same "
                                  f"reward on all {self.stage.measure.samples} answers {label} training (GRPO learns "
                                  "only from groups whose rewards differ)")  # fmt: skip
                    break
            clipped = measured_before.extra["clipped"]
            if clipped >= 0.5:
                causes.append(f"truncation: {clipped:.0%} of answers hit max_completion_length "
                              "before training (a truncated answer is often scored alike)")  # fmt: skip
            cut = measured_before.extra.get("cut_thought_rate")
            if cut is not None and cut >= cut_thoughts_share(self.stage.alarms):
                # First: thoughts cut before any answer explain a flat reward before the settings do.
                limit = self.stage.train.get("max_completion_length", "its default")
                switch = self.thinking is not None and self.thinking.switch is not None
                cause = cut_thoughts_cause(cut, "held-out answers before training", limit, switch)
                verdict = Verdict(verdict.status, [f"cut thoughts: {cause}", *verdict.reasons], verdict.warnings)
        notes = []
        if self.tools or self.environment is not None:  # what TRL's loop does in silence, seen in the held-out answers
            after = measured_after.extra
            if after["malformed_call_rate"] > 0:
                notes.append(f"malformed tool calls: {after['malformed_call_rate']:.0%} of held-out answers after "
                             "training open a tool call that does not parse: no tool ran, and the text was taken as "
                             "the answer (TRL's loop does the same in training, in silence)")  # fmt: skip
            if after["capped_rate"] > 0:
                notes.append(f"capped: {after['capped_rate']:.0%} of held-out answers after training were still "
                             "calling tools when max_tool_calls ran out")  # fmt: skip
        verdict = Verdict(verdict.status, [*verdict.reasons, *causes], [*verdict.warnings, *self.health.fired, *notes])
        from align.verdict import shown_answer

        # An answer reached through tools reads as its transcript (each call and result, then the final answer).
        answers = ([shown_answer({"answer": a.text, "turns": getattr(a, "turns", None)}) for a in measured.answers]
                   for measured in (measured_before, measured_after))  # fmt: skip
        generations = generation_table(self.ctx, [show_prompt(p) for p in self.prompts], *answers)
        return metrics, {"generations": generations, "verdict": verdict}


def thought_figures(texts: list[str], thinking: Any) -> dict[str, float]:
    """A thinking template's cut-thought share and mean reasoning length over answers (none otherwise)."""
    if thinking is None:
        return {}
    from align.thinking import split_reasoning
    from align.thinking import thought_figures as figures

    return figures([split_reasoning(text, thinking) for text in texts])


def plan_thinking(stage: Any, tokenizer: Any, thinking: Any, data: Any, parts: StageParts) -> None:
    """A thinking template's switch for the stage's `thinking:` (TRL's `chat_template_kwargs`), the generation prompt
    as rendered under it, and a data column named `reasoning` refused (the rewards receive the completions'
    reasoning under that name). A `thinking:` the template cannot follow is refused by every kind's plan
    (align/stages/base.py)."""
    from align.families import render
    from align.thinking import thinking_problem

    where = f"stages.{stage.name}"
    if data is not None and "reasoning" in data["validation"].column_names:
        parts.problems.append(f"{where}.data: a column named 'reasoning': reward functions receive each "
                              "completion's reasoning under that name")  # fmt: skip
        parts.hints.append("rename the column (the data card's or source's `columns:` mapping, or in the file)")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return
    if thinking is not None and thinking_problem(stage, thinking) is not None:  # the plan of every kind says why
        return
    asked = stage.thinking
    kwargs = thinking.kwargs(asked) if thinking is not None else {}
    if data is not None and len(data["train"]):  # what the policy reads before its answer, as rendered
        prompt = data["train"][0]["prompt"]  # a string prompt is read as it is (TRL renders no template for it)
        shown = prompt if isinstance(prompt, str) else render(tokenizer, prompt, prompt=True, **kwargs)
        parts.details["generation_prompt"] = repr(shown)
    if thinking is None:
        return
    if kwargs:
        given = stage.train.get("chat_template_kwargs") or {}
        parts.fixed["chat_template_kwargs"] = Setting({**given, **kwargs}, f"align (thinking: {str(asked).lower()})")
    state = "the template's default" if asked is None else ("on" if asked else "off")
    parts.details["thinking"] = (f"{state}: reasoning in {thinking.opens} ... {thinking.closes}; rewards get the "
                                 "answer as completions and the reasoning as reasoning (raw: true for the whole "
                                 "completion)")  # fmt: skip


# A placeholder argument of each JSON-schema type, for the plan's example call.
_PLACEHOLDERS: dict[str, Any] = {"integer": 2, "number": 2.5, "boolean": True, "string": "text", "array": [],
                                 "object": {}}  # fmt: skip


def tool_exchange(tokenizer: Any, prompt: list[dict[str, Any]], schema: dict[str, Any]) -> str | None:
    """One tool-call exchange after `prompt`, as TRL's loop makes a completion of it, with the loss mask visible
    (`[[ ]]`): the policy's call and its answer are trained; the tool's turn, which the loop writes in, never is.
    The call is the first tool's, with a placeholder of each argument's type. None where the template's turns cannot
    be placed (it is not prefix-preserving: the template check has said so)."""
    from align.families import derived_masks, render

    function = schema["function"]
    arguments = {k: _PLACEHOLDERS.get(v.get("type"), "x") for k, v in function["parameters"]["properties"].items()}
    call = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    messages = [*prompt, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": function["name"], "content": "(the tool's result)"},
                {"role": "assistant", "content": "(the answer)"}]  # fmt: skip
    try:
        ids, mask = derived_masks(tokenizer, messages)
    except ValueError:
        return None
    # The policy stops at its end-of-turn token: whitespace the template writes after it is the loop's, untrained.
    ended = False
    for i, token in enumerate(ids):
        if not mask[i]:
            ended = False
        elif ended:
            mask[i] = 0
        elif token == tokenizer.eos_token_id:
            ended = True
    start = len(tokenizer(render(tokenizer, list(prompt), prompt=True), add_special_tokens=False)["input_ids"])
    return repr(render_mask(ids[start:], mask[start:], tokenizer))


def plan_tools(stage: Any, tokenizer: Any, data: Any, base_dir: Any, parts: StageParts, config: Any = None) -> None:
    """A grpo stage's tools: each imported and its schema built as TRL builds it, the template checked for tool calls
    TRL can render and parse, `max_tool_calls` as TRL's `max_tool_calling_iterations`, one prompt rendered with the
    tools' schemas, as the policy reads it, and that prompt checked against the model's positions."""
    from transformers.utils import get_json_schema

    from align.errors import BadInput
    from align.families import render
    from align.prompt_format import tool_signature
    from align.tools import TEMPLATE_HINT, resolve_tools, template_problems

    where = f"stages.{stage.name}"
    try:
        tools = resolve_tools(stage.tools or [], base_dir, f"{where}.tools")
        if stage.environment:
            from align.patches import environment_factory
            from align.tools import resolve_environment

            environment_factory(library_class("trl:GRPOTrainer"))  # the installed TRL takes environments
            cls, methods, owns_reward = resolve_environment(stage.environment, base_dir, f"{where}.environment")
            clash = sorted({m.__name__ for m in methods} & {t.__name__ for t in tools})
            if clash:
                raise BadInput(f"{where}.environment: {cls.__name__} has a method named as a tool "
                               f"({', '.join(clash)}): TRL calls tools by name, so one would shadow the other",
                               hint="rename one of them")  # fmt: skip
            tools += methods
            if not owns_reward and not stage.rewards:
                raise BadInput(f"{where}.environment: {cls.__name__} has no get_reward() and the stage no rewards: "
                               "nothing would score the answers",
                               hint="add rewards: [{function: ...}], or def get_reward(self) -> float to the "
                               "environment")  # fmt: skip
            weights = parts.fixed.get("reward_weights")
            if owns_reward and weights is not None:  # TRL takes the rewards:' weights and appends its own
                parts.fixed["reward_weights"] = Setting(
                    weights.value, f"{weights.source}; TRL appends 1.0 for {cls.__name__}.get_reward()"
                )
            parts.details["environment"] = (
                f"{cls.__name__}: reset(**row) before each rollout; its methods are tools"
                + (f"; get_reward() is a reward TRL adds at weight 1 (logged as {cls.__name__}), beside rewards:"
                   if owns_reward and stage.rewards else f"; get_reward() is the only reward (weight 1, logged as "
                   f"{cls.__name__})" if owns_reward else "; no get_reward(): the rewards: alone score")
            )  # fmt: skip
            if not stage.rewards:
                parts.details["rewards"] = f"{cls.__name__}.get_reward() (weight 1), the environment's own"
    except BadInput as exc:
        parts.problems += exc.problems
        parts.hints += [exc.hint] if exc.hint else []
        return
    schemas = [get_json_schema(fn) for fn in tools]
    parts.details["tools"] = ", ".join(tool_signature(schema) for schema in schemas)
    trained = _input_tools(stage, base_dir)
    if trained and not set(trained) & {fn.__name__ for fn in tools}:  # it will call tools it is not offered
        parts.details["input_tools"] = (f"the input model was trained to call {', '.join(trained)}, none of which this "
                                        "stage offers: its calls will fail until it learns the new names")  # fmt: skip
    elif changed := schema_changes(trained, schemas):
        # A small policy's calls follow the very text it learned: a calculator whose docstring was shortened got no
        # call at all from the recipe's sft model, where the builtin's got 88-94% (docs/tools.md).
        parts.details["input_tools"] = (f"not the schema the input model was trained on ({'; '.join(changed)}): "
                                        "its calls follow the schema it learned, and a small model may stop calling; "
                                        "offer the same function, or expect to retrain the calls")  # fmt: skip
    if "input_tools" in parts.details:
        logger.warning("%s: %s", where, parts.details["input_tools"])
    if stage.max_tool_calls is not None:
        parts.fixed["max_tool_calling_iterations"] = Setting(stage.max_tool_calls, "recipe (max_tool_calls:)")
    if tokenizer is None:
        return
    bad = template_problems(tokenizer, f"{where}.tools")
    if bad:
        parts.problems += bad
        parts.hints.append(TEMPLATE_HINT)
        return
    if data is not None and len(data["train"]) and isinstance(data["train"][0]["prompt"], list):
        rendered = render(tokenizer, data["train"][0]["prompt"], prompt=True, tools=schemas)
        parts.details["prompt_with_tools"] = repr(rendered)
        exchange = tool_exchange(tokenizer, data["train"][0]["prompt"], schemas[0]) if schemas else None
        if exchange is not None:
            parts.details["tool_exchange"] = exchange
        from align.models import model_positions

        # TRL's max_completion_length bounds the whole exchange: calls, tool results and the answer.
        parts.details["tool_budget"] = (f"max_completion_length {stage.train.get('max_completion_length', 'default')} "
                                        "tokens hold every call, tool result and the answer: TRL drops a result that "
                                        "does not fit")  # fmt: skip
        positions = model_positions(config) if config is not None else None
        tokens = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        if positions is not None and tokens >= positions:
            parts.problems.append(f"{where}.tools: a prompt with the tools' schemas is {tokens} tokens, and the "
                                  f"model has {positions} positions: no room for an answer")  # fmt: skip
            parts.hints.append("fewer or shorter tools (their docstrings are the schemas), or a model with more "
                               "positions")  # fmt: skip
    elif data is not None and len(data["train"]):
        parts.problems.append(f"{where}.tools: the prompts are strings, which TRL gives no tools: tools need "
                              "message-list prompts")  # fmt: skip


def monitor_callback(stage: OnlineKind) -> Any:
    """A TrainerCallback: at each evaluation during training, the held-out answers sampled and scored by the rewards
    and by every `monitor:` judge (the `monitor` split of metrics.jsonl and the trackers), and the reward-hacking
    alarm checked against the measure before training. Built here so transformers is imported only when it runs."""
    from transformers import TrainerCallback

    from align.stages.runner import keep_random_state

    class Monitor(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            # Only the Trainer's evaluations while it trains: the closing one is `measure`d after training.
            if state.global_step == 0 or model is None or (stage.writer and stage.writer.phase is not None):
                return
            with keep_random_state():  # training must draw the same random numbers with a monitor or without
                measured = stage.measure_model(model, args)
            row = {"step": state.global_step, "epoch": state.epoch, "split": "monitor",
                   "monitor/reward": measured.figure}  # fmt: skip
            row |= {f"monitor/{name}": value for name, value in measured.extra["monitor"].items()}
            if stage.writer is not None:
                stage.writer.record(row)
            hacking = stage.hacking(measured)
            if hacking is not None:
                stage.health.fire("reward hacking", hacking, control)

    return Monitor()


def _nanmean(values: list[float]) -> float | None:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


# --------------------------------------------------------------------------------------------------
# Plan


def plan_online(
    stage: Any, cls: type, data: Any, start: StartingPoint, recipe: Any, thinking: Any = None
) -> StageParts:
    """An online stage's part of its plan (`cls`: its config class): its rewards (each imported and called on two
    held-out rows, as the stage calls them: `thinking`, a thinking template's, splits the answers), the batch
    rules TRL enforces only when it starts (at least 2 answers per prompt; the generation
    batch a multiple of them at this process count), vLLM's needs, and the reference."""
    import importlib.util

    from align.plan import batch_figures, world_size

    where = f"stages.{stage.name}"
    fields = cls.__dataclass_fields__
    value = {k: stage.train.get(k, fields[k].default) for k in (
        "num_generations", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
        "steps_per_generation", "generation_batch_size", "max_completion_length", "beta", "use_vllm",
        "num_iterations", "save_steps",
    ) if k in fields}  # fmt: skip
    parts = StageParts(fixed={
        "remove_unused_columns": Setting(False, "align (managed): the data's other columns reach the rewards"),
        # Its batches are prompts, with no input_ids for the Trainer to count (it warns at every step).
        "include_num_input_tokens_seen": Setting("no", "align (managed): online batches hold prompts, not tokens"),
    })  # fmt: skip
    # TRL sums the functions' rewards unweighted unless it is given `reward_weights`: each entry's `weight` reaches it,
    # so the trained objective is the one the plan names and the held-out measure scores.
    parts.fixed["reward_weights"] = Setting(
        [float(e.weight) for e in stage.rewards], "align (from rewards:): each entry's weight, in order"
    )
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
    # TRL samples a generation batch once per steps_per_generation x num_iterations steps and reuses it in between;
    # a checkpoint inside that span resumes with a fresh batch, so only one on its boundary ends where an unbroken
    # run ends.
    span = (value.get("steps_per_generation") or value["gradient_accumulation_steps"]) * (
        value.get("num_iterations") or 1
    )
    save = value.get("save_steps")
    if span > 1 and isinstance(save, int | float) and save >= 1 and int(save) % span:
        logger.warning("%s.train.save_steps: %s is not a multiple of %d (steps_per_generation x num_iterations): a "
                       "resume from such a checkpoint samples a new generation batch and will not end where an "
                       "unbroken run ends", where, save, span)  # fmt: skip
        parts.details["resume"] = f"inexact: save_steps {save} is not a multiple of {span}"
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
        measure=f"at most {stage.measure.prompts} validation prompts x {stage.measure.samples} answers, sampled as "
        "training samples, scored before and after training: the verdict's held-out reward",
    )
    if stage.monitor:
        parts.details["monitor"] = ", ".join(j.name for j in stage.monitor) + " (at each evaluation)"
    if data is not None:
        parts.problems += check_functions(stage.rewards, data["validation"], recipe.base_dir, where + ".rewards",
                                          by_trl=True, thinking=thinking)  # fmt: skip
        parts.problems += check_functions(stage.monitor, data["validation"], recipe.base_dir, where + ".monitor")
        for n, judge in enumerate(stage.monitor):
            if judge.reference is not None and "completion" not in data["validation"].column_names:
                parts.problems.append(f"{where}.monitor[{n}]: rouge_l scores the answers against the data's "
                                      "`completion` column, which this data does not have")  # fmt: skip
        train = data["train"]
        parts.details["train_prompts"] = len(train)
        # TRL samples a group for every validation prompt at each evaluation: the cost a user may not expect.
        parts.details["evaluation"] = (f"{len(data['validation'])} validation prompts x {g} answers at each "
                                       "evaluation (data's max_eval_rows caps the prompts)")  # fmt: skip
        parts.details["examples"] = [{"prompt": show_prompt(train[i]["prompt"])} for i in range(min(2, len(train)))]
        parts.count = lambda effective: batch_figures(effective, len(train) * g)
    return parts


def schema_changes(trained: dict[str, dict[str, Any]], schemas: list[dict[str, Any]]) -> list[str]:
    """What differs, tool by tool, between the schemas a stage offers and those of the same names its input model
    was trained on, said as text a person can check: `calculator's description: 'Evaluate ...' (trained) against
    'Compute ...' (offered)`, an argument's description the same way, an argument added, dropped or retyped."""

    def text(value: Any) -> str:
        shown = str(value or "")
        return repr(shown if len(shown) <= 60 else shown[:57] + "...")

    changes = []
    for schema in schemas:
        offered = schema.get("function", schema)
        name = offered.get("name")
        before = trained.get(name)
        if before is None:
            continue
        before = before.get("function", before)
        found = []
        if before.get("description") != offered.get("description"):
            found.append(f"{name}'s description: {text(before.get('description'))} (trained) against "
                         f"{text(offered.get('description'))} (offered)")  # fmt: skip
        was = (before.get("parameters") or {}).get("properties") or {}
        now = (offered.get("parameters") or {}).get("properties") or {}
        found += [f"{name}'s argument {arg!r} is new" for arg in now if arg not in was]
        found += [f"{name}'s argument {arg!r} is gone" for arg in was if arg not in now]
        for arg in [a for a in now if a in was]:
            if was[arg].get("type") != now[arg].get("type"):
                found.append(f"{name}'s argument {arg!r} was {was[arg].get('type')}, is {now[arg].get('type')}")
            if was[arg].get("description") != now[arg].get("description"):
                found.append(f"{name}'s argument {arg!r}: {text(was[arg].get('description'))} (trained) against "
                             f"{text(now[arg].get('description'))} (offered)")  # fmt: skip
        if not found and before.get("parameters") != offered.get("parameters"):  # required, enums: said whole
            found.append(f"{name}'s parameters differ")
        changes += found
    return changes


def _input_tools(stage: Any, base_dir: Any) -> dict[str, dict[str, Any]]:
    """The tools a stage's input model records it was trained to call (a saved model's align_prompts.json), their
    schemas by name; {} for an earlier stage of the recipe or a hub model (not known before it runs)."""
    from pathlib import Path

    from align.prompt_format import read_prompt_format
    from align.recipe import search_paths

    if not isinstance(stage.model, str) or stage.model.startswith("@"):
        return {}
    found = next((p for p in search_paths(stage.model, Path(base_dir)) if p.is_dir()), None)
    recorded = read_prompt_format(found).tools or () if found is not None else ()
    return {t.get("function", t).get("name", "?"): t for t in recorded}


def online_plots(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The reward and what the health alarms watch, as TRL logs them at each training log."""
    from align.plots import figure, png, series

    plots = []
    reward_x, reward_y = series(rows, "train", "reward")
    if reward_x:
        fig, (left, right) = figure(9, 3.2, columns=2)
        left.plot(reward_x, reward_y, "o-", label="reward (total)", color="#2ca02c")
        for key in sorted({k for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")}):
            x, y = series(rows, "train", key)
            left.plot(x, y, "--", label=key.removeprefix("rewards/").removesuffix("/mean"))
        eval_x, eval_y = series(rows, "eval", "eval_reward")
        if eval_x:
            left.plot(eval_x, eval_y, "s", label="reward (eval)", color="#d62728")
        left.set_title("reward")
        left.legend(fontsize=7)
        for key, color in (("frac_reward_zero_std", "#7f7f7f"), ("completions/clipped_ratio", "#ff7f0e")):
            x, y = series(rows, "train", key)
            if x:
                right.plot(x, y, "o-", label=key, color=color)
        right.set_ylim(-0.05, 1.05)
        right.set_title("groups without variance, answers truncated")
        right.legend(fontsize=7)
        for ax in (left, right):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        plots.append(
            (
                "Reward and its health",
                png(fig),
                "reward per function, share of groups without reward variance, share of answers truncated",
            )
        )
    return plots
