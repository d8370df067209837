"""Thinking models: a template's reasoning block found from what it renders, the `thinking:` switch, rewards that get
the answer and the reasoning apart, and the alarm and verdict for thoughts cut off by `max_completion_length`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests import families
from tests.conftest import write_yaml


def qwen3_tokenizer(family_models: dict[str, Path], template: str | None = None) -> Any:
    from align.models import load_tokenizer

    tokenizer = load_tokenizer(str(family_models["qwen3"]))
    if template is not None:
        tokenizer.chat_template = families.trl_template(template)
    return tokenizer


@pytest.mark.parametrize(
    ("template", "thinks"),
    [("qwen3", ("enable_thinking", False)), ("deepseek_r1_distill", (None, True)), ("qwen3_5_think",
     ("enable_thinking", True)), ("qwen2_5", None), ("llama3_1", None), ("phi3", None), ("gemma3", None)],
)  # fmt: skip
def test_a_template_thinks_by_what_it_renders(family_models, template, thinks):
    """Qwen 3 renders `reasoning_content` between <think> tags and switches the block with `enable_thinking`; an R1
    distill's generation prompt opens <think> itself; Qwen 2.5, Llama 3.1, Phi-3 and Gemma 3 do not think."""
    from align.thinking import thinking_of

    found = thinking_of(qwen3_tokenizer(family_models, template))
    if thinks is None:
        assert found is None
    else:
        assert (found.opens, found.closes, found.switch, found.prompt_opens) == ("<think>", "</think>", *thinks)


def test_rewards_get_the_answer_after_the_reasoning_and_raw_gets_it_all(family_models):
    """exact_match scores the answer after </think>: a right answer after a thought scores 1 where the whole
    completion scores 0; a function gets the reasoning as `reasoning`; `raw: true` gets the completion as generated;
    the first function logs the share of cut thoughts."""
    from align.rewards import answers_apart, exact_match, guarded
    from align.thinking import thinking_of

    thinking = thinking_of(qwen3_tokenizer(family_models))
    completions = [[{"role": "assistant", "content": text}] for text in
                   ("<think>\nthe last word is blue\n</think>\n\nblue", "<think>\nthe last", "red")]  # fmt: skip
    columns = {"answer": ["blue", "blue", "red"]}
    logged: dict[str, float] = {}
    score = guarded(answers_apart(exact_match(), thinking, health=True), "exact_match")
    assert score(prompts=[[]] * 3, completions=completions, log_metric=logged.__setitem__, **columns) == [1.0, 0.0, 1.0]
    assert logged == {"thinking/cut_rate": pytest.approx(1 / 3), "thinking/reasoning_chars": pytest.approx(29 / 3)}
    assert exact_match()(prompts=[[]] * 3, completions=completions, **columns) == [0.0, 0.0, 1.0]  # raw: 0 for it
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(completions=[c[-1]["content"] for c in completions], reasoning=kwargs.get("reasoning"))
        return [0.0] * len(completions)

    answers_apart(spy, thinking)(prompts=[[]] * 3, completions=completions)
    assert seen == {"completions": ["blue", "", "red"], "reasoning": ["the last word is blue", "the last", ""]}
    answers_apart(spy, thinking, raw=True)(prompts=[[]] * 3, completions=completions)
    assert seen["completions"][0].startswith("<think>") and seen["reasoning"] is None


def grpo_stage(family_models: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {"name": "grpo", "kind": "grpo", "model": str(family_models["qwen3"]), "generations": 0,
            "data": {"source": {"files": [str(family_models["prompts"])]}, "format": "prompt_only",
                     "valid_fraction": 0.2},
            "rewards": [{"function": "exact_match"}], "measure": {"prompts": 4, "samples": 2},
            "train": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4,
                      "max_completion_length": 6, "logging_steps": 1}, **extra}  # fmt: skip


