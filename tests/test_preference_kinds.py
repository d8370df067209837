"""kto, orpo and simpo: each trains on a user's own files from a tiny local model, holds the reference (or none) and
the loss its method needs, reads its data the right way round, and ends with a held-out measure and a verdict.

One run (module fixture) trains all four from one saved model: kto on unpaired rows and on pairs, orpo, simpo.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_MODEL, captured_trainers, read_jsonl, write_yaml

TRAIN = {"max_length": 128, "max_steps": 60, "per_device_train_batch_size": 8, "learning_rate": 1.0e-2,
         "logging_steps": 10, "eval_steps": 30}  # fmt: skip
STATUSES = ("improved", "did_not_learn", "got_worse")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def columns_to_rows(columns: dict[str, list], fields: tuple[str, ...], n: int) -> list[dict[str, Any]]:
    return [{f: columns[f][i] for f in fields} for i in range(min(n, len(columns[fields[0]])))]


def files_data(train: str, valid: str, fmt: str) -> dict[str, Any]:
    return {"source": {"files": {"train": [train], "validation": [valid]}}, "format": fmt,
            "splits": {"validation": "validation"}}  # fmt: skip


def stage(name: str, kind: str, model: str, data: dict[str, Any], **train: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "model": model, "generations": 1, "data": data, "train": {**TRAIN, **train}}


def recipe(stages: list[dict[str, Any]], name: str = "prefs") -> dict[str, Any]:
    return {"name": name, "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": stages}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """The user's files (pairs and labelled rows, from the builtin preference set), a tiny saved model (an sft
    stage's output, used as a plain directory), and one run of the four stages on them."""
    from align.builtin import python_docs_feedback, python_docs_preferences
    from align.run import main

    root = tmp_path_factory.mktemp("prefs")
    prefs, rows = python_docs_preferences(), python_docs_feedback()
    pair_fields, row_fields = ("prompt", "chosen", "rejected"), ("prompt", "completion", "label")
    files = {
        "pairs": (write_jsonl(root / "pairs_train.jsonl", columns_to_rows(prefs["train"], pair_fields, 200)),
                  write_jsonl(root / "pairs_valid.jsonl", columns_to_rows(prefs["validation"], pair_fields, 48))),
        "rows": (write_jsonl(root / "rows_train.jsonl", columns_to_rows(rows["train"], row_fields, 200)),
                 write_jsonl(root / "rows_valid.jsonl", columns_to_rows(rows["validation"], row_fields, 48))),
    }  # fmt: skip
    sft = {"name": "sft", "kind": "sft", "model": {**TINY_MODEL, "n_positions": 128}, "generations": 0,
           "data": {"card": "python-docs-instruct", "max_train_rows": 240, "max_eval_rows": 16},
           "train": {**TRAIN, "max_steps": 30, "learning_rate": 3.0e-3, "eval_steps": 15}}  # fmt: skip
    assert main([str(write_yaml(root / "base.yaml", recipe([sft], "base"))), "--output-dir", str(root / "base")]) == 0
    model = str(root / "base" / "sft" / "model")
    pairs = files_data(*files["pairs"], "preference")
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]}
    stages = [
        stage("kto", "kto", model, files_data(*files["rows"], "unpaired_preference"), beta=0.5),
        stage("kto_pairs", "kto", model, pairs, beta=0.5),
        stage("orpo", "orpo", model, pairs),
        stage("simpo", "simpo", model, pairs),
        {**stage("kto_lora", "kto", model, files_data(*files["rows"], "unpaired_preference"), max_steps=2,
                 eval_steps=2), "peft": lora},
    ]  # fmt: skip
    path = write_yaml(root / "prefs.yaml", recipe(stages))
    with captured_trainers() as trainers:
        assert main([str(path), "--output-dir", str(root / "run")]) == 0
    return {"root": root, "run": root / "run", "recipe": path, "model": model, "trainers": trainers, "files": files}


