"""Tools a grpo policy may call while it answers (TRL's `GRPOTrainer(tools=...)`): the recipe's `tools:` entries
resolved and checked, the template checked for tool calls TRL can render and parse, and each call counted.

An entry is `FILE.py:NAME` (the recipe's folder, then the working directory), `module:NAME`, or a builtin
(`calculator`). TRL builds each tool's JSON schema from its type hints and Google-style docstring, so a tool without
them is refused before any stage trains, naming it. `max_tool_calls:` caps the turns (TRL's
`max_tool_calling_iterations`, which the recipe may not set under `train:`).
"""

from __future__ import annotations

import ast
import asyncio
import copy
import dataclasses
import functools
import inspect
import logging
import operator
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from align.errors import BadInput

logger = logging.getLogger(__name__)

_OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}  # fmt: skip


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression; return it with its value.

    Args:
        expression: The expression, with numbers, + - * / // % ** and parentheses, e.g. "(12 + 3) * 4".
    """

    def value(node: ast.AST) -> float | int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e12):
                raise ValueError("exponent or base too large")
            result = _OPERATORS[type(node.op)](left, right)
            if abs(result) > 1e100:  # each step bounded, so no expression runs for long
                raise ValueError("result too large")
            return result
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    expression = expression.strip()  # a model's " 7 / 2" would be an IndentationError to the parser
    result = value(ast.parse(expression, mode="eval").body)
    # The expression echoed ("(12 + 3) * 4 = 60"): an answer can quote the whole equation, and a reader (or a small
    # model) sees which question the value answers.
    return f"{expression} = {int(result) if isinstance(result, float) and result.is_integer() else result}"


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


BUILTIN_TOOLS = {"calculator": calculator, "multiply": multiply}
# The tool alarms' thresholds where `alarms:` sets none: no answer calling a tool (calls collapsed), half the calls
# raising.
TOOL_CALLS, TOOL_FAILURES = 0.0, 0.5
TOOL_HINT = (
    "a tool needs a type hint on every argument and a Google-style docstring with an Args: section naming each "
    "(TRL builds its JSON schema from them)"
)


def resolve_tools(entries: list[str], base_dir: Path, where: str) -> list[Any]:
    """Each `tools:` entry's function, its schema built as TRL builds it.

    Raises:
        BadInput: every entry that cannot be found or imported, or has no schema (no docstring, a missing hint),
            each naming `<where>[i]`.
    """
    from transformers.utils import get_json_schema

    from align.rewards import load_callable

    problems, hints, tools = [], [], []
    for n, entry in enumerate(entries):
        at = f"{where}[{n}]"
        try:
            if entry in BUILTIN_TOOLS:
                fn = BUILTIN_TOOLS[entry]
            elif ":" in entry:
                fn = load_callable(entry, base_dir, at)
            else:
                raise BadInput(f"{at}: no tool named {entry!r}", hint=f"builtins: {', '.join(BUILTIN_TOOLS)}; or "
                               "FILE.py:NAME, module:NAME")  # fmt: skip
            if inspect.isclass(fn):  # its schema would be its constructor's: a tool with no arguments
                raise BadInput(
                    f"{at}: {entry} is a class, not a function: an environment (reset, methods as "
                    "tools) goes under a grpo stage's `environment:`",
                    hint="environment: " + entry,
                )
            try:
                get_json_schema(fn)
            except Exception as exc:  # transformers' TypeHintParsingException / DocstringParsingException
                raise BadInput(f"{at}: {entry}: {str(exc).splitlines()[0]}", hint=TOOL_HINT) from None
            if any(t.__name__ == fn.__name__ for t in tools):
                raise BadInput(f"{at}: {entry}: a second tool named {fn.__name__!r}: TRL calls tools by name, so one "
                               "would shadow the other", hint="rename one of them")  # fmt: skip
            tools.append(fn)
        except BadInput as exc:
            problems += exc.problems
            hints += [exc.hint] if exc.hint else []
    if problems:
        raise BadInput(problems, hint="; ".join(dict.fromkeys(hints)) or None)
    return tools


def tools_identity(entries: list[str], base_dir: Path) -> list[str]:
    """What pins the tools beyond their names: each `FILE.py:NAME` file's contents (its hash)."""
    import hashlib

    from align.recipe import search_paths

    out = []
    for entry in entries:
        source = entry.rpartition(":")[0]
        if source.endswith(".py"):
            path = next((p for p in search_paths(source, base_dir) if p.is_file()), None)
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else "missing"
            out.append(f"{entry}:{digest}")
    return out


