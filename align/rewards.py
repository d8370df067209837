"""Reward functions for online RL (grpo, rloo): align's builtin ones, TRL's `trl.rewards` by name, a user's own
(`FILE.py:NAME` beside the recipe, or `a.module:NAME`), and reward models; each entry with its `weight`.

A reward function is TRL's: `f(prompts, completions, **columns) -> list[float | None]`, one value per completion,
`None` where it has no opinion; the data's other columns come as keyword lists, one value per completion. Every
function is imported and called on held-out rows before anything trains (`check_reward`), and during training a
function that raises or returns a non-finite value stops the stage with an `error:` naming it and the step
(`guarded`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_serializer, model_validator

from align.errors import BadInput, StageFailed, closest
from align.recipe import MODEL_REF, Strict, search_paths

RewardFn = Callable[..., list]


class FunctionFields(Strict):
    """What a `function:` entry may say: the function, the column it reads, and its arguments."""

    function: str | None = Field(
        None, description="a builtin (exact_match, format, length, repetition), trl.rewards' name, FILE.py:NAME or "
        "module:NAME"
    )  # fmt: skip
    column: str | None = Field(None, description="the data column it reads: exact_match's reference (default answer)")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of a builtin or a factory")


class RewardEntry(FunctionFields):
    """One reward of an online stage: a function or a reward model, and its weight."""

    reward_model: Annotated[str | None, MODEL_REF] = Field(
        None, description="a sequence-classification model: @<rm stage>, path or hub id"
    )
    weight: float = Field(1.0, description="its share of the total reward (TRL's reward_weights)")
    raw: bool | None = Field(
        None,
        description="on a thinking stage, the completion as generated, reasoning included (TRL's "
        "think_format_reward needs it); otherwise a function gets the final answer as `completions` and the "
        "reasoning as `reasoning`",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        from align.recipe import later_keys_left_out

        return later_keys_left_out(handler(self), self, ("raw",))

    @model_validator(mode="after")
    def _exactly_one(self) -> RewardEntry:
        given = [k for k in ("function", "reward_model") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of function, reward_model (got {', '.join(given) or 'none'})")
        return self

    @property
    def name(self) -> str:
        """The name its figures are recorded under: the function as written, or `reward_model`."""
        return self.function if self.function is not None else "reward_model"


class Judge(FunctionFields):
    """One judge of answers (an eval stage's `judges:`, an online stage's `monitor:`): a function (the entries
    `rewards:` takes), a reward model, or ROUGE-L against the data's references; higher is better."""

    reward_model: Annotated[str | None, MODEL_REF] = Field(
        None, description="a sequence-classification model: @<rm stage>, path or hub id"
    )
    reference: Literal["rouge_l"] | None = Field(None, description="score answers against the data's references")

    @model_serializer(mode="wrap")
    def _without_unused_function_keys(self, handler: Any) -> dict[str, Any]:
        # A reward-model or ROUGE-L judge dumps as it did before function judges existed: an eval stage's dump is
        # in its fingerprint, and a run directory made then must still be `cached`.
        data = handler(self)
        if self.function is None:
            for key in ("function", "column", "args"):
                data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> Judge:
        given = [k for k in ("function", "reward_model", "reference") if getattr(self, k) is not None]
        if len(given) != 1:
            got = ", ".join(given) or "none"
            raise ValueError(f"give exactly one of function, reward_model, reference (got {got})")
        if self.function is None and (self.column is not None or self.args):
            raise ValueError("column and args belong to a function judge")
        return self

    @property
    def name(self) -> str:
        """The judge's name in summaries and generations.jsonl: the function as written, `reward_model` or
        `rouge_l`."""
        if self.function is not None:
            return self.function
        return "reward_model" if self.reward_model is not None else str(self.reference)


# --------------------------------------------------------------------------------------------------
# align's builtin rewards


def final_answer(completion: Any) -> str:
    """What `exact_match` compares: after a `####` or inside the last `\\boxed{}` where there is one, else the first
    non-empty line; stripped, a trailing full stop dropped, case folded."""
    text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    else:
        boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
        if boxed:
            text = boxed[-1]
    line = next((part for part in text.strip().splitlines() if part.strip()), "")
    return line.strip().rstrip(".").strip().casefold()


def exact_match(column: str = "answer") -> RewardFn:
    """1.0 where the completion's final answer (`final_answer`) equals the row's `column`, else 0.0. Reads the
    completions and `column`."""

    def exact_match(prompts: list, completions: list, **columns: Any) -> list[float]:
        if column not in columns:
            raise KeyError(f"no column {column!r} reaches the reward (columns: {', '.join(sorted(columns))})")
        return [float(final_answer(c) == str(r).strip().casefold()) for c, r in zip(completions, columns[column],
                                                                                    strict=True)]  # fmt: skip

    return exact_match


