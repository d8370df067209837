"""A run that goes non-finite stops with the cause named; every run leaves a report a person can open."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import pytest

from tests.conftest import tiny_lm_recipe, write_yaml


def two_stage_recipe() -> dict:
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"]["max_steps"] = 20
    recipe["stages"].append(
        {"name": "sft", "kind": "sft", "data": {"card": "python-docs-instruct", "max_train_rows": 32},
         "train": {"max_length": 64, "max_steps": 2, "per_device_train_batch_size": 8}}
    )  # fmt: skip
    return recipe


def chain_recipe() -> dict:
    """lm -> sft -> dpo. The SFT stage's learning rate is so high that its eval loss jumps (5.42 before, 5.85 at
    step 2, 8.75 at 4): early stopping (patience 1) ends it at step 4 and restores step 2, which is still worse
    than before the stage. The DPO stage has no early stopping, so its model is its last step's, whatever its
    lowest eval was."""
    recipe = two_stage_recipe()
    recipe["stages"][1]["data"]["max_eval_rows"] = 16
    recipe["stages"][1]["train"].update(max_steps=12, learning_rate=4e-2, logging_steps=2, eval_steps=2)
    recipe["stages"][1].update(early_stopping={"patience": 1}, generations=2)
    recipe["stages"].append(
        {"name": "dpo", "kind": "dpo", "generations": 2,
         "data": {"card": "python-docs-preferences", "max_train_rows": 32, "max_eval_rows": 16},
         "train": {"beta": 0.1, "max_length": 64, "max_steps": 4, "per_device_train_batch_size": 8,
                   "learning_rate": 1e-3, "logging_steps": 2, "eval_steps": 2}}
    )  # fmt: skip
    return recipe


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    """One real lm -> sft -> dpo run (~12 s on 2 idle cores) whose report the tests below read."""
    from align.run import main

    tmp = tmp_path_factory.mktemp("report")
    assert main([str(write_yaml(tmp / "r.yaml", chain_recipe())), "--output-dir", str(tmp / "run")]) == 0
    sft = json.loads((tmp / "run" / "sft" / "summary.json").read_text())["metrics"]
    assert sft["stopped_early"] and sft["best_step"] < sft["global_step"], "the SFT stage should stop early"
    return tmp / "run"


def summaries(run_dir) -> dict[str, dict]:
    return {s: json.loads((run_dir / s / "summary.json").read_text())["metrics"] for s in ("lm", "sft", "dpo")}


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts (a <br> inside a cell becomes a newline), and every img's alt."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.alts: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")
        elif tag == "br":
            self.tables[-1][-1][-1] += "\n"
        elif tag == "img":
            self.alts.append(dict(attrs).get("alt", ""))

    def handle_data(self, data):
        if self.tables and self.tables[-1] and self.tables[-1][-1]:
            self.tables[-1][-1][-1] += data.strip()


@pytest.mark.slow
def test_exploding_learning_rate_stops_the_pipeline_and_names_the_cause(tmp_path, run_cli):
    path = write_yaml(tmp_path / "r.yaml", two_stage_recipe())
    code, _, err = run_cli(path, "--output-dir", tmp_path / "run", "--set", "stages.lm.train.learning_rate=1e12")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite train loss" in errors[0] and "learning rate too high" in errors[0], err
    assert "Traceback" not in err
    lm = json.loads((tmp_path / "run" / "lm" / "summary.json").read_text())
    assert lm["status"] == "failed" and "non-finite" in lm["error"]
    assert not (tmp_path / "run" / "sft" / "summary.json").exists(), "no later stage runs"
    pipeline = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert [s["status"] for s in pipeline["stages"]] == ["failed", "pending"]
    assert (tmp_path / "run" / "report.html").is_file(), "a failed run still gets its report"


@pytest.mark.slow
def test_report_is_self_contained_with_decodable_plots(chain_run):
    from io import BytesIO

    import matplotlib.image

    page = (chain_run / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) >= 3
    for data in images:
        pixels = matplotlib.image.imread(BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert "Train and eval loss" in page and "Resolved recipe" in page and "Greedy answers" in page
    assert "http://" not in page and "https://" not in page.split("Resolved recipe")[0], "nothing fetched"


@pytest.mark.slow
def test_stages_table_gives_each_stage_its_metrics_before_and_after_and_the_change(chain_run):
    page = (chain_run / "report.html").read_text()
    assert page.index("<h2>Stages</h2>") < page.index("<h2>lm (lm)"), "the table comes before the stage sections"
    header, *rows = _Tables(page).tables[0]
    columns = ["stage", "kind", "status", "metric", "before", "after", "change", "verdict", "saved model", "wall time"]
    assert header == columns
    by_stage = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert list(by_stage) == ["lm", "sft", "dpo"]
    metrics = summaries(chain_run)
    losses = [("eval loss", "eval_loss"), ("perplexity", "perplexity")]
    wanted = {
        "lm": losses,
        "sft": losses,
        "dpo": [("pref accuracy", "pref_accuracy"), ("eval loss (DPO)", "eval_loss")],
    }
    for stage, shown in wanted.items():
        row = by_stage[stage]
        assert row["metric"].splitlines() == [label for label, _ in shown]
        for i, (_, key) in enumerate(shown):
            before, after = metrics[stage][f"{key}_before"], metrics[stage][key]
            assert float(row["before"].splitlines()[i]) == pytest.approx(before, rel=1e-3)
            assert float(row["after"].splitlines()[i]) == pytest.approx(after, rel=1e-3)
            # The change is the stage's own after - before, signed; never a difference between two stages.
            # Its minus is the true minus sign (U+2212) the verdicts write, never a hyphen beside it.
            change = row["change"].splitlines()[i]
            assert "-" not in change, change
            number = float(change.replace("−", "-"))
            assert change[0] == ("+" if after > before else "−") or after == before == before + number
            assert number == pytest.approx(after - before, rel=1e-3)
    assert by_stage["lm"]["change"].startswith("−") and by_stage["sft"]["change"].startswith("+"), "see chain_recipe"
    assert by_stage["sft"]["saved model"].startswith("step 2 (best eval loss, restored by early stopping)")
    assert by_stage["lm"]["saved model"].startswith("step 20 (last step)")
    assert by_stage["dpo"]["saved model"].startswith("step 4 (last step)")


@pytest.mark.slow
def test_best_step_is_marked_only_where_early_stopping_restored_it(chain_run):
    """best_step is always the lowest eval; the plot marks the step the saved model is, the best only where
    early stopping restored it, and says that the restored SFT model is still worse than before the stage."""
    page = (chain_run / "report.html").read_text()
    metrics = summaries(chain_run)
    assert metrics["dpo"]["global_step"] == 4 and metrics["sft"]["best_step"] == 2
    loss_plots = [alt for alt in _Tables(page).alts if alt.startswith("Train and eval loss")]
    assert loss_plots == [
        "Train and eval loss: train loss; eval loss; saved model: step 20 (last step)",
        "Train and eval loss: train loss; eval loss; saved model: step 2 (best eval loss, restored by early stopping);"
        " early stop at step 4",
        "Train and eval loss: train loss; eval loss; saved model: step 4 (last step)",
    ]
    assert "best step" not in page
    sections = {name: page.split(f"<h2>{name} ({name})")[1].split("<h2>")[0] for name in ("lm", "sft", "dpo")}
    assert "saved model: step 20 (last step)" in sections["lm"]
    assert "saved model: step 2 (best eval loss, restored by early stopping)" in sections["sft"]
    assert "saved model: step 4 (last step)" in sections["dpo"]
    assert metrics["sft"]["eval_loss"] > metrics["sft"]["eval_loss_before"]
    assert "higher than before this stage" in sections["sft"]
    assert "higher than before" not in sections["lm"] + sections["dpo"]


def test_saved_model_step_follows_the_recipe_and_the_stop():
    from align.report import saved_model_step

    def summary(status="completed", **metrics):
        return {"status": status, "metrics": {"global_step": 60, "best_step": 40, "stopped_early": False, **metrics}}

    assert saved_model_step(summary(), early_stopping=False) == (60, "last step")
    assert saved_model_step(summary(stopped_early=True), early_stopping=False)[0] == 40
    assert saved_model_step(summary(), early_stopping=True) == (
        40, "best eval loss, restored at the end: early stopping was on"
    )  # fmt: skip
    assert saved_model_step(summary(status="failed"), early_stopping=False) is None


def test_report_command_rebuilds_and_rejects_non_runs(tmp_path, capsys):
    from align.report import main

    assert main([str(tmp_path)]) == 2
    assert "not an align run directory" in capsys.readouterr().err


def _feed(guard, losses, grad_norm=1.0):
    """Drive a NumericGuard as the Trainer would: one micro-batch loss, then the step's end."""
    from types import SimpleNamespace

    import torch

    state, control = SimpleNamespace(global_step=0), SimpleNamespace(should_training_stop=False)
    for step, loss in enumerate(losses, start=1):
        guard.pending.append(torch.tensor(loss))
        guard.grad_norm = grad_norm
        state.global_step = step
        guard.on_step_end(None, state, control)
    return control