def summary(world: dict[str, Any], name: str) -> dict[str, Any]:
    return json.loads((world["run"] / name / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "measure", "status"),
    [("kto", "label_auc", "improved"), ("kto_pairs", "pref_accuracy", None), ("orpo", "pref_accuracy", "improved"),
     ("simpo", "pref_accuracy", "improved")],
)  # fmt: skip
def test_each_kind_trains_on_the_users_files_and_says_whether_it_helped(world, name, measure, status):
    result = summary(world, name)
    assert result["status"] == "completed" and result["input_model"] == world["model"]
    metrics = result["metrics"]
    before, after = metrics[f"{measure}_before"], metrics[measure]
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    verdict = result["verdict"]
    assert verdict["status"] in STATUSES
    assert verdict["reasons"][0].startswith(f"{measure} {before:.2f} → {after:.2f}"), verdict["reasons"]
    if status is not None:  # the measured outcome of this seeded run (README: the preference kinds)
        assert verdict["status"] == status, verdict
    assert metrics["global_step"] == TRAIN["max_steps"] and metrics["eval_loss"] is not None


@pytest.mark.slow
def test_kto_reads_the_labels_as_given_and_splits_pairs_chosen_first(world):
    import torch

    trainer, paired = world["trainers"]["kto"], world["trainers"]["kto_pairs"]
    given = read_jsonl(Path(world["files"]["rows"][0]))
    assert list(trainer.train_dataset["label"][:20]) == [row["label"] for row in given[:20]]
    pairs = read_jsonl(Path(world["files"]["pairs"][0]))
    prepared = paired.train_dataset
    assert list(prepared["label"][:6]) == [True, False] * 3, "desirable and undesirable rows alternate"
    tokenizer = paired.processing_class
    chosen, rejected = (tokenizer.decode(torch.tensor(prepared[i]["completion_ids"])) for i in (0, 1))
    half = len(pairs) // 2  # the undesirable row beside pair 0's chosen answer is pair n/2's rejected one
    assert pairs[0]["chosen"].strip()[:30] in chosen and pairs[half]["rejected"].strip()[:30] in rejected
    # KTO's KL estimate pairs each row's prompt with the next row's answer: both labels in every batch, and no
    # neighbour answering the same prompt (that pair would not be mismatched).
    labels, prompts = list(prepared["label"]), list(paired.train_dataset["prompt"])
    batches = [labels[i : i + 8] for i in range(0, len(labels) - 7, 8)]
    assert all(True in b and False in b for b in batches)
    dropped = 2 * len(pairs) - len(prompts)  # rows whose prompt fills max_length: their neighbours meet
    assert sum(a == b for a, b in zip(prompts, prompts[1:], strict=False)) <= dropped


@pytest.mark.slow
def test_kto_holds_a_frozen_copy_of_its_input_as_reference(world):
    from transformers import AutoModelForCausalLM

    trainer = world["trainers"]["kto"]
    reference = trainer.ref_model
    assert reference is not None and reference is not trainer.model
    assert not any(p.requires_grad for p in reference.parameters())
    original = AutoModelForCausalLM.from_pretrained(world["model"]).state_dict()
    held = reference.state_dict()
    assert all((held[k] == original[k]).all() for k in original), "the reference is the input model, untrained"
    trained = trainer.model.state_dict()
    assert any((trained[k] != original[k]).any() for k in original), "the policy trained"
    assert summary(world, "kto")["reference"] == "a frozen copy of the input model"


