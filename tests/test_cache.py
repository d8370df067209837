"""The tokenized-data cache: what its key holds, hits and misses across runs, damaged and unwritable caches."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest

from align import cache
from tests.conftest import TINY_MODEL, tiny_lm_recipe, write_yaml

HIT = "tokenized data from the cache"


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("ALIGN_CACHE_DIR", str(root))
    return root


def scratch_tokenizer(text: str = "def f(x): return x + 1"):
    """A byte-level BPE tokenizer trained on one repeated line: another line gives other merges."""
    from align.models import build_model
    from align.recipe import ScratchModel

    _, tokenizer = build_model(ScratchModel(**TINY_MODEL), "model", texts=lambda: [text] * 50, trust_remote_code=False)
    return tokenizer


# --------------------------------------------------------------------------------------------------
# What the key is made of


def test_tokenizer_fingerprint_follows_content_not_path(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = scratch_tokenizer()
    tokenizer.save_pretrained(tmp_path / "a")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert cache.tokenizer_fingerprint(reloaded) == cache.tokenizer_fingerprint(tokenizer)

    other_vocab = scratch_tokenizer("class A: pass")
    assert cache.tokenizer_fingerprint(other_vocab) != cache.tokenizer_fingerprint(tokenizer)
    reloaded.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    templated = cache.tokenizer_fingerprint(reloaded)
    assert templated != cache.tokenizer_fingerprint(tokenizer), "a changed chat template is a changed key"
    reloaded.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert cache.tokenizer_fingerprint(reloaded) != templated, "an added special token is a changed key"


def test_dataset_fingerprint_follows_rows():
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"]})
    same = Dataset.from_dict({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"]})
    assert cache.dataset_fingerprint(ds) == cache.dataset_fingerprint(same)
    edited = Dataset.from_dict({"prompt": ["a", "b", "c"], "completion": ["x", "y", "Z"]})
    assert cache.dataset_fingerprint(edited) != cache.dataset_fingerprint(ds)
    assert cache.dataset_fingerprint(ds.select([0, 1])) != cache.dataset_fingerprint(ds)
    assert cache.dataset_fingerprint(ds.select([2, 1, 0])) != cache.dataset_fingerprint(ds), "order is content"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("trainer", "must_read"),
    [("SFTTrainer", {"max_length", "truncation_mode", "assistant_only_loss", "dataset_text_field"}),
     ("DPOTrainer", {"max_length", "truncation_mode"})],
)  # fmt: skip
def test_key_reads_the_settings_trl_prepares_with(trainer, must_read):
    import trl

    from align.patches import settings_read_by_preparation

    args, attributes = settings_read_by_preparation(getattr(trl, trainer))
    assert must_read <= set(args)
    assert "_tokenizer" in attributes


# --------------------------------------------------------------------------------------------------
# The store


def test_fetch_builds_once_then_loads(own_cache, caplog):
    from datasets import Dataset

    calls = []

    def build():
        calls.append(1)
        return Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]]}), {"blocks": 2}

    caplog.set_level(logging.INFO, logger="align.cache")
    first, stats = cache.fetch({"k": 1}, build, "test")
    second, stats_again = cache.fetch({"k": 1}, build, "test")
    assert calls == [1], "the second fetch must not build"
    assert first["input_ids"] == second["input_ids"] == [[1, 2, 3], [4, 5]]
    assert stats == stats_again == {"blocks": 2}
    assert second.cache_files, "served memory-mapped from the cache folder"
    assert HIT in caplog.text
    cache.fetch({"k": 2}, build, "test")
    assert calls == [1, 1], "another key builds again"
    assert len(list((own_cache / "tokenized").iterdir())) == 2


def test_a_damaged_entry_is_rebuilt(own_cache, caplog):
    from datasets import Dataset

    def build():
        return Dataset.from_dict({"input_ids": [[7, 8]]}), {}

    cache.fetch({"k": "damaged"}, build, "test")
    (entry,) = (own_cache / "tokenized").iterdir()
    for arrow in entry.glob("*.arrow"):
        arrow.write_bytes(b"not arrow")
    ds, _ = cache.fetch({"k": "damaged"}, build, "test")
    assert ds["input_ids"] == [[7, 8]]
    assert "unreadable" in caplog.text


def test_an_unwritable_cache_costs_a_warning_not_the_run(tmp_path, monkeypatch, caplog):
    from datasets import Dataset

    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("ALIGN_CACHE_DIR", str(blocker / "cache"))
    ds, _ = cache.fetch({"k": 3}, lambda: (Dataset.from_dict({"input_ids": [[1]]}), {}), "test")
    assert ds["input_ids"] == [[1]]
    assert "could not write the tokenized-data cache" in caplog.text


def test_cache_off(monkeypatch, tmp_path):
    from datasets import Dataset

    monkeypatch.setenv("ALIGN_CACHE_DIR", "off")
    assert cache.cache_root() is None
    ds, _ = cache.fetch({"k": 4}, lambda: (Dataset.from_dict({"input_ids": [[1]]}), {}), "test")
    assert not ds.cache_files


def test_no_cache_when_the_run_spans_several_machines(monkeypatch, own_cache):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cache.cache_root() == own_cache, "four processes on one machine share its cache"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cache.cache_root() is None, "two machines: another machine's ranks would never find the entries"


# --------------------------------------------------------------------------------------------------
# Whole runs: lm -> sft -> dpo, again into a fresh directory, then with one tokenizer setting changed


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    from align.run import main

    tmp = tmp_path_factory.mktemp("cached")
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"].update(max_steps=6, eval_steps=3, logging_steps=3)
    recipe["stages"][0]["model"]["n_positions"] = 128  # room for the preference prompts
    small = {"max_steps": 3, "per_device_train_batch_size": 8, "logging_steps": 1, "eval_steps": 3}
    recipe["stages"].append(
        {
            "name": "sft",
            "kind": "sft",
            "generations": 0,
            "train": small | {"max_length": 128},
            "data": {"card": "python-docs-instruct", "max_train_rows": 48, "max_eval_rows": 8},
        }
    )
    pairs = {"card": "python-docs-preferences", "max_train_rows": 32, "max_eval_rows": 8}
    recipe["stages"].append(
        {"name": "dpo", "kind": "dpo", "generations": 0, "train": small | {"max_length": 128}, "data": pairs}
    )
    path = write_yaml(tmp / "r.yaml", recipe)
    saved = os.environ["ALIGN_CACHE_DIR"]
    os.environ["ALIGN_CACHE_DIR"] = str(tmp / "cache")
    try:
        assert main([str(path), "--output-dir", str(tmp / "first")]) == 0
        assert main([str(path), "--output-dir", str(tmp / "second")]) == 0
        # A shorter SFT max_length: SFT must prepare again; lm and DPO (same tokenizer, own max_length) must not.
        assert main([str(path), "--output-dir", str(tmp / "third"), "--set", "stages.sft.train.max_length=96"]) == 0
    finally:
        os.environ["ALIGN_CACHE_DIR"] = saved
    return tmp


def hits(run_dir) -> list[str]:
    """The data sets a run took from the cache, as `<stage kind> <split>`, from its align.log."""
    text = (run_dir / "align.log").read_text()
    return sorted(re.findall(r"(\w+ \w+): " + HIT, text))


@pytest.mark.slow
def test_second_run_takes_every_stage_data_from_the_cache(three_runs):
    assert hits(three_runs / "first") == []
    assert hits(three_runs / "second") == sorted(
        ["lm train", "lm eval", "sft train", "sft eval", "dpo train", "dpo eval"]
    )
    for stage in ("lm", "sft", "dpo"):
        first = json.loads((three_runs / "first" / stage / "summary.json").read_text())["metrics"]
        second = json.loads((three_runs / "second" / stage / "summary.json").read_text())["metrics"]
        assert second["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6), stage
        assert second["train_tokens"] == first["train_tokens"], stage


@pytest.mark.slow
def test_a_changed_setting_misses_only_where_it_is_read(three_runs):
    assert hits(three_runs / "third") == sorted(["lm train", "lm eval", "dpo train", "dpo eval"])
    third = json.loads((three_runs / "third" / "sft" / "summary.json").read_text())["metrics"]
    first = json.loads((three_runs / "first" / "sft" / "summary.json").read_text())["metrics"]
    assert third["train_tokens"] < first["train_tokens"], "the shorter max_length was applied, not a stale cache"


def test_a_changed_tokenizer_never_reuses_the_cache(tmp_path, own_cache):
    from datasets import Dataset

    from align.stages.lm import cached_blocks

    ds = Dataset.from_dict({"text": ["def f(x): return x + 1"] * 40})
    blocks_a, _ = cached_blocks(ds, scratch_tokenizer(), 16, "train")
    blocks_b, _ = cached_blocks(ds, scratch_tokenizer("class A: pass"), 16, "train")
    assert len(list((own_cache / "tokenized").iterdir())) == 2
    again, _ = cached_blocks(ds, scratch_tokenizer(), 16, "train")
    assert again["input_ids"] == blocks_a["input_ids"]
    assert len(list((own_cache / "tokenized").iterdir())) == 2
