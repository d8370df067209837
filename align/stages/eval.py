"""`kind: eval` — did it help? Every model of `models:` answers the same held-out prompts; judges score the answers;
each model is compared with the baseline, prompt by prompt, with an interval. Trains nothing.

    - name: eval
      kind: eval
      models: {sft: "@sft", dpo: "@dpo"}      # label -> @stage, directory or hub id (omitted: every policy stage)
      baseline: sft                           # omitted: the first model
      data: {card: python-docs-instruct}      # prompts: the card's `test` split, else validation, else all rows
      max_prompts: 200
      generation: {max_new_tokens: 64, temperature: 0.0, num_samples: 1, batch_size: 16, seed: 0}
      judges: [{reward_model: "@rm"}, {reference: rouge_l}]   # the first decides the win rate
      lm_eval: {tasks: [...], include_path: tasks/, limit: 100}   # optional, `pip install -e ".[eval]"`

Every answer and its scores go to `<stage>/generations.jsonl`; the figures (per model: each judge's mean score, the
win rate against the baseline with its 95% bootstrap interval, the length-controlled win rate, answer length,
repetition, distinct-2, the share of answers that ended) to summary.json. Each model's answers are kept in
`<stage>/progress/` as soon as they are made, so a stopped eval goes on where it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, SerializerFunctionWrapHandler, StrictBool, model_serializer

from align.errors import BadInput, Problems
from align.plan import PlanInputs, StagePlan
from align.recipe import (
    MODEL_REF,
    PREFERENCE_FORMATS,
    DataRef,
    Recipe,
    Stage,
    Strict,
    later_keys_left_out,
    path_component_problems,
    reward_model_problems,
    stage_ref,
)
from align.rewards import Judge, check_functions, entries_identity
from align.stages.base import Figure, Kind
from align.stages.runner import show_prompt
from align.values import Setting, StageResult, saved_model_dir

if TYPE_CHECKING:
    from align.context import StageContext
    from align.recipe import DataSpec

logger = logging.getLogger(__name__)

# Prompts and references shorter than this are not looked for in an lm stage's text: a short phrase occurs in any
# large text by chance, without the answer having leaked.
LEAK_MIN_CHARS = 40


# --------------------------------------------------------------------------------------------------
# Recipe keys


class Generation(Strict):
    """How an eval stage's models answer: the same settings for every model, so their answers compare."""

    max_new_tokens: int = Field(64, ge=1, description="the longest answer, in tokens")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy; above 0 samples")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling's probability mass (sampling only)")
    num_samples: int = Field(1, ge=1, description="answers per prompt (greedy answers are all the same)")
    batch_size: int = Field(16, ge=1, description="rows per generate call (left-padded)")
    seed: int = Field(0, description="seeds the sampling; each model label adds its position, so samples differ")


class LmEvalSettings(Strict):
    """lm-evaluation-harness tasks run on every evaluated model (`pip install -e ".[eval]"`)."""

    tasks: list[str] = Field(min_length=1, description="task names (harness tasks, or YAMLs under include_path)")
    include_path: str | None = Field(None, description="a folder of local task YAMLs (relative to the recipe)")
    limit: int | None = Field(None, ge=1, description="at most this many examples per task")
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(8, ge=1)