def format_reward(pattern: str = r"\S") -> RewardFn:
    """1.0 where the completion matches the regular expression `pattern` (`re.search`), else 0.0. Reads the
    completions."""
    compiled = re.compile(pattern)

    def format(prompts: list, completions: list, **columns: Any) -> list[float]:
        return [float(compiled.search(_text(c)) is not None) for c in completions]

    return format


def length(target: int = 50) -> RewardFn:
    """The completion's words over `target`, capped at 1.0: a reward for answering at length (and the classic one
    to game: see `monitor:`). Reads the completions."""

    def length(prompts: list, completions: list, **columns: Any) -> list[float]:
        return [min(1.0, len(_text(c).split()) / target) for c in completions]

    return length


def repetition(n: int = 4) -> RewardFn:
    """1.0 minus the share of the completion's word n-grams that repeat an earlier one: 1.0 for no repetition, near
    0 for a loop. Reads the completions."""

    def repetition(prompts: list, completions: list, **columns: Any) -> list[float]:
        out = []
        for c in completions:
            words = _text(c).split()
            grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
            out.append(1.0 - (len(grams) - len(set(grams))) / len(grams) if grams else 1.0)
        return out

    return repetition


def _text(completion: Any) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else str(completion)


BUILTIN: dict[str, Callable[..., RewardFn]] = {
    "exact_match": exact_match,
    "format": format_reward,
    "length": length,
    "repetition": repetition,
}
# trl.rewards (1.16): what each needs beyond what TRL installs, and whether it reads message-list completions.
TRL_REWARDS: dict[str, dict[str, Any]] = {
    "accuracy_reward": {"needs": "math_verify", "messages": True},
    "reasoning_accuracy_reward": {"needs": "math_verify", "messages": True},
    "get_cosine_scaled_reward": {"needs": "math_verify", "messages": True, "factory": True},
    "think_format_reward": {"messages": True},
    "get_repetition_penalty_reward": {"factory": True},
    "get_soft_overlong_punishment": {"factory": True},
}


# --------------------------------------------------------------------------------------------------
# Resolving an entry to a callable


def resolve_function(entry: RewardEntry, base_dir: Path, where: str, conversational: bool) -> RewardFn:
    """The callable a `function:` entry names: a builtin (called with `column` and `args`), a `trl.rewards` name
    (a factory called with `args`), `FILE.py:NAME` (the recipe's folder, then the working directory) or
    `a.module:NAME`.

    Raises:
        BadInput: it cannot be found or imported, needs a package that is not installed, or needs message-list
            completions while the prompts are strings.
    """
    name = str(entry.function)
    if name in BUILTIN:
        kwargs = dict(entry.args) | ({"column": entry.column} if entry.column and name == "exact_match" else {})
        try:
            return BUILTIN[name](**kwargs)
        except TypeError as exc:
            raise BadInput(f"{where}.args: {name}: {exc}") from None
    if name in TRL_REWARDS:
        return _trl_reward(name, entry, where, conversational)
    if ":" not in name:
        guess = closest(name, [*BUILTIN, *TRL_REWARDS])
        raise BadInput(
            f"{where}.function: no reward named {name!r}" + (f" (did you mean '{guess}'?)" if guess else ""),
            hint=f"builtins: {', '.join(BUILTIN)}; trl.rewards: {', '.join(TRL_REWARDS)}; or FILE.py:NAME, module:NAME",
        )
    found = load_callable(name, base_dir, f"{where}.function")
    return found(**entry.args) if entry.args else found


def load_callable(name: str, base_dir: Path, where: str) -> Callable[..., Any]:
    """The function `FILE.py:NAME` (the recipe's folder, then the working directory) or `module:NAME` names; `where`
    is the recipe key its errors name.

    Raises:
        BadInput: the file or module cannot be found or imported, or has no such function.
    """
    source, _, attribute = name.rpartition(":")
    module = load_module(source, base_dir, where) if source.endswith(".py") else _import(source, where)
    found = getattr(module, attribute, None)
    if not callable(found):
        names = [n for n in vars(module) if callable(getattr(module, n)) and not n.startswith("_")]
        near = closest(attribute, names)
        raise BadInput(f"{where}: {source} has no function {attribute!r} (it has: {', '.join(names) or '-'})",
                       hint=f"did you mean {source}:{near}?" if near else None)  # fmt: skip
    return found


