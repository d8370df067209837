"""Tools in grpo (TRL's `GRPOTrainer(tools=...)`): entries resolved and their schemas built before anything trains,
the template checked for tool calls TRL can render and parse, each call counted, and the tool alarms."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests import families
from tests.conftest import REPO, kill_after, read_jsonl, write_yaml

TOOLS = '''
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


def undocumented(a: int) -> int:
    return a


class Shop:
    def reset(self, **row):
        return None
'''


# A tool whose docstring alone fills the fixture's 256 positions.
LONG_SCHEMA = (
    '''

def long_schema(text: str) -> str:
    """'''
    + "Describe the text at length. " * 60
    + '''

    Args:
        text: The text.
    """
    return text
'''
)


def grpo_stage(family_models: dict[str, Path], model: str = "qwen2_5_wide", **extra: Any) -> dict[str, Any]:
    return {"name": "grpo", "kind": "grpo", "model": str(family_models[model]), "generations": 0,
            "data": {"source": {"files": [str(family_models["prompts"])]}, "format": "prompt_only",
                     "valid_fraction": 0.2},
            "rewards": [{"function": "exact_match"}], "measure": {"prompts": 4, "samples": 2},
            "tools": ["calculator", "tools.py:add"], "max_tool_calls": 2,
            "train": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4,
                      "max_completion_length": 8, "logging_steps": 1}, **extra}  # fmt: skip


def test_the_calculator_evaluates_arithmetic_and_nothing_else():
    from align.tools import calculator

    assert calculator("(12 + 3) * 4") == "(12 + 3) * 4 = 60" and calculator(" 7 / 2") == "7 / 2 = 3.5"
    assert calculator("-2 ** 3") == "-2 ** 3 = -8"
    for bad in ("__import__('os')", "2 ** 1000", "x + 1", "(((10 ** 64) ** 64) ** 64) ** 64"):
        with pytest.raises(ValueError):
            calculator(bad)


def test_the_plan_shows_each_tool_and_a_prompt_rendered_with_their_schemas(family_models, run_cli, tmp_path):
    (tmp_path / "tools.py").write_text(TOOLS)
    recipe = write_yaml(tmp_path / "r.yaml", {"name": "t", "stages": [grpo_stage(family_models)]})
    code, out, err = run_cli(recipe, "--output-dir", tmp_path / "run", "--dry-run")
    assert code == 0, err
    assert "tools: calculator(expression: string), add(a: integer, b: integer)" in out
    assert "max_tool_calling_iterations: 2  (recipe (max_tool_calls:))" in out
    prompt = next(line for line in out.splitlines() if line.strip().startswith("prompt_with_tools:"))
    assert "<tools>" in prompt and '"name": "add"' in prompt and prompt.rstrip().endswith("<|im_start|>assistant\\n'")
    # One exchange with its loss mask: the call and the answer trained, the tool's turn never.
    exchange = next(line for line in out.splitlines() if line.strip().startswith("tool_exchange:"))
    assert exchange.split(": ", 1)[1] == (
        '\'[[<tool_call>\\n{"name": "calculator", "arguments": {"expression": "text"}}\\n</tool_call><|im_end|>]]\\n'
        "<|im_start|>user\\n<tool_response>\\n(the tool\\'s result)\\n</tool_response><|im_end|>\\n"
        "<|im_start|>assistant\\n[[(the answer)<|im_end|>]]\\n'"
    ), exchange


def qwen2_5_one_newline_off(family_models: dict[str, Path], folder: Path) -> Path:
    """The Qwen 2.5 fixture with one extra newline in its template: TRL parses tool calls only of templates
    identical to those it ships."""
    import shutil

    shutil.copytree(family_models["qwen2_5"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.pop("chat_template", None) or (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(template + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"tools": ["missing.py:add"]}, "stages.grpo.tools[0]: no file missing.py"),
        ({"tools": ["missing.py:add"]}, "hint: a file's path is read from the recipe's folder, then the working"),
        ({"tools": ["tools.py:ad"]}, "stages.grpo.tools[0]: tools.py has no function 'ad' (it has: add, "),
        ({"tools": ["tools.py:ad"]}, "hint: did you mean tools.py:add?"),
        ({"tools": ["nosuchmod:add"]}, "hint: module:NAME names a module importable in this Python"),
        (
            {"tools": ["tools.py:undocumented"]},
            "stages.grpo.tools[0]: tools.py:undocumented: Cannot generate JSON "
            "schema for undocumented because it has no docstring!",
        ),
        ({"model": "gpt2"}, "stages.grpo.tools: the chat template renders no tool calls"),
        ({"model": "edited"}, "stages.grpo.tools: TRL has no parser for this chat template's tool calls"),
        ({"kind": "rloo"}, "stages.grpo.tools: TRL's RLOOTrainer takes no tools (its GRPOTrainer does)"),
        (
            {"train": {"max_tool_calling_iterations": 3}},
            "stages.grpo.train.max_tool_calling_iterations: set by align: use the stage's `max_tool_calls:`",
        ),
        ({"tools": None}, "stages.grpo.max_tool_calls: caps tool calls, and the stage has no `tools:`"),
        (
            {"tools": ["tools.py:add", "other.py:add"]},
            "stages.grpo.tools[1]: other.py:add: a second tool named 'add': TRL calls tools by name",
        ),
        (
            {"tools": ["tools.py:add", "tools.py:long_schema"]},
            "stages.grpo.tools: a prompt with the tools' schemas is ",
        ),
        (
            {"tools": ["tools.py:Shop"]},
            "stages.grpo.tools[0]: tools.py:Shop is a class, not a function: an environment (reset, methods as tools) "
            "goes under a grpo stage's `environment:`",
        ),
    ],  # fmt: skip
)
def test_bad_tools_stop_before_stage_one(family_models, run_cli, tmp_path, change, error):
    (tmp_path / "tools.py").write_text(TOOLS + LONG_SCHEMA)
    (tmp_path / "other.py").write_text(TOOLS.replace("Add two integers.", "Add, again."))
    stage = grpo_stage(family_models)
    for key, value in change.items():
        if key == "model":
            path = qwen2_5_one_newline_off(family_models, tmp_path / "m") if value == "edited" else family_models[value]
            stage["model"] = str(path)
        elif key == "train":
            stage["train"].update(value)
        else:
            stage[key] = value
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", {"name": "t", "stages": [stage]}), "--output-dir",
                           tmp_path / "run")  # fmt: skip
    assert code == 2, err
    assert error in err, err
    assert not (tmp_path / "run" / "grpo").exists()


def test_an_async_tool_stays_async_when_counted_and_the_loop_awaits_it(family_models):
    """TRL awaits async tools: align's counting wrapper must stay a coroutine function, and the held-out loop
    awaits what it returns (a tool once answered `<coroutine object ...>`)."""
    import asyncio
    import inspect

    from align.tools import ToolCalls

    async def later(a: int) -> int:
        """Return a later.

        Args:
            a: The number.
        """
        return a + 1

    calls = ToolCalls()
    counted = calls.counted(later)
    assert inspect.iscoroutinefunction(counted) and asyncio.run(counted(1)) == 2 and calls.calls["later"] == 1


def test_the_failure_alarm_names_the_tool_that_raises():
    """A tool raising in half its calls: the alarm reads TRL's failure frequency and names the tool from align's own
    count of its calls, with its last error."""
    from types import SimpleNamespace

    from align.guards import HealthAlarms
    from align.stages.online_rl import Alarms
    from align.tools import ToolCalls

    def lookup(key: str) -> str:
        """Look a key up.

        Args:
            key: The key.
        """
        if key.startswith("x"):
            raise KeyError(key)
        return key.upper()

    calls = ToolCalls()
    counted = calls.counted(lookup)
    assert counted.__doc__ == lookup.__doc__ and counted.__name__ == "lookup"  # TRL's schema reads them
    for key in ("a", "x1", "b", "x2"):
        with contextlib.suppress(KeyError):
            counted(key)
    alarms = HealthAlarms(Alarms(window=1), None, calls)
    state = SimpleNamespace(global_step=1)
    logs = {"reward": 0.0, "tools/call_frequency": 1.0, "tools/failure_frequency": 0.5}
    alarms.on_log(SimpleNamespace(max_completion_length=8, beta=0.0), state, None, logs=logs)
    assert alarms.fired == ["tool failures: 50% of tool calls raised for 1 log: lookup raised in 2 of 4 calls (last: "
                            "KeyError: 'x2')"]  # fmt: skip


FLAKY, STEADY = families.lookup_tool(raises=True), families.lookup_tool(raises=False)


@pytest.mark.slow
def test_a_tool_raising_in_half_its_calls_is_in_metrics_and_its_alarm_names_it(family_models, caller, tmp_path):
    """A policy that calls (every answer, through TRL's multi-turn loop) meets a tool that raises in every other call:
    TRL's failure frequency of each logged step is in metrics.jsonl, and the alarm names the tool, its count of
    calls and failures and its last error."""
    from align.loader import load_recipe
    from align.pipeline import run_pipeline

    (tmp_path / "flaky.py").write_text(FLAKY)
    stage = {**grpo_stage(family_models, tools=["flaky.py:lookup"], max_tool_calls=1, alarms={"window": 1}),
             "model": str(caller), "generations": 2}  # fmt: skip
    # 8 answers a step; sampled at 0.5, where the tiny caller's calls parse every time (tests/families.py: `caller`).
    stage["train"].update(max_steps=2, max_completion_length=64, per_device_train_batch_size=8, temperature=0.5)
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", {"name": "flaky", "seed": 0, "stages": [stage]}))
    summary = run_pipeline(recipe, output_dir=tmp_path / "run", log_level="warning")[0]
    rows = [r for r in read_jsonl(tmp_path / "run" / "grpo" / "metrics.jsonl") if r["split"] == "train"]
    logged = [(r["tools/call_frequency"], r["tools/failure_frequency"]) for r in rows if "tools/failure_frequency" in r]
    assert len(logged) == 2 and all(calls >= 0.75 and 0.4 <= failed <= 0.6 for calls, failed in logged), logged
    alarm = [w for w in summary["verdict"]["warnings"] if w.startswith("tool failures: ")]
    found = re.search(r"raised for 1 log: lookup raised in (\d+) of (\d+) calls \(last: RuntimeError: the dictionary "
                      r"is out of pages\)$", alarm[0] if len(alarm) == 1 else "")  # fmt: skip
    assert found and abs(2 * int(found[1]) - int(found[2])) <= 1, alarm  # every other call, counted by align
    # The greedy answers before and after read as transcripts: the call, then what the tool returned or raised.
    shown = [row["after"] for row in summary["generations"]]
    assert shown and all(text.startswith("-> lookup(word='red')\n<- ") for text in shown), shown
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Answers to held-out prompts, sampled as in training" in report and "Greedy answers" not in report


@pytest.mark.slow
def test_a_policy_whose_calls_do_not_parse_gets_the_malformed_warning_with_its_share(family_models, tmp_path):
    """TRL takes a tool call it cannot parse as plain text, in silence: a policy that always opens one (taught to,
    as the `caller` is taught a good one) gets a verdict warning with the share of held-out answers."""
    from align.loader import load_recipe
    from align.pipeline import run_pipeline

    namespace: dict[str, Any] = {}
    exec(STEADY, namespace)
    broken = families.caller(family_models["qwen2_5_wide"], tmp_path / "broken", namespace["lookup"], {},
                             reply='<tool_call>\n{"name": lookup, red}\n</tool_call>')  # fmt: skip
    (tmp_path / "tools.py").write_text(STEADY)
    stage = {**grpo_stage(family_models, tools=["tools.py:lookup"], max_tool_calls=1), "model": str(broken)}
    stage["train"].update(max_steps=1, max_completion_length=48, temperature=0.5)
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", {"name": "broken", "seed": 0, "stages": [stage]}))
    summary = run_pipeline(recipe, output_dir=tmp_path / "run", log_level="warning")[0]
    share = summary["metrics"]["malformed_call_rate"]
    assert share >= 0.75 and summary["metrics"]["tool_call_rate"] == 0.0, summary["metrics"]
    assert f"malformed tool calls: {share:.0%} of held-out answers after training open a tool call that does not " \
           "parse" in " ".join(summary["verdict"]["warnings"]), summary["verdict"]  # fmt: skip


@pytest.mark.slow
def test_grpo_with_tools_trains_and_a_policy_that_never_calls_fires_the_collapse_alarm(family_models, tmp_path):
    """Qwen 2.5 (a template TRL parses tool calls of) with two tools through TRL's multi-turn loop: the stage trains,
    TRL's tool metrics reach metrics.jsonl, and a policy that never calls (an untrained one) fires the alarm."""
    from align.loader import load_recipe
    from align.pipeline import run_pipeline

    (tmp_path / "tools.py").write_text(TOOLS)
    stage = grpo_stage(family_models, alarms={"window": 1})
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", {"name": "tools", "seed": 0, "stages": [stage]}))
    summary = run_pipeline(recipe, output_dir=tmp_path / "run", log_level="warning")[0]
    assert summary["status"] == "completed"
    rows = read_jsonl(tmp_path / "run" / "grpo" / "metrics.jsonl")
    assert any("tools/call_frequency" in row for row in rows)
    metrics = summary["metrics"]  # the held-out measure answered through the tools, before and after
    for key in ("tool_call_rate", "calls_per_answer", "tool_failure_rate", "malformed_call_rate"):
        assert isinstance(metrics[key], float) and isinstance(metrics[f"{key}_before"], float)
    assert any(w.startswith("tool calls collapsed: 0% of answers called a tool for 1 log")
               for w in summary["verdict"]["warnings"]), summary["verdict"]  # fmt: skip


MULTIPLY = {"type": "function", "function": {"name": "multiply", "description": "Multiply two integers.",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "The first."},
                                                             "b": {"type": "integer", "description": "The second."}},
                           "required": ["a", "b"]}}}  # fmt: skip