class EvalStage(Stage):
    """An eval stage's recipe keys: which models answer, how, and who judges. It trains nothing."""

    kind: Literal["eval"]
    article: ClassVar[str] = "an"
    data: DataRef
    trust_remote_code: bool = Field(
        False, description="run Python code shipped in the models' hub repositories (only for models you trust)"
    )
    models: Annotated[dict[str, str] | None, MODEL_REF] = Field(
        None, description="label -> model (@stage, directory or hub id); omitted: every earlier policy stage"
    )
    baseline: str | None = Field(None, description="the label every model is compared with (default: the first)")
    max_prompts: int | None = Field(200, ge=1, description="at most this many held-out prompts (the first N)")
    generation: Generation = Field(default_factory=Generation)
    judges: list[Judge] = Field(default_factory=list, description="the first judge decides the win rate")
    lm_eval: LmEvalSettings | None = None
    allow_overlap: bool = Field(
        False, description="allow prompts that an earlier stage of this recipe trained on (refused by default)"
    )
    thinking: StrictBool | None = Field(
        None, description="the thinking switch of each model's template (one that thinks) when it answers; unset: "
        "the template's default. Judges score the answer after the reasoning"
    )  # fmt: skip
    tools: list[str] | None = Field(
        None, description="functions every model may call while it answers, as a grpo stage's tools: (each model's "
        "template must render and TRL parse tool calls)"
    )  # fmt: skip
    max_tool_calls: int | None = Field(None, ge=1, description="tool-calling turns per answer at most (with tools:)")

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return later_keys_left_out(handler(self), self, ("thinking", "tools", "max_tool_calls"))

    def problems(self, earlier: list[Stage]) -> list[str]:
        """Its models, baseline and judges against the stages before it."""
        where = f"stages.{self.name}"
        by_name = {s.name: s for s in earlier}
        problems = []
        models = self.models if self.models is not None else policy_refs(earlier)
        if not models:
            problems.append(f"{where}.models: nothing to evaluate: no earlier stage makes a policy; name models "
                            "(label: @stage, a directory or a hub id)")  # fmt: skip
        for label, ref in models.items():
            problems += path_component_problems(label, f"{where}.models.{label}", "the model's label")
            name = stage_ref(ref)
            if name is not None and name not in by_name:
                problems.append(f"{where}.models.{label}: '@{name}' is not an earlier stage "
                                f"(earlier stages: {', '.join(by_name) or '-'})")  # fmt: skip
            elif name is not None and by_name[name].makes != "policy":
                problems.append(f"{where}.models.{label}: '@{name}' is {by_name[name].a_kind()} stage; only a policy "
                                "answers prompts (a reward model judges: put it under `judges:`)")  # fmt: skip
        if self.baseline is not None and self.baseline not in models:
            problems.append(f"{where}.baseline: '{self.baseline}' is not one of the models ({', '.join(models)})")
        for n, judge in enumerate(self.judges):
            problems += reward_model_problems(judge.reward_model, f"{where}.judges.{n}.reward_model", earlier)
        names = [judge.name for judge in self.judges]
        if len(set(names)) < len(names):
            problems.append(f"{where}.judges: two judges of the same name ({', '.join(names)}); keep one of each")
        if not self.judges and self.lm_eval is None:
            problems.append(f"{where}.judges: an eval stage needs at least one judge (function, reward_model or "
                            "reference) "
                            "or lm_eval tasks")  # fmt: skip
        return problems


def policy_refs(stages: list[Stage]) -> dict[str, str]:
    """label -> `@stage` for each of `stages` that makes a policy, labelled by name."""
    return {s.name: f"@{s.name}" for s in stages if s.makes == "policy"}


# --------------------------------------------------------------------------------------------------
# What is evaluated


@dataclass(frozen=True)
class EvalRow:
    """One prompt to answer, its reference answer where the data has one (completion, chosen, last turn), and the
    row's other columns, which reach the function judges (exact_match's `answer`)."""

    prompt: Any  # a string, or a list of chat messages
    reference: str | None
    columns: dict[str, Any] = field(default_factory=dict)