def test_numeric_guard_stops_on_a_raw_nan_and_on_an_infinite_grad_norm():
    from align.guards import NumericGuard

    guard = NumericGuard()
    control = _feed(guard, [2.0, 1.9, float("nan"), 1.8])
    assert control.should_training_stop is True
    assert guard.nonfinite["step"] == 3 and guard.nonfinite["what"] == "loss"
    guard = NumericGuard()
    control = _feed(guard, [2.0], grad_norm=float("inf"))
    assert control.should_training_stop and guard.nonfinite["what"] == "grad norm"


def test_under_fp16_loss_scaling_an_overflowed_step_is_skipped_not_fatal(caplog):
    from align.guards import NumericGuard

    guard = NumericGuard(loss_scaling=True, max_skipped=5)
    with caplog.at_level("INFO"):
        control = _feed(guard, [2.0, 1.9], grad_norm=float("inf"))  # the scaler settling: two skipped steps
        control = _feed(guard, [1.8, 1.7], grad_norm=1.0)
    assert control.should_training_stop is False and guard.nonfinite is None
    assert "loss scaler skipped the step" in caplog.text and guard.skipped_in_a_row == 0
    control = _feed(guard, [1.6] * 5, grad_norm=float("inf"))  # the scale collapses: five in a row
    assert control.should_training_stop and guard.nonfinite["what"] == "grad norm"
    guard = NumericGuard(loss_scaling=True)
    control = _feed(guard, [float("nan")], grad_norm=float("inf"))
    assert control.should_training_stop and guard.nonfinite["what"] == "loss", "a NaN loss stops at once"


