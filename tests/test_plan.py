"""One plan: `--dry-run`, `--print-config` and the run share every decision, and every check runs before the first
stage trains."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import TINY_MODEL, tiny_lm_recipe, write_yaml

SMALL = {"max_length": 128, "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "eval_steps": 2}
ROWS = {"max_train_rows": 16, "max_eval_rows": 4}


def checkpointing_name() -> str:
    """The name the installed transformers takes the checkpointing switch by (5.25: activation_checkpointing)."""
    from transformers import TrainingArguments

    from align.plan import checkpointing_key

    return checkpointing_key(TrainingArguments)


def chain() -> dict:
    """lm -> sft -> rm -> dpo -> eval on a tiny scratch model: one stage of every kind."""
    recipe = tiny_lm_recipe(stage={"model": dict(TINY_MODEL, n_positions=128)})
    recipe["stages"][0]["train"].update(max_steps=2, eval_steps=2)
    recipe["stages"][0]["data"].update(max_train_rows=40, max_eval_rows=8)
    recipe["stages"] += [
        {"name": "sft", "kind": "sft", "data": {"card": "python-docs-instruct", **ROWS}, "train": dict(SMALL),
         "generations": 0},
        {"name": "rm", "kind": "rm", "data": {"card": "python-docs-preferences", **ROWS,
         "splits": {"train": "reward", "validation": "validation"}}, "train": dict(SMALL)},
        {"name": "dpo", "kind": "dpo", "data": {"card": "python-docs-preferences", **ROWS},
         "train": dict(SMALL, learning_rate=1e-4), "generations": 0},
        {"name": "eval", "kind": "eval", "data": {"card": "python-docs-instruct"}, "max_prompts": 4,
         "generation": {"max_new_tokens": 8}, "judges": [{"reward_model": "@rm"}, {"reference": "rouge_l"}]},
    ]  # fmt: skip
    return recipe


@pytest.mark.slow
def test_the_trainer_gets_exactly_the_planned_arguments_for_every_kind(tmp_path, monkeypatch):
    """The plan a dry run prints is what each stage's Trainer receives: every planned argument, for each kind."""
    import transformers

    from align.loader import load_recipe
    from align.pipeline import run_pipeline
    from align.preflight import plan_stages, preflight
    from align.runtime import choose_precision
    from align.tracking import report_to

    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", chain()))
    run_dir = tmp_path / "run"
    specs, data = preflight(recipe)
    plans = plan_stages(recipe, specs, data, choose_precision("auto"), run_dir, report_to(recipe.tracking.wandb))

    received = {}
    original = transformers.Trainer.__init__

    def capture(self, *args, **kwargs):
        received[kwargs["args"].run_name.split("/")[-1]] = kwargs["args"]
        original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "__init__", capture)
    run_pipeline(recipe, output_dir=run_dir)
    assert set(received) == {"lm", "sft", "rm", "dpo"}
    # The eval stage trains nothing: what it ran with (generation settings, prompts) is its plan, as recorded.
    recorded = yaml.safe_load((run_dir / "eval" / "summary.json").read_text())["plan"]
    assert recorded["settings"] == {
        k: {"value": s.value, "source": s.source} for k, s in plans["eval"].effective.items()
    }
    assert recorded["settings"]["generation.max_new_tokens"] == {"value": 8, "source": "recipe"}
    assert yaml.safe_load((run_dir / "eval" / "summary.json").read_text())["metrics"]["prompts"] == 4
    for name, plan in plans.items():
        if name == "eval":
            continue
        args = received[name]
        for key, setting in plan.settings.items():
            value = getattr(args, key)
            assert getattr(value, "value", value) == getattr(setting.value, "value", setting.value), (name, key)
        for key, setting in plan.effective.items():
            if key not in plan.runtime:
                value = getattr(args, key)
                assert getattr(value, "value", value) == setting.value, (name, key)
    assert set(plans["sft"].runtime) == {"packing"}, "the one decision left to the loaded model"

    # The dry run says what a run into that directory would do: everything cached; a changed dpo, and what reads it,
    # runs again (the fingerprints the run itself computes).
    from align.dry_run import dry_run

    out = dry_run(recipe, run_dir)
    assert out.count("  run: cached (unchanged since the last run") == 5, out
    changed = load_recipe(tmp_path / "r.yaml", ["stages.dpo.train.beta=0.2"])
    lines = dry_run(changed, run_dir).splitlines()
    runs = [line.split(":", 2)[1].strip() for line in lines if line.startswith("  run:")]
    assert [r.split(" ")[0] for r in runs] == ["cached", "cached", "cached", "runs", "runs"], runs


