"""Data mixing (`data: {mix: [...]}`): realized counts, repeats, format unification, per-source eval losses, the
fingerprint, the card, and bad input named as `--set` spells it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from align.errors import BadInput
from tests.conftest import TINY_MODEL, read_jsonl, write_yaml

TRAIN = {"max_length": 64, "max_steps": 16, "per_device_train_batch_size": 8, "learning_rate": 3.0e-3,
         "logging_steps": 4, "eval_steps": 8}  # fmt: skip


def write_sources(folder: Path, chat_rows: int = 200, domain_rows: int = 60) -> None:
    """A user's own two sets: a JSONL of sums (question/answer) and a CSV of colours (instruction/output)."""
    with (folder / "chat.jsonl").open("w") as fh:
        for i in range(chat_rows):
            fh.write(json.dumps({"question": f"What is {i} plus {i}?", "answer": f" {2 * i}."}) + "\n")
    with (folder / "domain.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["instruction", "output"])
        for i in range(domain_rows):
            writer.writerow([f"Name colour number {i}.", f" Colour {i % 7}."])


def sft_mix(weights: tuple[float, float] = (3, 1), **data) -> dict:
    mix = [
        {"source": {"files": ["chat.jsonl"]}, "format": "prompt_completion",
         "columns": {"prompt": "question", "completion": "answer"}, "weight": weights[0]},
        {"name": "domain", "source": {"files": ["domain.csv"]}, "format": "prompt_completion",
         "columns": {"prompt": "instruction", "completion": "output"}, "weight": weights[1], "valid_fraction": 0.2},
    ]  # fmt: skip
    stage = {"name": "sft", "kind": "sft", "model": dict(TINY_MODEL), "data": {"mix": mix, **data},
             "train": dict(TRAIN), "generations": 2}  # fmt: skip
    return {"name": "mix", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}


@pytest.fixture(scope="module")
def sft_mix_run(tmp_path_factory):
    from align.run import main

    tmp = tmp_path_factory.mktemp("mix")
    write_sources(tmp)
    recipe = write_yaml(tmp / "r.yaml", sft_mix())
    assert main([str(recipe), "--output-dir", str(tmp / "run")]) == 0
    return tmp


def summary(run_dir: Path, stage: str = "sft") -> dict:
    return json.loads((run_dir / stage / "summary.json").read_text())


@pytest.mark.slow
def test_a_jsonl_and_a_csv_mix_3_to_1_without_repeating_the_smaller(sft_mix_run):
    mix = summary(sft_mix_run / "run")["data"]["mix"]
    chat, domain = mix
    assert (chat["name"], domain["name"]) == ("chat", "domain")  # a file's stem where no name is given
    # 200 rows, 5% held out -> 190; 60 rows, 20% held out -> 48. The largest 3:1 mix repeating nothing: 144 + 48.
    assert (chat["available"], domain["available"]) == (190, 48)
    assert (chat["taken"], domain["taken"]) == (144, 48)
    assert chat["taken"] == 3 * domain["taken"]
    assert not chat["repeated"] and not domain["repeated"]
    assert (chat["share"], domain["share"]) == (0.75, 0.25)
    assert summary(sft_mix_run / "run")["data_order"] == {
        "seed": 0, "global_batch": 8, "per_device": 8, "accumulation": 1, "processes": 1, "train_rows": 192,
        "unit": "examples",
    }  # fmt: skip


@pytest.mark.slow
def test_the_same_rows_are_taken_on_a_second_load(sft_mix_run):
    from align.data import load_data
    from align.data_cards import resolve_data
    from align.recipe import DataRef

    ref = DataRef.model_validate(sft_mix()["stages"][0]["data"])
    loads = [load_data(resolve_data(ref, sft_mix_run, "stages.sft.data"), seed=0, base_dir=sft_mix_run)
             for _ in range(2)]  # fmt: skip
    assert loads[0].mix == loads[1].mix == summary(sft_mix_run / "run")["data"]["mix"]
    assert loads[0]["train"]["prompt"] == loads[1]["train"]["prompt"]
    other_seed = load_data(resolve_data(ref, sft_mix_run, "stages.sft.data"), seed=1, base_dir=sft_mix_run)
    assert other_seed.mix[0]["rows_sha256"] != loads[0].mix[0]["rows_sha256"], "each source is shuffled by the seed"
    # The mix is interleaved, not one source after the other.
    first = ["colour" in p for p in loads[0]["train"]["prompt"][:40]]
    assert 0 < sum(first) < 40


@pytest.mark.slow
def test_eval_loss_per_source_beside_the_total(sft_mix_run):
    run = sft_mix_run / "run"
    metrics = summary(run)["metrics"]
    by_source, before = metrics["eval_loss_by_source"], metrics["eval_loss_by_source_before"]
    assert set(by_source) == set(before) == {"chat", "domain"}
    assert all(by_source[n] < before[n] for n in by_source), "both sources learned"
    # eval_loss is the whole validation split's: between its sources' (their rows, 10 and 12, weigh alike).
    assert min(by_source.values()) - 1e-6 <= metrics["eval_loss"] <= max(by_source.values()) + 1e-6
    rows = [r for r in read_jsonl(run / "sft" / "metrics.jsonl") if "eval_loss" in r]
    assert len(rows) >= 3 and all("eval_chat_loss" in r and "eval_domain_loss" in r for r in rows)
    assert rows[-1]["eval_domain_loss"] == pytest.approx(by_source["domain"])


@pytest.mark.slow
def test_the_report_shows_each_source_beside_the_total(sft_mix_run):
    from align.report import build_report

    text = build_report(sft_mix_run / "run").read_text()
    table = text[text.index("<h3>Data mix</h3>") :].split("</table>")[0]
    assert "<td>chat</td><td>3</td><td>144 of 190</td><td>75.0%</td>" in table
    assert "<td>domain</td><td>1</td><td>48 of 48</td><td>25.0%</td>" in table
    assert "eval&nbsp;loss:&nbsp;domain" in text, "the stages table has a line per source"
    assert "eval loss: domain" in text, "the loss plot draws each source's curve"


@pytest.mark.slow
def test_the_card_and_dry_run_show_the_mix(sft_mix_run, run_cli):
    card = (sft_mix_run / "run" / "sft" / "model" / "README.md").read_text()
    assert "mix of" in card and "144 rows, 75%" in card and "48 rows, 25%" in card
    code, out, err = run_cli(sft_mix_run / "r.yaml", "--output-dir", sft_mix_run / "run", "--dry-run")
    assert code == 0, err
    assert "cached (unchanged" in out
    assert "chat: 144 of 190 train rows (75.0% of rows, " in out and "% of tokens), weight 3" in out
    code, out, err = run_cli(sft_mix_run / "r.yaml", "--output-dir", sft_mix_run / "run", "--dry-run",
                             "--set", "stages.sft.data.mix.1.weight=2")  # fmt: skip
    assert code == 0, err
    assert "runs again: changed since the last run" in out
    assert "domain: 48 of 48 train rows (40.0% of rows" in out


@pytest.mark.slow
def test_the_resolved_recipe_of_a_mix_runs_again_as_the_same_stage(sft_mix_run, run_cli, monkeypatch):
    """recipe.yaml (and the card's and report's copies) once wrote the defaults back beside `mix:`, which the loader
    refuses: the run's own record could not be run again. (Run again, it is planned as `runs again`, as any resolved
    recipe is: the stage's fingerprint hashes its `data:` as written, card names expanded.)"""
    import yaml

    monkeypatch.chdir(sft_mix_run)  # the sources, named as written (relative), are found from here
    resolved = sft_mix_run / "run" / "recipe.yaml"
    data = yaml.safe_load(resolved.read_text())["stages"][0]["data"]
    assert set(data) <= {"card", "name", "mix", "mix_rows"} and data["mix"][1]["weight"] == 1
    code, out, err = run_cli(resolved, "--output-dir", sft_mix_run / "run", "--dry-run")
    assert code == 0, err
    assert "chat: 144 of 190 train rows (75.0% of rows, " in out and "domain: 48 of 48 train rows" in out
    from align.loader import load_recipe
    from align.preflight import resolve_specs

    specs = [
        resolve_specs(load_recipe(path))["sft"].model_dump(mode="json") for path in (sft_mix_run / "r.yaml", resolved)
    ]
    assert specs[0] == specs[1], "the same sources, weights and settings"


def test_mix_rows_repeats_a_source_and_says_so(tmp_path, caplog):
    from align.data import load_data
    from align.data_cards import resolve_data
    from align.recipe import DataRef

    write_sources(tmp_path)
    ref = DataRef.model_validate(sft_mix(weights=(1, 1), mix_rows=300)["stages"][0]["data"])
    data = load_data(resolve_data(ref, tmp_path, "stages.sft.data"), seed=0, base_dir=tmp_path, where="x")
    chat, domain = data.mix
    assert (chat["taken"], domain["taken"]) == (150, 150) and len(data["train"]) == 300
    assert domain["repeated"] and not chat["repeated"]
    assert "domain is repeated to give 150 rows from its 48" in caplog.text
    assert "REPEATED 3.1 times" in data.describe()[1]


def test_mix_counts():
    from align.data import mix_counts

    assert mix_counts([190, 48], [3, 1], None) == [144, 48]
    assert mix_counts([10, 10, 10], [1, 1, 1], None) == [10, 10, 10]
    assert mix_counts([100, 100], [2, 1], 10) == [7, 3]  # largest remainder: 6.67 -> 7, 3.33 -> 3
    assert sum(mix_counts([5, 7, 11], [0.2, 0.3, 0.5], 101)) == 101


@pytest.mark.slow
def test_an_explicit_and_an_implicit_preference_set_in_one_dpo_stage(tmp_path, run_cli):
    with (tmp_path / "explicit.jsonl").open("w") as fh:
        for i in range(40):
            fh.write(json.dumps({"prompt": f"Say {i} politely:", "chosen": f" Please, {i}.", "rejected": f" {i}!"}))
            fh.write("\n")
    with (tmp_path / "implicit.jsonl").open("w") as fh:
        for i in range(40):
            ask = f"Human: Count to {i % 9 + 1}.\n\nAssistant:"
            fh.write(json.dumps({"chosen": f"{ask} " + " ".join(map(str, range(1, i % 9 + 2))),
                                 "rejected": f"{ask} no"}) + "\n")  # fmt: skip
    mix = [{"name": "polite", "source": {"files": ["explicit.jsonl"]}, "format": "preference", "weight": 1,
            "valid_fraction": 0.2},
           {"name": "counting", "source": {"files": ["implicit.jsonl"]}, "format": "preference_implicit",
            "weight": 1, "valid_fraction": 0.2}]  # fmt: skip
    stage = {"name": "dpo", "kind": "dpo", "model": dict(TINY_MODEL), "data": {"mix": mix}, "generations": 2,
             "train": {**TRAIN, "max_steps": 8, "learning_rate": 1.0e-3}}  # fmt: skip
    recipe = {"name": "pmix", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    result = summary(tmp_path / "run", "dpo")
    assert [(m["name"], m["format"], m["taken"]) for m in result["data"]["mix"]] == [
        ("polite", "preference", 32), ("counting", "preference_implicit", 32)
    ]  # fmt: skip
    assert set(result["metrics"]["eval_loss_by_source"]) == {"polite", "counting"}
    resolved = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "preference_implicit" in resolved and "implicit.jsonl" in resolved


@pytest.mark.slow
def test_a_text_mix_in_an_lm_stage_packs_each_source_for_its_loss(tmp_path, run_cli):
    (tmp_path / "notes.txt").write_text("\n".join(f"Note {i}: the value of x is {i * 3}." for i in range(300)))
    mix = [{"card": "python-docs", "max_train_rows": 150, "max_eval_rows": 30, "weight": 1},
           {"name": "notes", "source": {"files": ["notes.txt"]}, "format": "text", "weight": 1}]  # fmt: skip
    stage = {"name": "lm", "kind": "lm", "model": dict(TINY_MODEL), "data": {"mix": mix}, "train": dict(TRAIN)}
    recipe = {"name": "lmix", "seed": 0, "tracking": {"wandb": {"mode": "disabled"}}, "stages": [stage]}
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    result = summary(tmp_path / "run", "lm")
    assert [m["name"] for m in result["data"]["mix"]] == ["python-docs", "notes"]  # the card's name
    losses = result["metrics"]["eval_loss_by_source"]
    assert set(losses) == {"python-docs", "notes"} and losses["notes"] != losses["python-docs"]


def test_a_source_that_got_worse_while_the_total_improved_is_named():
    from align.stages.runner import source_warnings

    metrics = {"eval_loss_before": 3.0, "eval_loss": 2.0, "eval_loss_by_source_before": {"chat": 3.1, "safety": 2.5},
               "eval_loss_by_source": {"chat": 1.9, "safety": 2.8}}  # fmt: skip
    (warning,) = source_warnings(metrics)
    assert "source safety got worse: 2.5 -> 2.8" in warning
    assert source_warnings({**metrics, "eval_loss_by_source": {"chat": 1.9, "safety": 2.4}}) == []
    assert source_warnings({**metrics, "eval_loss": 3.2}) == [], "the total did not improve: the verdict says so"


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        ({"weight": 0}, "stages.sft.data.mix.1.weight", "greater than 0"),
        ({"weight": "heavy"}, "stages.sft.data.mix.1.weight", "valid number"),
        ({"weight": float("inf")}, "stages.sft.data.mix.1.weight", "finite number"),
        ({"source": {"files": ["empty.jsonl"]}}, "stages.sft.data.mix.1", "empty file"),
        ({"source": {"files": ["header.csv"]}}, "stages.sft.data.mix.1", "header.csv: a header line and no rows"),
        ({"format": "preference", "columns": {}}, "stages.sft.data.mix.1.format", "'preference' cannot feed this"),
        ({"format": "text", "columns": {"text": "instruction"}}, "stages.sft.data.mix.1.format", "cannot be mixed"),
    ],
)
def test_bad_mix_entries_are_exit_2_named_as_set_spells_them(tmp_path, run_cli, change, where, message):
    write_sources(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("instruction, output\n")
    recipe = sft_mix()
    recipe["stages"][0]["data"]["mix"][1].update(change)
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 2, err
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert where in line and message in line, line
    assert line.startswith(f"error: {tmp_path / 'r.yaml'}: stages.sft.data.mix.1"), "the line names the recipe file"
    assert not (tmp_path / "run" / "sft").exists(), "nothing trained"


def test_a_format_the_stage_cannot_take_and_other_mix_problems(tmp_path, run_cli):
    write_sources(tmp_path)
    recipe = sft_mix()
    recipe["stages"][0]["kind"] = "dpo"
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 2 and "stages.sft.data.mix.0.format: 'prompt_completion' cannot feed a dpo stage" in err, err

    recipe = sft_mix(mix_rows=20000)
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 2 and "stages.sft.data.mix_rows: 20000 rows would repeat domain's 48 train rows" in err, err
    assert "hint: lower mix_rows" in err

    recipe = sft_mix(max_train_rows=10)
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 2 and "stages.sft.data: max_train_rows beside `mix:`" in err, err

    recipe = sft_mix()
    recipe["stages"][0]["data"]["mix"] = []
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 2 and "stages.sft.data.mix: an empty mix" in err, err


def test_an_eval_stage_refuses_a_mix(tmp_path):
    from align import stages as registry
    from align.data_cards import check_format, resolve_data
    from align.recipe import DataRef

    write_sources(tmp_path)
    spec = resolve_data(DataRef.model_validate(sft_mix()["stages"][0]["data"]), tmp_path, "stages.eval.data")
    (problem,) = check_format(spec, registry.get("eval"), "stages.eval.data")
    assert problem.startswith("stages.eval.data.mix: ") and "one source" in problem
    with pytest.raises(BadInput, match=r"d\.mix\.0: give `card: NAME`"):
        resolve_data(DataRef.model_validate({"mix": [{"format": "text", "weight": 1}]}), tmp_path, "d")


def test_a_mix_entry_is_addressed_by_its_index_or_given_name(tmp_path, run_cli):
    """`--set ...mix.2.weight` on a two-source mix once crashed (exit 1, KeyError); a misspelt key in an entry was
    named by the entry's name, not by the index `--set` takes."""
    write_sources(tmp_path)
    path = write_yaml(tmp_path / "r.yaml", sft_mix())
    code, _, err = run_cli(path, "--dry-run", "--set", "stages.sft.data.mix.2.weight=1")
    assert code == 2 and "stages.sft.data.mix has no entry '2' (its entries are 0 to 1, or one of the names" in err
    code, out, err = run_cli(path, "--dry-run", "--output-dir", tmp_path / "run", "--set",
                             "stages.sft.data.mix.domain.weight=3")  # fmt: skip
    assert code == 0 and "domain: 48 of 48 train rows (50.0% of rows" in out, out + err
    recipe = sft_mix()
    recipe["stages"][0]["data"]["mix"][1]["wieght"] = 1
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--dry-run")
    assert code == 2 and "stages.sft.data.mix.1: unknown key 'wieght' (did you mean 'weight'?)" in err, err
