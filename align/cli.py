"""`align`: one console command for everything align does.

    align run RECIPE.yaml [...]      same as `python -m align.run` (the same parser and flags)
    align report RUN_DIR             same as `python -m align.report`
    align chat MODEL [...]           talk to a trained model (align/chat.py)
    align push RUN_DIR [...]         upload a stage's model to the Hugging Face Hub (align/push.py)
    align merge RUN_DIR OUT [...]    a stage's LoRA adapters merged into their base (align/merge.py)
    align schema [-o FILE]           the recipe's JSON Schema, for editors (align/schema.py)

Nothing heavy (torch, transformers) is imported before a subcommand has parsed its arguments, so every `--help`
is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys

from align import __version__
from align.errors import closest

COMMANDS = {
    "run": "run a recipe: its stages in order, each on the previous one's output (= python -m align.run)",
    "report": "(re)build RUN_DIR/report.html (= python -m align.report)",
    "chat": "chat with a trained model, prompts rendered as in its training",
    "push": "upload a stage's model and its model card to the Hugging Face Hub (HF_TOKEN)",
    "merge": "save a stage's LoRA adapters merged into their base: plain weights, loadable without peft",
    "schema": "print the recipe's JSON Schema (every key, its type, default and help), for editors",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: only for `align --help` and the list of subcommands (each parses its own flags)."""
    parser = argparse.ArgumentParser(
        prog="align",
        description="Post-training stages (causal-LM fine-tuning, SFT, reward models, preference optimisation, "
        "online RL, evaluation) as YAML recipes on the Hugging Face stack.",
        epilog="`align COMMAND --help` shows a command's flags. The python -m forms (align.run, align.report) work "
        "the same.",
    )
    parser.add_argument("--version", action="version", version=f"align {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def _as(prog: str, module_prog: str, run, args: list[str]) -> int:
    """Run a `python -m` command's main, its help naming it as `align ...` (their parsers name the module)."""
    if not {"-h", "--help"} & set(args):
        return run(args)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            code = run(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
    # argparse indents the usage's continuation lines under the program's name: re-indent them under the new one.
    text = buffer.getvalue().replace("\n" + " " * len(f"usage: {module_prog} "), "\n" + " " * len(f"usage: {prog} "))
    sys.stdout.write(text.replace(module_prog, prog))
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser = build_parser()
        if not argv:
            parser.print_help(sys.stderr)
            return 2
        parser.parse_args(argv)  # prints the help or the version, and exits 0
        return 0
    command, rest = argv[0], argv[1:]
    if command == "run":
        from align import run

        return _as("align run", "python -m align.run", run.main, rest)
    if command == "report":
        from align import report

        return _as("align report", "python -m align.report", report.main, rest)
    if command == "chat":
        from align import chat

        return chat.main(rest)
    if command == "push":
        from align import push

        return push.main(rest)
    if command == "merge":
        from align import merge

        return merge.main(rest)
    if command == "schema":
        from align import schema

        return schema.main(rest)
    guess = closest(command, COMMANDS)
    print(
        f"error: unknown command '{command}'" + (f" (did you mean '{guess}'?)" if guess else ""),
        file=sys.stderr,
    )
    print(f"hint: align {{{','.join(COMMANDS)}}} ...; align --help lists them", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