def transcripts(n: int = 40) -> list[dict[str, Any]]:
    """Tool-call transcripts as a data set stores them: arguments as JSON strings (Arrow holds no dicts of varying
    shape), the tools' schemas as a JSON string column."""
    import random

    rng, rows = random.Random(0), []
    for _ in range(n):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        call = {"type": "function", "function": {"name": "multiply", "arguments": json.dumps({"a": a, "b": b})}}
        rows.append({"messages": [
            {"role": "user", "content": f"What is {a} times {b}?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "multiply", "content": str(a * b)},
            {"role": "assistant", "content": f"The answer is {a * b}."},
        ], "tools": json.dumps([MULTIPLY])})  # fmt: skip
    return rows


def test_sft_masks_of_a_transcript_train_the_calls_and_never_the_tool_results(family_models, tmp_path):
    """The arguments stored as JSON text are written as JSON objects, the tools' schemas are in the prompt, the
    assistant's calls and final answer are trained, and the tool's result (in its tool turn) never is."""
    from types import SimpleNamespace

    from datasets import Dataset

    from align.models import load_tokenizer
    from align.stages.sft import TRANSCRIPTS, loss_flags, masked_ids

    tokenizer = load_tokenizer(str(family_models["qwen2_5"]))
    rows = Dataset.from_list(transcripts(4))
    loss = loss_flags(SimpleNamespace(train={}, name="sft"), "messages", tokenizer, rows)
    assert loss == {TRANSCRIPTS: True}
    ids, mask = masked_ids(rows[0], tokenizer, loss)
    trained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    untrained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    a, b = json.loads(rows[0]["messages"][1]["tool_calls"][0]["function"]["arguments"]).values()
    assert f'{{"name": "multiply", "arguments": {{"a": {a}, "b": {b}}}}}' in trained
    assert f"The answer is {a * b}.<|im_end|>" in trained
    assert f"<tool_response>\n{a * b}\n</tool_response>" in untrained and "<tool_response>" not in trained
    assert '"name": "multiply", "description": "Multiply two integers."' in untrained  # the schemas, in the prompt


@pytest.mark.slow
def test_sft_trains_on_tool_call_transcripts(family_models, tmp_path):
    """An sft stage on transcripts with a `tools` column trains through TRL on align's tokenization: the labels of
    the tool results are -100."""

    from align.loader import load_recipe
    from align.pipeline import run_pipeline
    from tests.conftest import captured_trainers

    model = family_models["qwen2_5_wide"]  # the tools' schemas fill a long system turn
    data = tmp_path / "transcripts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in transcripts()))
    stage = {"name": "sft", "kind": "sft", "model": str(model), "generations": 0,
             "data": {"source": {"files": [str(data)]}, "format": "messages", "valid_fraction": 0.2},
             "train": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1}}  # fmt: skip
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", {"name": "tt", "seed": 0, "stages": [stage]}))
    with captured_trainers() as trainers:
        summary = run_pipeline(recipe, output_dir=tmp_path / "run", log_level="warning")[0]
    assert summary["status"] == "completed" and summary["loss_on"].startswith("assistant turns (their tool calls")
    trainer = trainers["sft"]
    row = trainer.train_dataset[0]
    labels = row["labels"]  # TRL built them from align's assistant mask
    tokenizer = trainer.processing_class
    trained = tokenizer.decode([t for t in labels if t != -100])
    assert "<tool_call>" in trained and "<tool_response>" not in trained