def trained_tools(stage: Any, rows: Any, base_dir: Path) -> dict[str, list] | None:
    """The tools a stage trained its model to call, for the model's `align_prompts.json`: a grpo stage's `tools:`
    and environment methods (their schemas, and the entries chat can load again: a file's path made absolute; an
    environment's methods need its reset, so they are not among them), or the schemas in an sft stage's
    transcripts (the `tools` column of its first rows). None where it trained with none."""
    import json

    from transformers.utils import get_json_schema

    from align.recipe import search_paths

    entries = list(getattr(stage, "tools", None) or [])
    functions = resolve_tools(entries, base_dir, f"stages.{stage.name}.tools") if entries else []
    environment = getattr(stage, "environment", None)
    if environment:
        functions += resolve_environment(environment, base_dir, f"stages.{stage.name}.environment")[1]
    schemas = [get_json_schema(fn) for fn in functions]
    if not schemas and rows is not None and "tools" in getattr(rows, "column_names", ()):
        seen: dict[str, Any] = {}
        for value in rows.select(range(min(64, len(rows))))["tools"]:
            for schema in (json.loads(value) if isinstance(value, str) else value) or []:
                seen.setdefault(schema.get("function", schema).get("name"), schema)
        schemas = list(seen.values())
    if not schemas:
        return None
    loadable = []
    for entry in entries:
        source, _, name = entry.rpartition(":")
        found = search_paths(source, base_dir) if source.endswith(".py") else []
        path = next((p for p in found if p.is_file()), None)
        loadable.append(f"{path.resolve()}:{name}" if path is not None else entry)
    return {"tools": schemas, **({"tool_entries": loadable} if loadable else {})}


def template_problems(tokenizer: Any, where: str) -> list[str]:
    """Why TRL cannot run tool calls through this tokenizer's chat template: it renders no tool calls, TRL has no
    parser for them (TRL sets one only for templates identical to those it ships), or it renders earlier turns
    differently as the conversation grows and TRL has no training variant that does not."""

    from trl.chat_template_utils import (
        add_response_schema,
        get_training_chat_template,
        is_chat_template_prefix_preserving,
        supports_tool_calling,
    )

    if not getattr(tokenizer, "chat_template", None) or not supports_tool_calling(tokenizer):
        return [f"{where}: the chat template renders no tool calls"]
    probe = copy.deepcopy(tokenizer)
    if getattr(probe, "response_template", None) is None and getattr(probe, "response_schema", None) is None:
        try:
            add_response_schema(probe)
        except Exception as exc:  # TRL's "Unrecognized chat template"
            logger.debug("no response schema: %s", exc)
    if getattr(probe, "response_template", None) is None and getattr(probe, "response_schema", None) is None:
        return [f"{where}: TRL has no parser for this chat template's tool calls (it parses only templates identical "
                "to those it ships)"]  # fmt: skip
    if not is_chat_template_prefix_preserving(tokenizer):
        try:
            patched = get_training_chat_template(tokenizer)
        except Exception:
            patched = None
        if patched is None:
            return [f"{where}: the chat template renders earlier turns differently as the conversation grows, and "
                    "TRL has no training variant of it"]  # fmt: skip
    return []


