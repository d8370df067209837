"""grpo and rloo: a user's own prompts and reward functions train, the data's other columns reach the rewards, a
reward that teaches nothing is named as such, and a broken reward ends with one line naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_MODEL, write_yaml

REWARDS = '''
def near(prompts, completions, answer, **kwargs):
    """Dense on purpose, for a random model: the closer the completion's length in characters to the answer's
    number, the higher (it needs the data's `answer` column)."""
    return [1.0 / (1 + abs(len(c) - int(a))) for c, a in zip(completions, answer)]


def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def boom(prompts, completions, trainer_state=None, **kwargs):
    if trainer_state is not None and trainer_state.global_step >= 2:
        raise RuntimeError("the grader is down")
    return [0.0] * len(completions)


def short(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)
'''
TRAIN = {"max_steps": 4, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "num_generations": 4,
         "max_completion_length": 6, "learning_rate": 1.0e-3, "logging_steps": 1, "eval_steps": 4}  # fmt: skip


def online(name: str, kind: str, reward: str, **train: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "model": dict(TINY_MODEL), "generations": 1,
            "data": {"source": {"files": ["prompts.jsonl"]}, "format": "prompt_only", "valid_fraction": 0.2},
            "rewards": [{"function": reward}], "train": {**TRAIN, **train}}  # fmt: skip


def recipe(stages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "rl", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": stages}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A user's folder: prompts with an `answer` column and a `topic`, and a reward file beside the recipe."""
    root = tmp_path_factory.mktemp("rl")
    rows = [{"prompt": f"What is {a} + {b}? Answer:", "answer": str(a + b), "topic": "sums"}
            for a in range(8) for b in range(8)]  # fmt: skip
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "rewards.py").write_text(REWARDS)
    return root


@pytest.fixture(scope="module")
def trained(folder) -> Path:
    from align.run import main

    stages = [
        online("grpo", "grpo", "rewards.py:near"),
        online("grpo_constant", "grpo", "rewards.py:constant"),
        online("rloo", "rloo", "rewards.py:near"),
        online("rloo_constant", "rloo", "rewards.py:constant"),
    ]
    assert main([str(write_yaml(folder / "r.yaml", recipe(stages))), "--output-dir", str(folder / "run")]) == 0
    return folder / "run"


def summary(run: Path, name: str) -> dict[str, Any]:
    return json.loads((run / name / "summary.json").read_text())


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_a_users_prompts_and_reward_file_train_and_the_columns_reach_the_reward(trained, name):
    result = summary(trained, name)
    assert result["status"] == "completed"
    metrics = result["metrics"]
    for key in ("reward_before", "reward", "completion_length", "clipped_ratio"):
        assert isinstance(metrics[key], float), key
    scored = metrics["rewards"]["rewards.py:near"]
    assert 0.0 < scored["before"] <= 1.0, "the reward read the `answer` column on every completion"
    assert result["verdict"]["status"] in ("improved", "did_not_learn", "got_worse")
    assert result["verdict"]["reasons"][0].startswith(f"reward {metrics['reward_before']:.2f} → ")
    rows = [json.loads(line) for line in (trained / name / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/rewards_py_near/mean" in r for r in rows if r["split"] == "train")


@pytest.mark.parametrize("name", ["grpo_constant", "rloo_constant"])
def test_a_constant_reward_is_not_improved_and_names_the_missing_variance(trained, name):
    verdict = summary(trained, name)["verdict"]
    assert verdict["status"] != "improved"
    assert any("no learning signal: 100% of held-out prompts got the same reward" in r for r in verdict["reasons"])
    assert any(w.startswith("zero reward variance: 100% of groups") for w in verdict["warnings"]), verdict


def test_a_reward_that_raises_while_training_stops_the_stage_naming_it_and_the_step(folder, run_cli):
    path = write_yaml(folder / "boom.yaml", recipe([online("grpo", "grpo", "rewards.py:boom")]))
    code, _, err = run_cli(path, "--output-dir", folder / "boom")
    assert code == 1
    assert "error: reward rewards.py:boom raised RuntimeError at step 3: the grader is down" in err, err
    assert "Traceback" not in err
    assert summary(folder / "boom", "grpo")["status"] == "failed"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rewards": [{"function": "rewards.py:short"}]},
         "stages.grpo.rewards[0]: rewards.py:short returned 1 values for 2 completions"),
        ({"rewards": [{"function": "rewards.py:nope"}]}, "stages.grpo.rewards[0].function: rewards.py has no function"),
        ({"rewards": [{"function": "grader.py:near"}]}, "stages.grpo.rewards[0].function: no file grader.py"),
        ({"rewards": [{"function": "exact_mtach"}]}, "no reward named 'exact_mtach' (did you mean 'exact_match'?)"),
        ({"rewards": [{"function": "think_format_reward"}]}, "think_format_reward reads message-list completions"),
        ({"rewards": [{"function": "accuracy_reward"}]}, "accuracy_reward needs math-verify, which is not installed"),
        ({"rewards": []}, "stages.grpo.rewards"),
        ({"rewards": [{"reward_model": "@nope"}]}, "rewards.0.reward_model: '@nope' is not an earlier stage"),
        ({"train": {**TRAIN, "reward_weights": [1.0]}}, "stages.grpo.train.reward_weights: each entry of `rewards:`"),
        ({"train": {**TRAIN, "num_generations": 3}}, "does not divide into groups of num_generations 3"),
        ({"train": {**TRAIN, "use_vllm": True}}, "stages.grpo.train.use_vllm: vllm is not installed"),
        ({"data": {"card": "python-docs"}}, "'text' cannot feed a grpo stage (use prompt_only)"),
    ],
)  # fmt: skip
def test_reward_and_batch_mistakes_are_refused_before_training(folder, run_cli, change, message):
    stage = {**online("grpo", "grpo", "rewards.py:near"), **change}
    code, _, err = run_cli(write_yaml(folder / "bad.yaml", recipe([stage])), "--dry-run")
    assert code == 2 and message in err, err
    assert "Traceback" not in err


def test_exact_match_reads_the_final_answer():
    from align.rewards import exact_match, final_answer

    assert final_answer(" 19\nand more") == "19" and final_answer("so #### 42.") == "42"
    assert final_answer("the sum is \\boxed{7}") == "7"
    assert exact_match()(prompts=["q"] * 3, completions=[" 5", "5.", " 6"], answer=["5", "5", "5"]) == [1.0, 1.0, 0.0]


def test_the_builtin_arithmetic_task_keeps_every_held_out_problem_out_of_training():
    from align.builtin import arithmetic

    splits = arithmetic()
    train = {tuple(sorted(map(int, p.removeprefix("What is ").removesuffix("? Answer:").split(" + "))))
             for p in splits["train"]["prompt"]}  # fmt: skip
    for split in ("validation", "test"):
        held = {tuple(sorted(map(int, p.removeprefix("What is ").removesuffix("? Answer:").split(" + "))))
                for p in splits[split]["prompt"]}  # fmt: skip
        assert held and not held & train, f"{split}: problems (in either order) also in train"
    assert len(splits["train"]["prompt"]) > 6 * len(splits["test"]["prompt"])


def test_the_report_draws_the_reward_and_its_health_and_heads_each_stage_by_its_reward(trained):
    from align.report import build_report

    html = build_report(trained).read_text()
    assert "<h3>Reward and its health</h3>" in html
    row = next(r for r in html.split("<tr>") if r.startswith("<td>grpo</td><td>grpo</td>"))
    assert "<td>reward</td>" in row, row