class ScriptedPolicy:
    """A stand-in for a policy that has learned to call tools: it answers by a script read off the prompt (a call,
    then the answer once a tool result is in the conversation), through `generate` as a model does, so that
    align's tool loop runs end to end: rendering, TRL's parser, the tools, the tool turns."""

    def __init__(self, tokenizer: Any, script: Any):
        import torch

        self.tokenizer, self.script = tokenizer, script
        self.config = type("Config", (), {})()
        self.training = False
        self.weight = torch.zeros(1)

    def parameters(self):
        yield self.weight

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def generate(self, input_ids, attention_mask, **kwargs):
        import torch

        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            said = self.tokenizer(self.script(prompt) + "<|im_end|>", add_special_tokens=False)["input_ids"]
            rows.append(torch.cat([ids, torch.tensor(said)]))
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return torch.stack([torch.cat([r, torch.full((width - len(r),), pad)]) for r in rows])


def call(a: int, b: int) -> str:
    return f'<tool_call>\n{{"name": "multiply", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>'


def test_the_held_out_tool_loop_calls_runs_and_counts(family_models):
    """Through align's loop: a call is parsed and run and its result fed back; a tool that raises is counted and
    its error fed back; a call that does not parse is malformed; a policy that never stops calling is capped; one
    that ends its turn at once after a tool result answers "" (TRL 1.16's parse_response fails on no ids)."""
    from align.models import load_tokenizer
    from align.tools import answer_with_tools, tool_figures

    tokenizer = load_tokenizer(str(family_models["qwen2_5"]))

    def multiply(a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: The first.
            b: The second.
        """
        if a == 0:
            raise ValueError("zero")
        return a * b

    def script(prompt: str) -> str:
        if "<tool_response>" in prompt and "silent" in prompt:
            return ""
        if "<tool_response>" in prompt and "always" not in prompt:
            return "The answer is " + prompt.rsplit("<tool_response>\n", 1)[1].split("\n", 1)[0] + "."
        if "broken" in prompt:
            return '<tool_call>\n{"name": "multiply", "argum'
        return call(0 if "zero" in prompt else 3, 4)

    # A string prompt is one user turn (an eval's plain prompts).
    prompts = ["three times four", *([{"role": "user", "content": t}] for t in ("zero", "broken", "always", "silent"))]
    answers = answer_with_tools(ScriptedPolicy(tokenizer, script), tokenizer, prompts, [multiply], 2,
                                max_new_tokens=64)  # fmt: skip
    first, failed, broken, capped, silent = (per[0] for per in answers)
    assert [m["role"] for m in first.turns] == ["assistant", "tool", "assistant"]
    assert first.turns[0]["tool_calls"][0]["function"]["arguments"] == {"a": 3, "b": 4}
    assert first.turns[1]["content"] == "12" and first.text == "The answer is 12."
    assert failed.tool_failures == 1 and "zero" in failed.turns[1]["content"]
    assert failed.failed_tools == {"multiply": 1} and first.failed_tools == {}
    assert broken.tool_calls == 0 and broken.malformed_call
    assert capped.capped and capped.tool_calls == 2
    assert silent.text == "" and silent.tool_calls == 1 and [m["role"] for m in silent.turns][-1] == "assistant"
    figures = tool_figures([first, failed, broken, capped, silent])
    assert figures == {"tool_call_rate": 0.8, "calls_per_answer": 1.0, "tool_failure_rate": 0.2,
                       "malformed_call_rate": 0.2, "capped_rate": 0.2}  # fmt: skip


class Vault:
    """An environment for the held-out loop: the code is the row's, only `open_vault` reads it, and the reward is
    whether it was read."""

    def __init__(self) -> None:
        self.code, self.opened = None, False

    def reset(self, code: int | None = None, **row: Any) -> str:
        self.code, self.opened = code, False
        return " (the vault is locked)"

    def open_vault(self) -> str:
        """Open the vault and read its code."""
        self.opened = True
        return str(self.code)

    def get_reward(self) -> float:
        return float(self.opened)


def test_the_held_out_tool_loop_answers_in_an_environment_reset_with_each_row(family_models):
    """With an environment, as TRL's loop: one instance per answer, reset with its row's columns, what reset returns
    appended to the prompt, its methods the tools, and get_reward() scoring each answer when it is done."""
    from align.models import load_tokenizer
    from align.tools import answer_with_tools

    tokenizer = load_tokenizer(str(family_models["qwen2_5"]))
    seen = []

    def script(prompt: str) -> str:
        seen.append(prompt)
        if "<tool_response>" in prompt:
            return "The code is " + prompt.rsplit("<tool_response>\n", 1)[1].split("\n", 1)[0] + "."
        if "never" in prompt:
            return "I will not open it."
        return '<tool_call>\n{"name": "open_vault", "arguments": {}}\n</tool_call>'

    prompts = [[{"role": "user", "content": "What is the code?"}], [{"role": "user", "content": "never mind"}]]
    rows = [{"prompt": prompts[0], "code": 41}, {"prompt": prompts[1], "code": 42}]
    answers = answer_with_tools(ScriptedPolicy(tokenizer, script), tokenizer, prompts, [], 2, num_samples=2,
                                environment=Vault, rows=rows, max_new_tokens=64)  # fmt: skip
    assert [[a.text for a in per] for per in answers] == [["The code is 41."] * 2, ["I will not open it."] * 2]
    assert [[a.environment_reward for a in per] for per in answers] == [[1.0, 1.0], [0.0, 0.0]]
    assert answers[0][0].turns[0]["tool_calls"][0]["function"]["name"] == "open_vault"
    assert all("What is the code? (the vault is locked)" in p for p in seen if "code?" in p)
    assert '"name": "open_vault"' in seen[0]  # the environment's method is in the tools' schemas


def eval_stage(family_models: dict[str, Path], models: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"name": "eval", "kind": "eval", "models": models, "tools": ["tools.py:add"], "max_tool_calls": 2,
            "data": {"source": {"files": {"test": [str(family_models["prompts"])]}}, "format": "prompt_only"},
            "max_prompts": 4, "generation": {"max_new_tokens": 8, "batch_size": 4},
            "judges": [{"function": "exact_match"}], **extra}  # fmt: skip


def test_an_eval_with_tools_refuses_a_model_whose_template_cannot_call(family_models, run_cli, tmp_path):
    (tmp_path / "tools.py").write_text(TOOLS)
    models = {"qwen": str(family_models["qwen2_5_wide"]), "gpt2": str(family_models["gpt2"])}
    recipe = write_yaml(tmp_path / "r.yaml", {"name": "e", "stages": [eval_stage(family_models, models)]})
    code, _, err = run_cli(recipe, "--output-dir", tmp_path / "run")
    assert code == 2 and "stages.eval.tools: model gpt2's chat template renders no tool calls" in err, err
    assert "qwen's" not in err


def test_a_one_model_evals_plan_names_no_baseline_and_no_win_rate(family_models, run_cli, tmp_path):
    """One model answering (the tools recipe's `in_its_head`): nothing to compare, so the plan shows no baseline
    and no judge deciding a win rate (it showed the model as its own baseline)."""
    (tmp_path / "tools.py").write_text(TOOLS)
    stage = eval_stage(family_models, {"qwen": str(family_models["qwen2_5_wide"])})
    code, out, err = run_cli(write_yaml(tmp_path / "r.yaml", {"name": "e", "stages": [stage]}), "--dry-run")
    assert code == 0, err
    assert "baseline: none (one model: its scores alone, no win rate)" in out and "decides the win rate" not in out


@pytest.mark.slow
def test_the_eval_stage_answers_through_the_tools(family_models, tmp_path):
    """Every model answers through the tools (TRL's parser, align's loop): generations.jsonl keeps each answer's
    turns and calls, the summary each model's tool figures, and the judges get the turns as TRL gives a reward."""
    from align.loader import load_recipe
    from align.pipeline import run_pipeline

    (tmp_path / "tools.py").write_text(TOOLS)
    stage = eval_stage(family_models, {"a": str(family_models["qwen2_5_wide"]), "b": str(family_models["qwen3"])})
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", {"name": "e", "stages": [stage]}))
    summary = run_pipeline(recipe, output_dir=tmp_path / "run", log_level="warning")[0]
    lines = read_jsonl(tmp_path / "run" / "eval" / "generations.jsonl")
    assert lines and all(line["turns"] and line["turns"][-1]["role"] == "assistant" for line in lines)
    assert all(line["answer"] == line["turns"][-1]["content"] for line in lines)
    for model in summary["metrics"]["models"].values():
        assert {"tool_call_rate", "calls_per_answer", "tool_failure_rate", "malformed_call_rate"} <= set(model)
    report = (tmp_path / "run" / "report.html").read_text()
    assert "<th>calls per answer</th>" in report and "Transcripts: the first 4 prompts" in report


def test_one_model_evaluated_without_tools_says_its_score_and_the_calls_nothing_ran():
    """An eval of a lone model (the tool recipe's `in_its_head`): the verdict gives its figure, and warns where its
    answers are tool calls the eval (without tools:) never ran."""
    from types import SimpleNamespace

    from align.evaluation.generation import Answer
    from align.evaluation.records import figures
    from align.evaluation.verdicts import eval_verdict

    stage = SimpleNamespace(tools=None, judges=[SimpleNamespace(name="exact_match")],
                            generation=SimpleNamespace(seed=0))  # fmt: skip
    call = Answer('<tool_call>\n{"name": "calculator"}\n</tool_call>', (1,), True)
    answers = {"grpo": [[call], [Answer("7", (2,), True)]]}
    scores = {"exact_match": {"grpo": [[0.0], [1.0]]}}
    metrics = figures(stage, "grpo", {"grpo": "@grpo"}, [None, None], answers, scores, {})
    assert metrics["models"]["grpo"]["unrun_tool_call_rate"] == 0.5
    verdict = eval_verdict(metrics)
    assert verdict["reasons"][0].startswith("only grpo was evaluated: mean exact_match 0.500 ["), verdict
    assert verdict["warnings"] == ["grpo: 50% of its answers are a tool call (<tool_call>) that nothing ran: this "
                                   "eval has no tools:, so the call is judged as the answer"]  # fmt: skip


def _add_schema(**change: Any) -> dict[str, Any]:
    from transformers.utils import get_json_schema

    namespace: dict[str, Any] = {}
    exec(TOOLS, namespace)
    schema = get_json_schema(namespace["add"])
    return {**schema, "function": {**schema["function"], **change}}


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (None, "input_tools: the input model was trained to call calculator, none of which this stage offers"),
        ({"description": "Sum two integers."},
         "input_tools: not the schema the input model was trained on (add's description: 'Sum two integers.' "
         "(trained) against 'Add two integers.' (offered)): its calls follow the schema it learned, and a small model "
         "may stop calling"),
        ({"parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "The first."},
                                                          "c": {"type": "number", "description": "The third."}}}},
         "(add's argument 'b' is new; add's argument 'c' is gone)"),
        ({"parameters": {"type": "object", "properties": {"a": {"type": "number", "description": "The first."},
                                                          "b": {"type": "integer", "description": "Another."}},
                         "required": ["a", "b"]}},
         "(add's argument 'a' was number, is integer; add's argument 'b': 'Another.' (trained) against 'The second.' "
         "(offered))"),
        ({}, None),  # the very schema it learned: nothing to say
    ],
    ids=["other_names", "description", "arguments", "argument_type_and_text", "same"],
)  # fmt: skip
def test_a_grpo_stage_says_when_its_tools_are_not_those_its_input_model_was_trained_to_call(
    family_models, run_cli, tmp_path, change, said
):
    """The input model's record (align_prompts.json) against the stage's `tools:`: none of the names it learned, or
    a tool of the same name whose schema (the text in every prompt) is not the one it learned."""
    import shutil

    from align.prompt_format import record_prompt_format

    (tmp_path / "tools.py").write_text(TOOLS)
    model = shutil.copytree(family_models["qwen2_5_wide"], tmp_path / "model")
    recorded = [{"type": "function", "function": {"name": "calculator"}}] if change is None else [_add_schema(**change)]
    record_prompt_format(model, "sft", "sft", "messages", [{"messages": [{"role": "user", "content": "x"}]}],
                         tools={"tools": recorded})  # fmt: skip
    stage = {**grpo_stage(family_models), "model": str(model), "tools": ["tools.py:add"]}
    code, out, err = run_cli(write_yaml(tmp_path / "r.yaml", {"name": "t", "stages": [stage]}), "--dry-run")
    assert code == 0, err
    if said is None:
        assert "input_tools:" not in out, out
    else:
        assert said in out, out