def test_thinking_off_reaches_the_generation_prompt_in_the_plan(family_models, run_cli, tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", {"name": "t", "stages": [grpo_stage(family_models, thinking=False)]})
    code, out, err = run_cli(recipe, "--output-dir", tmp_path / "run", "--dry-run")
    assert code == 0, err
    assert "chat_template_kwargs: {'enable_thinking': False}  (align (thinking: false))" in out
    assert "thinking: off: reasoning in <think> ... </think>" in out
    assert "<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'" in out  # the rendered generation prompt


@pytest.mark.parametrize(
    ("model", "extra", "error"),
    [
        ("qwen2_5", {"thinking": True}, "stages.grpo.thinking: true: the chat template does not think"),
        ("qwen3", {"reasoning_column": True}, "stages.grpo.data: a column named 'reasoning'"),
        (
            "qwen3",
            {"chat_template": "deepseek_r1_distill", "thinking": False},
            "stages.grpo.thinking: false: the chat template has no switch for it (its generation prompt opens",
        ),
    ],  # fmt: skip
)
def test_bad_thinking_input_stops_before_stage_one(family_models, run_cli, tmp_path, model, extra, error):
    stage = grpo_stage(family_models, **{k: v for k, v in extra.items() if k != "reasoning_column"})
    stage["model"] = str(family_models[model])
    if extra.get("reasoning_column"):
        rows = [
            {**json.loads(line), "reasoning": "because"} for line in family_models["prompts"].read_text().splitlines()
        ]
        data = tmp_path / "prompts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        stage["data"]["source"]["files"] = [str(data)]
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", {"name": "t", "stages": [stage]}), "--output-dir",
                           tmp_path / "run")  # fmt: skip
    assert code == 2, err
    assert error in err and err.count("error:") == 1, err
    assert not (tmp_path / "run" / "grpo").exists()


RECORDER = """
import json

def record(prompts, completions, reasoning, **kwargs):
    with open(__file__ + ".jsonl", "a") as out:
        for c, r in zip(completions, reasoning or [None] * len(completions)):
            answer = c[-1]["content"] if isinstance(c, list) else c
            out.write(json.dumps({"answer": answer, "reasoning": r}) + "\\n")
    return [0.0] * len(completions)
"""


@pytest.mark.slow
def test_thoughts_cut_by_max_completion_length_fire_the_alarm_and_the_verdict_names_them(family_models, tmp_path):
    """A template whose generation prompt opens <think> (Qwen 3.5's thinking one) and 6 new tokens: no answer closes
    its thought. TRL's own rollouts reach the rewards as answer "" and the reasoning apart; the cut-thoughts alarm
    fires while training; the summary counts every held-out answer cut; the verdict names the cause and the fix."""
    from align.loader import load_recipe
    from align.pipeline import run_pipeline
    from align.rewards import exact_match as raw_exact_match
    from tests.conftest import captured_trainers

    (tmp_path / "recorder.py").write_text(RECORDER)
    stage = grpo_stage(family_models, chat_template="qwen3_5_think", alarms={"window": 1})
    stage["rewards"].append({"function": "recorder.py:record", "weight": 0.0})
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", {"name": "cut", "seed": 0, "stages": [stage]}))
    with captured_trainers() as trainers:
        summary = run_pipeline(recipe, output_dir=tmp_path / "run", log_level="warning")[0]
    # The exact_match TRL called in this stage scores the answer after the reasoning: a right answer after a thought
    # scores 1, where the completion as written (the prompt opened <think>) scores 0.
    exact_match = trainers["grpo"].reward_funcs[0]
    thought = [[{"role": "assistant", "content": "the last word is blue\n</think>\n\nblue"}]]
    assert exact_match(prompts=[[]], completions=thought, answer=["blue"]) == [1.0]
    assert raw_exact_match()(prompts=[[]], completions=thought, answer=["blue"]) == [0.0]
    seen = [json.loads(line) for line in (tmp_path / "recorder.py.jsonl").read_text().splitlines()]
    # A random policy closes a thought now and then (</think> is one of its 400 tokens): nearly every one is cut.
    cut = [r for r in seen if r["answer"] == ""]
    assert len(cut) >= 0.8 * len(seen) and sum(bool(r["reasoning"]) for r in cut) >= 16  # TRL's rollouts
    metrics = summary["metrics"]
    assert metrics["cut_thought_rate_before"] >= 0.8 and metrics["cut_thought_rate"] >= 0.8
    assert metrics["reasoning_length"] > 0
    verdict = summary["verdict"]
    assert any(w.startswith("cut thoughts: ") and "% of answers for 1 log never closed their reasoning" in w
               for w in verdict["warnings"]), verdict  # fmt: skip
    assert any(r.startswith("cut thoughts: ") and "% of held-out answers before training never closed their "
               "reasoning within max_completion_length=6" in r and "thinking: false" in r
               for r in verdict["reasons"]), verdict  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("thinking/cut_rate", 0) >= 0.5 for r in rows)