TEMPLATE_HINT = "a template TRL parses tool calls of: chat_template: qwen2_5 (or qwen3)"


class ToolCalls:
    """Each tool's calls and failures while the stage trains (TRL counts failures for all tools together): the
    tool-failure alarm names the tools that raised."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.last_error: dict[str, str] = {}

    def counted(self, fn: Any) -> Any:
        """`fn` as TRL calls it, counted; an exception it raises still reaches TRL (which reports the call as
        failed to the policy), after it is counted."""

        if inspect.iscoroutinefunction(fn):  # TRL awaits async tools on its event loop: the wrapper stays async

            @functools.wraps(fn)
            async def call_async(*args: Any, **kwargs: Any) -> Any:
                self.calls[fn.__name__] += 1
                try:
                    return await fn(*args, **kwargs)
                except Exception as exc:
                    self.failed(fn.__name__, exc)
                    raise

            return call_async

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[fn.__name__] += 1
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                self.failed(fn.__name__, exc)
                raise

        return call

    def failed(self, name: str, exc: Exception) -> None:
        self.failures[name] += 1
        self.last_error[name] = f"{type(exc).__name__}: {exc}"

    def worst(self) -> str:
        """The tools that raised, most failures first, each with its share and last error."""
        return (
            "; ".join(
                f"{name} raised in {n} of {self.calls[name]} calls (last: {self.last_error.get(name, '-')[:80]})"
                for name, n in self.failures.most_common()
            )
            or "none of the stage's tools: raised in the calls counted so far (an environment's methods are counted "
            "by TRL alone)"
        )


def transcript_masks(tokenizer: Any, messages: list[dict[str, Any]], tools: Any) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of a tool-call transcript: rendered with its tools' schemas (a `tools` column,
    a list or JSON string) and arguments parsed, through the template's training variant. The mask covers the
    assistant's turns, its tool calls included; tool results sit in tool turns, never trained."""
    import json

    from align.families import parsed_arguments, training_template

    template = training_template(tokenizer)
    tools = json.loads(tools) if isinstance(tools, str) else tools
    out = tokenizer.apply_chat_template([parsed_arguments(m) for m in messages], tools=tools or None, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True,
                                        chat_template=template)  # fmt: skip
    return list(out["input_ids"]), list(out["assistant_masks"])


# --------------------------------------------------------------------------------------------------
# Answering with tools, outside training (the held-out measure)