def test_numeric_guard_warns_on_spikes_and_zero_loss(caplog):
    from align.guards import NumericGuard

    with caplog.at_level("WARNING"):
        control = _feed(NumericGuard(), [2.0] * 20 + [9.0] + [2.0] * 5)
    assert control.should_training_stop is False
    assert "loss spike at step 21" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        _feed(NumericGuard(), [1.0, 0.0, 0.0])
    assert caplog.text.count("exactly 0") == 1
    caplog.clear()
    with caplog.at_level("WARNING"):  # frozen weights: a loss, and no gradient at all
        _feed(NumericGuard(), [0.69, 0.69, 0.69], grad_norm=0.0)
    assert caplog.text.count("grad norm is exactly 0 at step 1 while the loss is 0.69") == 1
    assert "requires_grad False" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # online RL: a zero gradient, and a 12x jump against a median near 0, are normal
        _feed(NumericGuard(surrogate_loss=True), [0.5], grad_norm=0.0)
        _feed(NumericGuard(surrogate_loss=True), [0.002] * 30 + [0.026] + [0.002] * 5)
    assert "grad norm" not in caplog.text and "spike" not in caplog.text


@pytest.mark.slow
def test_metrics_rows_carry_throughput_and_memory(tmp_path, run_cli):
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"]["max_steps"] = 10
    code, _, err = run_cli(write_yaml(tmp_path / "r.yaml", recipe), "--output-dir", tmp_path / "run")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "lm" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all(r["tokens_per_s"] > 0 and r["memory/rss_gb"] > 0 for r in train[1:])
    metrics = json.loads((tmp_path / "run" / "lm" / "summary.json").read_text())["metrics"]
    assert 0.1 < metrics["peak_memory_gb"] < 8, "the stage's peak resident memory, in GiB"
    assert 0 < metrics["time_to_first_step_s"] < metrics["train_runtime_s"] + 60


