"""The command line: `python -m align.run RECIPE.yaml [--set KEY=VALUE ...] [options]`.

Exit codes: 0 success; 2 bad input found before training (or the run directory in use); 1 any other failure;
130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint (the same command resumes).
Errors are one `error:` line each (plus an optional `hint:`), with a traceback only at `--log-level debug`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from align.errors import AlignError, BadInput, print_error
from align.stages import NAMES

logger = logging.getLogger("align.run")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m align.run",
        description=f"Run an align recipe: its stages ({', '.join(NAMES)}) in order, each on an earlier one's output.",
    )
    parser.add_argument("recipe", type=Path, help="the recipe YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value by dotted path, stages by name: --set stages.lm.train.max_steps=20",
    )
    parser.add_argument("--output-dir", type=Path, help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--dry-run", action="store_true", help="validate everything and show the plan; train nothing")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe as YAML and exit")
    parser.add_argument(
        "--fresh", action="store_true", help="start over: delete what earlier runs wrote in the run directory"
    )
    parser.add_argument(
        "--only",
        metavar="STAGE[,STAGE]",
        help="run only these stages, on the earlier ones completed in the output directory (the others untouched)",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning"], help="console level (default: recipe's)")
    parser.add_argument("--offline", action="store_true", help="never contact the Hugging Face Hub")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Heavy imports (torch, transformers) wait until after argument parsing, so --help is instant.
    from align.runtime import setup_logging

    setup_logging(args.log_level or "info")
    try:
        return _main(args)
    except AlignError as exc:
        from align.runtime import is_main_process

        # Every process meets the same bad input or stop (they agree on both); the main process says it, once.
        if is_main_process():
            if args.log_level == "debug":
                traceback.print_exc()
            print_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:  # before the run installed its handlers (loading, preflight): nothing to save yet
        print("error: interrupted before training started", file=sys.stderr)
        return 130
    except Exception as exc:  # the last resort: one line, the traceback only when asked for
        if args.log_level == "debug":
            traceback.print_exc()
        logger.debug("unexpected error", exc_info=True)
        print(
            f"error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr
        )
        print("hint: rerun with --log-level debug for the traceback", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    from align.loader import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # before the heavy imports: a recipe's typo is named at once
    try:
        return _run_recipe(args, recipe)
    except BadInput as exc:
        # Preflight's problems name a recipe path (`stages.sft.data.mix.1.weight`); the line also names the file, or
        # the `--set` that gave the value, as the loader's own problems do.
        from align.recipe_yaml import blame

        exc.problems = [blame(p, args.recipe, args.overrides) if p.startswith("stages.") else p for p in exc.problems]
        raise


def warn_replaced(recipe: Any, specs: Any, output_dir: Path, only: list[str]) -> None:
    """`--only` with `--set`: each named stage the changed values make train again replaces its model in the run, and
    a later run without the `--set` trains it back; said before it happens, with the way to try a value beside it."""
    from align.run_records import planned_status
    from align.runtime import choose_precision

    status = planned_status(recipe, specs, choose_precision(recipe.precision).name, output_dir)
    for name in only:
        if status.get(name, "").startswith("runs again"):
            logger.warning(
                "--only %s with --set: the %s model in %s is replaced by one trained with the --set values, and the "
                "next run without them trains it again; to try a value beside the run, copy it and run the copy: "
                "cp -r %s %s-try, then --output-dir %s-try", name, name, output_dir, output_dir, output_dir, output_dir
            )  # fmt: skip


def _run_recipe(args: argparse.Namespace, recipe: Any) -> int:
    from align.dry_run import dry_run, print_config
    from align.pipeline import run_pipeline
    from align.preflight import resolve_specs
    from align.runtime import check_hub, is_main_process, set_console_level

    level = args.log_level or recipe.tracking.log_level
    set_console_level(level)
    specs = resolve_specs(recipe)
    if args.print_config:
        check_hub(True)  # the hub is never asked: a model not in the local cache shows its settings as unknown
        print(print_config(recipe, specs, args.output_dir or Path("runs") / recipe.name), end="")
        return 0

    output_dir = args.output_dir or Path("runs") / recipe.name
    if needs_hub(recipe, specs):
        check_hub(args.offline)
    elif args.offline:
        check_hub(True)
    only = None
    if args.only is not None:
        only = [name.strip() for name in args.only.split(",") if name.strip()]
        if not only:  # `--only ""` or `--only ,` once ran the whole recipe
            raise BadInput(f"--only {args.only!r}: names no stage", hint="--only STAGE[,STAGE], e.g. --only sft")
    if args.dry_run:
        print(dry_run(recipe, output_dir, only))
        return 0
    if only and args.overrides:
        warn_replaced(recipe, specs, output_dir, only)

    summaries = run_pipeline(recipe, output_dir=output_dir, log_level=level, fresh=args.fresh, only=only)
    if is_main_process():
        print(results_table(summaries))
    return 0


def needs_hub(recipe: Any, specs: dict[str, Any]) -> bool:
    """Whether any stage names a hub model or hub data (so reachability is worth a probe)."""
    from align.models import is_local_model, looks_like_path
    from align.recipe import stage_ref

    for stage in recipe.stages:
        for model in stage.model_refs().values():
            # A path-like model that is not there is a missing directory (preflight says so), not a hub id to probe.
            if stage_ref(model) is None and not (is_local_model(model) or looks_like_path(model)):
                return True
    return any(source.source.hub for spec in specs.values() for source in spec.mix or [spec])


def key_figure(summary: dict[str, Any]) -> str:
    """A stage's headline figure, as its kind gives it: before -> after of what its verdict measures (a training
    stage), the last model's win rate (an eval)."""
    from align import stages as registry

    kind = registry.kinds().get(str(summary.get("kind")))
    return kind.headline(summary) if kind is not None else "-"


def results_table(summaries: list[dict[str, Any]]) -> str:
    """One line per stage (status, its headline figure before -> after, the stage's wall time, where its model
    is), then each stage's verdict with its first reason in full (summary.json and report.html hold them all)."""
    rows = [("stage", "status", "before → after", "time", "model")]
    for s in summaries:
        seconds = s.get("wall_time_s")
        time_cell = "cached" if s["status"] == "cached" else f"{seconds:.0f}s" if seconds else "-"
        rows.append((s["stage"], s["status"], key_figure(s), time_cell, s.get("model_dir") or "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    verdicts = [(s["stage"], s["verdict"]) for s in summaries if isinstance(s.get("verdict"), dict)]
    if verdicts:
        width = max(len(name) for name, _ in verdicts)
        lines += ["", "verdicts:"]
        for name, verdict in verdicts:
            reasons = verdict.get("reasons") or []
            first = f": {reasons[0]}" if reasons else ""
            more = len(reasons) - 1 + len(verdict.get("warnings") or [])
            tail = f" (+{more} more in summary.json)" if more else ""
            lines.append(f"  {name.ljust(width)}  {verdict.get('status')}{first}{tail}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