@pytest.mark.slow
def test_orpo_and_simpo_train_without_a_reference_and_simpo_without_an_nll_term(world):
    from align.patches import experimental

    orpo, simpo = world["trainers"]["orpo"], world["trainers"]["simpo"]
    assert isinstance(orpo, experimental("trl.experimental.orpo:ORPOTrainer"))
    assert isinstance(simpo, experimental("trl.experimental.cpo:CPOTrainer"))
    assert getattr(orpo, "ref_model", None) is None and getattr(simpo, "ref_model", None) is None
    assert (simpo.args.loss_type, simpo.args.cpo_alpha, simpo.args.beta) == ("simpo", 0.0, 2.0)
    settings = summary(world, "simpo")["plan"]["settings"]
    assert settings["cpo_alpha"]["source"].startswith("align default: pure SimPO")
    assert settings["loss_type"] == {"value": "simpo", "source": "align (managed): SimPO is CPO's simpo loss"}
    assert summary(world, "simpo")["metrics"]["nll_loss"] == 0.0
    assert summary(world, "orpo")["metrics"]["nll_loss"] > 0.0, "ORPO's loss holds the chosen answers' NLL"


@pytest.mark.slow
def test_each_kind_declares_its_guards(world):
    from align.guards import NumericGuard, PreferenceGuard

    for name, trainer in world["trainers"].items():
        callbacks = trainer.callback_handler.callbacks
        assert any(isinstance(cb, NumericGuard) for cb in callbacks), name
        guard = next(cb for cb in callbacks if isinstance(cb, PreferenceGuard))
        assert guard.stuck_loss is None, f"{name}: no loss value means 'nothing learned' for this method"


@pytest.mark.slow
def test_dry_run_shows_each_plan_and_loss_mask_and_a_rerun_is_cached(world, run_cli):
    code, out, err = run_cli(world["recipe"], "--output-dir", world["run"], "--dry-run")
    assert code == 0, err
    blocks = {b.split("\n", 1)[0].split()[1]: b for b in out.split("\n[")[1:]}
    for name in ("kto", "kto_pairs", "orpo", "simpo", "kto_lora"):
        assert "run: cached (unchanged since the last run" in blocks[name], blocks[name]
        assert "[[" in blocks[name], f"{name}: the rendered example marks what the loss falls on"
    assert "reference: a frozen copy of the input model" in blocks["kto"] and "label: 'desirable'" in blocks["kto"]
    assert "held-out measure: label_auc" in blocks["kto"] and "held-out measure: pref_accuracy" in blocks["kto_pairs"]
    assert "reference: none (ORPO is reference-free)" in blocks["orpo"]
    assert "NLL on the whole chosen sequence, prompt included" in blocks["orpo"]
    assert "cpo_alpha: 0.0  (align default: pure SimPO" in blocks["simpo"]
    names = ("kto", "kto_pairs", "orpo", "simpo", "kto_lora")
    before = {name: (world["run"] / name / "summary.json").read_bytes() for name in names}
    code, out, err = run_cli(world["recipe"], "--output-dir", world["run"])
    assert code == 0, err
    pipeline = {s["name"]: s["status"] for s in json.loads((world["run"] / "pipeline.json").read_text())["stages"]}
    assert all(pipeline[name] == "cached" for name in names), pipeline
    # The summaries still say what the run that trained them wrote: a rerun reuses a stage, it does not remake it.
    assert all((world["run"] / name / "summary.json").read_bytes() == before[name] for name in names)
    assert all(summary(world, name)["status"] == "completed" for name in names)


@pytest.mark.slow
def test_report_card_and_console_show_each_kinds_headline(world):
    from align.report import build_report
    from align.run import results_table

    html = build_report(world["run"]).read_text()
    for label in ("label AUC", "pref accuracy", "pref accuracy (per token)", "eval loss (ORPO)"):
        assert f"<td>{label}" in html or f"<br>{label}" in html, label
    card = (world["run"] / "kto" / "model" / "README.md").read_text()
    assert "| `kto` | label_auc |" in card and "tags:\n- align\n- kto" in card
    table = results_table([summary(world, name) for name in ("kto", "simpo")])
    assert "label_auc" in table.splitlines()[1] and "pref_accuracy" in table.splitlines()[2]


@pytest.mark.slow
def test_lora_kto_uses_its_adapters_off_as_reference(world):
    trainer = world["trainers"]["kto_lora"]
    assert trainer.ref_model is None and hasattr(trainer.model, "disable_adapter"), "no second model in memory"
    assert list(trainer.model.peft_config) == ["default"]
    result = summary(world, "kto_lora")
    assert "adapters switched off" in result["reference"] and result["saved"] == "adapter"


