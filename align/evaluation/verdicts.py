"""An eval's verdicts: each model against the baseline by the first judge's win rate (with the interval of each
judge's mean score it quotes), and the stage's own over every model, the worst first.
"""

from __future__ import annotations

from typing import Any


def score_interval(per_prompt: list[list[float]], seed: int) -> list[float] | None:
    """The 95% percentile bootstrap interval of a judge's mean score, prompts resampled (each prompt's mean over
    its samples)."""
    from align.evaluation.pairwise import bootstrap_interval

    means = [sum(p) / len(p) for p in per_prompt if p]
    return list(bootstrap_interval(means, seed=seed)) if means else None


def model_verdict(
    label: str, baseline: str, entry: dict[str, Any], base: dict[str, Any] | None, judges: list[str]
) -> dict[str, Any]:
    """A model against the baseline by the first judge's raw win rate: `better` or `worse` where the 95% interval
    excludes 0.5, else `no_difference`. The raw rate, not the length-controlled one: the LC fit forgives an answer
    cut short by the length limit, which is a real failure here. Shorter, more repetitive or fewer ended answers
    than the baseline's are warnings."""
    if label == baseline:
        return {"status": "baseline", "reasons": [f"{label} is the baseline every model is compared with"],
                "warnings": []}  # fmt: skip
    if not judges:
        return {"status": "no_difference", "reasons": ["no judge compared the answers (lm_eval figures only)"],
                "warnings": []}  # fmt: skip
    low, high = entry["win_rate_ci"]
    status = "better" if low > 0.5 else "worse" if high < 0.5 else "no_difference"
    first = (f"win rate {entry['win_rate']:.2f} [{low:.2f}, {high:.2f}] against {baseline} by {judges[0]} "
             f"(length-controlled {entry['lc_win_rate']:.2f})")  # fmt: skip
    if base is not None and entry["score_ci"].get(judges[0]) and base["score_ci"].get(judges[0]):
        # The judge's mean for both, each with its interval: for exact_match, the two accuracies.
        (low_m, high_m), (low_b, high_b) = entry["score_ci"][judges[0]], base["score_ci"][judges[0]]
        first += (f"; mean {judges[0]} {entry['score_mean'][judges[0]]:.3f} [{low_m:.3f}, {high_m:.3f}] against "
                  f"{base['score_mean'][judges[0]]:.3f} [{low_b:.3f}, {high_b:.3f}]")  # fmt: skip
    reasons = [first]
    for j in judges[1:]:
        other = entry["win_rates"][j]
        low_j, high_j = other["win_rate_ci"]
        reasons.append(f"by {j}: {other['win_rate']:.2f} [{low_j:.2f}, {high_j:.2f}]")
    warnings = []
    if base is not None:
        if entry["mean_length"] < 0.8 * base["mean_length"]:
            warnings.append(f"shorter answers: {entry['mean_length']:.1f} tokens against {base['mean_length']:.1f}")
        if entry["repetition"] > base["repetition"] + 0.05:
            warnings.append(f"more repetitive: repeated 4-grams {entry['repetition']:.2f} against "
                            f"{base['repetition']:.2f}")  # fmt: skip
        if entry["eos_rate"] < base["eos_rate"] - 0.05:
            warnings.append(f"fewer answers end on their own: {entry['eos_rate']:.0%} against {base['eos_rate']:.0%}")
    return {"status": status, "reasons": reasons, "warnings": warnings}


# Worst first: a model the baseline beat must not stand behind one that tied it.
VERDICT_ORDER = {"worse": 0, "better": 1, "no_difference": 2}


def ranked_models(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The models other than the baseline, those whose verdict differs from it first, the worst first: `worse`,
    then `better`, then `no_difference`, each by raw win rate from the lowest (recipe order breaks ties)."""
    others = [(label, m) for label, m in metrics["models"].items() if label != metrics["baseline"]]

    def rank(item: tuple[str, dict[str, Any]]) -> tuple[int, float]:
        rate = item[1].get("win_rate")
        status = (item[1].get("verdict") or {}).get("status")
        return VERDICT_ORDER.get(status, 2), rate if isinstance(rate, int | float) else 0.5

    return sorted(others, key=rank)


def eval_verdict(metrics: dict[str, Any]) -> dict[str, Any]:
    """The stage's own verdict over every model: `worse` where any model is worse than the baseline, else `better`
    where any is better, else `no_difference`; one reason a model, worst first (`ranked_models`), so the headline
    that quotes the first never hides a model the baseline beat."""
    others = [(label, m["verdict"]) for label, m in ranked_models(metrics)]
    if not others:  # one model: its own figures are the answer, with the warnings about it
        label, model = next(iter(metrics["models"].items()), (None, {}))
        judge = metrics.get("judge")
        score, interval = (model.get("score_mean") or {}).get(judge), (model.get("score_ci") or {}).get(judge)
        figure = (f": mean {judge} {score:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
                  if isinstance(score, int | float) else "")  # fmt: skip
        return {"status": "baseline", "reasons": [f"only {label} was evaluated{figure}" if label else
                                                  "only the baseline was evaluated"],
                "warnings": [f"{label}: {w}" for w in tool_warnings(model)] if label else []}  # fmt: skip
    reasons = [f"{label}: {v['reasons'][0]}" + ("" if len(others) == 1 else f" ({v['status']})")
               for label, v in others]  # fmt: skip
    warnings = [f"{label}: {w}" for label, v in others for w in v["warnings"]]
    # Any model (the baseline too) whose answers mostly never closed their reasoning: nothing was left to judge.
    from align.thinking import CUT_THOUGHTS

    warnings += [f"{label}: cut thoughts: {m['cut_thought_rate']:.0%} of its answers never closed their reasoning "
                 "within generation.max_new_tokens, so they have no answer to judge: raise it, or set thinking: false"
                 for label, m in metrics["models"].items()
                 if (m.get("cut_thought_rate") or 0) >= CUT_THOUGHTS]  # fmt: skip
    warnings += [f"{label}: {w}" for label, m in metrics["models"].items() for w in tool_warnings(m)]
    return {"status": others[0][1]["status"], "reasons": reasons, "warnings": warnings}


def tool_warnings(model: dict[str, Any]) -> list[str]:
    """What went wrong in a model's answers through tools (an eval stage's `tools:`), each with its numbers: no call
    at all, calls that failed (by tool), calls that did not parse, answers still calling when the cap ran out."""
    if model.get("unrun_tool_call_rate"):  # answers written as tool calls where the eval runs none
        return [
            f"{model['unrun_tool_call_rate']:.0%} of its answers are a tool call (<tool_call>) that nothing ran: "
            "this eval has no tools:, so the call is judged as the answer"
        ]
    if "tool_call_rate" not in model:
        return []
    out = []
    if model["tool_call_rate"] == 0:
        out.append("no answer called a tool (tool_call_rate 0): it answered every prompt without them")
    if model["tool_failure_rate"] > 0:
        by_tool = ", ".join(f"{name} {count}" for name, count in (model.get("failed_tools") or {}).items())
        out.append(
            f"{model['tool_failure_rate']:.0%} of its tool calls failed ({by_tool}): the tool raised, or the "
            "name is no tool's; the model was given the error as the result (generations.jsonl has each)"
        )
    if model["malformed_call_rate"] > 0:
        out.append(f"{model['malformed_call_rate']:.0%} of its answers open a tool call that does not parse: no tool "
                   "ran, and the text was taken as the answer")  # fmt: skip
    if model["capped_rate"] > 0:
        out.append(f"{model['capped_rate']:.0%} of its answers were still calling tools when max_tool_calls ran out")
    return out