REASONED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "red blue"},
    {"role": "assistant", "content": "blue", "reasoning_content": "the last word is blue"},
]


@pytest.mark.parametrize("thinking", [False, True])
def test_sft_masks_train_the_reasoning_or_leave_the_empty_block_to_the_prompt(family_models, thinking):
    """With `thinking: true` an assistant's `reasoning_content` is rendered by the template and trained with the
    answer; with `thinking: false` the reasoning is dropped, and the empty block the template still writes sits on
    the prompt side of the mask (the generation prompt writes it under thinking: false)."""
    from types import SimpleNamespace

    from align.stages.sft import loss_flags, masked_ids, render_mask

    tokenizer = qwen3_tokenizer(family_models)
    loss = loss_flags(SimpleNamespace(train={}, name="sft", thinking=thinking), "messages", tokenizer)
    ids, mask = masked_ids({"messages": REASONED}, tokenizer, loss)
    shown = render_mask(ids, mask, tokenizer)
    if thinking:
        assert shown.endswith("<|im_start|>assistant\n[[<think>\nthe last word is blue\n</think>\n\nblue<|im_end|>\n]]")
    else:
        assert shown.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n[[blue<|im_end|>\n]]"), shown
    assert "Be brief." not in tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])


def test_thinking_true_on_a_template_that_cannot_think_is_refused_in_sft(family_models, run_cli, tmp_path):
    stage = {"name": "sft", "kind": "sft", "model": str(family_models["llama3"]), "thinking": True,
             "data": {"source": {"files": [str(family_models["conv"])]}, "format": "messages",
                      "valid_fraction": 0.1}, "train": {"max_steps": 1}}  # fmt: skip
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", {"name": "t", "stages": [stage]}), "--output-dir",
                           tmp_path / "run")  # fmt: skip
    assert code == 2 and "stages.sft.thinking: true: the chat template does not think" in err, err
    assert "hint: remove thinking: (the template decides), or use a template that thinks" in err


def thinking_copy(family_models: dict[str, Path], template: str, folder: Path) -> Path:
    """The Qwen 3 fixture saved again with another of TRL's templates (as a release that ships it would be)."""
    import shutil

    shutil.copytree(family_models["qwen3"], folder)
    config = folder / "tokenizer_config.json"
    (folder / "chat_template.jinja").write_text(families.trl_template(template))
    settings = json.loads(config.read_text())
    settings.pop("chat_template", None)
    config.write_text(json.dumps(settings))
    return folder


@pytest.mark.slow
def test_the_eval_stage_keeps_reasoning_apart_and_judges_the_answer(family_models, tmp_path):
    """Two models answer: Qwen 3, and a copy whose template opens <think> in its generation prompt (Qwen 3.5's
    thinking one, which has no switch to turn it off). generations.jsonl keeps each answer and its reasoning apart;
    the judges get the answer, and the reasoning; the summary counts cut thoughts per model."""
    from align.loader import load_recipe
    from align.pipeline import run_pipeline

    opens = thinking_copy(family_models, "qwen3_5_think", tmp_path / "opens")
    # A judge receives `reasoning` where a model's template thinks (the check before the stage calls it without).
    (tmp_path / "recorder.py").write_text(RECORDER.replace("reasoning, **kwargs", "reasoning=None, **kwargs"))
    stage = {"name": "eval", "kind": "eval", "models": {"qwen3": str(family_models["qwen3"]), "opens": str(opens)},
             "data": {"source": {"files": {"test": [str(family_models["prompts"])]}}, "format": "prompt_only"},
             "max_prompts": 4, "generation": {"max_new_tokens": 6, "batch_size": 4},
             "judges": [{"function": "recorder.py:record"}, {"function": "exact_match"}]}  # fmt: skip
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", {"name": "e", "stages": [stage]}))
    summary = run_pipeline(recipe, output_dir=tmp_path / "run", log_level="warning")[0]
    lines = [json.loads(line) for line in (tmp_path / "run" / "eval" / "generations.jsonl").read_text().splitlines()]
    opened = [line for line in lines if line["model"] == "opens"]
    assert opened and all("reasoning" in line and line["thought_cut"] == (line["answer"] == "") for line in opened)
    models = summary["metrics"]["models"]
    assert models["opens"]["cut_thought_rate"] >= 0.5 and "reasoning_length" in models["opens"]
    assert any(w.startswith("opens: cut thoughts: ") for w in summary["verdict"]["warnings"]), summary["verdict"]
    seen = [json.loads(line) for line in (tmp_path / "recorder.py.jsonl").read_text().splitlines()]
    judged = {line["answer"] for line in lines}
    assert {r["answer"] for r in seen[-len(lines) :]} <= judged  # the judge got the answers as written, apart