# --------------------------------------------------------------------------------------------------
# Bad input: exit 2 before anything trains, naming the key or row


@pytest.mark.slow
def test_unpaired_rows_whose_label_is_not_a_boolean_name_the_files_line(world, tmp_path, run_cli):
    rows = read_jsonl(Path(world["files"]["rows"][0]))[:20]
    rows[2]["label"] = "yes"
    bad = write_jsonl(tmp_path / "rows.jsonl", rows)
    kto = stage("kto", "kto", world["model"], files_data(bad, world["files"]["rows"][1], "unpaired_preference"))
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe([kto])), "--dry-run")
    assert code == 2
    assert "rows.jsonl: line 3: column 'label' must be true or false (true: a desirable answer), got 'yes'" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(kind="ppo2"), "unknown kind 'ppo2' (kinds: lm, sft, dpo, kto, orpo, simpo, rm"),
        (lambda s: s.update(kind="kt0"), "did you mean 'kto'?"),
        (lambda s: s.update(judges=[{"reference": "rouge_l"}]),
         "stages.x.judges: only eval stages take `judges` (this stage is an orpo stage)"),
        (lambda s: s.update(kind="dpo", models={"a": "@b"}), "stages.x.models: only eval stages take `models`"),
        (lambda s: s.update(kind="simpo", train={"loss_type": "sigmoid"}),
         "stages.x.train.loss_type: a simpo stage trains SimPO's loss (got 'sigmoid')"),
        (lambda s: s.update(kind="kto", train={"per_device_train_batch_size": 1}),
         "KTO estimates its KL term from other rows of the same batch, so it needs at least 2 per device (got 1)"),
        (lambda s: s.update(kind="orpo", train={"loss_type": "x"}), "stages.x.train: unknown key 'loss_type'"),
        (lambda s: s["data"].update(format="unpaired_preference"),
         "stages.x.data.format: 'unpaired_preference' cannot feed an orpo stage (use preference,"),
    ],
)  # fmt: skip
def test_recipe_mistakes_are_named_with_the_kinds_that_take_a_key(world, tmp_path, run_cli, change, message):
    orpo = stage("x", "orpo", world["model"], files_data(*world["files"]["pairs"], "preference"))
    change(orpo)
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe([orpo])), "--dry-run")
    assert code == 2 and message in err, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_crashed_kto_stage_resumes_and_ends_where_an_uninterrupted_run_ends(world, tmp_path, run_cli, monkeypatch):
    from align.metrics import MetricsWriter

    kto = stage("kto", "kto", world["model"], files_data(*world["files"]["rows"], "unpaired_preference"),
                max_steps=12, eval_steps=6, save_steps=6)  # fmt: skip
    path = write_yaml(tmp_path / "r.yaml", recipe([kto]))
    code, _, err = run_cli(path, "--output-dir", tmp_path / "whole")
    assert code == 0, err
    original = MetricsWriter.on_step_end

    def crash_at_step_9(self, args, state, control, **kwargs):
        if state.global_step == 9:
            raise RuntimeError("the machine went away")
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(MetricsWriter, "on_step_end", crash_at_step_9)
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run")
    assert code == 1 and "the machine went away" in err
    monkeypatch.setattr(MetricsWriter, "on_step_end", original)
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run")
    assert code == 0 and "resuming from checkpoint-6" in err, err
    whole, resumed = (json.loads((tmp_path / d / "kto" / "summary.json").read_text()) for d in ("whole", "run"))
    assert resumed["metrics"]["global_step"] == 12
    assert abs(resumed["metrics"]["eval_loss"] - whole["metrics"]["eval_loss"]) <= 1e-5
    assert resumed["metrics"]["label_auc"] == pytest.approx(whole["metrics"]["label_auc"], abs=1e-9)
