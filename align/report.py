"""`python -m align.report RUN_DIR`: a self-contained report.html of a run, plots embedded as PNG.

Per stage: train and eval loss with the best step and any early stop marked; learning rate and grad norm;
for DPO, rewards of chosen and rejected answers, margins and accuracy. Then a summary table and the
resolved recipe. Written at the end of every run, failed ones included, from whatever the run left.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from align.files import read_json, write_text_atomic

logger = logging.getLogger(__name__)

SHOWN_METRICS = (
    "eval_loss_before", "eval_loss", "perplexity_before", "perplexity", "pref_accuracy_before", "pref_accuracy",
    "reward_accuracy", "reward_margin", "train_loss", "global_step", "best_step", "stopped_early",
    "train_runtime_s", "train_tokens", "tokens_per_s",
)  # fmt: skip


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


def _series(rows: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), int | float)]
    return [p[0] for p in points], [p[1] for p in points]


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
    """A bare Agg figure with fixed margins (in inches, room for tick labels, axis labels and titles): no pyplot,
    whose import and figure registry cost more than the plots, and no layout engine, which measures every text
    by drawing it once more (~0.1 s a figure: a tenth of an SFT run's whole overhead over bare TRL)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.2 / width, bottom=0.5 / height, top=1 - 0.35 / height,
                        wspace=0.25)  # fmt: skip
    return fig, fig.subplots(1, columns)


def stage_plots(rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, base64 PNG) for each plot the stage's rows allow."""
    plots = []
    metrics = summary.get("metrics") or {}
    train_x, train_y = _series(rows, "train", "loss")
    eval_x, eval_y = _series(rows, "eval", "eval_loss")
    if train_x or eval_x:
        fig, ax = _figure(7, 3.6)
        if train_x:
            ax.plot(train_x, train_y, label="train loss", color="#1f77b4")
        if eval_x:
            ax.plot(eval_x, eval_y, "o-", label="eval loss", color="#d62728")
        if isinstance(metrics.get("best_step"), int):
            ax.axvline(metrics["best_step"], color="#2ca02c", linestyle="--", label=f"best step {metrics['best_step']}")
        if metrics.get("stopped_early"):
            ax.axvline(metrics["global_step"], color="#7f7f7f", linestyle=":", label="early stop")
        bad = [r for r in rows if isinstance(r.get("loss"), float) and not math.isfinite(r["loss"])]
        if bad:
            ax.axvline(bad[0]["step"], color="black", label=f"non-finite loss at step {bad[0]['step']}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        plots.append(("Train and eval loss", _png(fig)))
    lr_x, lr_y = _series(rows, "train", "learning_rate")
    gn_x, gn_y = _series(rows, "train", "grad_norm")
    if lr_x or gn_x:
        fig, (left, right) = _figure(9, 3.2, columns=2)
        left.plot(lr_x, lr_y, color="#9467bd")
        left.set_title("learning rate")
        right.plot(gn_x, gn_y, color="#ff7f0e")
        right.set_title("grad norm")
        for ax in (left, right):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        plots.append(("Learning rate and grad norm", _png(fig)))
    chosen_x, chosen_y = _series(rows, "eval", "eval_rewards/chosen")
    if chosen_x:
        _, rejected_y = _series(rows, "eval", "eval_rewards/rejected")
        _, margins = _series(rows, "eval", "eval_rewards/margins")
        _, accuracy = _series(rows, "eval", "eval_rewards/accuracies")
        fig, (left, right) = _figure(9, 3.2, columns=2)
        left.plot(chosen_x, chosen_y, "o-", label="chosen", color="#2ca02c")
        left.plot(chosen_x, rejected_y, "o-", label="rejected", color="#d62728")
        left.plot(chosen_x, margins, "o--", label="margin", color="#7f7f7f")
        left.set_title("DPO rewards (eval)")
        left.legend()
        right.plot(chosen_x, accuracy, "o-", color="#1f77b4")
        right.set_ylim(0, 1.05)
        right.set_title("reward accuracy (eval)")
        for ax in (left, right):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        plots.append(("DPO rewards", _png(fig)))
    return plots


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def build_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html from the run's files and return its path.

    Raises:
        FileNotFoundError: RUN_DIR holds no pipeline.json (not an align run).
    """
    pipeline = read_json(run_dir / "pipeline.json")
    if pipeline is None:
        raise FileNotFoundError(f"{run_dir}: no pipeline.json here: not an align run directory")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>align report: {html.escape(pipeline.get('name', ''))}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#f3f3f3}img{max-width:100%}pre{background:#f7f7f7;padding:1em;overflow:auto}"
        ".failed{color:#b00}.completed,.cached{color:#070}</style></head><body>",
        f"<h1>align run: {html.escape(pipeline.get('name', ''))}</h1>",
        "<h2>Stages</h2><table><tr><th>stage</th><th>kind</th><th>status</th><th>key metrics</th>"
        "<th>time</th><th>model</th></tr>",
    ]
    sections = []
    for entry in pipeline.get("stages", []):
        stage_dir = run_dir / entry["name"]
        summary = read_json(stage_dir / "summary.json") or {}
        metrics = summary.get("metrics") or {}
        status = summary.get("status", entry.get("status", "pending"))
        key = ", ".join(f"{k}={_fmt(metrics[k])}" for k in SHOWN_METRICS[:8] if metrics.get(k) is not None)
        seconds = metrics.get("train_runtime_s")
        parts.append(
            f"<tr><td>{html.escape(entry['name'])}</td><td>{html.escape(entry.get('kind', ''))}</td>"
            f"<td class='{status}'>{status}</td><td>{key}</td><td>{f'{seconds:.0f} s' if seconds else '-'}</td>"
            f"<td>{html.escape(str(summary.get('model_dir') or '-'))}</td></tr>"
        )
        section = [f"<h2>{html.escape(entry['name'])} ({html.escape(entry.get('kind', ''))}): {status}</h2>"]
        if summary.get("error"):
            section.append(f"<p class='failed'>{html.escape(summary['error'])}</p>")
        if summary.get("input_model"):
            section.append(f"<p>input model: {html.escape(summary['input_model'])}</p>")
        for title, png in stage_plots(read_rows(stage_dir / "metrics.jsonl"), summary):
            section.append(f"<h3>{title}</h3><img alt='{title}' src='data:image/png;base64,{png}'>")
        if metrics:
            section.append("<table><tr><th>metric</th><th>value</th></tr>")
            section += [f"<tr><td>{k}</td><td>{_fmt(metrics[k])}</td></tr>" for k in SHOWN_METRICS if k in metrics]
            section.append("</table>")
        generations = summary.get("generations") or []
        if generations:
            section.append(
                "<h3>Greedy answers to eval prompts</h3><table><tr><th>prompt</th><th>before</th><th>after</th></tr>"
            )
            for row in generations:
                cells = "".join(
                    f"<td><pre>{html.escape(str(row.get(k, '')))}</pre></td>" for k in ("prompt", "before", "after")
                )
                section.append(f"<tr>{cells}</tr>")
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
