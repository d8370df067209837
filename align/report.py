"""`python -m align.report RUN_DIR`: a self-contained report.html of a run, plots embedded as PNG.

First "Did it help?": from the eval stage (if the run has one), every evaluated model with its judges' scores, its
win rate against the baseline drawn with its interval, its answer statistics and verdict, then every stage's
verdict in a line, then side-by-side answers where a model fell furthest behind the baseline. Then a table of the
stages: each one's key metrics before and after it, its verdict, and which step its saved model is. Then
per stage: train and eval loss with the saved model's step and any early stop marked; learning rate and grad norm;
for DPO, rewards of chosen and rejected answers, margins and accuracy; its metrics and greedy answers before and
after. Then the resolved recipe. Written at the end of every run, failed ones included, from whatever the run left.
"""

from __future__ import annotations

import html
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from align import stages as registry
from align.files import read_json, write_text_atomic
from align.plots import figure, png, series
from align.values import same_decimals

logger = logging.getLogger(__name__)

SHOWN_METRICS = (
    "eval_loss_before", "eval_loss", "perplexity_before", "perplexity", "pref_accuracy_before", "pref_accuracy",
    "reward_accuracy", "reward_margin", "train_loss", "global_step", "best_step", "stopped_early",
    "train_runtime_s", "train_tokens", "tokens_per_s",
)  # fmt: skip


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
    "td code{overflow-wrap:anywhere}"
    "th{background:#f3f3f3}img{max-width:100%}pre{background:#f7f7f7;padding:1em;overflow:auto}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
    # Greedy answers: a fixed layout shares the page's width out among the three columns, and the cells wrap, so
    # the before and after columns (the point of the table) stay on screen beside a long prompt.
    "table.generations{table-layout:fixed;width:100%}"
    "table.generations pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:0;padding:.5em;overflow:visible}"
    ".empty{color:#888;font-style:italic}p.note{color:#444;font-size:.92em;max-width:52em}"
    "table.regressions td.num{white-space:normal;overflow-wrap:anywhere}"
    ".failed,.worse{color:#b00}.completed,.cached,.better{color:#070}.warn{color:#a60}"
    # Verdicts (align/verdict.py; the eval stage's per model): the same colours as the statuses above.
    ".got_worse{color:#b00}.improved{color:#070}.did_not_learn,.no_difference{color:#a60}.baseline{color:#555}"
    "p.verdict{font-weight:600}ul.reasons,ul.warnings{margin:.2em 0 .8em}"
    # Every evaluated model's figures: many columns (a score per judge, lm_eval tasks), so smaller and wrapping.
    "table.models{font-size:90%}table.models code{overflow-wrap:anywhere}"
)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def recipe_stages(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The stages of the run's resolved recipe.yaml by name; empty when it is missing or unreadable."""
    import yaml

    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
        return {s["name"]: s for s in recipe["stages"] if isinstance(s, dict)}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return {}


def early_stopping_stages(run_dir: Path) -> set[str]:
    """Names of the stages whose entry in the run's resolved recipe.yaml sets `early_stopping`; empty when the
    recipe is missing or unreadable (the report then goes by `stopped_early` alone)."""
    return {name for name, stage in recipe_stages(run_dir).items() if stage.get("early_stopping")}


def lora_line(stage: dict[str, Any], summary: dict[str, Any]) -> str:
    """What a stage trained of its model, where LoRA adapters did it (the settings otherwise live only in the
    recipe at the page's end)."""
    peft = stage.get("peft")
    if not isinstance(peft, dict):
        return ""
    targets = peft.get("target_modules")
    targets = ", ".join(targets) if isinstance(targets, list) else str(targets)
    saved = {"adapter": "the adapters alone", "merged": "merged into the model"}.get(str(summary.get("saved")), "-")
    return (f"<p class='lora'>LoRA adapters: r={_fmt(peft.get('r'))}, alpha={_fmt(peft.get('alpha'))}, "
            f"target modules {html.escape(targets)}; saved {html.escape(saved)}</p>")  # fmt: skip


def saved_model_step(summary: dict[str, Any], early_stopping: bool) -> tuple[int, str] | None:
    """The step the stage's saved model comes from, and why; None where the stage saved none (failed, running).

    `best_step` is always the lowest in-training eval loss, but only early stopping (which sets
    load_best_model_at_end) restores that step: without it the saved model is the last step's.
    """
    metrics = summary.get("metrics") or {}
    if summary.get("status") not in ("completed", "cached") or not isinstance(metrics.get("global_step"), int):
        return None
    if isinstance(metrics.get("best_step"), int) and (early_stopping or metrics.get("stopped_early")):
        if metrics.get("stopped_early"):
            return metrics["best_step"], "best eval loss, restored by early stopping"
        return metrics["best_step"], "best eval loss, restored at the end: early stopping was on"
    return metrics["global_step"], "last step"


def stage_plots(
    rows: list[dict[str, Any]], summary: dict[str, Any], saved: tuple[int, str] | None = None
) -> list[tuple[str, str, str]]:
    """(title, base64 PNG, alt text naming what is drawn) for each plot the stage's rows allow, its kind's own
    (`Kind.plots`) after those of every training stage; `saved` is `saved_model_step`'s answer, marked on the loss
    plot."""
    plots = []
    metrics = summary.get("metrics") or {}
    train_x, train_y = series(rows, "train", "loss")
    eval_x, eval_y = series(rows, "eval", "eval_loss")
    if train_x or eval_x:
        fig, ax = figure(7, 3.6)
        if train_x:
            ax.plot(train_x, train_y, label="train loss", color="#1f77b4")
        if eval_x:
            ax.plot(eval_x, eval_y, "o-", label="eval loss", color="#d62728")
        for name in metrics.get("eval_loss_by_source") or {}:  # a mix: each source's own, dashed
            x, y = series(rows, "eval", f"eval_{name}_loss")
            if x:
                ax.plot(x, y, ".--", label=f"eval loss: {name}", linewidth=1)
        if saved is not None:
            ax.axvline(saved[0], color="#2ca02c", linestyle="--", label=f"saved model: step {saved[0]} ({saved[1]})")
        if metrics.get("stopped_early"):
            step = metrics["global_step"]
            ax.axvline(step, color="#7f7f7f", linestyle=":", label=f"early stop at step {step}")
        bad = [r for r in rows if isinstance(r.get("loss"), float) and not math.isfinite(r["loss"])]
        if bad:
            ax.axvline(bad[0]["step"], color="black", label=f"non-finite loss at step {bad[0]['step']}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        labels = ax.get_legend_handles_labels()[1]
        plots.append(("Train and eval loss", png(fig), "Train and eval loss: " + "; ".join(labels)))
    lr_x, lr_y = series(rows, "train", "learning_rate")
    gn_x, gn_y = series(rows, "train", "grad_norm")
    if lr_x or gn_x:
        fig, (left, right) = figure(9, 3.2, columns=2)
        left.plot(lr_x, lr_y, color="#9467bd")
        left.set_title("learning rate")
        right.plot(gn_x, gn_y, color="#ff7f0e")
        right.set_title("grad norm")
        for ax in (left, right):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        plots.append(("Learning rate and grad norm", png(fig), "learning rate and grad norm per train step"))
    known = registry.kinds().get(str(summary.get("kind")))
    if known is not None:
        plots += known.plots(rows, summary)
    return plots


def mix_table(summary: dict[str, Any]) -> list[str]:
    """A mix's sources (summary.json's `data.mix`): the train rows taken of those each has, its share, whether it
    was repeated, and its own eval loss before and after the stage."""
    mix = (summary.get("data") or {}).get("mix")
    if not mix:
        return []
    metrics = summary.get("metrics") or {}
    after, before = metrics.get("eval_loss_by_source") or {}, metrics.get("eval_loss_by_source_before") or {}
    out = ["<h3>Data mix</h3><table><tr><th>source</th><th>weight</th><th>train rows taken</th><th>share</th>"
           "<th>validation rows</th><th>eval loss before</th><th>eval loss after</th></tr>"]  # fmt: skip
    for m in mix:
        name = m["name"]
        taken = f"{m['taken']} of {m['available']}" + (" (repeated)" if m.get("repeated") else "")
        cells = [html.escape(name), _fmt(m["weight"]), taken, f"{m['share']:.1%}", _fmt(m.get("validation", "-")),
                 _fmt(before.get(name, "-")), _fmt(after.get(name, "-"))]  # fmt: skip
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return [*out, "</table>"]


def shown_metrics(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """A stage's table of figures: the common ones first (SHOWN_METRICS' order), then every other figure its kind
    recorded (label_auc, kl, log_odds_ratio, ...), alphabetically; a value that is missing or not a number (an
    eval's per-model records) is left out."""
    keys = [*[k for k in SHOWN_METRICS if k in metrics], *sorted(set(metrics) - set(SHOWN_METRICS))]
    return [(k, metrics[k]) for k in keys if isinstance(metrics[k], int | float)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _change(value: float, digits: int = 4) -> str:
    """A signed difference with a true minus sign (U+2212), as the verdicts beside it write theirs: the report
    once showed `-0.5` in the table and `−0.5` in the verdict for the same change."""
    text = f"{value:+.{digits}g}"
    return "−" + text[1:] if text.startswith("-") else text


def key_metric_cells(kind: str, metrics: dict[str, Any]) -> list[str]:
    """The stages table's metric, before, after and change cells: one line per figure the kind declares.

    Each stage is compared with itself, after - before on its own eval set, and never with the stage before it: an
    SFT stage's eval loss is measured on other data (chat-formatted, completion tokens only) than an LM stage's,
    and a DPO stage's eval loss is the preference loss, so a difference across stages would subtract two different
    quantities."""
    lines: list[tuple[str, str, str, str]] = []
    known = registry.kinds().get(kind)
    figures = [(f.label, f.key, f.lower_is_better) for f in known.figures] if known is not None else []
    for label, key, lower_is_better in figures or [("eval loss", "eval_loss", True)]:
        before, after = metrics.get(f"{key}_before"), metrics.get(key)
        if before is None and after is None:
            continue
        change = "-"
        if isinstance(before, int | float) and isinstance(after, int | float):
            delta = after - before
            verdict = "" if delta == 0 else "better" if (delta < 0) == lower_is_better else "worse"
            change = f"<span class='{verdict}'>{_change(delta)}</span>"
        if isinstance(before, float | int) and isinstance(after, float | int):
            shown_before, shown_after = same_decimals(before, after)  # as the console's closing table writes them
        else:
            shown_before, shown_after = ("-" if v is None else _fmt(v) for v in (before, after))
        lines.append((label, shown_before, shown_after, change))
    sources_before = metrics.get("eval_loss_by_source_before") or {}
    for name, after in (metrics.get("eval_loss_by_source") or {}).items():  # a mix: each source's eval loss
        before = sources_before.get(name)
        change = "-"
        if isinstance(before, int | float) and isinstance(after, int | float):
            change = f"<span class='{'better' if after < before else 'worse'}'>{_change(after - before)}</span>"
        lines.append((f"eval&nbsp;loss:&nbsp;{html.escape(name)}", _fmt(before) if before is not None else "-",
                      _fmt(after) if after is not None else "-", change))  # fmt: skip
    if not lines:
        return ["-", "-", "-", "-"]
    return ["<br>".join(column) for column in zip(*lines, strict=True)]


def _pre(text: Any) -> str:
    """A prompt or greedy answer as preformatted text; one that is empty or all whitespace (a tiny or broken
    model's answer) says so rather than leave a blank box."""
    text = str(text if text is not None else "")
    if not text.strip():
        what = f"only whitespace, {len(text)} characters" if text else "empty"
        return f"<pre><span class='empty'>({what})</span></pre>"
    return f"<pre>{html.escape(text)}</pre>"


def _inside(path: Path, run_dir: Path) -> str:
    """`path` relative to the run directory where it lies inside it (the report sits there), else as it is."""
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------------
# Verdicts and "Did it help?"


def verdict_status(verdict: dict[str, Any] | None) -> str:
    """A verdict's status as a coloured span (the class is the status), or '-' for none."""
    if not verdict or not verdict.get("status"):
        return "-"
    status = html.escape(str(verdict["status"]))
    return f"<span class='{status}'>{status.replace('_', ' ')}</span>"


def verdict_cell(verdict: dict[str, Any] | None) -> str:
    """The stages table's verdict cell: the status and its first reason (the deciding numbers)."""
    if not verdict:
        return "-"
    reasons = verdict.get("reasons") or []
    return verdict_status(verdict) + (f"<br>{html.escape(reasons[0])}" if reasons else "")


def verdict_block(verdict: dict[str, Any] | None) -> str:
    """A verdict in full: the status, every reason (the deciding numbers first), then any warnings."""
    if not verdict:
        return ""
    out = [f"<p class='verdict'>Verdict: {verdict_status(verdict)}</p>"]
    reasons, warnings = verdict.get("reasons") or [], verdict.get("warnings") or []
    if reasons:
        out.append("<ul class='reasons'>" + "".join(f"<li>{html.escape(r)}</li>" for r in reasons) + "</ul>")
    if warnings:
        out.append(
            "<ul class='warnings'>" + "".join(f"<li class='warn'>warning: {html.escape(w)}</li>" for w in warnings)
            + "</ul>"
        )  # fmt: skip
    return "".join(out)


def win_rate_plot(models: dict[str, dict[str, Any]], baseline: str, judge: str) -> str | None:
    """Each model's win rate against the baseline with its 95% interval, as a horizontal error bar (base64 PNG);
    None when no model has one. The line at 0.5 is a draw: an interval that crosses it is no difference."""
    drawn = [(label, m) for label, m in models.items() if isinstance(m.get("win_rate"), int | float)]
    if not drawn:
        return None
    fig, ax = figure(7, 0.9 + 0.45 * len(drawn))
    fig.subplots_adjust(left=1.6 / 7)
    for y, (_, m) in enumerate(drawn):
        rate = m["win_rate"]
        low, high = (m.get("win_rate_ci") or [rate, rate])[:2]
        colour = {"better": "#2ca02c", "worse": "#d62728"}.get((m.get("verdict") or {}).get("status"), "#7f7f7f")
        ax.errorbar([rate], [y], xerr=[[rate - low], [high - rate]], fmt="o", color=colour, capsize=4)
    ax.axvline(0.5, color="#555", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(drawn)), [label for label, _ in drawn])
    ax.set_ylim(-0.6, len(drawn) - 0.4)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"win rate vs {baseline} ({judge}), 95% interval")
    ax.grid(alpha=0.3, axis="x")
    return png(fig)


def how_to_read(baseline: str, judge: str) -> str:
    """What the table's figures mean, under it: a reader new to win rates should not have to look them up."""
    b, j = html.escape(baseline), html.escape(judge)
    return (
        "<p class='note'>How to read this: every model answered the same held-out prompts. <b>score</b> is a judge's "
        f"mean over all answers. <b>win rate</b> compares prompt by prompt with {b}'s answer to the same prompt, by "
        f"{j}: 1 where the model's answer scores higher, 0.5 for a tie, 0 where lower; 0.5 overall is a draw, and the "
        "95% interval (prompts resampled) says how sure that is. A mean score and a win rate can disagree: a few very "
        "low scores pull a mean down without losing more than a few prompts. <b>LC win rate</b> is the win rate "
        "corrected for answer length (what it would be at equal length; judges often favour longer answers). "
        "<b>repetition</b>: the share of repeated 4-grams in an answer; <b>eos rate</b>: answers that ended on their "
        "own rather than at the length limit. A judge's differences can be tiny: the scores below show them.</p>"
    )


def did_it_help(run_dir: Path, entries: list[dict[str, Any]], summaries: dict[str, dict[str, Any]]) -> str:
    """The report's first section: the eval stages' tables, figures and regressions, and every stage's verdict."""
    from align.verdict import regressions

    out = ["<h2 id='did-it-help'>Did it help?</h2>"]
    evals = [e for e in entries if _declares(e, "compares_models") and (summaries[e["name"]].get("metrics") or {})]
    for entry in evals:
        name, summary = entry["name"], summaries[entry["name"]]
        metrics = summary["metrics"]
        models: dict[str, dict[str, Any]] = metrics.get("models") or {}
        baseline, judge = metrics.get("baseline"), metrics.get("judge")
        judges = list(metrics.get("judges") or ([judge] if judge else []))
        out.append(
            f"<h3>{html.escape(name)}: {len(models)} models on {_fmt(metrics.get('prompts', '?'))} prompts, against "
            f"{html.escape(str(baseline))}, judged by {html.escape(str(judge))}</h3>"
        )
        if entry.get("stale"):  # as the stages table says it, here too: its figures are of models since retrained
            out.append(f"<p class='warn'>Stale: {html.escape(str(entry['stale']))}.</p>")
        out.append(verdict_block(summary.get("verdict")))
        tasks = sorted({f"{task}/{key}" for m in models.values() for task, figures in (m.get("lm_eval") or {}).items()
                        for key in (figures or {})})  # fmt: skip
        # Answers through tools (an eval's `tools:`): how each model used them, beside its scores.
        tool_columns = [k for k in TOOL_COLUMNS if any(k in m for m in models.values())]
        head = ["model", *(f"score: {html.escape(j)}" for j in judges), "win rate [95% CI]", "LC win rate",
                "mean length", "repetition", "distinct-2", "eos rate", *(TOOL_COLUMNS[k] for k in tool_columns),
                *map(html.escape, tasks), "verdict"]  # fmt: skip
        out.append("<table class='models'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
        rows = []
        for label, m in models.items():
            scores = m.get("score_mean") or {}
            rate, ci, lc = m.get("win_rate"), m.get("win_rate_ci"), m.get("lc_win_rate")
            # Rates as the verdicts write them (0.14 [0.08, 0.20]); the baseline against itself is no figure.
            if label == baseline:
                win, lc = "- (the baseline)", "-"
            else:
                win = "-" if rate is None else f"{rate:.2f}" + (f"<br>[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                lc = "-" if lc is None else f"{lc:.2f}"
            lm_eval = m.get("lm_eval") or {}
            task_cells = [lm_eval.get(t.split("/", 1)[0], {}).get(t.split("/", 1)[1]) for t in tasks]
            cells = [*(scores.get(j) for j in judges), win, lc, m.get("mean_length"), m.get("repetition"),
                     m.get("distinct_2"), m.get("eos_rate"), *(m.get(k) for k in tool_columns),
                     *task_cells]  # fmt: skip
            rows.append((label, m, cells))
        # Each column's numbers with one number of decimals (2.850 beside 2.990, as the verdict writes them; not
        # 2.85 beside 2.99, nor an eos rate of 1 beside 0.975).
        columns = [list(column) for column in zip(*(cells for _, _, cells in rows), strict=True)]
        for column in columns:
            numeric = [isinstance(c, int | float) and not isinstance(c, bool) for c in column]
            shown = iter(same_decimals(*(c for c, number in zip(column, numeric, strict=True) if number)))
            column[:] = [next(shown) if number else c for c, number in zip(column, numeric, strict=True)]
        for (label, m, _), cells in zip(rows, zip(*columns, strict=True), strict=True):
            verdict = m.get("verdict") or {}
            reasons = "".join(f"<br>{html.escape(r)}" for r in verdict.get("reasons") or [])
            reasons += "".join(f"<br><span class='warn'>warning: {html.escape(w)}</span>"
                               for w in verdict.get("warnings") or [])  # fmt: skip
            out.append(
                f"<tr><td>{html.escape(label)}<br><code>{html.escape(str(m.get('model', '')))}</code></td>"
                + "".join(f"<td class='num'>{'-' if c is None else c}</td>" for c in cells)
                + f"<td>{verdict_status(verdict)}{reasons}</td></tr>"
            )  # fmt: skip
        out.append("</table>")
        out.append(how_to_read(str(baseline), str(judge)))
        png = win_rate_plot(models, str(baseline), str(judge))
        if png is not None:
            alt = "Win rate against the baseline with 95% intervals: " + "; ".join(
                f"{label} {m['win_rate']:.2f}" for label, m in models.items() if m.get("win_rate") is not None
            )
            out.append(f"<img class='win-rates' alt='{html.escape(alt)}' src='data:image/png;base64,{png}'>")
        rows = read_rows(run_dir / name / "generations.jsonl")  # a torn last line (a killed run) is skipped
        out += transcripts_table(rows, list(models), str(judge))
        for candidate in [label for label in models if label != baseline]:
            compared = regressions(rows, str(baseline), candidate, 10**9, judge=judge)
            worst = [r for r in compared if r["difference"] < 0][:10]  # ties are no regression
            if compared and not worst:
                out.append(f"<p>No prompt where {html.escape(candidate)} scored below {html.escape(str(baseline))} "
                           f"by {html.escape(str(judge))}.</p>")  # fmt: skip
            if not worst:
                continue
            out.append(
                f"<h4>{html.escape(candidate)} against {html.escape(str(baseline))}: largest regressions first "
                f"({html.escape(str(judge))} score, candidate &minus; baseline)</h4>"
                "<table class='generations regressions'><colgroup><col style='width:28%'><col style='width:31%'>"
                "<col style='width:31%'><col style='width:10%'></colgroup>"
                f"<tr><th>prompt</th><th>{html.escape(str(baseline))}</th><th>{html.escape(candidate)}</th>"
                "<th>scores</th></tr>"
            )
            for row in worst:
                difference = row["difference"]
                change = "0 (tie)" if difference == 0 else (
                    f"<span class='{'worse' if difference < 0 else 'better'}'>{_change(difference, 3)}</span>"
                )  # fmt: skip
                shown = same_decimals(row["baseline_score"], row["candidate_score"])
                # Named, not "a -> b": an arrow between two models reads as before -> after.
                scores = (f"{html.escape(str(baseline))} {shown[0]}<br>{html.escape(candidate)} {shown[1]}"
                          f"<br>{change}")  # fmt: skip
                out.append(f"<tr><td>{_pre(row['prompt'])}</td><td>{_pre(row['baseline'])}</td>"
                           f"<td>{_pre(row['candidate'])}</td><td class='num'>{scores}</td></tr>")  # fmt: skip
            out.append("</table>")
    trained = [e for e in entries if _declares(e, "trains")]
    lines = []
    for entry in trained:
        summary = summaries[entry["name"]]
        verdict = summary.get("verdict")
        reasons = (verdict or {}).get("reasons") or []
        text = f" — {html.escape(reasons[0])}" if reasons else ""
        status = str(summary.get("status", entry.get("status", "pending")))
        # A stage that did not finish has no verdict; one from before verdicts existed has none recorded.
        missing = "no verdict recorded" if status in ("completed", "cached") else f"no verdict ({html.escape(status)})"
        lines.append(f"<li><b>{html.escape(entry['name'])}</b> ({html.escape(entry.get('kind', ''))}): "
                     f"{verdict_status(verdict) if verdict else missing}{text}</li>")  # fmt: skip
    if lines:
        out.append("<h3>Stage verdicts</h3><p>Each training stage on its own held-out split, before against after "
                   "(paired 95% bootstrap interval of the change).</p><ul class='stage-verdicts'>"
                   + "".join(lines) + "</ul>")  # fmt: skip
    if not evals and not lines:
        out.append("<p class='empty'>No stage has finished yet.</p>")
    return "\n".join(out)


def transcripts_table(rows: list[dict[str, Any]], labels: list[str], judge: str, prompts: int = 5) -> list[str]:
    """An eval that answered through tools: each model's transcript (calls, results, final answer) and score for
    the first `prompts` prompts, sample 0; nothing for an eval without tools."""
    from align.verdict import shown_answer

    if not any(row.get("turns") for row in rows):
        return []
    chosen: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row.get("sample", 0) == 0 and (row["prompt_index"] in chosen or len(chosen) < prompts):
            chosen.setdefault(row["prompt_index"], {"prompt": row.get("prompt"), "models": {}})["models"][
                row.get("model")] = row  # fmt: skip
    width = 70 // max(1, len(labels))
    out = [f"<h4>Transcripts: the first {len(chosen)} prompts, each model's calls (-&gt;), results (&lt;-) and final "
           f"answer, with its {html.escape(judge)} score</h4><table class='generations'><colgroup><col style='width:"
           f"30%'>" + "".join(f"<col style='width:{width}%'>" for _ in labels) + "</colgroup><tr><th>prompt</th>"
           + "".join(f"<th>{html.escape(label)}</th>" for label in labels) + "</tr>"]  # fmt: skip
    for entry in chosen.values():
        cells = []
        for label in labels:
            row = entry["models"].get(label)
            score = (row or {}).get("scores", {}).get(judge)
            shown = "" if row is None else str(shown_answer(row) or "")
            cells.append(f"<td>{_pre(shown)}{'' if score is None else f'{judge} {_fmt(score)}'}</td>")
        out.append(f"<tr><td>{_pre(entry['prompt'])}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    return out


# An eval's tool figures (align/tools.py `tool_figures`) as the models table heads them.
TOOL_COLUMNS = {"tool_call_rate": "answers calling a tool", "calls_per_answer": "calls per answer",
                "tool_failure_rate": "calls failed", "malformed_call_rate": "malformed calls"}  # fmt: skip


def answers_heading(online: bool) -> str:
    """The heading of a stage's answers before and after: an online RL kind's come from its held-out measure, sampled
    as training samples (through its tools, shown as transcripts)."""
    if online:
        return "Answers to held-out prompts, sampled as in training (one of each prompt's)"
    return "Greedy answers to eval prompts"


def _declares(entry: dict[str, Any], what: str) -> bool:
    """Whether the stage's kind declares `what` (`trains`, `compares_models`); False for a kind not registered."""
    known = registry.kinds().get(str(entry.get("kind")))
    return bool(known is not None and getattr(known, what))


def build_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html from the run's files and return its path.

    Raises:
        FileNotFoundError: RUN_DIR holds no pipeline.json (not an align run).
    """
    pipeline = read_json(run_dir / "pipeline.json")
    if pipeline is None:
        raise FileNotFoundError(f"{run_dir}: no pipeline.json here: not an align run directory")
    with_early_stopping = early_stopping_stages(run_dir)
    stages = recipe_stages(run_dir)
    entries = pipeline.get("stages", [])
    summaries = {e["name"]: read_json(run_dir / e["name"] / "summary.json") or {} for e in entries}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>align report: {html.escape(pipeline.get('name', ''))}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>align run: {html.escape(pipeline.get('name', ''))}</h1>",
        did_it_help(run_dir, entries, summaries),
        "<h2>Stages</h2><p>Each stage against itself: its metrics on its own eval set before and after training "
        "(change = after &minus; before). Stages are not compared with each other: their eval sets and losses "
        "differ.</p>",
        "<table class='stages'><tr><th>stage</th><th>kind</th><th>status</th><th>metric</th><th>before</th>"
        "<th>after</th><th>change</th><th>verdict</th><th>saved model</th><th>wall time</th></tr>",
    ]
    sections = []
    for entry in entries:
        stage_dir = run_dir / entry["name"]
        summary = summaries[entry["name"]]
        metrics = summary.get("metrics") or {}
        status = html.escape(summary.get("status", entry.get("status", "pending")))
        kind = entry.get("kind", "")
        saved = saved_model_step(summary, entry["name"] in with_early_stopping)
        model = "-" if saved is None else f"step {saved[0]} ({html.escape(saved[1])})"
        if saved is not None and summary.get("model_dir"):
            model += f"<br><code>{html.escape(_inside(Path(summary['model_dir']), run_dir))}</code>"
        metric, before, after, change = key_metric_cells(kind, metrics)
        # The stage's wall time, as the console's closing table gives it (the Trainer's train_runtime_s leaves out
        # loading, evaluation before and after, and saving).
        seconds = summary.get("wall_time_s") or metrics.get("train_runtime_s")
        # A stage an --only run left behind: its figures are of models that run replaced, and the table says so.
        stale = f"<br><span class='warn'>stale: {html.escape(entry['stale'])}</span>" if entry.get("stale") else ""
        parts.append(
            f"<tr><td>{html.escape(entry['name'])}</td><td>{html.escape(kind)}</td><td class='{status}'>{status}"
            f"{stale}</td>"
            f"<td>{metric}</td><td class='num'>{before}</td><td class='num'>{after}</td><td class='num'>{change}</td>"
            f"<td class='verdict'>{verdict_cell(summary.get('verdict'))}</td>"
            f"<td>{model}</td><td class='num'>{f'{seconds:.1f} s' if seconds else '-'}</td></tr>"
        )
        section = [
            f"<h2>{html.escape(entry['name'])} ({html.escape(kind)}): {status}{' (stale)' if stale else ''}</h2>"
        ]
        if summary.get("error"):
            section.append(f"<p class='failed'>{html.escape(summary['error'])}</p>")
        if summary.get("input_model"):
            section.append(f"<p>input model: {html.escape(summary['input_model'])}</p>")
        section.append(lora_line(stages.get(entry["name"], {}), summary))
        section.append(verdict_block(summary.get("verdict")))
        if saved is not None:
            where = html.escape(str(summary.get("model_dir") or "-"))
            section.append(f"<p class='saved'>saved model: step {saved[0]} ({html.escape(saved[1])}), in {where}</p>")
            loss, loss_before = metrics.get("eval_loss"), metrics.get("eval_loss_before")
            surrogate = _declares(entry, "surrogate_loss")  # grpo's loss is a policy-gradient surrogate, not a fit
            if isinstance(loss, int | float) and isinstance(loss_before, int | float) and loss > loss_before \
                    and not surrogate:  # fmt: skip
                section.append(
                    f"<p class='warn'>The saved model's eval loss ({_fmt(loss)}) is higher than before this stage "
                    f"({_fmt(loss_before)}): training made it worse on this stage's eval set.</p>"
                )
        section += mix_table(summary)
        for title, image, alt in stage_plots(read_rows(stage_dir / "metrics.jsonl"), summary, saved):
            section.append(f"<h3>{title}</h3><img alt='{html.escape(alt)}' src='data:image/png;base64,{image}'>")
        shown = shown_metrics(metrics)
        known = registry.kinds().get(kind)
        if known is not None and not known.trains:  # an eval: its figures are the models', under "Did it help?"
            prompts = metrics.get("prompts")
            count = f"{_fmt(prompts)} prompts; " if prompts is not None else ""
            section.append(f"<p>{count}every model's figures are in <a href='#did-it-help'>Did it help?</a> above.</p>")
            shown = []
        if shown:
            section.append("<table><tr><th>metric</th><th>value</th></tr>")
            section += [f"<tr><td>{k}</td><td>{_fmt(v)}</td></tr>" for k, v in shown]
            section.append("</table>")
        generations = summary.get("generations") or []
        if generations:
            section.append(
                f"<h3>{html.escape(answers_heading(_declares(entry, 'surrogate_loss')))}</h3>"
                "<table class='generations'><colgroup><col style='width:36%'>"
                "<col style='width:32%'><col style='width:32%'></colgroup>"
                "<tr><th>prompt</th><th>before</th><th>after</th></tr>"
            )
            for row in generations:
                section.append(
                    "<tr>" + "".join(f"<td>{_pre(row.get(k))}</td>" for k in ("prompt", "before", "after")) + "</tr>"
                )
            section.append("</table>")
        sections.append("\n".join(section))
    parts.append("</table>")
    parts += sections
    recipe = run_dir / "recipe.yaml"
    if recipe.is_file():
        parts.append(f"<h2>Resolved recipe</h2><pre>{html.escape(recipe.read_text(encoding='utf-8'))}</pre>")
    parts.append("</body></html>")
    path = run_dir / "report.html"
    write_text_atomic(path, "\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print("usage: python -m align.report RUN_DIR   (re)builds RUN_DIR/report.html")
        return 0
    if len(args) != 1:
        print("error: usage: python -m align.report RUN_DIR", file=sys.stderr)
        return 2
    try:
        path = build_report(Path(args[0]))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