def _trl_reward(name: str, entry: RewardEntry, where: str, conversational: bool) -> RewardFn:
    facts = TRL_REWARDS[name]
    if facts.get("needs") and importlib.util.find_spec(facts["needs"]) is None:
        package = facts["needs"].replace("_", "-")
        raise BadInput(f"{where}.function: {name} needs {package}, which is not installed",
                       hint=f"pip install {package}")  # fmt: skip
    if facts.get("messages") and not conversational:
        raise BadInput(f"{where}.function: {name} reads message-list completions, but this stage's prompts are "
                       "strings (its completions are strings too)",
                       hint="give the prompts as message lists, or use a reward that reads strings")  # fmt: skip
    import trl.rewards

    found = getattr(trl.rewards, name)
    if facts.get("factory"):
        try:
            return found(**entry.args)
        except TypeError as exc:
            raise BadInput(f"{where}.args: {name}: {exc}") from None
    return found


def load_module(source: str, base_dir: Path, where: str) -> Any:
    """The Python file `source` (the recipe's folder, then the working directory), imported; `where` is the key its
    errors name."""
    path = next((p for p in search_paths(source, base_dir) if p.is_file()), None)
    if path is None:
        places = " or ".join(str(p) for p in search_paths(source, base_dir))
        raise BadInput(f"{where}: no file {source} (looked in {places})",
                       hint="a file's path is read from the recipe's folder, then the working directory; give it "
                       "from there, or absolute")  # fmt: skip
    spec = importlib.util.spec_from_file_location(f"align_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: any error in it is theirs to see, in one line
        raise BadInput(f"{where}: {path} fails to import: {type(exc).__name__}: {exc}") from None
    return module


def _import(module: str, where: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as exc:
        hint = ("module:NAME names a module importable in this Python (pip install it); a file beside the recipe is "
                "FILE.py:NAME") if isinstance(exc, ModuleNotFoundError) else None  # fmt: skip
        raise BadInput(f"{where}: cannot import {module}: {type(exc).__name__}: {exc}", hint=hint) from None


def entries_identity(entries: Sequence[Any], base_dir: Path, outputs: Any) -> list[str]:
    """What pins each entry's scores beyond its settings (which the stage's fingerprint holds): a `FILE.py:NAME`
    function's file contents, an `@stage` reward model's fingerprint; so editing the reward file or retraining the
    rm runs the stage again instead of reusing its output."""
    from align.recipe import stage_ref

    out = []
    for entry in entries:
        function, model = getattr(entry, "function", None), getattr(entry, "reward_model", None)
        if function is not None and ":" in function and function.rpartition(":")[0].endswith(".py"):
            source = function.rpartition(":")[0]
            path = next((p for p in search_paths(source, base_dir) if p.is_file()), None)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path is not None else "missing"
            out.append(f"{function}:{digest}")
        elif model is not None and stage_ref(model) is not None:
            out.append(f"{model}:{outputs[stage_ref(model)].fingerprint}")
    return out


# --------------------------------------------------------------------------------------------------
# Checked before training, guarded during it


def check_reward(
    fn: RewardFn, label: str, rows: Sequence[dict[str, Any]], where: str, completions: list, by_trl: bool = False
) -> None:
    """Call `fn` as it will be called, on held-out `rows` with `completions` (their reference answers where a column
    names them, else empty strings): it must return one float or None per row. `by_trl` (a reward TRL calls while it
    trains): with the keywords TRL's GRPO and RLOO trainers add (a fresh trainer state, and the logging callbacks).

    Raises:
        BadInput: it raises (the message names the columns that reach it, and asks for `**kwargs` where it refused
            a keyword), returns something that is not a list, the wrong number of values, or a value that is
            neither a finite number nor None.
    """
    prompts = [row["prompt"] for row in rows]
    columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"} if rows else {}
    extras: dict[str, Any] = {}
    if by_trl:
        from transformers import TrainerState

        extras = {
            "trainer_state": TrainerState(),
            "log_extra": lambda *a, **k: None,
            "log_metric": lambda *a, **k: None,
        }
    try:
        values = fn(prompts=prompts, completions=completions, completion_ids=[[] for _ in rows], **columns, **extras)
    except Exception as exc:
        given = ", ".join(["prompts", "completions", "completion_ids", *columns, *extras])
        fix = ""
        if isinstance(exc, TypeError) and "unexpected keyword argument" in str(exc):
            fix = "; add **kwargs to its parameters, since every column and TRL's own keywords are passed"
        elif isinstance(exc, TypeError) and "missing" in str(exc) and "argument" in str(exc):
            fix = "; a parameter must be one of these (a data column, or one renamed with the data's `columns:`)"
        raise BadInput(f"{where}: {label} raised {type(exc).__name__}: {exc} (called on {len(rows)} held-out rows "
                       f"before training, with {given}){fix}") from None  # fmt: skip
    if not isinstance(values, list | tuple):
        raise BadInput(f"{where}: {label} returned {type(values).__name__}, not a list of floats (one per completion)")
    if len(values) != len(rows):
        raise BadInput(f"{where}: {label} returned {len(values)} values for {len(rows)} completions (one per "
                       "completion)")  # fmt: skip
    bad = [v for v in values if not (v is None or (isinstance(v, int | float) and math.isfinite(v)))]
    if bad:
        raise BadInput(f"{where}: {label} returned {bad[0]!r}: each value must be a finite number or None")


def check_functions(
    entries: Sequence[FunctionFields],
    rows: Any,
    base_dir: Path,
    where: str,
    by_trl: bool = False,
    thinking: Any = None,
) -> list[str]:
    """Every `function:` entry of `entries` (an online stage's rewards or monitor, an eval's judges) imported and
    called on two of `rows` (dicts or a Dataset with a `prompt` column), with their reference column as the
    completions where one is named (exact_match's `answer` by default), else empty completions; `by_trl`: as TRL
    calls a reward (`check_reward`); `thinking` (a thinking template's): with the answer and reasoning apart, as
    the stage calls it (`answers_apart`). Returns the problems, each naming `<where>[i]`."""
    sample = [dict(rows[i]) for i in range(min(2, len(rows)))]
    conversational = bool(sample) and isinstance(sample[0]["prompt"], list)
    problems = []
    for n, entry in enumerate(entries):
        if entry.function is None:
            continue
        at = f"{where}[{n}]"
        try:
            fn = answers_apart(resolve_function(entry, base_dir, at, conversational), thinking,
                               bool(getattr(entry, "raw", False)))  # fmt: skip
            column = entry.column or ("answer" if entry.function == "exact_match" else None)
            completions = [row[column] if column and column in row else "" for row in sample]
            if conversational:
                completions = [[{"role": "assistant", "content": str(c)}] for c in completions]
            check_reward(fn, entry.function, sample, at, completions, by_trl)
        except BadInput as exc:
            problems += exc.problems
    return problems


class RewardFailed(StageFailed):
    """A reward function raised or returned a non-finite value during training."""


def answers_apart(fn: RewardFn, thinking: Any, raw: bool = False, health: bool = False) -> RewardFn:
    """`fn` given each completion's final answer as `completions` and its reasoning as `reasoning` (an empty string
    where it has none), on a stage whose template thinks (`thinking`: align.thinking.Thinking); `raw`: the
    completion as generated, with the tag a generation prompt opened put back in front (TRL's `think_format_reward`
    reads `<think>` there). `health`: this function (the stage's first) also logs, through TRL's `log_metric`, the
    share of completions whose reasoning never closed (`thinking/cut_rate`) and the mean reasoning length in
    characters (`thinking/reasoning_chars`)."""
    if thinking is None:
        return fn
    from align.thinking import split_reasoning, thought_figures

    def reward(*args: Any, completions: list, **kwargs: Any) -> list:
        kwargs.pop("reasoning", None)  # a data column of that name is refused when planning; never passed twice
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        parts = [split_reasoning(text, thinking) for text in texts]
        log = kwargs.get("log_metric")
        if health and callable(log) and parts:
            figures = thought_figures(parts)
            log("thinking/cut_rate", figures["cut_thought_rate"])
            log("thinking/reasoning_chars", figures["reasoning_length"])
        if raw:
            if thinking.prompt_opens:  # the generation prompt opened the block: put its tag back, as written
                completions = [[{**c[-1], "content": f"{thinking.opens}\n{c[-1]['content']}"}] if isinstance(c, list)
                               else f"{thinking.opens}\n{c}" for c in completions]  # fmt: skip
            return fn(*args, completions=completions, **kwargs)
        answers = [[{**c[-1], "content": a}] if isinstance(c, list) else a
                   for c, (a, _, _) in zip(completions, parts, strict=True)]  # fmt: skip
        return fn(*args, completions=answers, reasoning=[r or "" for _, r, _ in parts], **kwargs)

    return reward


def guarded(fn: RewardFn, label: str) -> RewardFn:
    """`fn` as TRL calls it, stopping the stage with one line naming `label` and the step where it raises or
    returns a non-finite value (TRL would pass the traceback on, or train on a NaN)."""

    def reward(*args: Any, **kwargs: Any) -> list:
        state = kwargs.get("trainer_state")
        step = getattr(state, "global_step", None)
        at = f"at step {step + 1}" if isinstance(step, int) else "during training"
        try:
            values = fn(*args, **kwargs)
        except Exception as exc:
            raise RewardFailed(f"reward {label} raised {type(exc).__name__} {at}: {exc}") from None
        bad = [v for v in values if v is not None and not (isinstance(v, int | float) and math.isfinite(v))]
        if bad:
            raise RewardFailed(f"reward {label} returned {bad[0]!r} {at}: not a finite number")
        return values

    reward.__name__ = re.sub(r"\W", "_", label).strip("_") or "reward"
    return reward
