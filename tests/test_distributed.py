"""The same recipe under several processes (2 on the CPU, gloo): side effects once, stages in step."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_MODEL, tiny_lm_recipe, write_yaml

ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))  # a dataclass: an unknown key is a TypeError
    assert config.num_processes >= 1 and str(config.mixed_precision) == "no"
    assert path.read_text().startswith("#"), "each config opens with the command that uses it"


@pytest.mark.slow
def test_two_processes_run_the_chain_once(tmp_path):
    model = {**TINY_MODEL, "n_positions": 128}
    recipe = tiny_lm_recipe(tracking={"wandb": {"mode": "offline"}}, stage={"model": model})
    recipe["stages"][0]["train"].update(max_steps=6, eval_steps=3)
    small = {"max_length": 128, "max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "eval_steps": 3}
    rows = {"max_train_rows": 32, "max_eval_rows": 8}
    recipe["stages"] += [
        {"name": "sft", "kind": "sft", "data": {"card": "python-docs-instruct", **rows}, "train": dict(small),
         "generations": 1},
        {"name": "rm", "kind": "rm", "train": dict(small), "data": {
            "card": "python-docs-preferences", **rows, "splits": {"train": "reward", "validation": "validation"}}},
        {"name": "dpo", "kind": "dpo", "data": {"card": "python-docs-preferences", **rows}, "train": dict(small),
         "generations": 1},
        # Online RL: each process samples its share of the groups (4 answers per prompt, 2 x 4 per step).
        {"name": "grpo", "kind": "grpo", "data": {"card": "arithmetic", **rows}, "rewards": [{"function": "length",
         "args": {"target": 3}}], "measure": {"prompts": 4, "samples": 2}, "generations": 1,
         "train": {"max_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
                   "num_generations": 4, "max_completion_length": 4, "logging_steps": 1, "eval_steps": 2}},
        {"name": "eval", "kind": "eval", "data": {"card": "python-docs-instruct"}, "max_prompts": 8,
         "generation": {"max_new_tokens": 8}, "judges": [{"reward_model": "@rm"}, {"reference": "rouge_l"}]},
    ]  # fmt: skip
    path = write_yaml(tmp_path / "r.yaml", recipe)
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "-m", "align.run", str(path),
         "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    for stage in ("lm", "sft", "rm", "dpo", "grpo", "eval"):
        assert err.count(f"] {stage}: completed in") == 1, f"{stage}: its completion is logged once"
    assert "x 2 processes" in err, "one distributed run of 2 processes, not two runs of 1"
    assert not [line for line in err.splitlines() if "[rank1" in line and " INFO " in line], "rank 1 says only warnings"
    assert "URL not available" not in err, "wandb's offline warning at every checkpoint save is noise"
    assert "find_unused_parameters" not in err
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 6, "one wandb run per stage"
    pipeline = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert [s["status"] for s in pipeline["stages"]] == ["completed"] * 6
    assert proc.stdout.count("completed") == 6, "the closing table is printed once"
    # The eval ran once (the main process): every prompt answered by each policy stage's model (lm, sft, dpo, grpo).
    assert len((tmp_path / "run" / "eval" / "generations.jsonl").read_text().splitlines()) == 8 * 4
    grpo = json.loads((tmp_path / "run" / "grpo" / "summary.json").read_text())
    assert grpo["metrics"]["global_step"] == 2 and isinstance(grpo["metrics"]["reward"], float)
    logged = [json.loads(line) for line in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["split"] == "train" and "reward" in r] == [1, 2], "rows written once"


def launch(tmp_path: Path, recipe_path: Path, **kwargs) -> subprocess.Popen:
    accelerate = Path(sys.executable).with_name("accelerate")
    log = (tmp_path / f"launch-{len(list(tmp_path.glob('launch-*')))}.log").open("w")
    return subprocess.Popen(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "-m", "align.run", str(recipe_path),
         "--output-dir", str(tmp_path / "run")],
        stdout=log, stderr=log, text=True, cwd=tmp_path, **kwargs,
    )  # fmt: skip


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_both_ranks_after_the_same_step_and_resumes(tmp_path):
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"].update(max_steps=120, eval_steps=60, save_steps=20, logging_steps=20)
    path = write_yaml(tmp_path / "r.yaml", recipe)
    proc = launch(tmp_path, path, start_new_session=True)
    first = tmp_path / "run/lm/checkpoints/checkpoint-20/trainer_state.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "launch-0.log").read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)  # to the launcher alone, as Slurm or Kubernetes would: it forwards the signal
    proc.wait(timeout=120)  # nobody hangs in a collective
    err = (tmp_path / "launch-0.log").read_text()
    stops = re.findall(r"\[(rank1 )?lm\] align.signals: SIGTERM: stopping after step (\d+)", err)
    assert len(stops) == 2 and stops[0][1] == stops[1][1], err[-3000:]
    step = stops[0][1]
    assert f"error: stopped by SIGTERM after step {step}; checkpoint-{step} is saved" in err
    assert (tmp_path / f"run/lm/checkpoints/checkpoint-{step}/trainer_state.json").is_file(), "rank 0 saved it"
    assert json.loads((tmp_path / "run/lm/summary.json").read_text())["status"] == "interrupted"

    again = launch(tmp_path, path)
    assert again.wait(timeout=600) == 0, (tmp_path / "launch-1.log").read_text()[-3000:]
    err = (tmp_path / "launch-1.log").read_text()
    assert f"resuming from checkpoint-{step}" in err
    assert json.loads((tmp_path / "run/lm/summary.json").read_text())["metrics"]["global_step"] == 120


@pytest.mark.slow
def test_bad_input_under_two_processes_is_one_error_line(tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n' * 40)
    recipe = tiny_lm_recipe(stage={"kind": "sft", "data": {"source": {"files": ["qa.jsonl"]},
                                                           "format": "prompt_completion"}})  # fmt: skip
    proc = launch(tmp_path, write_yaml(tmp_path / "r.yaml", recipe))
    proc.wait(timeout=300)
    err = (tmp_path / "launch-0.log").read_text()
    assert [line for line in err.splitlines() if line.startswith("error:")] and proc.returncode != 0
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err[-3000:]
    assert "Connection closed by peer" not in err and "unexpected" not in err, err[-3000:]


@pytest.mark.slow
def test_fsdp_config_on_the_cpu_trains_as_ddp_and_says_so(tmp_path):
    """Issue #18 item 6, as far as a CPU goes. torch's FSDP2 (`fully_shard`) shards on the CPU over gloo, but
    accelerate 1.15 turns FSDP on only for GPUs: under recipes/accelerate/fsdp.yaml the two CPU processes train as
    DDP, each with the whole model. align says so; this test pins both, so the day accelerate shards on the CPU it
    fails, and the real FSDP test (sharded training, the gathered model saved whole) takes its place."""
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"].update(max_steps=4, eval_steps=2, save_steps=2)
    path = write_yaml(tmp_path / "r.yaml", recipe)
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(REPO / "recipes/accelerate/fsdp.yaml"), "--num_processes", "2",
         "-m", "align.run", str(path), "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert err.count("accelerate is asked for FSDP, but there is no GPU") == 1, err[-3000:]
    assert "x 2 processes" in err, "one distributed run of 2 processes"
    checkpoint = tmp_path / "run/lm/checkpoints/checkpoint-4"
    assert (checkpoint / "model.safetensors").is_file()
    assert not list(checkpoint.glob("pytorch_model_fsdp*")), (
        "accelerate sharded on the CPU: FSDP now runs here; replace this test with the FSDP run of issue #18 item 6"
    )
    assert json.loads((tmp_path / "run/pipeline.json").read_text())["stages"][0]["status"] == "completed"


@pytest.mark.slow
def test_one_process_with_accumulation_and_two_processes_train_alike(tmp_path):
    """At the same effective batch, 1 process x accumulation 2 and 2 processes x accumulation 1 see the same blocks
    in the same steps with the same averaged gradients (align's evaluation before training once left the model
    unwrapped, so each process trained its own copy: align/patches.py `train_after_evaluation`). Without dropout,
    whose masks are other random numbers on two ranks; with at least 4 x 8 train rows, so that no step's batch is
    short (two processes fill a short last batch with repeated rows, one process takes it short)."""
    model = {**TINY_MODEL, "n_positions": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    train = {"max_length": 64, "max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 3.0e-3,
             "logging_steps": 1, "eval_steps": 2}  # fmt: skip
    runs = {}
    for processes, accumulation in ((1, 2), (2, 1)):
        steps = {**train, "gradient_accumulation_steps": accumulation}
        recipe = tiny_lm_recipe(stage={"model": model, "train": steps})
        cards = {"sft": "python-docs-instruct", "dpo": "python-docs-preferences"}
        recipe["stages"] += [{"name": name, "kind": name, "generations": 1, "train": {**steps, "max_length": 128},
                              "data": {"card": c, "max_train_rows": 48}} for name, c in cards.items()]  # fmt: skip
        path = write_yaml(tmp_path / f"r{processes}.yaml", recipe)
        out = tmp_path / f"run{processes}"
        launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
                    "2", "--main_process_port", "29517"] if processes == 2 else [sys.executable]  # fmt: skip
        proc = subprocess.run([*launcher, "-m", "align.run", str(path), "--output-dir", str(out)],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[processes] = {s: json.loads((out / s / "summary.json").read_text()) for s in ("lm", "sft", "dpo")}
        runs[processes]["rows"] = {s: [json.loads(x) for x in (out / s / "metrics.jsonl").read_text().splitlines()]
                                   for s in ("lm", "sft", "dpo")}  # fmt: skip
    for stage in ("lm", "sft", "dpo"):
        one, two = runs[1][stage], runs[2][stage]
        assert one["data_order"] == {**two["data_order"], "per_device": 4, "accumulation": 2, "processes": 1}
        assert one["data_order"]["train_rows"] >= 4 * 8, "a short batch: not the same rows on 1 and 2 processes"
        assert two["data_order"]["processes"] == 2 and two["data_order"]["global_batch"] == 8
        losses = [{r["step"]: r["loss"] for r in runs[n]["rows"][stage] if r["split"] == "train" and "loss" in r}
                  for n in (1, 2)]  # fmt: skip
        assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=1e-5), stage
        # The verdict's per-example pass counts each held-out example once whatever the process count.
        assert one["verdict"]["reasons"][0] == two["verdict"]["reasons"][0], stage
    # lm's and sft's eval_loss is align's token mean over the validation rows, each row once: the same on 1 process
    # and 2, before and after training, where the eval rows do not fill whole batches too (sft: 15 rows).
    for stage in ("lm", "sft"):
        for key in ("eval_loss_before", "eval_loss"):
            evals = runs[1][stage]["metrics"][key], runs[2][stage]["metrics"][key]
            assert evals[0] == pytest.approx(evals[1], abs=1e-4), (stage, key)
    # The Trainer's figure beside it is a mean of batch means, and two processes fill the last eval batch with
    # repeated rows whose loss enters that batch's mean: off by about 1e-3 (sft: 15 rows; dpo: 66 pairs, whose
    # eval_loss is still the Trainer's; README: "The same run on 1 process or 8").
    trainer = [runs[n]["sft"]["metrics"]["eval_loss_trainer"] for n in (1, 2)]
    assert trainer[0] != pytest.approx(trainer[1], abs=1e-4), "the measurement still shows the difference"
    evals = runs[1]["dpo"]["metrics"]["eval_loss"], runs[2]["dpo"]["metrics"]["eval_loss"]
    assert evals[0] == pytest.approx(evals[1], rel=3e-3)


@pytest.mark.slow
def test_two_processes_refused_a_busy_run_directory_both_exit_2_before_preflight(tmp_path):
    """The lock is probed before preflight, on the main process; the other process learns the refusal from it (the
    process group started for that), instead of going on alone into preflight."""
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"].update(max_steps=2, eval_steps=2)
    recipe["stages"][0]["data"].update(max_train_rows=40, max_eval_rows=8)
    path, run_dir = write_yaml(tmp_path / "r.yaml", recipe), tmp_path / "run"
    run_dir.mkdir()  # the lock needs only the directory
    hold = ("import sys, time\nfrom pathlib import Path\nfrom align.rundir import RunLock\n"
            "lock = RunLock(Path(sys.argv[1]))  # kept: a collected lock is let go\n"
            "lock.acquire()\nprint('held', flush=True)\ntime.sleep(120)\n")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        accelerate = Path(sys.executable).with_name("accelerate")
        proc = subprocess.run(
            [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29519",
             "-m", "align.run", str(path), "--output-dir", str(run_dir)],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    err = proc.stderr
    assert proc.returncode != 0 and err.count(f"error: {run_dir} is in use by process {holder.pid}") == 1, err[-3000:]
    # The main process exits 2 (the launcher itself then exits 1); the other exits 2 too, unless the launcher has
    # already ended it on the main process's exit: either way it never goes on into preflight alone.
    assert "exitcode  : 2" in err and "exitcode  : 1" not in err, err[-3000:]
    assert "preflight" not in err and "align.data" not in err, "refused before preflight"
