"""Data cards, loading from files and builtin sources, column mapping, splits, and bad data."""

from __future__ import annotations

import json

import pytest

from align.builtin import python_docs
from align.data import load_data, pack_text_blocks
from align.data_cards import resolve_data
from align.errors import BadInput
from align.recipe import DataRef, DataSpec
from tests.conftest import REPO


def spec(**fields) -> DataSpec:
    return DataSpec.model_validate({"format": "text", **fields})


def test_python_docs_is_deterministic_real_prose():
    first, second = python_docs(), python_docs()
    assert first == second
    chars = sum(map(len, first["text"]))
    assert len(first["text"]) > 2000 and 400_000 < chars < 600_000
    assert all(t.strip() for t in first["text"])


def test_card_loads_by_name_with_fields_overridden():
    resolved = resolve_data(DataRef(card="python-docs", valid_fraction=0.1), REPO, "stages.lm.data")
    assert resolved.source.builtin == "python-docs" and resolved.valid_fraction == 0.1
    assert resolved.name == "python-docs" and resolved.license


def test_unknown_card_suggests_the_closest():
    with pytest.raises(BadInput, match="data card 'python-doc' not found \\(did you mean 'python-docs'\\?\\)"):
        resolve_data(DataRef(card="python-doc"), REPO, "stages.lm.data")


def test_valid_fraction_cut_is_seeded_and_only_used_without_a_validation_split(tmp_path):
    card = spec(source={"builtin": "python-docs"}, valid_fraction=0.05)
    a = load_data(card, seed=1, base_dir=tmp_path)
    b = load_data(card, seed=1, base_dir=tmp_path)
    c = load_data(card, seed=2, base_dir=tmp_path)
    assert a["validation"]["text"] == b["validation"]["text"]
    assert a["validation"]["text"] != c["validation"]["text"]
    total = len(a["train"]) + len(a["validation"])
    assert len(a["validation"]) == pytest.approx(0.05 * total, abs=2)

    (tmp_path / "train.txt").write_text("one line\nanother line\n" * 20)
    (tmp_path / "valid.txt").write_text("held out\n")
    own = spec(
        source={"files": {"train": ["train.txt"], "validation": ["valid.txt"]}}, splits={"validation": "validation"}
    )
    loaded = load_data(own, seed=1, base_dir=tmp_path)
    assert loaded["validation"]["text"] == ["held out"] and len(loaded["train"]) == 40


def test_a_validation_file_is_the_validation_split_without_naming_it_in_splits(tmp_path, caplog):
    """A new user's `files: {train: [...], validation: [...]}` once cut 5% from train and read no validation file,
    then advised writing what they had written."""
    (tmp_path / "train.txt").write_text("".join(f"line {i}\n" for i in range(40)))
    (tmp_path / "valid.txt").write_text("held out\n")
    (tmp_path / "test.txt").write_text("a prompt\n")
    files = {"train": ["train.txt"], "validation": ["valid.txt"], "test": ["test.txt"]}
    with caplog.at_level("WARNING", logger="align.data"):
        loaded = load_data(spec(source={"files": files}), seed=1, base_dir=tmp_path, where="stages.lm.data")
    assert loaded["validation"]["text"] == ["held out"] and len(loaded["train"]) == 40
    # Too small, and the warning's fix is no longer what the user already wrote.
    assert "the source's split 'validation'" in caplog.text and "splits:" not in caplog.text
    assert "valid_fraction" not in caplog.text
    # A valid_fraction set beside a validation split changes nothing, and says so instead of nothing.
    caplog.clear()
    with caplog.at_level("WARNING", logger="align.data"):
        again = load_data(spec(source={"files": files}, valid_fraction=0.2), seed=1, base_dir=tmp_path)
    assert len(again["train"]) == 40 and "valid_fraction 0.2 is not used: the source has a validation split" in (
        caplog.text
    )
    prompts = load_data(spec(source={"files": files}), seed=1, base_dir=tmp_path, prompts_only=True)
    assert prompts["test"]["text"] == ["a prompt"]
    # A split of another name is read only where `splits:` names it; else refused, not loaded and ignored.
    odd = {"train": ["train.txt"], "valid": ["valid.txt"]}
    with pytest.raises(BadInput, match=r"stages.lm.data: source.files.valid: no split of that name") as info:
        load_data(spec(source={"files": odd}), seed=1, base_dir=tmp_path, where="stages.lm.data")
    assert "splits: {validation: valid}" in info.value.hint
    named = load_data(spec(source={"files": odd}, splits={"validation": "valid"}), seed=1, base_dir=tmp_path)
    assert named["validation"]["text"] == ["held out"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".txt"])
