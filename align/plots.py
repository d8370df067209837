"""What the report's plots are drawn with: a stage's series from metrics.jsonl, a bare figure, and the PNG the report
embeds. The report draws what every training stage logs (loss, learning rate, grad norm); a kind draws its own
(`Kind.plots`) with these."""

from __future__ import annotations

import base64
import io
from typing import Any


def series(rows: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    """The (steps, values) of `key` in the metrics.jsonl rows of one split ("train", "eval"), numbers only."""
    points = [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), int | float)]
    return [p[0] for p in points], [p[1] for p in points]


def png(fig: Any) -> str:
    """The figure as a base64 PNG, as the report embeds it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def figure(width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
    """A bare Agg figure with fixed margins (in inches, room for tick labels, axis labels and titles): no pyplot,
    whose import and figure registry cost more than the plots, and no layout engine, which measures every text
    by drawing it once more (~0.1 s a figure: a tenth of an SFT run's whole overhead over bare TRL)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.2 / width, bottom=0.5 / height, top=1 - 0.35 / height,
                        wspace=0.25)  # fmt: skip
    return fig, fig.subplots(1, columns)