def answer_with_tools(
    model: Any,
    tokenizer: Any,
    prompts: list[Any],
    tools: list[Any],
    max_calls: int | None,
    *,
    num_samples: int = 1,
    template_kwargs: dict[str, Any] | None = None,
    environment: type | None = None,
    rows: list[dict[str, Any]] | None = None,
    **generation: Any,
) -> list[list[Any]]:
    """Each prompt answered `num_samples` times as TRL's tool loop answers it: the policy writes, its tool calls
    are parsed (TRL's `parse_response`), run, and their results (or `{"error": ...}`) appended as tool turns, until
    it answers without a call or `max_tool_calls` turns ran out. `generation`: `generate_batched`'s settings.

    With an `environment` (a grpo stage's class, TRL's `environment_factory`), each answer has an instance of its
    own, reset with its prompt's row (`rows`, every column, as TRL passes them): what `reset` returns is appended to
    the prompt's last turn, its public methods are tools beside `tools`, and its `get_reward()`, where it has one,
    scores the answer once it is done (`environment_reward`).

    Returns `Answer`s whose `turns`, `tool_calls`, `tool_failures`, `failed_tools`, `malformed_call`, `capped` and
    `environment_reward` say how."""
    from transformers.utils import get_json_schema
    from trl.chat_template_utils import add_response_schema, parse_response

    from align.evaluation.generation import as_messages, generate_batched, prompt_ids

    if getattr(tokenizer, "response_template", None) is None and getattr(tokenizer, "response_schema", None) is None:
        tokenizer = add_response_schema(copy.deepcopy(tokenizer))
    opener = "<tool_call>" if "<tool_call>" in str(tokenizer.chat_template) else None
    # Each answer's state; a string prompt is one user turn. With an environment, one instance per answer, reset
    # before the answer is begun (so each sample is generated from its own, possibly different, observation).
    states = [[{"prompt": as_messages(p), "messages": [], "calls": 0, "failures": 0, "failed": Counter(),
                "tools": {fn.__name__: fn for fn in tools}} for _ in range(num_samples)]
              for p in prompts]  # fmt: skip
    if environment is not None:
        for state, row in ((s, row) for per, row in zip(states, rows or [{}] * len(prompts), strict=True) for s in per):
            state["environment"] = instance = environment()
            observation = _awaited(instance.reset(**row))
            if observation is not None:  # appended to the last turn, as TRL appends it
                last = state["prompt"][-1]
                state["prompt"] = [*state["prompt"][:-1], {**last, "content": last["content"] + str(observation)}]
            state["tools"].update({name: getattr(instance, name) for name in environment_tools(environment)})
    schemas = [get_json_schema(fn) for fn in states[0][0]["tools"].values()] if states else []
    kwargs = {**(template_kwargs or {}), "tools": schemas}
    if environment is None:
        first = generate_batched(model, tokenizer, list(prompts), num_samples=num_samples, template_kwargs=kwargs,
                                 prompt_format="chat_template", **generation)  # fmt: skip
        for per, answers in zip(states, first, strict=True):
            for state, answer in zip(per, answers, strict=True):
                state["answer"] = answer
    else:  # each sample its own prompt
        flat = [s for per in states for s in per]
        first = generate_batched(model, tokenizer, [s["prompt"] for s in flat], template_kwargs=kwargs,
                                 prompt_format="chat_template", **generation)  # fmt: skip
        for state, (answer,) in zip(flat, first, strict=True):
            state["answer"] = answer
    active = [s for per in states for s in per]
    limit = sys.maxsize if max_calls is None else max_calls
    turn = 0
    while active:
        waiting = []
        for state in active:
            conversation = state["prompt"] + state["messages"]
            prefix = prompt_ids(tokenizer, conversation, "chat_template", kwargs)
            ids = list(state["answer"].token_ids)
            # An answer that ends its turn at once has no ids (its end-of-turn is cut), and the parser gives `[]`
            # for none, which TRL's parse_response cannot read; TRL's own loop skips empty answers as this does.
            parsed = parse_response(tokenizer, ids, prefix=prefix, tools=schemas) if ids else {"content": ""}
            calls = parsed.get("tool_calls") or []
            message = {"role": "assistant", "content": parsed.get("content") or ""}
            if not calls:
                state["messages"].append(message)
                state["malformed"] = bool(opener and opener in state["answer"].text)
                # The answer is the last turn as parsed, as TRL gives it to the rewards.
                state["answer"] = dataclasses.replace(state["answer"], text=message["content"])
                continue
            if turn >= limit:
                state["messages"].append(message | {"tool_calls": calls})
                state["capped"] = True
                continue
            state["messages"].append(message | {"tool_calls": calls})
            for call in calls:
                function = call.get("function", call)
                state["calls"] += 1
                try:
                    result = _awaited(state["tools"][function["name"]](**(function.get("arguments") or {})))
                except Exception as exc:  # a tool that raises, or a name the policy made up: as TRL reports it
                    state["failures"] += 1
                    state["failed"][str(function.get("name"))] += 1
                    result = {"error": str(exc)}
                state["messages"].append({"role": "tool", "name": function.get("name"), "content": str(result)})
            waiting.append(state)
        turn += 1
        if not waiting:
            break
        answers = generate_batched(model, tokenizer, [s["prompt"] + s["messages"] for s in waiting],
                                   template_kwargs=kwargs, prompt_format="chat_template",
                                   **{**generation, "seed": generation.get("seed", 0) + turn})  # fmt: skip
        for state, per in zip(waiting, answers, strict=True):
            state["answer"] = per[0]
        active = waiting
    for state in (s for per in states for s in per):
        instance = state.get("environment")
        if instance is not None and hasattr(instance, "get_reward"):  # the rollout is done: the environment scores it
            state["environment_reward"] = float(_awaited(instance.get_reward()))
    return [[dataclasses.replace(s["answer"], turns=s["messages"], tool_calls=s["calls"], tool_failures=s["failures"],
                                 failed_tools=dict(s["failed"]), malformed_call=s.get("malformed", False),
                                 capped=s.get("capped", False), environment_reward=s.get("environment_reward"))
             for s in per] for per in states]  # fmt: skip