def test_a_transcript_reads_as_calls_results_and_the_final_answer():
    """The report's (and the regressions') view of an answer reached through tools."""
    from align.report import transcripts_table
    from align.verdict import shown_answer

    row = {"prompt_index": 0, "prompt": "user: What is 3 * 4?", "model": "grpo", "sample": 0, "answer": "12",
           "scores": {"exact_match": 1.0}, "turns": [
               {"role": "assistant", "content": "", "tool_calls": [
                   {"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}]},
               {"role": "tool", "name": "multiply", "content": "12"},
               {"role": "assistant", "content": "12"}]}  # fmt: skip
    assert shown_answer(row) == "-> multiply(a=3, b=4)\n<- 12\n12"
    assert shown_answer({"answer": "plain"}) == "plain"
    table = "".join(transcripts_table([row], ["grpo"], "exact_match"))
    assert "-&gt; multiply(a=3, b=4)\n&lt;- 12\n12" in table and "exact_match 1" in table, table
    assert transcripts_table([{**row, "turns": None}], ["grpo"], "exact_match") == []


MULTIPLY_FILE = '''
def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a * b


def _helper():
    return None
'''


def test_the_eval_verdict_warns_of_each_models_tool_trouble_with_its_numbers():
    """An eval's verdict names, per model (the baseline too), calls that failed (by tool), calls that did not parse,
    answers cut by max_tool_calls and a model that never called; a model whose calls all went well has none."""
    from align.evaluation.verdicts import eval_verdict

    def model(**tools: Any) -> dict[str, Any]:
        figures = {"tool_call_rate": 1.0, "calls_per_answer": 1.0, "tool_failure_rate": 0.0,
                   "malformed_call_rate": 0.0, "capped_rate": 0.0, "failed_tools": {}, **tools}  # fmt: skip
        return {**figures, "win_rate": 0.5, "verdict": {"status": "no_difference", "reasons": ["tie"], "warnings": []}}

    metrics = {"baseline": "sft", "models": {
        "sft": model(tool_call_rate=0.0, calls_per_answer=0.0),
        "grpo": model(tool_failure_rate=0.5, failed_tools={"multiply": 3, "made_up": 1}, malformed_call_rate=0.25,
                      capped_rate=0.1),
        "fine": model(),
    }}  # fmt: skip
    warnings = eval_verdict(metrics)["warnings"]
    assert warnings == [
        "sft: no answer called a tool (tool_call_rate 0): it answered every prompt without them",
        "grpo: 50% of its tool calls failed (multiply 3, made_up 1): the tool raised, or the name is no tool's; the "
        "model was given the error as the result (generations.jsonl has each)",
        "grpo: 25% of its answers open a tool call that does not parse: no tool ran, and the text was taken as the "
        "answer",
        "grpo: 10% of its answers were still calling tools when max_tool_calls ran out",
    ], warnings


def test_chat_runs_the_tool_loop_and_shows_each_call(family_models, tmp_path, capsys, monkeypatch):
    """`align chat --tools FILE.py` (its public functions): each call and its result on stderr, the final answer
    alone on stdout; a model whose template cannot call tools is bad input (exit 2)."""
    import align.chat as chat_module
    from align.models import load_tokenizer

    (tmp_path / "mult.py").write_text(MULTIPLY_FILE)
    tokenizer = load_tokenizer(str(family_models["qwen2_5"]))

    def script(prompt: str) -> str:
        if "<tool_response>" in prompt:
            return "The answer is " + prompt.rsplit("<tool_response>\n", 1)[1].split("\n", 1)[0] + "."
        return call(3, 4)

    monkeypatch.setattr(chat_module, "load", lambda saved: (ScriptedPolicy(tokenizer, script), tokenizer))
    code = chat_module.main([str(family_models["qwen2_5"]), "--prompt", "three times four", "--tools",
                             str(tmp_path / "mult.py")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == "The answer is 12."
    assert "[call] multiply(a=3, b=4)" in err and "[result] 12" in err
    monkeypatch.undo()
    assert chat_module.main(["--compare", str(tmp_path), "--prompt", "x", "--tools", "calculator"]) == 2
    assert "error: --compare does not run tools yet" in capsys.readouterr().err
    assert chat_module.main([str(family_models["gpt2"]), "--prompt", "x", "--tools", "calculator"]) == 2
    assert "error: --tools: the" in capsys.readouterr().err
    (tmp_path / "classes.py").write_text("class Shop:\n    pass\n")
    assert chat_module.main([str(family_models["qwen2_5"]), "--prompt", "x", "--tools",
                             str(tmp_path / "classes.py")]) == 2  # fmt: skip
    assert "the file defines no public function to call" in capsys.readouterr().err


def test_a_model_records_the_tools_it_was_trained_to_call_and_chat_runs_them(family_models, tmp_path, capsys,
                                                                              monkeypatch):  # fmt: skip
    """A grpo stage's tools are recorded with its model (schemas, and entries with a file's path made absolute);
    chat runs them without --tools (saying so), --no-tools chats without; the card lists them."""
    import shutil
    from types import SimpleNamespace

    import align.chat as chat_module
    from align.card import prompt_section
    from align.models import load_tokenizer
    from align.prompt_format import read_prompt_format, record_prompt_format
    from align.tools import trained_tools

    (tmp_path / "mult.py").write_text(MULTIPLY_FILE)
    stage = SimpleNamespace(name="grpo", tools=["mult.py:multiply", "calculator"], environment=None)
    tools = trained_tools(stage, None, tmp_path)
    assert tools["tool_entries"] == [f"{(tmp_path / 'mult.py').resolve()}:multiply", "calculator"]
    model = shutil.copytree(family_models["qwen2_5"], tmp_path / "model")
    record_prompt_format(model, "grpo", "grpo", "prompt_only", [{"prompt": [{"role": "user", "content": "x"}]}],
                         tools=tools)  # fmt: skip
    record = read_prompt_format(model)
    assert record.tool_names() == ["multiply", "calculator"]
    assert "Trained to call tools: `multiply(a: integer, b: integer)`; `calculator(expression: string)`" in \
        prompt_section(record)  # fmt: skip
    tokenizer = load_tokenizer(str(model))

    def script(prompt: str) -> str:
        if "<tool_response>" in prompt:
            return "The answer is " + prompt.rsplit("<tool_response>\n", 1)[1].split("\n", 1)[0] + "."
        return call(3, 4) if '"name": "multiply"' in prompt else "no tools here"

    monkeypatch.setattr(chat_module, "load", lambda saved: (ScriptedPolicy(tokenizer, script), tokenizer))
    monkeypatch.chdir(tmp_path.parent)  # the recorded path is absolute: chat runs from anywhere
    assert chat_module.main([str(model), "--prompt", "three times four"]) == 0
    out, err = capsys.readouterr()
    assert "tools: multiply, calculator, as the model was trained to call them (--no-tools" in err
    assert out.strip() == "The answer is 12." and "[call] multiply(a=3, b=4)" in err
    assert chat_module.main([str(model), "--prompt", "three times four", "--no-tools"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "no tools here" and "tools:" not in err


ENVIRONMENT = '''
class Counter:
    """Counts what the policy adds; the reward is how close it got to the row's answer."""

    def __init__(self):
        self.total, self.target = 0, 0

    def reset(self, answer=None, **row):
        self.total, self.target = 0, len(str(answer or ""))
        return None

    def add(self, n: int) -> int:
        """Add n to the running total.

        Args:
            n: How much to add.
        """
        self.total += n
        return self.total

    def get_reward(self) -> float:
        return 1.0 / (1 + abs(self.total - self.target))


class NoReward:
    def reset(self, **row):
        return None

    def add(self, n: int) -> int:
        """Add.

        Args:
            n: How much.
        """
        return n


class NoReset:
    def add(self, n: int) -> int:
        """Add.

        Args:
            n: How much.
        """
        return n


class Undocumented:
    def reset(self, **row):
        return None

    def add(self, n: int) -> int:
        return n
'''


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"environment": "env.py:NoReset"}, "stages.grpo.environment: env.py:NoReset has no reset method"),
        ({"environment": "env.py:Undocumented"}, "stages.grpo.environment: env.py:Undocumented.add: Cannot generate"),
        ({"kind": "rloo", "environment": "env.py:Counter"}, "stages.grpo.environment: TRL's RLOOTrainer takes no"),
        # Nothing to score the answers: no rewards, and no environment or one without get_reward().
        ({"rewards": [], "tools": ["tools.py:add"]}, "stages.grpo.rewards: nothing scores the answers"),
        (
            {"rewards": [], "environment": "env.py:NoReward", "tools": None},
            "stages.grpo.environment: NoReward has no get_reward() and the stage no rewards",
        ),
    ],  # fmt: skip
)
def test_bad_environments_stop_before_stage_one(family_models, run_cli, tmp_path, change, error):
    (tmp_path / "tools.py").write_text(TOOLS)
    (tmp_path / "env.py").write_text(ENVIRONMENT)
    stage = {**grpo_stage(family_models), **change}
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", {"name": "t", "stages": [stage]}), "--output-dir",
                           tmp_path / "run")  # fmt: skip
    assert code == 2 and error in err, err


@pytest.mark.slow
def test_grpo_with_an_environment_trains_and_its_reward_is_shown_beside_the_rewards(family_models, run_cli, tmp_path):
    """`environment: env.py:Counter` reaches TRL's environment_factory: the plan shows its tool and that its
    get_reward is a reward TRL adds at weight 1; the stage trains, TRL logging the environment's reward."""
    (tmp_path / "tools.py").write_text(TOOLS)
    (tmp_path / "env.py").write_text(ENVIRONMENT)
    stage = grpo_stage(family_models, environment="env.py:Counter", tools=None)
    recipe = write_yaml(tmp_path / "r.yaml", {"name": "env", "seed": 0, "stages": [stage]})
    code, out, err = run_cli(recipe, "--output-dir", tmp_path / "run", "--dry-run")
    assert code == 0, err
    assert "tools: add(n: integer)" in out
    assert "environment: Counter: reset(**row) before each rollout; its methods are tools; get_reward() is a reward " \
           "TRL adds at weight 1 (logged as Counter), beside rewards:" in out  # fmt: skip
    assert "reward_weights: [1.0]  (align (from rewards:): each entry's weight, in order; TRL appends 1.0 for " \
           "Counter.get_reward())" in out  # fmt: skip
    # Without rewards: the environment's get_reward() alone scores, in training and in the held-out measure.
    alone = write_yaml(tmp_path / "alone.yaml", {"name": "env", "seed": 0, "stages": [{**stage, "rewards": []}]})
    code, out, err = run_cli(alone, "--output-dir", tmp_path / "run", "--dry-run")
    assert code == 0, err
    assert "rewards: Counter.get_reward() (weight 1), the environment's own" in out
    assert "get_reward() is the only reward (weight 1, logged as Counter)" in out
    code, _, err = run_cli(alone, "--output-dir", tmp_path / "run")
    assert code == 0, err
    rows = read_jsonl(tmp_path / "run" / "grpo" / "metrics.jsonl")
    assert any("rewards/Counter/mean" in row for row in rows), rows[0]
    summary = json.loads((tmp_path / "run" / "grpo" / "summary.json").read_text())
    held_out = summary["metrics"]["rewards"]["Counter"]
    # Counter's reward is 1 / (1 + |total - len(answer)|): in (0, 1], never the 0 of an environment left out; the
    # held-out reward is it alone.
    assert 0 < held_out["before"] <= 1 and 0 < held_out["after"] <= 1, held_out
    assert summary["metrics"]["reward"] == pytest.approx(held_out["after"])
    assert {"tool_call_rate", "calls_per_answer", "tool_failure_rate"} <= set(summary["metrics"])


SLOW_REWARD = '''
import time


def near(prompts, completions, answer, trainer_state=None, **kwargs):
    """Dense, and slow after checkpoint-2 (0.3 s a training call) so that a run can be killed before it ends."""
    if trainer_state is not None and trainer_state.global_step >= 2:
        time.sleep(0.3)
    return [1.0 / (1 + abs(len(c[-1]["content"]) - len(str(a)))) for c, a in zip(completions, answer)]
'''


@pytest.mark.slow
def test_grpo_with_tools_killed_mid_stage_resumes_to_the_unbroken_runs_rewards_and_weights(
    family_models, caller, tmp_path, run_cli
):
    """SIGKILL to the whole process group after checkpoint-2 of a grpo stage with tools; run again, it resumes
    from that checkpoint and ends with the rewards of every logged step, and the weights, of a run never stopped."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    (tmp_path / "tools.py").write_text(STEADY + SLOW_REWARD)
    stage = {**grpo_stage(family_models, rewards=[{"function": "tools.py:near"}], tools=["tools.py:lookup"],
                          max_tool_calls=1), "model": str(caller)}  # fmt: skip
    # A policy that calls in every answer (at 0.5, where the tiny caller's calls parse every time), whose answer
    # after the tool's result the reward reads.
    stage["train"].update(max_steps=6, save_steps=2, eval_steps=6, temperature=0.5, max_completion_length=48)
    path = write_yaml(tmp_path / "r.yaml", {"name": "resume", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}},
                                            "stages": [stage]})  # fmt: skip
    code, _, err = run_cli(path, "--output-dir", tmp_path / "whole")
    assert code == 0, err
    cut = tmp_path / "cut"
    command = [sys.executable, "-m", "align.run", str(path), "--output-dir", str(cut)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    kill_after(proc, cut / "grpo/checkpoints/checkpoint-2/trainer_state.json")
    code, _, err = run_cli(path, "--output-dir", cut)
    assert code == 0 and "resuming from checkpoint-" in err, err

    def rewards(run: Path) -> dict[int, float]:
        rows = read_jsonl(run / "grpo" / "metrics.jsonl")
        return {r["step"]: r["reward"] for r in rows if r["split"] == "train" and "reward" in r}

    calls = [r["tools/call_frequency"] for r in read_jsonl(cut / "grpo" / "metrics.jsonl") if r["split"] == "train"
             and "tools/call_frequency" in r]  # fmt: skip
    assert len(calls) == 6 and min(calls) >= 0.75, calls  # the tool ran before the kill and after the resume
    whole, resumed = rewards(tmp_path / "whole"), rewards(cut)
    assert sorted(whole) == sorted(resumed) == list(range(1, 7))
    assert all(abs(whole[s] - resumed[s]) <= 1e-6 for s in whole), (whole, resumed)
    a, b = (load_file(str(run / "grpo" / "model" / "model.safetensors")) for run in (tmp_path / "whole", cut))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_the_builtin_multiplication_task_needs_its_tool_and_holds_each_pair_out_of_training():
    """Every held-out pair is out of training in either order; each transcript calls the builtin `calculator` with
    the question's expression, and its answer is the tool's result (the equation); the `tools` column is that tool's
    schema on one row in eight, null on the others."""
    from transformers.utils import get_json_schema

    from align.builtin import SCHEMA_EVERY, multiplication
    from align.tools import resolve_tools

    splits = multiplication()

    def pair(messages: list[dict[str, Any]]) -> tuple[int, ...]:
        expression = json.loads(messages[1]["tool_calls"][0]["function"]["arguments"])["expression"]
        return tuple(sorted(int(n) for n in expression.split(" * ")))

    pairs = {name: {pair(m) for m in rows["messages"]} for name, rows in splits.items()}
    assert not pairs["train"] & (pairs["test"] | pairs["validation"]) and len(pairs["test"]) > 500
    (tool,) = resolve_tools(["calculator"], Path("."), "tools")
    for i in range(0, 8000, 997):
        messages, answer = splits["train"]["messages"][i], splits["train"]["answer"][i]
        expression = json.loads(messages[1]["tool_calls"][0]["function"]["arguments"])["expression"]
        a, b = map(int, expression.split(" * "))
        assert messages[0]["content"] == f"What is {a} * {b}?" == splits["train"]["prompt"][i][0]["content"]
        assert messages[2]["content"] == tool(expression) == answer == messages[3]["content"]
        assert answer == f"{a} * {b} = {a * b}" and splits["train"]["product"][i] == str(a * b)
    tools = splits["train"]["tools"]
    assert json.loads(tools[0]) == [get_json_schema(tool)] and tools[1] is None
    assert sum(t is not None for t in tools) == -(-len(tools) // SCHEMA_EVERY)


# recipes/tools.yaml, short: every stage a few steps, fewer prompts everywhere (the chain's figures need the full
# recipe: docs/tools.md). Its sft model does not call yet (that takes about 150 steps, 80 s); the tests of what
# happens to calls (a tool that raises, resuming) use the tiny `caller` instead.
SHORT_TOOLS = ["stages.sft.train.max_steps=30", "stages.sft.train.eval_steps=30", "stages.sft.data.max_eval_rows=8",
               "stages.grpo.train.max_steps=2", "stages.grpo.train.logging_steps=1", "stages.grpo.train.eval_steps=2",
               "stages.grpo.data.max_eval_rows=4", "stages.grpo.train.per_device_eval_batch_size=8",
               "stages.grpo.measure.prompts=4", "stages.eval.max_prompts=8",
               "stages.in_its_head.max_prompts=8", "stages.sft.generations=0", "stages.grpo.generations=0",
               "stages.grpo.train.max_completion_length=32"]  # fmt: skip


@pytest.mark.slow
def test_the_shipped_tools_recipe_runs_short_and_each_stage_says_how_its_models_used_the_tool(tmp_path, run_cli):
    """recipes/tools.yaml with --set for fewer steps runs end to end: grpo logs TRL's tool figures, the eval gives
    both models' tool figures and the report their transcripts, the lone model without tools gets its score in the
    verdict; the sft model records the schemas of its transcripts, the grpo model the calculator it can run."""
    out = tmp_path / "run"
    code, stdout, err = run_cli(REPO / "recipes" / "tools.yaml", "--output-dir", out,
                                *(x for s in SHORT_TOOLS for x in ("--set", s)))  # fmt: skip
    assert code == 0, err
    rows = read_jsonl(out / "grpo" / "metrics.jsonl")
    assert [r for r in rows if r["split"] == "train" and "tools/call_frequency" in r and "tools/failure_frequency" in r]
    models = json.loads((out / "eval" / "summary.json").read_text())["metrics"]["models"]
    assert set(models) == {"sft", "grpo"} and all("tool_call_rate" in m and "failed_tools" in m
                                                  for m in models.values()), models  # fmt: skip
    head = json.loads((out / "in_its_head" / "summary.json").read_text())
    assert head["verdict"]["reasons"][0].startswith("only grpo was evaluated: mean exact_match 0.000")
    # Its warnings (the point of that stage: calls nothing ran) are logged too, not only kept in summary.json.
    assert all(f"verdict warning: {w}" in err for w in head["verdict"]["warnings"]), err
    assert "Transcripts: the first 5 prompts" in (out / "report.html").read_text()
    record = json.loads((out / "grpo" / "model" / "align_prompts.json").read_text())
    assert record["tool_entries"] == ["calculator"] and record["tools"][0]["function"]["name"] == "calculator"
    # The sft model learned the calls from transcripts: their schemas are recorded, no function to run.
    record = json.loads((out / "sft" / "model" / "align_prompts.json").read_text())
    assert [t["function"]["name"] for t in record["tools"]] == ["calculator"] and "tool_entries" not in record