def test_every_file_type_loads_with_columns_mapped(tmp_path, suffix):
    rows = [{"body": f"row number {i}", "other": i} for i in range(40)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        path.write_text("body,other\n" + "\n".join(f"{r['body']},{r['other']}" for r in rows))
    elif suffix == ".parquet":
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("\n".join(r["body"] for r in rows))
    columns = {} if suffix == ".txt" else {"text": "body"}
    loaded = load_data(spec(source={"files": [path.name]}, columns=columns), seed=0, base_dir=tmp_path)
    assert loaded["train"].column_names == ["text"]
    assert len(loaded["train"]) + len(loaded["validation"]) == 40


def test_broken_json_names_its_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken}\n')
    with pytest.raises(BadInput, match="d.jsonl: line 3: broken JSON"):
        load_data(spec(source={"files": ["d.jsonl"]}), seed=0, base_dir=tmp_path)


def test_empty_file_says_so(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(BadInput, match="d.jsonl: empty file"):
        load_data(spec(source={"files": ["d.jsonl"]}), seed=0, base_dir=tmp_path)


def test_missing_column_names_file_column_and_a_mapping(tmp_path):
    (tmp_path / "d.csv").write_text("question,answer\n" + "what,that\n" * 10)
    with pytest.raises(BadInput) as info:
        load_data(spec(source={"files": ["d.csv"]}), seed=0, base_dir=tmp_path)
    message = info.value.problems[0]
    assert "d.csv" in message and "column 'text' missing" in message and "question, answer" in message


def test_non_string_text_names_the_row(tmp_path):
    rows = [{"text": "fine"}] * 30 + [{"text": 5}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    card = spec(
        source={"files": {"train": ["d.jsonl"], "validation": ["d.jsonl"]}}, splits={"validation": "validation"}
    )
    with pytest.raises(BadInput, match=r"d.jsonl: line 31: column 'text' must be a string, got int"):
        load_data(card, seed=0, base_dir=tmp_path)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(BadInput, match="nope.jsonl: no such data file"):
        load_data(spec(source={"files": ["nope.jsonl"]}), seed=0, base_dir=tmp_path)
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(BadInput, match="unsupported file type '.xml'"):
        load_data(spec(source={"files": ["d.xml"]}), seed=0, base_dir=tmp_path)


def test_blocks_are_full_and_all_real_tokens():
    from align.models import train_tokenizer

    texts = python_docs()["text"][:300]
    tokenizer = train_tokenizer(texts, 512)
    from datasets import Dataset

    blocks, stats = pack_text_blocks(Dataset.from_dict({"text": texts}), tokenizer, 64)
    assert all(len(ids) == 64 for ids in blocks["input_ids"])
    assert stats["block_tokens"] == 64 * len(blocks)
    # Only the tail that cannot fill a block is dropped: real tokens are >= 99% of what was tokenized.
    assert stats["block_tokens"] / stats["tokens"] >= 0.99


def test_builtin_sets_hold_out_the_same_topics_and_never_train_on_them():
    """The eval stage's prompts (every set's `test` split) come from topics no split a stage trains on holds, and no
    training row repeats a held-out paragraph under another topic's name (the help topics share some text)."""
    from align.builtin import (
        held_out_topics,
        python_docs_instruct_splits,
        python_docs_preferences,
        python_docs_splits,
    )

    held = held_out_topics()
    docs, instruct, prefs = python_docs_splits(), python_docs_instruct_splits(), python_docs_preferences()
    assert len(instruct["test"]["prompt"]) >= 100 and len(set(prefs["test"]["prompt"])) >= 100
    for splits in (docs, instruct, prefs):
        assert set(splits["test"]["topic"]) <= held
        for name, rows in splits.items():
            if name != "test":
                assert not set(rows["topic"]) & held, name
    lm_text = " ".join(" ".join(t.split()) for t in docs["train"]["text"])
    references = [" ".join(c.split()) for c in instruct["test"]["completion"]]
    # (A reference as short as "For example:" is in any text: the eval's leak check skips under 40 characters too.)
    assert not [r for r in references if len(r) >= 40 and r in lm_text]
    assert not set(instruct["test"]["prompt"]) & set(instruct["train"]["prompt"])
    # Preferences: each prompt in one split only; the reward split's prompts are none of the dpo stage's.
    by_split = {name: set(rows["prompt"]) for name, rows in prefs.items()}
    names = list(by_split)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not by_split[a] & by_split[b], (a, b)
    assert len(by_split["reward"]) >= 80 and len(by_split["train"]) >= 150


def test_a_data_set_saved_with_save_to_disk_loads_as_a_source(tmp_path):
    """The offline hint once said to save_to_disk, and no source read such a folder."""
    from datasets import Dataset, DatasetDict

    from align.fingerprints import data_identity

    rows = {"body": [f"row {i}" for i in range(30)]}
    DatasetDict(train=Dataset.from_dict(rows), validation=Dataset.from_dict({"body": ["held out"]})).save_to_disk(
        str(tmp_path / "saved")
    )
    card = spec(source={"disk": "saved"}, columns={"text": "body"})
    loaded = load_data(card, seed=0, base_dir=tmp_path)  # a DatasetDict's validation split is the validation
    assert loaded["validation"]["text"] == ["held out"] and len(loaded["train"]) == 30
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "lone"))  # a lone Dataset: train, 5% cut from it
    lone = load_data(spec(source={"disk": "lone"}, columns={"text": "body"}), seed=0, base_dir=tmp_path)
    assert len(lone["train"]) + len(lone["validation"]) == 30 and len(lone["validation"]) >= 1
    before = data_identity(card, tmp_path)
    DatasetDict(train=Dataset.from_dict({"body": ["other"] * 30}), validation=Dataset.from_dict({"body": ["x"]})
                ).save_to_disk(str(tmp_path / "saved"))  # fmt: skip
    assert data_identity(card, tmp_path) != before, "the fingerprint follows the saved rows"
    assert (
        "disk"
        not in DataSpec.model_validate({"format": "text", "source": {"files": ["a.txt"]}}).model_dump(mode="json")[
            "source"
        ]
    ), "an unset disk: leaves earlier fingerprints as they were"
    DatasetDict(train=Dataset.from_dict(rows), valid=Dataset.from_dict({"body": ["held"]})).save_to_disk(
        str(tmp_path / "odd")
    )  # a split of another name: refused, not left out in silence (5% would be cut from train instead)
    with pytest.raises(BadInput, match=r"source.disk: the saved data set's split 'valid' is not read") as odd:
        load_data(spec(source={"disk": "odd"}, columns={"text": "body"}), seed=0, base_dir=tmp_path)
    assert odd.value.hint == "map it: splits: {validation: valid}"
    named = load_data(spec(source={"disk": "odd"}, columns={"text": "body"}, splits={"validation": "valid"}), seed=0,
                      base_dir=tmp_path)  # fmt: skip
    assert named["validation"]["text"] == ["held"]
    with pytest.raises(BadInput, match=r"source.disk: nowhere: no such folder"):
        load_data(spec(source={"disk": "nowhere"}), seed=0, base_dir=tmp_path)
    (tmp_path / "plain").mkdir()
    with pytest.raises(BadInput, match=r"holds no data set saved by datasets' save_to_disk") as info:
        load_data(spec(source={"disk": "plain"}), seed=0, base_dir=tmp_path, where="stages.lm.data")
    assert info.value.problems[0].startswith("stages.lm.data: source.disk:")


def test_csv_rows_in_a_jsonl_file_are_named_as_csv(tmp_path):
    (tmp_path / "qa.jsonl").write_text("question,answer\nWhat is 1?,One\n")
    with pytest.raises(BadInput, match=r"qa.jsonl: line 1: broken JSON: .*it looks like CSV .*name the file .csv"):
        load_data(spec(source={"files": ["qa.jsonl"]}), seed=0, base_dir=tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(BadInput, match=r"bad.jsonl: line 2: broken JSON") as info:
        load_data(spec(source={"files": ["bad.jsonl"]}), seed=0, base_dir=tmp_path)
    assert "CSV" not in str(info.value), "a JSON file with one bad line is not called CSV"