def _awaited(value: Any) -> Any:
    """`value`, or what it resolves to where it is awaitable (an async tool, reset or get_reward, awaited as TRL
    awaits them)."""
    return asyncio.run(value) if inspect.isawaitable(value) else value


def environment_tools(cls: type) -> list[str]:
    """The methods of an environment class that are tools, as TRL finds them: its public functions other than
    `reset` and `get_reward`, listed on the class (an instance's properties are never evaluated)."""
    return [name for name, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
            if name not in ("reset", "get_reward") and not name.startswith("_")]  # fmt: skip


def tool_figures(answers: list[Any]) -> dict[str, float]:
    """The health of tool use over answers (`Answer`s from `answer_with_tools`): the share with at least one call,
    calls per answer, the share of calls that raised, the share whose last turn opens a call that does not parse,
    and the share cut by `max_tool_calls`."""
    n = max(1, len(answers))
    calls = sum(a.tool_calls for a in answers)
    return {
        "tool_call_rate": sum(a.tool_calls > 0 for a in answers) / n,
        "calls_per_answer": calls / n,
        "tool_failure_rate": sum(a.tool_failures for a in answers) / calls if calls else 0.0,
        "malformed_call_rate": sum(a.malformed_call for a in answers) / n,
        "capped_rate": sum(a.capped for a in answers) / n,
    }


# --------------------------------------------------------------------------------------------------
# Environments (TRL's `environment_factory`)


def resolve_environment(entry: str, base_dir: Path, where: str) -> tuple[type, list[Any], bool]:
    """A grpo stage's `environment: FILE.py:Class` (or `module:Class`): the class, one instance's tools (its public
    methods, each with its schema built as TRL builds it) and whether it owns a reward (`get_reward`), found as TRL
    finds them: on the class, an instance made once.

    Raises:
        BadInput: it cannot be had, has no `reset`, or a method has no schema (each named).
    """
    from transformers.utils import get_json_schema

    from align.rewards import load_callable

    cls = load_callable(entry, base_dir, where)
    members = dict(inspect.getmembers(cls, predicate=inspect.isfunction)) if isinstance(cls, type) else {}
    if "reset" not in members:
        raise BadInput(f"{where}: {entry} has no reset method: TRL resets an environment with each row's columns "
                       "(reset(**row)) before every rollout",
                       hint="add def reset(self, **row) -> str | None")  # fmt: skip
    try:
        instance = cls()
    except Exception as exc:
        raise BadInput(f"{where}: {entry}() raised {type(exc).__name__}: {exc} (TRL makes one per rollout, with no "
                       "arguments)") from None  # fmt: skip
    tools, problems = [], []
    for name in environment_tools(cls):
        method = getattr(instance, name)
        try:
            get_json_schema(method)
        except Exception as exc:
            problems.append(f"{where}: {entry}.{name}: {str(exc).splitlines()[0]}")
            continue
        tools.append(method)
    if problems:
        raise BadInput(problems, hint=TOOL_HINT)
    return cls, tools, "get_reward" in members
