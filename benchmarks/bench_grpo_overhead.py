"""Online RL overhead: align's grpo stage against bare TRL GRPOTrainer on identical work; per-step ratio <= 1.05.

Two cases. Plain: the same saved model (the quickstart's GPT-2 shape), same prompts (the builtin arithmetic task
written to JSONL), the same reward (align's `exact_match`) and `train:` settings and seed. With tools: a policy that
calls a tool in every answer (the tests' tiny Qwen 2.5 `caller`, tests/families.py, taught one `lookup` call in
about 5 s), `tools: [tools.py:lookup]` and `max_tool_calls: 1` on align's side, `GRPOTrainer(tools=[lookup])` and
`max_tool_calling_iterations=1` on the bare side, and a dense reward on the answer written after the tool's result.
align runs the one-stage recipe as a user would (`python -m align.run`), with everything it adds to each step: the
guarded reward wrapper, the counted tools, the health alarms, the metrics writer and the numeric guard. The figure
is the Trainer's own `train_runtime` over its steps on each side: a step's cost. align's held-out measure before and
after training is work bare TRL does not do, and is not in it (the whole process's ratio is printed beside it).
Rounds in rotating order, medians. The mean reward of every logged step must match too, or the two sides did not do
the same work.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from _shared import REPO, align_cmd, save_small_model, summary, timed, verdict, write_jsonl

ROUNDS = 3
TRAIN = {"max_steps": 12, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 16, "num_generations": 8,
         "max_completion_length": 8, "learning_rate": 1.0e-4, "logging_steps": 2, "eval_steps": 12,
         "gradient_checkpointing": False}  # fmt: skip
# With tools: the policy's 2-layer, 32-wide model makes a step mostly TRL's tool loop and align's per-step work (the
# worst case for a ratio); sampled at 0.5, where its calls parse every time. A ratio of two spans of a few seconds
# each: more rounds than the plain case (one run of 8 steps and 3 rounds gave 0.92x and 1.13x on one commit).
TOOLS_ROUNDS = 5
TOOLS_TRAIN = {**TRAIN, "max_steps": 24, "eval_steps": 24, "max_completion_length": 48, "temperature": 0.5,
               "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "num_generations": 4}  # fmt: skip
NEAR = '''
def near(prompts, completions, answer, **kwargs):
    """Dense: the closer the answer after the tool's result is to the target length in characters, the higher."""
    return [1.0 / (1 + abs(len(c[-1]["content"]) - int(a))) for c, a in zip(completions, answer)]
