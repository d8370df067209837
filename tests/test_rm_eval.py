"""kind rm and kind eval on tiny runs: the reward model, the default input that skips it, the eval's figures,
files, cache and resume, the comparisons that must come out a draw or a loss, and leakage refused."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_MODEL, read_jsonl, tiny_lm_recipe, write_yaml

SMALL = {"max_length": 128, "max_steps": 6, "per_device_train_batch_size": 8, "learning_rate": 3.0e-3,
         "logging_steps": 2, "eval_steps": 3}  # fmt: skip


def chain_recipe(**eval_overrides: Any) -> dict[str, Any]:
    """lm -> sft -> rm -> dpo -> eval on a tiny GPT-2 with 128 positions (room for a prompt and its pair)."""
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["model"] = {**TINY_MODEL, "n_positions": 128}
    # Enough steps that the sft model answers in documentation words (ROUGE-L above 0): 3 s more on 2 cores.
    recipe["stages"][0]["train"].update(max_steps=80, eval_steps=40, learning_rate=5.0e-3)
    prefs = {"card": "python-docs-preferences", "max_train_rows": 48, "max_eval_rows": 32}
    recipe["stages"] += [
        {"name": "sft", "kind": "sft", "generations": 1, "train": {**SMALL, "max_steps": 30, "eval_steps": 15},
         "data": {"card": "python-docs-instruct", "max_train_rows": 240, "max_eval_rows": 16}},
        {"name": "rm", "kind": "rm", "train": {**SMALL, "max_steps": 20},
         "data": {**prefs, "splits": {"train": "reward", "validation": "validation"}}},
        {"name": "dpo", "kind": "dpo", "generations": 1, "train": dict(SMALL), "data": dict(prefs)},
        {"name": "eval", "kind": "eval", "models": {"sft": "@sft", "dpo": "@dpo"}, "baseline": "sft",
         "data": {"card": "python-docs-instruct"}, "max_prompts": 24,
         "generation": {"max_new_tokens": 16, "batch_size": 8},
         "judges": [{"reward_model": "@rm"}, {"reference": "rouge_l"}], **eval_overrides},
    ]  # fmt: skip
    return recipe


def run_align(*args: Any) -> int:
    from align.run import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("chain")
    assert run_align(write_yaml(tmp / "r.yaml", chain_recipe()), "--output-dir", tmp / "run") == 0
    return tmp / "run"


def summary(run_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir / stage / "summary.json").read_text())


# --------------------------------------------------------------------------------------------------
# kind: rm


@pytest.mark.slow
def test_reward_model_learns_the_held_out_pairs_and_saves_a_one_output_head(chain):
    from transformers import AutoModelForSequenceClassification

    rm = summary(chain, "rm")
    metrics = rm["metrics"]
    for key in ("accuracy_before", "accuracy", "margin", "eval_loss", "eval_loss_before", "train_loss"):
        assert isinstance(metrics[key], float), key
    # A random head on the sft model's body already ranks most loops below real sentences; training widens it.
    assert metrics["accuracy"] >= metrics["accuracy_before"] and metrics["accuracy"] >= 0.9
    assert metrics["margin"] > metrics["margin_before"] + 1.0
    assert metrics["flops_per_token"] > 0 and metrics["mfu"] is None  # a CPU has no known peak: not guessed
    assert rm["input_model"].startswith("@sft")
    figures = f"accuracy {metrics['accuracy_before']:.2f} → {metrics['accuracy']:.2f}"
    assert rm["verdict"]["reasons"][0].startswith(figures)
    # The Trainer's logged eval_accuracy differs from align's per-pair accuracy; the log says how, beside both.
    said = f"accuracy {metrics['accuracy_before']:.4f} → {metrics['accuracy']:.4f}: the share of the"
    assert (
        said in (chain / "align.log").read_text()
        and "is a mean of its eval batches' accuracies" in (chain / "align.log").read_text()
    )
    model = AutoModelForSequenceClassification.from_pretrained(chain / "rm" / "model")
    assert model.config.num_labels == 1 and model.score.weight.shape[0] == 1


@pytest.mark.slow
def test_the_report_and_console_show_each_kinds_headline_figure(chain):
    """lm and sft by eval loss, rm by accuracy, dpo by preference accuracy, each before and after; the eval by the
    last model's win rate. The rm row once showed a reward model's eval_loss: no kind may be left out."""
    from align.report import build_report
    from align.run import key_figure
    from align.values import same_decimals

    html = build_report(chain).read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"<tr><td>(\w+)</td><td>\w+</td>.*?</tr>", html)}
    for name, label, key in (("lm", "eval loss", "eval_loss"), ("sft", "eval loss", "eval_loss"),
                             ("rm", "accuracy", "accuracy"), ("dpo", "pref accuracy", "pref_accuracy")):  # fmt: skip
        metrics = summary(chain, name)["metrics"]
        row = rows[name]
        assert f"<td>{label}<br>" in row or f"<td>{label}</td>" in row, row
        # Before and after with one number of decimals, the same in the report and on the console.
        before, after = same_decimals(metrics[f"{key}_before"], metrics[key])
        assert f">{before}<" in row and f">{after}<" in row, row
        assert key_figure(summary(chain, name)).startswith(f"{key} {before} → {after}"), name
    assert key_figure(summary(chain, "eval")).startswith("dpo win rate ")
    # The data line counts the split; the eval's line says how many it uses of them, and why fewer.
    log = (chain / "align.log").read_text()
    assert re.search(r"python-docs-instruct: (\d+) prompts to evaluate", log)
    split = int(re.search(r"python-docs-instruct: (\d+) prompts to evaluate", log)[1])
    assert (f"evaluating 2 models on 24 held-out prompts (from the split's {split} rows: each prompt once, at most "
            "max_prompts 24)") in log  # fmt: skip


@pytest.mark.slow
def test_a_stage_without_a_model_takes_the_last_policy_stage_never_the_reward_model(chain):
    assert summary(chain, "dpo")["input_model"].startswith("@sft (")
    recipe = (chain / "recipe.yaml").read_text()
    assert "model: '@sft'" in recipe.split("name: dpo", 1)[1].split("name: eval", 1)[0]


def test_rm_and_eval_are_importable_entry_points():
    from align.stages import run_eval, run_rm

    assert callable(run_rm) and callable(run_eval)


# --------------------------------------------------------------------------------------------------
# kind: eval


@pytest.mark.slow
def test_eval_summary_holds_the_contract_figures_and_every_answer(chain):
    ev = summary(chain, "eval")
    assert ev["status"] == "completed" and ev["model_dir"] is None
    metrics = ev["metrics"]
    assert metrics["baseline"] == "sft" and metrics["prompts"] == 24 and metrics["judge"] == "reward_model"
    for label in ("sft", "dpo"):
        entry = metrics["models"][label]
        assert set(entry["score_mean"]) == {"reward_model", "rouge_l"}
        low, high = entry["win_rate_ci"]
        assert 0 <= low <= entry["win_rate"] <= high <= 1
        for key in ("lc_win_rate", "mean_length", "repetition", "distinct_2", "eos_rate"):
            assert isinstance(entry[key], float), key
    assert metrics["models"]["sft"]["verdict"]["status"] == "baseline"
    assert metrics["models"]["sft"]["win_rate"] == 0.5  # the baseline against itself: every prompt a tie
    assert metrics["models"]["dpo"]["verdict"]["status"] in ("better", "worse", "no_difference")
    assert ev["verdict"]["status"] == metrics["models"]["dpo"]["verdict"]["status"]

    rows = read_jsonl(chain / "eval" / "generations.jsonl")
    assert len(rows) == 24 * 2  # prompts x models x one sample
    first = rows[0]
    assert set(first) >= {"prompt_index", "prompt", "reference", "model", "sample", "answer", "tokens", "ended"}
    assert set(first["scores"]) == {"reward_model", "rouge_l"} and first["reference"]
    # The recorded figures are those of the recorded answers.
    dpo = [r for r in rows if r["model"] == "dpo"]
    assert metrics["models"]["dpo"]["mean_length"] == pytest.approx(sum(r["tokens"] for r in dpo) / len(dpo))
    mean_rouge = sum(r["scores"]["rouge_l"] for r in dpo) / len(dpo)
    assert metrics["models"]["dpo"]["score_mean"]["rouge_l"] == pytest.approx(mean_rouge)


@pytest.mark.slow
def test_eval_prompts_are_held_out_topics_no_stage_trained_on(chain):
    from align.builtin import held_out_topics, python_docs_instruct_splits

    test = python_docs_instruct_splits()["test"]
    topics = {p: t for p, t in zip(test["prompt"], test["topic"], strict=True)}
    prompts = {r["prompt"] for r in read_jsonl(chain / "eval" / "generations.jsonl")}
    assert prompts and all(topics[p] in held_out_topics() for p in prompts)


@pytest.mark.slow
def test_a_rerun_that_changes_nothing_regenerates_nothing(chain, caplog):
    before = (chain / "eval" / "generations.jsonl").read_bytes()
    recipe = chain.parent / "r.yaml"
    with caplog.at_level(logging.INFO):
        assert run_align(recipe, "--output-dir", chain) == 0
    pipeline = {s["name"]: s["status"] for s in json.loads((chain / "pipeline.json").read_text())["stages"]}
    assert pipeline["eval"] == "cached", pipeline
    assert summary(chain, "eval")["status"] == "completed", "summary.json keeps the status of the run that made it"
    assert "eval: unchanged since the last run" in caplog.text and "evaluating" not in caplog.text
    assert (chain / "eval" / "generations.jsonl").read_bytes() == before


@pytest.mark.slow
def test_a_stopped_eval_goes_on_from_the_answers_it_kept(chain, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(chain, run_dir)
    before = read_jsonl(run_dir / "eval" / "generations.jsonl")
    # As if stopped after the first model: its answers kept, the second's not yet made.
    record = summary(run_dir, "eval")
    record["status"] = "interrupted"
    (run_dir / "eval" / "summary.json").write_text(json.dumps(record))
    (run_dir / "eval" / "generations.jsonl").unlink()
    (run_dir / "eval" / "progress" / "dpo.json").unlink()
    with caplog.at_level(logging.INFO):
        assert run_align(chain.parent / "r.yaml", "--output-dir", run_dir) == 0
    assert "going on from the answers it kept" in caplog.text
    assert "sft: 24 answers kept from the earlier run" in caplog.text
    assert "dpo: 24 answers, mean" in caplog.text  # made again, greedy: the same answers
    after = read_jsonl(run_dir / "eval" / "generations.jsonl")
    assert [(r["model"], r["answer"]) for r in after] == [(r["model"], r["answer"]) for r in before]


def eval_only(tmp_path: Path, models: dict[str, str], **stage: Any) -> dict[str, Any]:
    """An eval-only recipe over saved model directories (as recipes/eval_only.yaml)."""
    return {"name": "evalonly", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [
        {"name": "eval", "kind": "eval", "models": models, "data": {"card": "python-docs-instruct"},
         "max_prompts": 40, "generation": {"max_new_tokens": 12, "batch_size": 20}, **stage}]}  # fmt: skip


@pytest.mark.slow
def test_a_model_sampled_against_itself_is_a_draw(chain, tmp_path):
    sft = str(chain / "sft" / "model")
    sampled = {"max_new_tokens": 12, "temperature": 1.0, "num_samples": 2, "batch_size": 20}
    judges = [{"reward_model": str(chain / "rm" / "model")}]
    recipe = eval_only(tmp_path, {"a": sft, "b": sft}, judges=judges, generation=sampled)
    assert run_align(write_yaml(tmp_path / "e.yaml", recipe), "--output-dir", tmp_path / "run") == 0
    metrics = summary(tmp_path / "run", "eval")["metrics"]
    b = metrics["models"]["b"]
    low, high = b["win_rate_ci"]
    assert low < 0.5 < high and 0.35 < b["win_rate"] < 0.65
    assert b["verdict"]["status"] == "no_difference"
    rows = read_jsonl(tmp_path / "run" / "eval" / "generations.jsonl")
    answers = {label: [r["answer"] for r in rows if r["model"] == label] for label in ("a", "b")}
    assert len(answers["a"]) == 80 and answers["a"] != answers["b"]  # a seed per label: the samples differ


@pytest.mark.slow
def test_an_untrained_model_ranks_below_with_an_interval_under_half(chain, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sft = chain / "sft" / "model"
    noise = tmp_path / "untrained"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sft)).save_pretrained(noise)
    AutoTokenizer.from_pretrained(sft).save_pretrained(noise)
    recipe = eval_only(tmp_path, {"sft": str(sft), "untrained": str(noise)}, judges=[{"reference": "rouge_l"}])
    assert run_align(write_yaml(tmp_path / "e.yaml", recipe), "--output-dir", tmp_path / "run") == 0
    entry = summary(tmp_path / "run", "eval")["metrics"]["models"]["untrained"]
    assert entry["win_rate_ci"][1] < 0.5, entry
    assert entry["verdict"]["status"] == "worse"


@pytest.mark.slow
def test_the_shipped_eval_only_recipe_evaluates_saved_models_without_training(chain, tmp_path):
    from align.loader import load_recipe

    shipped = Path(__file__).resolve().parent.parent / "recipes" / "eval_only.yaml"
    assert load_recipe(shipped).stages[0].kind == "eval"
    sets = [f"stages.eval.models.sft={chain / 'sft' / 'model'}", f"stages.eval.models.dpo={chain / 'dpo' / 'model'}",
            f"stages.eval.judges.0.reward_model={chain / 'rm' / 'model'}", "stages.eval.max_prompts=8",
            "stages.eval.generation.max_new_tokens=8"]  # fmt: skip
    args = [shipped, "--output-dir", tmp_path / "run"] + [a for s in sets for a in ("--set", s)]
    assert run_align(*args) == 0
    ev = summary(tmp_path / "run", "eval")
    assert ev["metrics"]["prompts"] == 8 and set(ev["metrics"]["models"]) == {"sft", "dpo"}
    assert not (tmp_path / "run" / "eval" / "model").exists()


# --------------------------------------------------------------------------------------------------
# Refused before anything trains


def test_eval_prompts_an_earlier_stage_trained_on_are_refused(tmp_path, run_cli):
    recipe = chain_recipe()
    del recipe["stages"][2:4]  # lm -> sft -> eval
    recipe["stages"][-1].update(models={"sft": "@sft"}, judges=[{"reference": "rouge_l"}])
    recipe["stages"][-1]["data"] = {"card": "python-docs-instruct", "splits": {"test": "train"}}
    path = write_yaml(tmp_path / "r.yaml", recipe)
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run")
    assert code == 2
    assert re.search(
        r"stages.eval.data: \d+ of the 24 prompts this eval answers \(from the split's \d+ rows\) are "
        r"among its training prompts \(stage sft\); the first, prompt \d+: '",
        err,
    ), err
    assert "allow_overlap" in err
    assert not (tmp_path / "run").exists()  # refused before the lm stage trained
    recipe["stages"][-1]["allow_overlap"] = True
    code, out, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run", "--dry-run")
    assert code == 0, err


def test_eval_references_found_in_the_lm_text_are_refused(tmp_path, run_cli):
    recipe = chain_recipe()
    del recipe["stages"][1:4]  # lm -> eval
    recipe["stages"][0]["data"] = {"card": "python-docs", "splits": {"train": "test"}}  # the held-out text
    recipe["stages"][-1].update(models={"lm": "@lm"}, baseline="lm", judges=[{"reference": "rouge_l"}])
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run", "--dry-run")
    assert code == 2
    assert "rows) are found word for word in its training text (stage lm)" in err


def test_a_leaked_chat_prompt_is_quoted_by_its_user_turn_not_the_system_turn_every_row_shares():
    from types import SimpleNamespace

    from datasets import Dataset

    from align.stages.eval import EvalRow, leaked

    system = {"role": "system", "content": "You are a careful assistant who answers questions about Python. " * 2}
    prompts = [[system, {"role": "user", "content": f"What does the keyword number {i} do?"}] for i in range(6)]
    rows = [EvalRow(p, None) for p in prompts]
    recipe = SimpleNamespace(stages=[SimpleNamespace(name="sft"), SimpleNamespace(name="eval")])
    chain = {"sft": {"train": Dataset.from_dict({"prompt": prompts[2:4]})}}
    (problem,) = leaked(rows, recipe, recipe.stages[1], chain, split_rows=40)
    assert problem == (
        "stages.eval.data: 2 of the 6 prompts this eval answers (from the split's 40 rows) are among its training "
        "prompts (stage sft); the first, prompt 3: 'user: What does the keyword number 2 do?'"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s[4].update(train={"max_steps": 3}),
            "stages take `train` (this stage is an eval stage, which trains nothing)",
        ),
        (lambda s: s[3].update(model="@rm"), "stages.dpo.model: '@rm' is an rm stage"),
        (lambda s: s[4].update(models={"rm": "@rm"}, baseline="rm"), "stages.eval.models.rm: '@rm' is an rm stage"),
        (lambda s: s[4].update(judges=[{"reward_model": "@sft"}]), "judges.0.reward_model: '@sft' is an sft"),
        (lambda s: s[4].update(baseline="base"), "stages.eval.baseline: 'base' is not one of the models"),
        (lambda s: s[4].update(judges=[]), "stages.eval.judges: an eval stage needs at least one judge"),
        (
            lambda s: s[1].update(max_prompts=5),
            "stages.sft.max_prompts: only eval stages take `max_prompts` (this stage is an sft stage)",
        ),
        (lambda s: s[4].update(judges=[{"reward_model": "@rm", "reference": "rouge_l"}]), "exactly one of"),
    ],
)
def test_eval_and_rm_recipe_mistakes_are_named(tmp_path, run_cli, change, message):
    recipe = chain_recipe()
    change(recipe["stages"])
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--dry-run")
    assert code == 2 and message in err, err


@pytest.mark.slow
def test_a_lora_reward_model_saves_adapters_with_its_head_and_judges_from_them(chain, tmp_path):
    recipe = {"name": "lora_rm", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [
        {"name": "rm", "kind": "rm", "model": str(chain / "sft" / "model"), "peft": {"r": 4, "alpha": 8},
         "train": {**SMALL, "max_steps": 10, "learning_rate": 1.0e-2},
         "data": {"card": "python-docs-preferences", "splits": {"train": "reward", "validation": "validation"},
                  "max_train_rows": 48, "max_eval_rows": 32}}]}  # fmt: skip
    assert run_align(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run") == 0
    rm = summary(tmp_path / "run", "rm")
    saved = tmp_path / "run" / "rm" / "model"
    config = json.loads((saved / "adapter_config.json").read_text())
    assert rm["saved"] == "adapter" and config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    assert rm["metrics"]["margin"] > rm["metrics"]["margin_before"]
    # As a judge: the adapters (and the trained head they carry) on the sft body order the held-out pairs as trained.
    from align.builtin import python_docs_preferences
    from align.evaluation.judges import score_token_ids
    from align.models import build_model

    model, tokenizer = build_model(str(saved), "judge", reward_head=True)
    pairs = python_docs_preferences()["validation"]
    sides = [tokenizer([p + a + tokenizer.eos_token for p, a in zip(pairs["prompt"], pairs[side], strict=True)],
                       add_special_tokens=False)["input_ids"] for side in ("chosen", "rejected")]  # fmt: skip
    fit = [i for i, (c, r) in enumerate(zip(*sides, strict=True)) if max(len(c), len(r)) <= model.config.n_positions]
    chosen, rejected = (score_token_ids(model, [ids[i] for i in fit], tokenizer.pad_token_id) for ids in sides)
    assert len(fit) >= 20
    ordered = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
    margin = sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
    print(f"judge from adapters: {ordered:.2f} of pairs ordered, margin {margin:.3f}; stage: {rm['metrics']}")
    assert ordered >= 0.8, f"the judge ranks the real sentence above its loop in only {ordered:.0%} of the pairs"
    # The trained head, not a fresh one: the separation is the trained one, not the untrained body's.
    assert margin > (rm["metrics"]["margin"] + rm["metrics"]["margin_before"]) / 2
    judged = eval_only(tmp_path, {"sft": str(chain / "sft" / "model")}, judges=[{"reward_model": str(saved)}])
    judged["stages"][0]["max_prompts"] = 8
    assert run_align(write_yaml(tmp_path / "e.yaml", judged), "--output-dir", tmp_path / "eval") == 0
    assert summary(tmp_path / "eval", "eval")["metrics"]["models"]["sft"]["score_mean"]["reward_model"] is not None


@pytest.mark.slow
def test_lm_eval_tasks_run_on_every_evaluated_model(chain, tmp_path, monkeypatch):
    """lm-evaluation-harness through the eval stage, offline, on a local multiple-choice task (tests/fixtures)."""
    pytest.importorskip("lm_eval", reason='lm-eval is the `eval` extra: pip install -e ".[eval]"')
    fixtures = Path(__file__).resolve().parent / "fixtures" / "lm_eval"
    monkeypatch.chdir(fixtures)  # the task's data_files are relative to the working directory (lm-eval's rule)
    models = {"sft": str(chain / "sft" / "model"), "dpo": str(chain / "dpo" / "model")}
    recipe = eval_only(tmp_path, models, judges=[{"reference": "rouge_l"}],
                       lm_eval={"tasks": ["tiny_choice"], "include_path": str(fixtures), "limit": 10})  # fmt: skip
    recipe["stages"][0]["max_prompts"] = 4
    assert run_align(write_yaml(tmp_path / "e.yaml", recipe), "--output-dir", tmp_path / "run") == 0
    for label in models:
        task = summary(tmp_path / "run", "eval")["metrics"]["models"][label]["lm_eval"]["tiny_choice"]
        assert 0.0 <= task["acc"] <= 1.0 and round(task["acc"] * 10) == task["acc"] * 10  # ten questions


@pytest.mark.slow
def test_lm_eval_without_the_extra_is_refused_with_the_install_command(chain, tmp_path, run_cli, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: find_spec and import find nothing
    recipe = eval_only(tmp_path, {"sft": str(chain / "sft" / "model")}, judges=[{"reference": "rouge_l"}],
                       lm_eval={"tasks": ["tiny_choice"]})  # fmt: skip
    code, _, err = run_cli(write_yaml(tmp_path / "e.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 2 and "stages.eval.lm_eval: lm-evaluation-harness is not installed" in err
    assert 'pip install -e ".[eval]"' in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_models_inside_the_output_directory_are_refused_even_with_fresh(chain, tmp_path, run_cli):
    """An eval over a run's models, pointed at that very run directory with --fresh, would clear the models before
    reading them: refused, nothing removed."""
    run_dir = tmp_path / "run"
    shutil.copytree(chain, run_dir)
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    recipe = eval_only(tmp_path, {"sft": str(run_dir / "sft" / "model")}, judges=[{"reference": "rouge_l"}])
    for extra in ([], ["--fresh"]):
        code, _, err = run_cli(write_yaml(tmp_path / "e.yaml", recipe), "--output-dir", run_dir, *extra)
        assert code == 2 and "stages.eval.models.sft: " in err and "is inside the output directory" in err, err
        assert "--fresh" not in err.split("hint:", 1)[1]
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before


@pytest.mark.slow
def test_a_reward_models_card_and_chat_say_it_scores_and_does_not_generate(chain, capsys):
    from align.chat import main as chat

    card = (chain / "rm" / "model" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card
    assert "| `rm` | accuracy |" in card and "generate(" not in card
    assert chat([str(chain / "rm" / "model"), "--prompt", "hi"]) == 2
    assert "a reward model (it scores answers; it does not generate text)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_later_evals_verdict_reaches_the_evaluated_models_cards(chain):
    """The dpo card said "Verdict: improved" and never the eval's verdict on it, and `align push` would publish it."""
    evaluation = summary(chain, "eval")
    judged = [name for name in evaluation["metrics"]["models"] if name != evaluation["metrics"]["baseline"]]
    assert judged
    for name in judged:
        card = (chain / name / "model" / "README.md").read_text()
        section = card[card.index("## Later evaluations") :].split("\n## ", 1)[0]
        own = evaluation["metrics"]["models"][name]["verdict"]["status"]
        assert f"- `eval`: **{own}**" in section, section
        ours = [r.removeprefix(f"{name}: ") for r in evaluation["verdict"]["reasons"] if r.startswith(f"{name}: ")]
        assert all(reason in section for reason in ours), section
    baseline = evaluation["metrics"]["baseline"]
    if (chain / baseline / "model" / "README.md").is_file():
        assert (
            "the baseline the other models were compared against"
            in (chain / baseline / "model" / "README.md").read_text()
        )