def test_the_eval_stage_refuses_thinking_for_a_model_that_cannot(family_models, run_cli, tmp_path):
    stage = {"name": "eval", "kind": "eval", "thinking": True, "models": {"llama": str(family_models["llama3"])},
             "data": {"source": {"files": {"test": [str(family_models["prompts"])]}}, "format": "prompt_only"},
             "judges": [{"function": "exact_match"}]}  # fmt: skip
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", {"name": "e", "stages": [stage]}), "--output-dir",
                           tmp_path / "run")  # fmt: skip
    assert code == 2 and "stages.eval.thinking: true: model llama's chat template does not think" in err, err


def test_chat_shows_the_reasoning_apart_and_switches_thinking(family_models, tmp_path, capsys):
    """`align chat --prompt`: the answer alone on stdout, a thinking model's reasoning apart on stderr; `--thinking`
    on a model that cannot think is bad input (exit 2)."""
    from align.chat import main as chat

    opens = thinking_copy(family_models, "qwen3_5_think", tmp_path / "opens")
    assert chat([str(opens), "--prompt", "red blue", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert "[reasoning (cut: it never closed within --max-new-tokens)]" in err
    assert "<think>" not in out
    assert chat([str(family_models["qwen3"]), "--prompt", "red", "--max-new-tokens", "4", "--thinking", "off"]) == 0
    assert "thinking: off; the reasoning is shown apart, on stderr" in capsys.readouterr().err
    assert chat([str(family_models["llama3"]), "--prompt", "red", "--thinking", "on"]) == 2
    assert "error: --thinking on: this model's chat template does not think" in capsys.readouterr().err


def test_the_switch_decides_whether_the_generation_prompt_opened_the_block(family_models):
    """Qwen 3.5's thinking template opens <think> in its generation prompt, and closes it empty under
    `enable_thinking: false`: then an answer is an answer, not a thought cut short. `raw: true` gets the tag the
    prompt opened back in front, so TRL's think_format_reward scores a well-formed completion 1."""
    from trl.rewards import think_format_reward

    from align.rewards import answers_apart
    from align.thinking import split_reasoning, thinking_of

    tokenizer = qwen3_tokenizer(family_models, "qwen3_5_think")
    assert thinking_of(tokenizer).prompt_opens and thinking_of(tokenizer, True).prompt_opens
    off = thinking_of(tokenizer, False)
    assert not off.prompt_opens and split_reasoning("blue", off) == ("blue", None, False)
    assert split_reasoning("blue", thinking_of(tokenizer)) == ("", "blue", True)
    raw = answers_apart(think_format_reward, thinking_of(tokenizer), raw=True)
    written = [[{"role": "assistant", "content": "I reason.\n</think>\n\nblue"}]]
    assert raw(prompts=[[]], completions=written) == [1.0]
    assert think_format_reward(completions=written) == [0.0]  # as generated, without the tag the prompt wrote


def test_a_model_remembers_the_thinking_it_was_trained_with(family_models, tmp_path, capsys):
    """align_prompts.json keeps a stage's `thinking:`; chat follows it unless --thinking says otherwise."""
    import shutil

    from align.chat import main as chat
    from align.prompt_format import read_prompt_format, record_prompt_format

    model = tmp_path / "model"
    shutil.copytree(family_models["qwen3"], model)
    record_prompt_format(model, "grpo", "grpo", "prompt_only", [{"prompt": [{"role": "user", "content": "x"}]}], False)
    assert read_prompt_format(model).thinking is False
    assert chat([str(model), "--prompt", "red", "--max-new-tokens", "2"]) == 0
    assert "thinking: off (as trained)" in capsys.readouterr().err
