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


def also_constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def boom(prompts, completions, trainer_state=None, **kwargs):
    if trainer_state is not None and trainer_state.global_step >= 2:
        raise RuntimeError("the grader is down")
    return [0.0] * len(completions)


def short(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def strict(prompts, completions, answer):
    return [float(c == a) for c, a in zip(completions, answer)]


def counts_steps(prompts, completions, trainer_state, **kwargs):
    return [float(trainer_state.global_step)] * len(completions)


def needs_level(prompts, completions, level, **kwargs):
    return [0.0] * len(completions)
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

    # The constant stages have two rewards of 1.0, weighted 1 and 0.25: what TRL logs as the training reward shows
    # whether the weights reached it (1.25) or not (2.0).
    constants = [{"function": "rewards.py:constant"}, {"function": "rewards.py:also_constant", "weight": 0.25}]
    stages = [
        online("grpo", "grpo", "rewards.py:near"),
        {**online("grpo_constant", "grpo", ""), "rewards": constants},
        online("rloo", "rloo", "rewards.py:near"),
        {**online("rloo_constant", "rloo", ""), "rewards": constants},
    ]
    assert main([str(write_yaml(folder / "r.yaml", recipe(stages))), "--output-dir", str(folder / "run")]) == 0
    return folder / "run"


def summary(run: Path, name: str) -> dict[str, Any]:
    return json.loads((run / name / "summary.json").read_text())


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo_constant", "rloo_constant"])
def test_a_constant_reward_is_not_improved_and_names_the_missing_variance(trained, name):
    verdict = summary(trained, name)["verdict"]
    assert verdict["status"] != "improved"
    assert any("no learning signal: 100% of held-out prompts got the same reward" in r for r in verdict["reasons"])
    assert any(w.startswith("zero reward variance: 100% of groups") for w in verdict["warnings"]), verdict


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_print_config_shows_the_reward_weights_align_passes_from_rewards(folder, run_cli, kind):
    import yaml

    stage = online(kind, kind, "")
    stage["rewards"] = [{"function": "rewards.py:constant"}, {"function": "rewards.py:also_constant", "weight": 0.25}]
    code, out, err = run_cli(write_yaml(folder / f"weights_{kind}.yaml", recipe([stage])), "--print-config")
    assert code == 0, err
    assert yaml.safe_load(out)["stages"][0]["train"]["reward_weights"] == [1.0, 0.25]
    assert "reward_weights:  # align (from rewards:): each entry's weight, in order" in out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo_constant", "rloo_constant"])
def test_each_rewards_weight_reaches_training_and_the_held_out_measure_alike(trained, name):
    """Two rewards of 1.0 at weights 1 and 0.25: TRL's logged training reward is their weighted sum, 1.25 (2.0 when
    the weights stayed with align), and the held-out measure is the same sum."""
    rows = [json.loads(line) for line in (trained / name / "metrics.jsonl").read_text().splitlines()]
    logged = [r["reward"] for r in rows if r["split"] == "train" and "reward" in r]
    assert len(logged) == TRAIN["max_steps"] and all(abs(v - 1.25) < 1e-6 for v in logged), logged
    metrics = summary(trained, name)["metrics"]
    assert metrics["reward_before"] == pytest.approx(1.25) and metrics["reward"] == pytest.approx(1.25)


@pytest.mark.slow
def test_a_reward_that_raises_while_training_stops_the_stage_naming_it_and_the_step(folder, run_cli):
    path = write_yaml(folder / "boom.yaml", recipe([online("grpo", "grpo", "rewards.py:boom")]))
    code, _, err = run_cli(path, "--output-dir", folder / "boom")
    assert code == 1
    assert "error: reward rewards.py:boom raised RuntimeError at step 3: the grader is down" in err, err
    assert "Traceback" not in err
    assert "attention_mask" not in err, "transformers' false alarm at the first answers is kept out of the console"
    assert summary(folder / "boom", "grpo")["status"] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rewards": [{"function": "rewards.py:short"}]},
         "stages.grpo.rewards[0]: rewards.py:short returned 1 values for 2 completions"),
        ({"rewards": [{"function": "rewards.py:nope"}]}, "stages.grpo.rewards[0].function: rewards.py has no function"),
        ({"rewards": [{"function": "rewards.py:strict"}]},
         "got an unexpected keyword argument 'completion_ids' (called on 2 held-out rows before training, with "
         "prompts, completions, completion_ids, answer, topic, trainer_state, log_extra, log_metric); add **kwargs"),
        ({"rewards": [{"function": "rewards.py:needs_level"}]},
         "missing 1 required positional argument: 'level' (called on 2 held-out rows before training, with prompts, "
         "completions, completion_ids, answer, topic, trainer_state, log_extra, log_metric); a parameter must be"),
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
    """No held-out problem is trained on in any order of its digits (the prompts are too short for the eval's text
    leakage check), and the answers are right."""
    from align.builtin import arithmetic

    def problems(split: dict[str, list]) -> set[tuple[int, ...]]:
        found = set()
        for prompt, answer in zip(split["prompt"], split["answer"], strict=True):
            digits = tuple(int(d) for d in prompt.removeprefix("What is ").removesuffix("? Answer:").split(" + "))
            assert sum(digits) == int(answer), prompt
            found.add(tuple(sorted(digits)))
        return found

    splits = arithmetic()
    train = problems(splits["train"])
    for split in ("validation", "test"):
        held = problems(splits[split])
        assert held and not held & train, f"{split}: problems (in some order) also in train"
    assert sum(len(s["prompt"]) for s in splits.values()) == 10_000
    assert len(splits["train"]["prompt"]) > 6 * len(splits["test"]["prompt"])