'''


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        plain = compare(tmp / "plain", *arithmetic_case(tmp / "plain"), TRAIN, ROUNDS)
        with_tools = compare(tmp / "tools", *tools_case(tmp / "tools"), TOOLS_TRAIN, TOOLS_ROUNDS)
    ok = True
    cases = {"grpo overhead": plain, "grpo overhead with tools": with_tools}
    for name, (ratio, same, step, wall, extra) in cases.items():
        ok_here = ratio <= 1.05 and same
        ok = ok and ok_here
        print(
            f"{name}: align {1000 * step['align']:.0f} ms/step vs bare TRL GRPOTrainer {1000 * step['bare']:.0f} "
            f"ms/step = {ratio:.3f}x per step (whole process {wall['align']:.1f} s vs {wall['bare']:.1f} s, align's "
            f"held-out measure and report included){extra}; rewards at every logged step "
            f"{'identical' if same else 'DIFFERENT'} (target <= 1.05x per step) {verdict(ok_here)}"
        )
    return 0 if ok else 1


def arithmetic_case(tmp: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    """The quickstart's GPT-2 shape on the builtin arithmetic prompts: (model, train file, validation file, what the
    stage adds: its reward)."""
    from align.builtin import arithmetic

    splits = arithmetic()
    train_file, valid_file = prompt_files(tmp, splits)
    texts = [p + " " + a for p, a in zip(splits["train"]["prompt"], splits["train"]["answer"], strict=True)]
    model_dir = save_small_model(tmp / "model", texts)
    return model_dir, train_file, valid_file, {"rewards": [{"function": "exact_match"}]}


def prompt_files(tmp: Path, splits: dict[str, Any]) -> tuple[Path, Path]:
    """A builtin set's first 400 train and 16 validation rows (prompt, answer) as JSONL files in `tmp` (made here)."""
    tmp.mkdir()
    rows = {s: [{"prompt": p, "answer": a} for p, a in zip(splits[s]["prompt"], splits[s]["answer"], strict=True)]
            for s in ("train", "validation")}  # fmt: skip
    train = write_jsonl(tmp / "train.jsonl", rows["train"][:400])
    return train, write_jsonl(tmp / "valid.jsonl", rows["validation"][:16])


def tools_case(tmp: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    """The tests' tiny Qwen 2.5 taught to call `lookup` in every answer (tests/families.py: `caller`), the fixture
    prompts with a target length for the dense reward, and `tools.py` (the tool and the reward) beside the recipe."""
    sys.path.insert(0, str(REPO))
    from tests import families

    tmp.mkdir()
    namespace: dict[str, Any] = {}
    exec(families.lookup_tool(), namespace)
    built = families.widened(families.build("qwen2_5", tmp / "qwen2_5"), tmp / "qwen2_5_wide", 1024)
    policy = families.caller(built, tmp / "policy", namespace["lookup"], {"word": "red"})
    (tmp / "tools.py").write_text(families.lookup_tool() + NEAR)
    rows = [{**row, "answer": str(4 + i % 6)} for i, row in enumerate(families.prompts(n=216, seed=7))]
    train, valid = write_jsonl(tmp / "train.jsonl", rows[:200]), write_jsonl(tmp / "valid.jsonl", rows[200:])
    return policy, train, valid, {"rewards": [{"function": "tools.py:near"}], "tools": ["tools.py:lookup"],
                                  "max_tool_calls": 1}  # fmt: skip


def compare(
    tmp: Path,
    model_dir: Path,
    train_file: Path,
    valid_file: Path,
    stage_extra: dict[str, Any],
    train: dict[str, Any],
    rounds: int,
) -> tuple[float, bool, dict, dict, str]:
    """align's one-stage grpo recipe against the bare trainer, `rounds` each in alternating order: (per-step ratio,
    whether the logged rewards match, median seconds a step and whole process per side, the tool figures)."""
    recipe = {
        "name": "grpo_overhead", "seed": 42, "tracking": {"wandb": {"mode": "disabled"}},
        "stages": [{
            "name": "grpo", "kind": "grpo", "model": str(model_dir), "generations": 0,
            "data": {"source": {"files": {"train": [str(train_file)], "validation": [str(valid_file)]}},
                     "format": "prompt_only", "splits": {"train": "train", "validation": "validation"}},
            "measure": {"prompts": 2, "samples": 1}, **stage_extra, "train": train,
        }],
    }  # fmt: skip
    recipe_path = tmp / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    tools = stage_extra.get("tools")
    settings = {**train, **({"max_tool_calling_iterations": stage_extra["max_tool_calls"]} if tools else {})}
    # The bare side takes the same entries, a file's resolved beside the recipe as align resolves it.
    entries = [str(tmp / e) if ".py:" in e else e for e in [stage_extra["rewards"][0]["function"], *(tools or [])]]
    baseline = [sys.executable, str(REPO / "benchmarks/baseline_trl_grpo.py"), str(model_dir), str(train_file),
                str(valid_file), str(tmp / "bare"), json.dumps(settings), ",".join(entries[1:]),
                entries[0]]  # fmt: skip
    sides = {"bare": (baseline, {"WANDB_MODE": "disabled"}), "align": (align_cmd(recipe_path, tmp / "align"), {})}
    per_step: dict[str, list[float]] = {side: [] for side in sides}
    whole: dict[str, list[float]] = {side: [] for side in sides}
    rewards: dict[str, list[float]] = {}
    extra = ""
    for i in range(rounds):
        for side in list(sides)[i % 2 :] + list(sides)[: i % 2]:  # the order alternates: a drift hits both
            cmd, env = sides[side]
            wall, proc = timed(cmd, env)
            whole[side].append(wall)
            if side == "bare":
                figures = json.loads(proc.stdout.strip().splitlines()[-1])
                per_step[side].append(figures["train_runtime"] / figures["steps"])
                rewards[side] = figures["rewards"]
            else:
                metrics = summary(tmp / "align", "grpo")["metrics"]
                per_step[side].append(metrics["train_runtime_s"] / metrics["global_step"])
                logged = [json.loads(line) for line in
                          (tmp / "align" / "grpo" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
                train_rows = [r for r in logged if r["split"] == "train" and "reward" in r]
                rewards[side] = [r["reward"] for r in train_rows]
                if tools:  # the work was tool calls: say how many the policy made
                    calls = [r["tools/call_frequency"] for r in train_rows if "tools/call_frequency" in r]
                    extra = f"; tool calls per answer {sum(calls) / max(1, len(calls)):.2f} (TRL's call_frequency)"
    step = {side: statistics.median(values) for side, values in per_step.items()}
    wall = {side: statistics.median(values) for side, values in whole.items()}
    same = len(rewards["align"]) == len(rewards["bare"]) and all(
        abs(a - b) <= 1e-6 for a, b in zip(rewards["align"], rewards["bare"], strict=True))  # fmt: skip
    return step["align"] / step["bare"], same, step, wall, extra


if __name__ == "__main__":
    sys.exit(main())