@pytest.mark.slow
def test_gradient_checkpointing_is_decided_once_from_the_architecture(tmp_path, run_cli):
    """The dry run once refused `gradient_checkpointing: true` on sft/dpo (it assumed no support) while the run
    accepted it, and said "off" while the run turned it on."""
    recipe = chain()
    path = write_yaml(tmp_path / "r.yaml", recipe)
    code, out, err = run_cli(path, "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 0, err
    sft = out.split("] sft (sft)")[1].split("] dpo (dpo)")[0]
    # Under the name the installed transformers takes it by (5.25 renamed it; the old one is a deprecated alias).
    key = checkpointing_name()
    assert f"{key}: True  (align default (the model supports it))" in sft
    # A recipe may give either name; it is shown under the one given, once.
    recipe["stages"][1]["train"]["gradient_checkpointing"] = True
    recipe["stages"][2]["train"][key] = True
    code, out, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 0, err
    sft, rm = out.split("] sft (sft)")[1].split("] dpo (dpo)")[0].split("] rm (rm)")
    assert "gradient_checkpointing: True  (recipe)" in sft and f"{key}: True  (recipe)" in rm
    assert sft.count("_checkpointing:") == rm.count("_checkpointing:") == 1, out


def test_a_max_length_that_leaves_a_later_stage_nothing_is_refused_before_the_first_stage_trains(tmp_path, run_cli):
    recipe = chain()
    recipe["stages"][1]["train"]["max_length"] = 8  # shorter than every sft prompt
    path = write_yaml(tmp_path / "r.yaml", recipe)
    code, _, err = run_cli(path, "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 2 and "stages.sft.train.max_length: 8 tokens leave no training example a trained token" in err
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run")
    assert code == 2 and "stages.sft.train.max_length: 8 tokens" in err
    assert not (tmp_path / "run").exists(), "refused before lm trained: nothing written"


@pytest.mark.slow
def test_lora_target_modules_the_model_lacks_are_refused_before_the_first_stage_trains(tmp_path, run_cli):
    """`[q_proj, v_proj]` on GPT-2 once passed --dry-run, trained the earlier stages, then failed in peft with exit 1
    and no word of GPT-2's own names."""
    recipe = chain()
    recipe["stages"][3]["peft"] = {"target_modules": ["q_proj", "v_proj", "c_attn"]}  # dpo
    recipe["stages"][2]["peft"] = {"target_modules": "transformer\\.h\\.\\d+\\.attn\\.nope"}  # rm: a pattern
    path = write_yaml(tmp_path / "r.yaml", recipe)
    code, _, err = run_cli(path, "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 2
    assert "stages.dpo.peft.target_modules: 'q_proj', 'v_proj': no module of GPT2LMHeadModel is named so" in err
    assert "stages.rm.peft.target_modules: 'transformer" in err and "GPT2ForSequenceClassification" in err
    assert "hint: its linear layers: target_modules: [c_attn, c_fc, c_proj] (or all-linear)" in err
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run")
    assert code == 2 and "'q_proj', 'v_proj'" in err and not (tmp_path / "run").exists()
    # GPT-2's own names, and their full paths, pass.
    recipe["stages"][3]["peft"] = {"target_modules": ["c_attn", "attn.c_proj"]}
    recipe["stages"][2]["peft"] = {"target_modules": "transformer\\.h\\.\\d+\\.attn\\.c_attn"}
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 0, err


def test_the_dry_run_names_the_reference_the_run_uses(tmp_path, run_cli):
    recipe = chain()
    recipe["stages"][3]["train"]["precompute_ref_log_probs"] = True  # dpo
    code, out, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--dry-run", "--output-dir", tmp_path / "r")
    assert code == 0, err
    assert "reference: the input model's log-probabilities, computed once before training" in out
    assert "frozen copy" not in out


def train_block(text: str, stage: str) -> dict:
    """A stage's `train:` mapping from `--print-config` output, and the source comment of each line."""
    resolved = yaml.safe_load(text)
    values = next(s for s in resolved["stages"] if s["name"] == stage)["train"]
    lines = text.split(f"- name: {stage}\n", 1)[1].split("\n  train:\n", 1)[1].splitlines()
    sources = {}
    for line in lines:
        if not line.startswith("    ") or line.startswith("     "):
            if not line.startswith("    -"):
                break
            continue
        key, _, rest = line.strip().partition(":")
        sources[key] = rest.split("  # ", 1)[1] if "  # " in rest else None
    return {"values": values, "sources": sources}


def test_print_config_shows_effective_values_and_where_they_came_from(tmp_path, run_cli):
    recipe = chain()
    recipe["stages"][0]["early_stopping"] = {"patience": 2}
    recipe["stages"][3]["train"].pop("learning_rate")  # dpo
    recipe["stages"][1]["train"]["max_length"] = 4096  # the tiny model has 128 positions
    path = write_yaml(tmp_path / "r.yaml", recipe)
    code, out, err = run_cli(path, "--print-config", "--set", "stages.lm.train.learning_rate=0.002")
    assert code == 0, err
    lm, sft, dpo = (train_block(out, name) for name in ("lm", "sft", "dpo"))
    assert lm["values"]["learning_rate"] == 0.002 and lm["sources"]["learning_rate"] == "--set"
    assert lm["values"]["save_steps"] == 2 and lm["sources"]["save_steps"].startswith("early stopping")
    assert lm["values"]["logging_steps"] == 5 and lm["sources"]["logging_steps"] == "recipe"
    assert sft["values"]["max_length"] == 128 and "capped at the model's 128 positions" in sft["sources"]["max_length"]
    assert sft["values"]["save_total_limit"] == 2 and sft["sources"]["save_total_limit"].startswith("align default")
    # TRL's own default, which learned nothing on the quickstart's pairs, is shown as what it is.
    assert dpo["values"]["learning_rate"] == 1e-6 and dpo["sources"]["learning_rate"] == "library default"
    assert dpo["sources"]["beta"] == "library default"


def test_print_config_offline_without_the_model_shows_what_it_can(tmp_path, run_cli):
    stage = {"name": "sft", "kind": "sft", "model": "nobody/not-in-any-cache",
             "data": {"card": "python-docs-instruct"}, "train": {"learning_rate": 1e-4}}  # fmt: skip
    recipe = {"name": "hub", "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}
    code, out, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--print-config")
    assert code == 0, err
    sft = train_block(out, "sft")
    assert sft["values"]["learning_rate"] == 1e-4
    assert "unknown until the model is available" in sft["sources"]["max_length"]
    assert "unknown until the model is available" in sft["sources"][checkpointing_name()]


@pytest.mark.slow
def test_model_type_scratch_is_planned_once(tmp_path, run_cli, caplog):
    """The from-scratch tokenizer is trained when planning and the stage builds on it: once, not twice."""
    import logging

    caplog.set_level(logging.INFO)
    recipe = tiny_lm_recipe(stage={"model": dict(TINY_MODEL)})
    recipe["stages"][0]["train"].update(max_steps=1, eval_steps=1)
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert caplog.text.count("trained a byte-level BPE tokenizer") == 1


def test_an_lm_stage_whose_eval_text_fills_no_block_is_refused_before_training(tmp_path, run_cli):
    (tmp_path / "notes.txt").write_text("\n".join(f"line {i} of some text to learn from" for i in range(120)))
    recipe = tiny_lm_recipe(stage={"data": {"source": {"files": ["notes.txt"]}, "format": "text"}})
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 2 and "stages.lm.train.max_length: the eval text (59 tokens) fills no block of 64 tokens" in err
    assert "hint: lower max_length, or give the stage more text" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_stage_runs_from_python_without_the_pipeline(tmp_path, run_cli):
    """The README's promise: `run_sft` callable from Python, its inputs built by `stage_context`."""
    from align.errors import BadInput
    from align.loader import load_recipe
    from align.pipeline import stage_context
    from align.stages import run_sft

    recipe = chain()
    recipe["stages"] = recipe["stages"][:2]
    path = write_yaml(tmp_path / "r.yaml", recipe)
    with pytest.raises(BadInput, match="starts from '@lm', which has not completed"):
        stage_context(load_recipe(path), "sft", tmp_path / "run")
    assert run_cli(path, "--output-dir", tmp_path / "run", "--set", "stages.sft.train.max_steps=1")[0] == 0
    run_files = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    ctx = stage_context(load_recipe(path), "sft", tmp_path / "run")
    with pytest.raises(AttributeError):
        ctx.plan = None  # read-only: a stage changes nothing another stage sees
    result = run_sft(ctx.stage, ctx)
    assert result.status == "completed" and result.metrics["global_step"] == 2
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"] * 1.5
    # Beside the run, never in it: the run's sft model is still the one its summary describes (it was replaced once).
    (beside,) = tmp_path.glob("run+sft-*")
    assert result.model_dir == beside / "sft" / "model" and (result.model_dir / "config.json").is_file()
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == run_files
    own = stage_context(load_recipe(path), "sft", tmp_path / "run", write_to=tmp_path / "mine")
    assert own.run_dir == tmp_path / "mine"
    with pytest.raises(BadInput, match="is inside the run directory"):
        stage_context(load_recipe(path), "sft", tmp_path / "run", write_to=tmp_path / "run")


def test_a_max_length_that_cuts_every_example_warns_and_the_plan_shows_the_cut(tmp_path, run_cli, caplog):
    """A max_length that truncated 100% of the examples once passed --dry-run with no warning, counted the dropped
    examples as training examples and rendered them whole."""
    import json

    rows = [
        {"prompt": f"Question {i}? ", "completion": " ".join(f"word{j}" for j in range(60)) + "."} for i in range(40)
    ]
    rows += [{"prompt": " ".join(f"p{i}q{j}" for j in range(80)), "completion": "y"} for i in range(4)]  # dropped
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = {"source": {"files": ["long.jsonl"]}, "format": "prompt_completion", "valid_fraction": 0.2}
    stage = {"name": "sft", "kind": "sft", "model": dict(TINY_MODEL), "generations": 0, "train": {"max_length": 32},
             "data": data}  # fmt: skip
    path = write_yaml(
        tmp_path / "r.yaml", {"name": "cut", "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}
    )
    with caplog.at_level("WARNING"):
        code, out, err = run_cli(path, "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert "stages.sft.train.max_length: 32 tokens cut" in caplog.text and "never trained" in caplog.text
    # The fix it names stays within the model's 64 positions: past them, only shorter examples help.
    assert "past the model's 64 positions: shorten the examples" in caplog.text, caplog.text
    import re

    given = re.search(r"untrained: (\d+) of (\d+) left no trained token", out)
    assert given and int(given[1]) >= 1, out
    assert f"train_examples: {int(given[2]) - int(given[1])}\n" in out, "the dropped are not counted as training ones"
    assert "more tokens cut at max_length=32: never trained]" in out


@pytest.mark.parametrize(
    ("kind", "why"), [("dpo", "the prompt alone fills it"), ("rm", "the longer answer does not fit")]
)
def test_a_max_length_that_drops_most_pairs_warns_at_plan_time(tmp_path, run_cli, caplog, kind, why):
    """rm once dropped 23 of 24 training pairs at max_length 64 and trained on one, with only a plan line saying so;
    only a split left empty was refused."""
    import json

    long_prompt = " ".join(f"p{j}" for j in range(40))
    rows = [{"prompt": (long_prompt if i % 4 else f"Q{i}?") + " ", "chosen": "yes.", "rejected": "no no no."}
            for i in range(40)]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = {"source": {"files": ["pairs.jsonl"]}, "format": "preference", "valid_fraction": 0.2}
    stage = {"name": kind, "kind": kind, "model": dict(TINY_MODEL), "train": {"max_length": 24}, "data": data}
    if kind == "dpo":
        stage["generations"] = 0
    path = write_yaml(tmp_path / "r.yaml", {"name": "drop", "tracking": {"wandb": {"mode": "disabled"}},
                                            "stages": [stage]})  # fmt: skip
    with caplog.at_level("WARNING"):
        code, out, err = run_cli(path, "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 0, err
    import re

    warned = re.search(rf"stages\.{kind}\.train\.max_length: 24 tokens drop (\d+) of (\d+) training pairs \((\d+)%: "
                       rf"{why}\), so the stage learns from (\d+) pairs?; raise max_length", caplog.text)  # fmt: skip
    assert warned, caplog.text
    dropped, total, _, left = map(int, warned.groups())
    assert dropped >= total / 2 and left == total - dropped
    assert f"dropped: {dropped} of {total} train pairs" in out, "the plan line says the same numbers"
    assert "data: pairs.jsonl (preference): 32 train rows, 8 validation rows" in out, "named by its file, not 'inline'"
    if kind == "dpo":  # TRL cuts each side to max_length: the planned tokens count what is trained (orpo, kto did)
        assert int(re.search(r"train_tokens: (\d+)", out)[1]) <= 2 * 32 * 24, out


def test_a_tokenizer_smaller_than_the_vocab_size_asked_is_said_in_the_plan_the_log_and_the_card(tmp_path, run_cli):
    """BPE stops merging when no pair of tokens occurs twice: 60 short lines give fewer than the 512 tokens TINY_MODEL
    asks for. It was silent, and the model card still said 512."""
    import re

    from align.card import describe_root

    (tmp_path / "text.jsonl").write_text("".join(f'{{"text": "line {i} of a short text"}}\n' for i in range(60)))
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["data"] = {"source": {"files": ["text.jsonl"]}, "format": "text", "valid_fraction": 0.3}
    code, out, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--dry-run", "--output-dir", tmp_path / "run")
    assert code == 0, err
    built = int(re.search(r"tokenizer trained here: (\d+) of the 512 asked\)", out).group(1))
    assert built < 512
    assert f"stages.lm.model.vocab_size: 512 asked, but the tokenizer trained on this stage's data has {built}" in err
    root = {"model_type": "gpt2", "vocab_size": 512, "n_layer": 2}
    assert describe_root(root, {"vocab_size": built}) == (
        f"a `gpt2` built from scratch (vocab_size {built} (512 asked; the tokenizer trained on the data has {built}), "
        "n_layer 2)"
    )
    assert describe_root(root, {"vocab_size": 512}) == "a `gpt2` built from scratch (vocab_size 512, n_layer 2)"