@pytest.mark.slow
def test_the_report_draws_the_reward_and_its_health_and_heads_each_stage_by_its_reward(trained):
    from align.report import build_report

    html = build_report(trained).read_text()
    assert "<h3>Reward and its health</h3>" in html
    row = next(r for r in html.split("<tr>") if r.startswith("<td>grpo</td><td>grpo</td>"))
    assert "<td>reward</td>" in row, row


@pytest.mark.slow
def test_a_length_reward_that_climbs_while_exact_match_stays_flat_gives_the_reward_hacking_warning(folder):
    """The proxy (answer length in words) is easy to game; the monitor (exact_match on the `answer` column) cannot
    move for a random model: the warning names both, with their held-out numbers, and each evaluation's monitor row
    is in metrics.jsonl."""
    from align.run import main

    stage = online("grpo", "grpo", "length")
    stage["rewards"] = [{"function": "length", "args": {"target": 4}}]
    stage["monitor"] = [{"function": "exact_match"}]
    stage["train"] = {**TRAIN, "max_steps": 40, "eval_steps": 20, "learning_rate": 5.0e-3, "max_completion_length": 8}
    path = write_yaml(folder / "hack.yaml", recipe([stage]))
    assert main([str(path), "--output-dir", str(folder / "hack")]) == 0
    result = summary(folder / "hack", "grpo")
    metrics = result["metrics"]
    assert metrics["reward"] - metrics["reward_before"] >= 0.1, metrics
    assert metrics["monitor"]["exact_match"]["after"] - metrics["monitor"]["exact_match"]["before"] < 0.01
    warning = next(w for w in result["verdict"]["warnings"] if w.startswith("reward hacking: "))
    assert f"{metrics['reward_before']:.3f} → " in warning and "exact_match 0.000 → 0.000" in warning, warning
    rows = [json.loads(line) for line in (folder / "hack" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    monitored = [r for r in rows if r["split"] == "monitor"]
    assert [r["step"] for r in monitored] == [20, 40]
    assert all(isinstance(r["monitor/exact_match"], float) and "monitor/reward" in r for r in monitored)


@pytest.mark.slow
def test_the_eval_stage_judges_by_a_reward_function_on_prompt_only_rows_with_an_accuracy_interval(folder, run_cli):
    """`judges: [{function: exact_match}]` on a prompt_only file: the `answer` column reaches the judge; each model
    gets its accuracy with a 95% interval; a user's function from the recipe's folder judges too."""
    stages = [online("grpo", "grpo", "rewards.py:near"),
              {"name": "eval", "kind": "eval", "models": {"start": "@grpo", "again": "@grpo"},
               "data": {"source": {"files": ["prompts.jsonl"]}, "format": "prompt_only"}, "max_prompts": 20,
               "allow_overlap": True, "generation": {"max_new_tokens": 4},
               "judges": [{"function": "exact_match"}, {"function": "rewards.py:near"}]}]  # fmt: skip
    stages[0]["train"] = {**TRAIN, "max_steps": 1}
    path = write_yaml(folder / "judged.yaml", recipe(stages))
    # The plan says what the judges read (it said "0 with a reference answer": only the reference judge reads one)
    code, out, err = run_cli(path, "--dry-run", "--output-dir", folder / "judged")
    assert code == 0 and "prompts: 20 (of 64 rows; the function judges get answer, topic)" in out, out
    code, out, err = run_cli(path, "--output-dir", folder / "judged")
    assert code == 0, err
    models = summary(folder / "judged", "eval")["metrics"]["models"]
    for label in ("start", "again"):
        accuracy, (low, high) = models[label]["score_mean"]["exact_match"], models[label]["score_ci"]["exact_match"]
        assert 0.0 <= low <= accuracy <= high <= 1.0
        assert 0.0 < models[label]["score_mean"]["rewards.py:near"] <= 1.0, "near read the `answer` column"
    lines = [json.loads(line) for line in (folder / "judged" / "eval" / "generations.jsonl").read_text().splitlines()]
    assert {tuple(sorted(line["scores"])) for line in lines} == {("exact_match", "rewards.py:near")}
    # Each line keeps what the judges read beside the answer: the row's expected answer, and its other columns.
    assert all(set(line["columns"]) == {"answer", "topic"} for line in lines)
    assert all(line["scores"]["exact_match"] == float(line["answer"].strip() == line["columns"]["answer"])
               for line in lines if line["answer"].strip().isdigit())  # fmt: skip


@pytest.mark.slow
def test_a_reward_that_reads_the_trainer_state_passes_the_check_before_training(folder, run_cli):
    """The check before training calls a reward as TRL does, `trainer_state` included: a reward that reads it is not
    refused, and one without **kwargs is refused then, not at TRL's first step."""
    path = write_yaml(folder / "state.yaml", recipe([online("grpo", "grpo", "rewards.py:counts_steps")]))
    code, out, err = run_cli(path, "--dry-run", "--output-dir", folder / "state")
    assert code == 0, err
    # And the plan says what each evaluation samples (TRL's: a group for every validation prompt).
    assert "evaluation: 13 validation prompts x 4 answers at each evaluation" in out, out


@pytest.mark.slow
def test_a_judge_on_messages_rows_receives_their_other_columns_and_a_missing_one_is_named(folder, run_cli):
    """An eval's judges get every column whatever the format: on `messages` rows, `answer` reaches `near` (it was
    dropped, and the check failed with a bare 'missing argument'); a judge asking for a column the data lacks is
    refused naming the columns that do reach it."""
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"It is {a + b}."}], "answer": str(a + b)}
            for a in range(4) for b in range(4)]  # fmt: skip
    (folder / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def eval_stage(judge: str) -> dict[str, Any]:
        return {
            "name": "eval",
            "kind": "eval",
            "models": {"m": "@grpo"},
            "allow_overlap": True,
            "generation": {"max_new_tokens": 4},
            "data": {"source": {"files": ["chats.jsonl"]}, "format": "messages"},
            "judges": [{"function": judge}],
        }

    stages = [online("grpo", "grpo", "rewards.py:near"), eval_stage("rewards.py:near")]
    code, _, err = run_cli(write_yaml(folder / "chats.yaml", recipe(stages)), "--dry-run")
    assert code == 0, err
    stages[1] = eval_stage("rewards.py:needs_level")
    code, _, err = run_cli(write_yaml(folder / "chats.yaml", recipe(stages)), "--dry-run")
    assert code == 2
    assert (
        "stages.eval.judges[0]: rewards.py:needs_level raised TypeError: needs_level() missing 1 required "
        "positional argument: 'level' (called on 2 held-out rows before training, with prompts, completions, "
        "completion_ids, answer)"
    ) in err, err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("judges", "message"),
    [
        ([{"function": "rewards.py:short"}], "stages.eval.judges[0]: rewards.py:short returned 1 values for 2"),
        ([{"function": "exact_mtach"}], "stages.eval.judges[0].function: no reward named 'exact_mtach'"),
        (
            [{"function": "exact_match", "reference": "rouge_l"}],
            "give exactly one of function, reward_model, reference",
        ),
    ],
)
def test_an_eval_judge_function_that_cannot_work_is_refused_before_anything_runs(folder, run_cli, judges, message):
    stage = {"name": "eval", "kind": "eval", "models": {"m": "@grpo"}, "allow_overlap": True,
             "data": {"source": {"files": ["prompts.jsonl"]}, "format": "prompt_only"}, "judges": judges}  # fmt: skip
    code, _, err = run_cli(write_yaml(folder / "bad_eval.yaml", recipe([online("grpo", "grpo", "rewards.py:near"),
                                                                         stage])), "--dry-run")  # fmt: skip
    assert code == 2 and message in err, err


