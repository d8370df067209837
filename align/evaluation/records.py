"""What an eval stage records of its answers (align/stages/eval.py runs it): the summary's figures per model,
`generations.jsonl`, and the trackers' summary and side-by-side table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.stages.runner import show_prompt

if TYPE_CHECKING:
    from align.context import StageContext
    from align.stages.eval import EvalRow


def figures(
    stage: Any,
    baseline: str,
    models: dict[str, str],
    rows: list[Any],
    answers: dict[str, list],
    scores: dict[str, dict[str, list]],
    lm_eval: dict[str, Any],
) -> dict[str, Any]:
    """The eval summary's metrics (the contract's keys): per model (`models`: label -> as the recipe names it) each
    judge's mean, the win rate against the `baseline` by every judge (the first judge's is `win_rate`), answer
    statistics, a thinking model's cut thoughts, tool figures and lm-eval figures."""
    from align.evaluation import answer_statistics, compare_pairwise
    from align.evaluation.verdicts import model_verdict, score_interval

    judges = [j.name for j in stage.judges]
    out: dict[str, Any] = {"baseline": baseline, "prompts": len(rows), "judge": judges[0] if judges else None,
                           "judges": judges, "models": {}}  # fmt: skip
    lengths = {label: [[a.tokens for a in samples] for samples in per] for label, per in answers.items()}
    for label, per in answers.items():
        entry: dict[str, Any] = {"model": models[label]}
        entry["score_mean"] = {j: _mean([v for p in scores[j][label] for v in p]) for j in judges}
        # Each judge's mean with its 95% bootstrap interval over prompts: exact_match's is the model's accuracy.
        entry["score_ci"] = {j: score_interval(scores[j][label], stage.generation.seed) for j in judges}
        entry["win_rates"] = {}
        for j in judges:
            result = compare_pairwise(scores[j][label], scores[j][baseline], lengths[label], lengths[baseline],
                                      seed=stage.generation.seed)  # fmt: skip
            entry["win_rates"][j] = {**result.summary(), "length_coefficient": result.length_coefficient}
        if judges:
            entry.update({k: entry["win_rates"][judges[0]][k] for k in ("win_rate", "win_rate_ci", "lc_win_rate")})
        flat_answers = [a for samples in per for a in samples]
        entry.update(answer_statistics(flat_answers))
        if not getattr(stage, "tools", None) and flat_answers:  # a tool call written where the eval runs none
            unrun = sum("<tool_call>" in a.text for a in flat_answers) / len(flat_answers)
            if unrun:
                entry["unrun_tool_call_rate"] = unrun
        if any(a.turns is not None for a in flat_answers):
            from align.tools import tool_figures

            entry.update(tool_figures(flat_answers))
            failed: dict[str, int] = {}
            for answer in flat_answers:
                for name, count in answer.failed_tools.items():
                    failed[name] = failed.get(name, 0) + count
            entry["failed_tools"] = dict(sorted(failed.items(), key=lambda item: -item[1]))
        if any(a.reasoning is not None or a.thought_cut for a in flat_answers):
            n = len(flat_answers)
            entry["cut_thought_rate"] = sum(a.thought_cut for a in flat_answers) / n
            entry["reasoning_length"] = sum(len(a.reasoning or "") for a in flat_answers) / n
        if label in lm_eval:
            entry["lm_eval"] = lm_eval[label]
        entry["verdict"] = model_verdict(label, baseline, entry, out["models"].get(baseline), judges)
        out["models"][label] = entry
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


SHOWN_ELSEWHERE = ("tools", "completion", "chosen", "rejected")


def write_generations(
    path: Path, rows: list[EvalRow], answers: dict[str, list], scores: dict[str, dict]
) -> list[dict[str, Any]]:
    """`generations.jsonl`: one line per prompt x model x sample, with every judge's score. Returns the lines."""
    from align.files import write_text_atomic

    lines = []
    for p, row in enumerate(rows):
        for label, per in answers.items():
            for s, answer in enumerate(per[p]):
                lines.append({
                    "prompt_index": p, "prompt": show_prompt(row.prompt), "reference": row.reference,
                    "model": label, "sample": s, "answer": answer.text, "tokens": answer.tokens,
                    "ended": answer.ended, "scores": {j: scores[j][label][p][s] for j in scores},
                    # What a function judge read beside the answer (exact_match's `answer`); not again what
                    # `reference` holds, nor the tools' schemas (the stage's, in its plan).
                    **({"columns": columns} if (columns := {k: v for k, v in row.columns.items()
                                                            if k not in SHOWN_ELSEWHERE}) else {}),
                    # A thinking model's reasoning, apart from the answer judged (only where it thought).
                    **({"reasoning": answer.reasoning, "thought_cut": answer.thought_cut}
                       if answer.reasoning is not None or answer.thought_cut else {}),
                    # An answer reached through tools: its calls, their results, and the count.
                    **({"turns": answer.turns, "tool_calls": answer.tool_calls, "tool_failures": answer.tool_failures,
                        "failed_tools": answer.failed_tools} if answer.turns is not None else {}),
                })  # fmt: skip
    write_text_atomic(path, "".join(json.dumps(line, default=str) + "\n" for line in lines))
    return lines


def report_to_tracker(ctx: StageContext, metrics: dict[str, Any], lines: list[dict[str, Any]]) -> None:
    """The figures as the stage's summary, and the answers side by side as a table, largest regressions first:
    the report's table (`align.verdict.regressions`), for every model against the baseline."""
    from align.verdict import regressions

    flat = {}
    for label, entry in metrics["models"].items():
        for key in ("win_rate", "lc_win_rate", "mean_length", "repetition", "distinct_2", "eos_rate"):
            if isinstance(entry.get(key), int | float):
                flat[f"eval/{label}/{key}"] = entry[key]
    ctx.tracker.summary(flat)
    judge, baseline = metrics["judge"], metrics["baseline"]
    if judge is None:
        return
    columns = ["prompt", "model", "answer", "baseline answer", "score", "baseline score", "difference"]
    table = [
        [r["prompt"], label, r["candidate"], r["baseline"], r["candidate_score"], r["baseline_score"], r["difference"]]
        for label in metrics["models"] if label != baseline
        for r in regressions(lines, baseline, label, 50, judge=judge)
    ]  # fmt: skip
    ctx.tracker.table("eval/answers", columns, table)