def eval_rows(data: Any, data_format: str, limit: int | None) -> list[EvalRow]:
    """The eval split's prompts (the first `limit`) with their references; a preference set's prompts come twice
    or more (one per pair): each is kept once."""
    rows, seen = [], set()
    for row in data:
        if data_format == "messages":
            messages = list(row["messages"])
            last = messages[-1] if messages else {}
            has_answer = last.get("role") == "assistant"
            prompt = messages[:-1] if has_answer else messages
            reference = last.get("content") if has_answer else None
        else:
            prompt = row["prompt"]
            answer = row.get("completion", row.get("chosen"))
            reference = answer[-1].get("content") if isinstance(answer, list) and answer else answer
        key = json.dumps(prompt, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        columns = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
        rows.append(EvalRow(prompt, reference if isinstance(reference, str) else None, columns))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def eval_models(stage: EvalStage, recipe: Recipe) -> dict[str, str]:
    """label -> model reference: the stage's `models:`, or every policy stage before it, labelled by name."""
    if stage.models is not None:
        return dict(stage.models)
    names = [s.name for s in recipe.stages]
    return policy_refs(recipe.stages[: names.index(stage.name)])


def baseline_of(stage: Stage, recipe: Recipe) -> str:
    return stage.baseline or next(iter(eval_models(stage, recipe)))


def resolve_ref(ref: str, outputs: Any, base_dir: Path) -> str:
    """A model reference as something to load: an earlier stage's saved directory, a local directory (looked for
    beside the recipe, then in the working directory), or a hub id as it is."""
    from align.recipe import search_paths

    name = stage_ref(ref)
    if name is not None:
        return str(outputs[name].model_dir)
    found = next((p for p in search_paths(ref, base_dir) if p.is_dir()), None)
    return str(found) if found is not None else ref


def model_identity(ref: str, outputs: Any, base_dir: Path) -> str:
    """What pins a model's weights, for the eval's fingerprint: an earlier stage's fingerprint; a directory's
    stage fingerprint (its summary.json beside it) or else its files' names, sizes and times; a hub id as it is."""
    from align.files import read_json

    name = stage_ref(ref)
    if name is not None:
        return outputs[name].fingerprint
    path = Path(resolve_ref(ref, outputs, base_dir))
    if not path.is_dir():
        return ref
    summary = read_json(path.parent / "summary.json")
    made_here = isinstance(summary, dict) and summary.get("fingerprint")
    if made_here and saved_model_dir(path.parent, summary) == path:
        return f"{path}:{summary['fingerprint']}"
    stats = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*")
                   if f.is_file())  # fmt: skip
    return f"{path}:" + hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def input_fingerprint(stage: Stage, recipe: Recipe, outputs: Any) -> str:
    """Every evaluated model's and reward judge's identity: the eval's fingerprint covers them (with the stage's
    own settings and the prompts' data, which the pipeline adds)."""
    refs = dict(eval_models(stage, recipe))
    refs |= {f"judge:{n}": j.reward_model for n, j in enumerate(stage.judges) if j.reward_model is not None}
    identities = {label: model_identity(ref, outputs, recipe.base_dir) for label, ref in refs.items()}
    functions = entries_identity([j for j in stage.judges if j.function is not None], recipe.base_dir, outputs)
    if functions:  # only where there are: the fingerprints of evals without function judges stay as they were
        identities["functions"] = functions
    if stage.tools:  # an edited tool file answers again
        from align.tools import tools_identity

        identities["tools"] = tools_identity(stage.tools, recipe.base_dir)
    return hashlib.sha256(json.dumps(identities, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Plan


def plan_eval(
    stage: Stage, recipe: Recipe, spec: DataSpec, data: Any, plans: dict[str, StagePlan], chain: dict[str, Any]
) -> tuple[StagePlan, list[str], list[str]]:
    """The eval stage's plan: its models, baseline, prompts, generation settings and judges, with every check that
    can be made before any stage trains: each model's positions leave room for the answers, the reference judge
    has references, lm-eval is installed, and no prompt was trained on by an earlier stage of this recipe
    (`chain`: stage name -> its data, None where not loaded). Returns the plan, problems and hints.
    """
    where = f"stages.{stage.name}"
    models = eval_models(stage, recipe)
    problems: list[str] = []
    hints: list[str] = []
    settings = {
        f"generation.{k}": Setting(v, "recipe" if k in stage.generation.model_fields_set else "align default")
        for k, v in stage.generation.model_dump().items()
    }
    settings["max_prompts"] = Setting(stage.max_prompts, "recipe" if "max_prompts" in stage.model_fields_set
                                      else "align default")  # fmt: skip
    if stage.max_tool_calls is not None and not stage.tools:
        problems.append(f"{where}.max_tool_calls: caps tool calls, and the stage has no `tools:`")
    if stage.tools:
        from align.tools import resolve_tools

        try:
            resolve_tools(stage.tools, recipe.base_dir, f"{where}.tools")
            details_tools = ", ".join(stage.tools)
        except BadInput as exc:
            problems += exc.problems
            hints += [exc.hint] if exc.hint else []
            details_tools = None
    for label, ref in models.items():
        config = _planned_config(ref, plans, recipe)
        if stage.thinking is not None:
            problems += thinking_problems(stage, label, _planned_tokenizer(ref, plans))
        if stage.tools:
            from align.tools import template_problems

            tokenizer = _planned_tokenizer(ref, plans)
            bad = template_problems(tokenizer, f"{where}.tools") if tokenizer is not None else []
            problems += [p.replace(": the chat template", f": model {label}'s chat template") for p in bad]
            hints += ["evaluate models whose template TRL parses tool calls of (trained with chat_template: qwen2_5, "
                      "or a Qwen 2.5 / Qwen 3 release)"] if bad else []  # fmt: skip
        limit = _positions(config)
        if limit is not None and stage.generation.max_new_tokens >= limit:
            problems.append(f"{where}.generation.max_new_tokens: {stage.generation.max_new_tokens} leaves no room for "
                            f"a prompt in model {label}'s {limit} positions")  # fmt: skip
    if stage.lm_eval is not None:
        try:
            from align.evaluation.lm_eval import require_lm_eval

            require_lm_eval(f"{where}.lm_eval")
        except BadInput as exc:
            problems += exc.problems
            hints += [exc.hint] if exc.hint else []
    judges = [f"{j.name} ({j.reward_model})" if j.reward_model else j.name for j in stage.judges]
    details: dict[str, Any] = {
        "baseline": baseline_of(stage, recipe),
        "judges": ", ".join(judges) or "-",
        "decides the win rate": stage.judges[0].name if stage.judges else "-",
    }
    if len(models) == 1:  # nothing to compare: the model's scores are the answer (its verdict says them)
        details["baseline"] = "none (one model: its scores alone, no win rate)"
        del details["decides the win rate"]
    if stage.lm_eval is not None:
        details["lm_eval"] = ", ".join(stage.lm_eval.tasks)
    if stage.tools and details_tools is not None:
        n = stage.max_tool_calls
        cap = f"at most {n} tool-calling turn{'s' if n != 1 else ''}" if n else "no cap on turns"
        details["tools"] = f"{details_tools}; each model answers through them ({cap})"
    elif not stage.tools:  # a model trained to call tools, answering here without them: say so, it may be meant
        trained = {label: names for label, ref in models.items() if (names := _trained_tools(ref, recipe))}
        if trained:
            details["tools"] = "none: " + "; ".join(f"{label} was trained to call {', '.join(names)}"
                                                    for label, names in trained.items()) + (
                " and answers here without tools (add tools: to evaluate it with them)")  # fmt: skip
    if stage.thinking is not None:
        details["thinking"] = (f"{'on' if stage.thinking else 'off'} for each model whose template thinks (unset: "
                               "as it was trained); its reasoning kept apart, its answer judged")  # fmt: skip
    if data is not None:
        rows = eval_rows(data["test"], spec.format, stage.max_prompts)
        with_reference = sum(r.reference is not None for r in rows)
        # What the judges read beside the answer: the reference judge a reference answer, a function judge the
        # row's columns (exact_match its `answer`).
        given = [f"{with_reference} with a reference answer"] if any(j.reference for j in stage.judges) else []
        columns = sorted({k for r in rows for k in r.columns if k != "tools"})  # schemas: shown under tools:
        if columns and any(j.function is not None for j in stage.judges):
            given.append(f"the function judges get {', '.join(columns)}")
        details["prompts"] = f"{len(rows)} (of {len(data['test'])} rows{''.join('; ' + g for g in given)})"
        problems += check_functions(
            stage.judges, [{"prompt": r.prompt, **r.columns} for r in rows[:2]], recipe.base_dir, f"{where}.judges"
        )
        if any(j.function is not None for j in stage.judges) and any("reasoning" in r.columns for r in rows):
            problems.append(f"{where}.data: a column named 'reasoning': function judges receive a thinking model's "
                            "reasoning under that name")  # fmt: skip
            hints.append("rename the column (the data card's or source's `columns:` mapping, or in the file)")
        if any(j.reference is not None for j in stage.judges) and with_reference < len(rows):
            problems.append(f"{where}.judges: the reference judge needs a reference answer for every prompt; "
                            f"{len(rows) - with_reference} of {len(rows)} have none")  # fmt: skip
            hints.append("use data with completions (prompt_completion) or chosen answers (preference)")
        if stage.allow_overlap:
            details["leakage"] = "not checked (allow_overlap: true)"
        else:
            leaks = leaked(rows, recipe, stage, chain, len(data["test"]))
            details["leakage"] = f"{len(leaks)} earlier stages trained on these prompts" if leaks else (
                "none: no prompt is in an earlier stage's training split")  # fmt: skip
            if leaks:
                problems += leaks
                hints.append("evaluate on prompts no stage trained on (a card's `test` split), or set "
                             "`allow_overlap: true` to evaluate on them anyway")  # fmt: skip
    label = ", ".join(f"{name}: {ref}" for name, ref in models.items())
    plan = StagePlan(stage.name, stage.kind, label, "models", None, None, None, settings, details=details)
    plan.effective = dict(settings)  # shown under `settings:`, each with its source
    return plan, problems, hints


def _planned_tokenizer(ref: str, plans: dict[str, StagePlan]) -> Any:
    """A model's tokenizer as planned (an earlier stage's) or saved (a directory); None where it is not at hand."""
    name = stage_ref(ref)
    if name is not None:
        return plans[name].tokenizer if name in plans else None
    try:
        from align.models import load_tokenizer

        return load_tokenizer(ref)
    except Exception:  # not available offline: nothing to check before the stage
        return None


def _trained_tools(ref: str, recipe: Recipe) -> list[str]:
    """The tools a model was trained to call: an earlier grpo stage's `tools:` (and environment), or a saved model's
    record (align_prompts.json); [] where none or not known before it trains (an sft stage's transcripts)."""
    name = stage_ref(ref)
    if name is not None:
        earlier = next((s for s in recipe.stages if s.name == name), None)
        found = list(getattr(earlier, "tools", None) or [])
        environment = getattr(earlier, "environment", None)
        return found + [environment.rpartition(":")[2]] if environment else found
    from align.prompt_format import read_prompt_format

    return read_prompt_format(Path(ref)).tool_names() if Path(ref).is_dir() else []


def thinking_problems(stage: Stage, label: str, tokenizer: Any) -> list[str]:
    """The eval's `thinking:` against one model's template (as `align.families.thinking_problem` says it)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return []
    from align.thinking import thinking_of, thinking_problem

    problem = thinking_problem(stage, thinking_of(tokenizer))
    return [] if problem is None else [problem.replace(": the chat template", f": model {label}'s chat template")]


def _planned_config(ref: str, plans: dict[str, StagePlan], recipe: Recipe) -> Any:
    name = stage_ref(ref)
    if name is not None:
        return plans[name].config if name in plans else None
    try:
        from align.models import hub_config

        return hub_config(ref, "models", False, recipe.base_dir)
    except Exception:  # not available offline: the model's own check runs when the stage loads it
        return None


def _positions(config: Any) -> int | None:
    from align.models import model_positions

    return model_positions(config) if config is not None else None


def leaked(rows: list[EvalRow], recipe: Recipe, stage: Stage, chain: dict[str, Any], split_rows: int) -> list[str]:
    """One problem per earlier training stage of this recipe that trained on some of the eval's prompts: the same
    prompt (sft, dpo and rm stages), or, for an lm stage, the reference answer (else the prompt) found word for word
    in its training text. Counted against the prompts the eval answers, with the `split_rows` they come from, as the
    plan counts them; the first is quoted by its own words (its last user turn, not a system turn many share)."""
    problems = []
    names = [s.name for s in recipe.stages]
    for earlier in recipe.stages[: names.index(stage.name)]:
        data = chain.get(earlier.name)
        if data is None or "train" not in data:  # a stage that trains nothing (another eval)
            continue
        train = data["train"]
        if "text" in train.column_names:  # trained on whole texts: the answer may be anywhere in them
            text = "\n".join(_normal(t) for t in train["text"])
            probes = [_normal(r.reference if r.reference else show_prompt(r.prompt)) for r in rows]
            hits = [i for i, probe in enumerate(probes) if len(probe) >= LEAK_MIN_CHARS and probe in text]
            what = "found word for word in its training text"
        else:
            trained = {_normal(show_prompt(p)) for p in _train_prompts(train)}
            hits = [i for i, r in enumerate(rows) if _normal(show_prompt(r.prompt)) in trained]
            what = "among its training prompts"
        if hits:
            first = _own_words(rows[hits[0]].prompt)
            problems.append(
                f"stages.{stage.name}.data: {len(hits)} of the {len(rows)} prompts this eval answers (from the split's "
                f"{split_rows} rows) are {what} (stage {earlier.name}); the first, prompt {hits[0] + 1}: "
                f"{first[:80] + ('...' if len(first) > 80 else '')!r}"
            )
    return problems


def _own_words(prompt: Any) -> str:
    """What tells a prompt apart: a message list's last user turn (its system turn is often every row's), else the
    text itself."""
    if isinstance(prompt, list):
        users = [m for m in prompt if m.get("role") == "user"] or prompt
        return f"{users[-1].get('role')}: {_normal(str(users[-1].get('content', '')))}" if users else ""
    return _normal(str(prompt))


def _train_prompts(train: Any) -> list[Any]:
    if "prompt" in train.column_names:
        return list(train["prompt"])
    if "messages" in train.column_names:
        return [m[:-1] if m and m[-1].get("role") == "assistant" else m for m in train["messages"]]
    return []


def _normal(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------------
# Run


def run(stage: Stage, ctx: StageContext) -> StageResult:
    """Answer the held-out prompts with every model, judge the answers, compare each model with the baseline."""
    from align.evaluation.records import figures, report_to_tracker, write_generations
    from align.evaluation.verdicts import eval_verdict
    from align.runtime import is_main_process
    from align.signals import raise_if_requested

    models = eval_models(stage, ctx.recipe)
    label = ", ".join(models)
    if not is_main_process():  # one process evaluates; the others wait for the next stage
        return StageResult(stage.name, stage.kind, "completed", None, label)
    rows = eval_rows(ctx.data["test"], ctx.spec.format, stage.max_prompts)
    available = len(ctx.data["test"])
    # The data line said how many the split has; this one says how many are used, and why fewer.
    first = (f" (from the split's {available} rows: each prompt once, at most max_prompts {stage.max_prompts})"
             if len(rows) < available else "")  # fmt: skip
    logger.info("evaluating %d models on %d held-out prompts%s: %s", len(models), len(rows), first, label)
    answers, lm_eval = {}, {}
    for index, (name, ref) in enumerate(models.items()):
        path = resolve_ref(ref, ctx.outputs, ctx.recipe.base_dir)
        answers[name] = answer_all(stage, ctx, name, ref, path, rows, index)
        if stage.lm_eval is not None:
            lm_eval[name] = run_lm_eval(stage, ctx, path)
        raise_if_requested(f"in stage {stage.name} after model {name} (its answers are kept)")
    scores = {judge.name: judge_all(judge, ctx, rows, answers) for judge in stage.judges}
    metrics = figures(stage, baseline_of(stage, ctx.recipe), models, rows, answers, scores, lm_eval)
    lines = write_generations(ctx.stage_dir / "generations.jsonl", rows, answers, scores)
    verdict = eval_verdict(metrics)
    for text in verdict.get("warnings") or []:  # the console table shows only the first reason
        logger.warning("verdict warning: %s", text)
    report_to_tracker(ctx, metrics, lines)
    return StageResult(stage.name, stage.kind, "completed", None, label, metrics, {"verdict": verdict})


def answer_all(
    stage: Stage, ctx: StageContext, name: str, ref: str, path: str, rows: list[EvalRow], index: int
) -> list:
    """One model's answers to every prompt (`num_samples` each), from its progress file when an earlier run of
    this very stage made them, else generated and kept there at once. The progress is keyed by the model as the
    recipe names it (`@sft`: that stage's fingerprint), not by where it lies, so a copied run goes on from it too."""
    from align.evaluation import generate_batched
    from align.evaluation.loading import load_policy, render_prompt
    from align.evaluation.progress import _read_progress, _write_progress

    gen = stage.generation
    parts = [model_identity(ref, ctx.outputs, ctx.recipe.base_dir), gen.model_dump(),
             [show_prompt(r.prompt) for r in rows], index]  # fmt: skip
    if stage.thinking is not None:  # only where set: progress kept before the key existed still matches
        parts.append({"thinking": stage.thinking})
    if stage.tools:
        parts.append({"tools": stage.tools, "max_tool_calls": stage.max_tool_calls})
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    progress = ctx.stage_dir / "progress" / f"{name}.json"
    kept = _read_progress(progress, key)
    if kept is not None:
        logger.info("%s: %d answers kept from the earlier run of this stage", name, len(kept))
        return kept
    model, tokenizer, prompt_format = load_policy(path, f"stages.{stage.name}.models.{name}", ctx.precision)
    prompts = [render_prompt(r.prompt, prompt_format) for r in rows]
    fmt = "plain" if prompt_format.format == "plain" and all(isinstance(p, str) for p in prompts) else "chat_template"
    from align.evaluation.generation import with_reasoning_apart
    from align.thinking import thinking_of

    # A template that thinks: its switch as the stage sets it, and each answer's reasoning kept apart from it.
    # The stage's `thinking:`, else the setting the model was trained with (its align_prompts.json).
    setting = stage.thinking if stage.thinking is not None else prompt_format.thinking
    thinking = thinking_of(tokenizer, setting) if fmt == "chat_template" and tokenizer.chat_template else None
    # A different seed per model: sampled answers of two copies of one model must differ, or they would tie.
    settings = dict(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                    batch_size=gen.batch_size, seed=gen.seed + index,
                    template_kwargs=thinking.kwargs(setting) if thinking else None)  # fmt: skip
    if stage.tools:  # every model answers through the same tools, as the grpo stage's loop does
        from align.tools import answer_with_tools, resolve_tools

        tools = resolve_tools(stage.tools, ctx.recipe.base_dir, f"stages.{stage.name}.tools")
        answers = answer_with_tools(model, tokenizer, prompts, tools, stage.max_tool_calls,
                                    num_samples=gen.num_samples, **settings)  # fmt: skip
    else:
        answers = generate_batched(model, tokenizer, prompts, num_samples=gen.num_samples, prompt_format=fmt,
                                   **settings)  # fmt: skip
    answers = with_reasoning_apart(answers, thinking)
    del model
    _write_progress(progress, key, answers)
    flat = [a for per_prompt in answers for a in per_prompt]
    length, ended = sum(a.tokens for a in flat) / max(1, len(flat)), sum(a.ended for a in flat) / max(1, len(flat))
    logger.info("%s: %d answers, mean %.1f tokens, %.0f%% ended on their own", name, len(flat), length, 100 * ended)
    return answers


def judge_all(judge: Any, ctx: StageContext, rows: list[EvalRow], answers: dict[str, list]) -> dict[str, list]:
    """One judge's score of every answer: label -> per prompt -> per sample."""
    from align.evaluation import reward_model_scores, rouge_l_f1
    from align.evaluation.loading import load_on_device, render_prompt

    flat = [(label, p, s) for label, per in answers.items() for p, samples in enumerate(per) for s in samples]
    if judge.reference is not None:
        values = rouge_l_f1([a.text for _, _, a in flat], [rows[p].reference or "" for _, p, _ in flat])
    elif judge.function is not None:
        values = function_scores(judge, ctx, rows, flat)
    else:
        from align.prompt_format import read_prompt_format

        path = resolve_ref(judge.reward_model, ctx.outputs, ctx.recipe.base_dir)
        model, tokenizer = load_on_device(path, f"stages.{ctx.stage.name}.judges", ctx.precision, reward_head=True)
        local = Path(path) if Path(path).is_dir() else Path("-")
        record = read_prompt_format(local, tokenizer.chat_template is not None)
        prompts = [render_prompt(rows[p].prompt, record) for _, p, _ in flat]
        fmt = "plain" if all(isinstance(p, str) for p in prompts) else "chat_template"
        values = reward_model_scores(model, tokenizer, prompts, [a.text for _, _, a in flat],
                                     batch_size=ctx.stage.generation.batch_size, prompt_format=fmt)  # fmt: skip
    out: dict[str, list] = {label: [[] for _ in rows] for label in answers}
    for (label, p, _), value in zip(flat, values, strict=True):
        out[label][p].append(float(value))
    return out


def function_scores(judge: Judge, ctx: StageContext, rows: list[EvalRow], flat: list[tuple[str, int, Any]]) -> list:
    """A function judge's score of each (label, prompt index, answer), called as TRL calls a reward: the data's
    prompts, the answers (message lists where the prompts are), their token ids and the rows' other columns. A
    function that raises or returns a non-finite value fails the stage with a line naming it."""
    from align.rewards import guarded, resolve_function

    where = f"stages.{ctx.stage.name}.judges[{ctx.stage.judges.index(judge)}]"
    conversational = bool(rows) and isinstance(rows[0].prompt, list)
    fn = guarded(resolve_function(judge, ctx.recipe.base_dir, where, conversational), judge.name)
    prompts = [rows[p].prompt for _, p, _ in flat]
    # The answer after any reasoning is what is judged (`Answer.text`); the reasoning comes as `reasoning`.
    reasoning = {"reasoning": [a.reasoning or "" for _, _, a in flat]} if any(
        a.reasoning is not None for _, _, a in flat) else {}  # fmt: skip
    completions = [[{"role": "assistant", "content": a.text}] if conversational else a.text for _, _, a in flat]
    # An answer reached through tools: its assistant and tool turns, as TRL gives them to a reward.
    completions = [a.turns if a.turns is not None else c for (_, _, a), c in zip(flat, completions, strict=True)]
    names = sorted({k for row in rows for k in row.columns})
    columns = {k: [rows[p].columns.get(k) for _, p, _ in flat] for k in names}
    values = fn(prompts=prompts, completions=completions, completion_ids=[list(a.token_ids) for _, _, a in flat],
                **columns, **reasoning)  # fmt: skip
    if len(values) != len(flat):
        from align.rewards import RewardFailed

        raise RewardFailed(f"judge {judge.name} returned {len(values)} values for {len(flat)} answers")
    # None: no opinion on that answer; it scores 0, as TRL counts a None reward.
    return [0.0 if v is None else float(v) for v in values]


def run_lm_eval(stage: Stage, ctx: StageContext, path: str) -> dict[str, Any]:
    from align.evaluation.lm_eval import run_lm_eval as harness

    settings = stage.lm_eval
    include = settings.include_path
    include_path = None
    if include is not None:
        from align.recipe import search_paths

        include_path = next((p for p in search_paths(include, ctx.recipe.base_dir) if p.is_dir()), Path(include))
    return harness(path, tasks=settings.tasks, include_path=include_path, limit=settings.limit,
                   num_fewshot=settings.num_fewshot, batch_size=settings.batch_size,
                   device=ctx.precision.device, seed=ctx.seed)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The kind


class Eval(Kind):
    """An eval stage: it plans its models, prompts and judges, saves no model, and goes on from the answers it
    kept after a stop."""

    name = "eval"
    keys = EvalStage
    # Prompts from any format with prompts; the reference answer (completion, chosen) is kept when there is one, and
    # the other columns reach the function judges.
    formats = ("prompt_completion", "messages", "prompt_only", *PREFERENCE_FORMATS)
    about = "did it help? every model answers held-out prompts, judges score them, each is compared with a baseline"
    figures = (Figure("win rate", "win_rate", False),)
    compares_models = True
    keeps_progress = True
    prompts_only = True

    def run(self, stage: Any, ctx: StageContext) -> StageResult:
        return run(stage, ctx)

    def plan(self, stage: Any, inputs: PlanInputs) -> tuple[StagePlan | None, Problems]:
        found = Problems()
        plan, problems, hints = plan_eval(stage, inputs.recipe, inputs.spec, inputs.data, inputs.plans, inputs.chain)
        found.add(problems)
        found.hints += hints
        return plan, found

    def resolve(self, entry: dict[str, Any], stage: Any, recipe: Recipe) -> None:
        entry["models"] = eval_models(stage, recipe)
        entry["baseline"] = baseline_of(stage, recipe)
        entry["judges"] = [{k: v for k, v in judge.items() if v is not None and v != {}} for judge in entry["judges"]]

    def input_identity(self, stage: Any, recipe: Recipe, outputs: Any) -> str:
        return input_fingerprint(stage, recipe, outputs)

    def input_label(self, stage: Any, recipe: Recipe, outputs: Any) -> str:
        return ", ".join(f"{label}: {ref}" for label, ref in eval_models(stage, recipe).items())

    def output_complete(self, stage_dir: Path, summary: dict[str, Any]) -> bool:
        return (stage_dir / "generations.jsonl").is_file()  # its figures and answers are its output

    def headline(self, summary: dict[str, Any]) -> str:
        """Each model's win rate against the baseline, worst first with its verdict where it differs from the
        baseline's; the interval with it for one model alone."""
        from align.evaluation.verdicts import ranked_models

        m = summary.get("metrics") or {}
        if not m.get("models"):
            return "-"
        others = [(label, e) for label, e in ranked_models(m) if isinstance(e.get("win_rate"), int | float)]
        if not others:
            return "-"
        if len(others) == 1:
            label, entry = others[0]
            low, high = entry["win_rate_ci"]
            return f"{label} win rate {entry['win_rate']:.2f} [{low:.2f}, {high:.2f}] vs {m.get('baseline')}"

        def shown(label: str, entry: dict[str, Any]) -> str:
            status = (entry.get("verdict") or {}).get("status", "no_difference")
            return f"{label} {entry['win_rate']:.2f}" + ("" if status == "no_difference" else f" ({status})")

        return f"win rate vs {m.get('baseline')}: " + ", ".join(shown(label, entry) for label, entry in others)