@pytest.mark.slow
def test_a_reward_crash_mid_stage_resumes_from_its_checkpoint_and_ends_where_an_unbroken_run_ends(folder, run_cli):
    """The grader fails at step 5 (a marker file says so): the stage stops naming it; run again, it resumes from
    checkpoint-4 and ends with the rewards of every logged step, and the weights, of a run that never stopped."""
    from safetensors.torch import load_file

    marker = folder / "grader_down"
    (folder / "flaky.py").write_text(
        REWARDS
        + f"""
from pathlib import Path


def flaky(prompts, completions, answer, trainer_state=None, **kwargs):
    if trainer_state is not None and trainer_state.global_step == 4 and Path({str(marker)!r}).exists():
        raise RuntimeError("the grader is down")
    return near(prompts, completions, answer)
"""
    )
    stage = online("grpo", "grpo", "flaky.py:flaky")
    stage["train"] = {**TRAIN, "max_steps": 8, "save_steps": 2, "eval_steps": 8}
    path = write_yaml(folder / "flaky.yaml", recipe([stage]))
    code, _, err = run_cli(path, "--output-dir", folder / "whole")
    assert code == 0, err
    marker.touch()
    code, _, err = run_cli(path, "--output-dir", folder / "cut")
    assert code == 1 and "error: reward flaky.py:flaky raised RuntimeError at step 5: the grader is down" in err
    marker.unlink()
    code, _, err = run_cli(path, "--output-dir", folder / "cut")
    assert code == 0 and "resuming from checkpoint-4" in err, err

    def rewards(run: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows if r["split"] == "train" and "reward" in r]
        assert steps == sorted(set(steps)), "no step logged twice"
        return {r["step"]: r["reward"] for r in rows if r["split"] == "train" and "reward" in r}

    whole, cut = rewards(folder / "whole"), rewards(folder / "cut")
    assert sorted(whole) == sorted(cut) == list(range(1, 9))
    assert all(abs(whole[s] - cut[s]) <= 1e-6 for s in whole), (whole, cut)
    a, b = (load_file(str(run / "grpo" / "model" / "model.safetensors")) for run in (folder / "whole", folder / "cut"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