@pytest.mark.slow
def test_report_loads_in_a_real_headless_browser(chain_run, tmp_path):
    """Debian's chromium opens the report from disk, with no network, at 1280 px wide: every embedded image
    decodes, every cell of the greedy-answer tables is inside the window (prompt, before and after side by side)
    and nothing scrolls sideways. A full-page screenshot is kept in $ALIGN_ARTIFACTS (else tmp_path/artifacts)."""
    import os
    import shutil
    import subprocess
    from io import BytesIO
    from pathlib import Path

    import matplotlib.image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("ALIGN_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed, and .ci/run requires it (apt-get install chromium)")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    width = 1280
    page = (chain_run / "report.html").read_text()
    probe = (
        "<script>window.addEventListener('load',()=>{const b=document.body,root=document.documentElement;"
        "const i=[...document.images];b.setAttribute('data-decoded',i.filter(x=>x.complete&&x.naturalWidth>0)"
        ".length+'/'+i.length);const cells=[...document.querySelectorAll('h3')].filter(h=>h.textContent"
        ".startsWith('Greedy answers')).flatMap(h=>[...h.nextElementSibling.querySelectorAll('td,th')]);"
        "b.setAttribute('data-cells',cells.length);"
        "b.setAttribute('data-cells-right',Math.max(...cells.map(c=>Math.ceil(c.getBoundingClientRect().right))));"
        "b.setAttribute('data-viewport',root.clientWidth);b.setAttribute('data-page-width',root.scrollWidth);"
        "b.setAttribute('data-page-height',root.scrollHeight)})</script>"
    )
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]  # fmt: skip
    dom = subprocess.run(
        [browser, *flags, f"--window-size={width},900", "--dump-dom", (tmp_path / "probe.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    decoded = re.search(r'data-decoded="(\d+)/(\d+)"', dom)
    assert decoded, "the page did not finish loading"
    assert int(decoded.group(2)) >= 3 and decoded.group(1) == decoded.group(2)
    layout = {
        k: int(float(v))
        for k, v in re.findall(r'data-(cells|cells-right|viewport|page-width|page-height)="([^"]+)"', dom)
    }
    assert layout["viewport"] == width, layout
    assert layout["cells"] == 2 * 3 * 3, "SFT and DPO: a header and two answers, three cells each"
    assert layout["cells-right"] <= layout["viewport"], f"greedy-answer cells end past the window: {layout}"
    assert layout["page-width"] <= layout["viewport"], f"the page scrolls sideways: {layout}"

    artifacts = Path(os.environ.get("ALIGN_ARTIFACTS") or tmp_path / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / f"report-{width}px.png"
    height = min(layout["page-height"], 16000)
    report = (chain_run / "report.html").as_uri()
    command = [browser, *flags, f"--window-size={width},{height}", f"--screenshot={shot}", report]
    subprocess.run(command, capture_output=True, timeout=120)
    print(f"report screenshot: {shot} (layout at {width} px: {layout})")
    pixels = matplotlib.image.imread(BytesIO(shot.read_bytes()), format="png")
    assert pixels.shape[:2] == (height, width)


def test_training_log_lines_say_the_step_of_the_total_the_time_and_the_eta(tmp_path, caplog, monkeypatch):
    """Where no progress bar is drawn (a log file, a batch job), each training row's line says where the run is."""
    from types import SimpleNamespace

    import align.metrics as metrics
    from align.metrics import MetricsWriter

    now = [100.0]  # the clock: training begins at 100 s, rows come at 108 s and 130 s
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    writer = MetricsWriter(tmp_path / "metrics.jsonl", started=0.0)
    state = SimpleNamespace(global_step=2, max_steps=10, num_input_tokens_seen=0, epoch=0.1)  # resumed at step 2
    writer.on_train_begin(None, state, None)
    with caplog.at_level("INFO", logger="align.metrics"):
        state.global_step, now[0] = 6, 108.0
        writer.on_log(None, state, SimpleNamespace(should_training_stop=False), logs={"loss": 1.5})
        state.global_step, now[0] = 10, 130.0
        writer.on_log(None, state, SimpleNamespace(should_training_stop=False), logs={"loss": 1.2})
    first, last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train:")]
    # 4 steps in 8 s since the resume: 2 s a step, 4 steps left.
    assert first.startswith("train: step 6/10 (60%), 8s elapsed, ETA 8s; loss=1.5,"), first
    assert last.startswith("train: step 10/10 (100%), 30s elapsed; loss=1.2"), last
    assert all("ETA" not in json.dumps(row) for row in writer.rows), "the rows (metrics.jsonl) are unchanged"


def test_the_dpo_reward_accuracy_curve_leaves_out_steps_where_every_reward_ties_at_zero():
    """It started at 0.0 (TRL counts ties as wrong; at step 0 every implicit reward is 0) beside a held-out
    pref_accuracy of 0.62 before training."""
    from align.stages.preference_family import reward_accuracy_points

    rows = [{"step": 0, "split": "eval", "eval_rewards/margins": 0.0, "eval_rewards/accuracies": 0.0},
            {"step": 4, "split": "eval", "eval_rewards/margins": 0.31, "eval_rewards/accuracies": 0.7},
            {"step": 4, "split": "train", "loss": 0.6}]  # fmt: skip
    assert reward_accuracy_points(rows) == ([(4, 0.7)], {0})


def test_a_lora_stage_says_so_in_its_report_section():
    """LoRA was mentioned nowhere in the report but the recipe dump at its end."""
    from align.report import lora_line

    line = lora_line({"peft": {"r": 8, "alpha": 16, "target_modules": ["c_attn", "c_proj"]}}, {"saved": "adapter"})
    assert line == ("<p class='lora'>LoRA adapters: r=8, alpha=16, target modules c_attn, c_proj; saved the "
                    "adapters alone</p>")  # fmt: skip
    assert "merged into the model" in lora_line({"peft": {"r": 4, "target_modules": "all-linear"}}, {"saved": "merged"})
    assert lora_line({"peft": None}, {}) == ""
