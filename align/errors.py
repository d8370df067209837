"""Errors that the CLI maps to exit codes and one-line `error:` messages.

`BadInput` (exit 2) is anything wrong with what the user gave us, found before training starts.
`StageFailed` (exit 1) is a stage that stopped on its own account (a guard, a crash mid-training).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AlignError(Exception):
    """Base class: carries one or more one-line problems and an optional hint."""

    exit_code = 1

    def __init__(self, problems: str | Iterable[str], hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.hint = hint
        super().__init__("; ".join(self.problems))


def print_error(exc: AlignError) -> int:
    """The command line's form of an error: one `error:` line per problem, then the `hint:`; returns its exit code."""
    import sys

    for problem in exc.problems:
        print(f"error: {problem}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    return exc.exit_code


class BadInput(AlignError):
    """The recipe, the data or the arguments are wrong. Exit code 2."""

    exit_code = 2


class StageFailed(AlignError):
    """A stage stopped during training (a guard fired, or an unexpected error). Exit code 1."""

    exit_code = 1


class Interrupted(AlignError):
    """A stop asked for by a signal (Ctrl-C, SIGTERM): exit 128 + the signal, 130 or 143; the command resumes."""

    def __init__(self, signum: int, problems: str | Iterable[str], hint: str | None = None):
        super().__init__(problems, hint)
        self.signum = signum
        self.exit_code = 128 + signum


class GuardStopped(StageFailed):
    """A guard stopped training (a non-finite loss): rerunning unchanged would blow up the same way, so the
    stage does not resume from its checkpoint; the message names the last good one."""


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid name to a misspelt one, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


# Other tools' names for a key align spells otherwise (peft's LoraConfig, axolotl's lora_*), suggested where the
# spelling is too far from align's for a closest match ("rank" is no near miss of "r").
SYNONYMS = {"rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "lora_target_modules": "target_modules", "modules": "target_modules"}  # fmt: skip


def unknown_key_message(where: str, key: str, choices: Iterable[str]) -> str:
    """`<where>: unknown key 'x' (did you mean 'y'?)` — the one wording used for every unknown key."""
    choices = [str(c) for c in choices if c is not None]  # an unnamed list entry's name is None
    suggestion = SYNONYMS[key] if key in SYNONYMS and SYNONYMS[key] in choices else closest(key, choices)
    tail = f" (did you mean '{suggestion}'?)" if suggestion else ""
    return f"{where}: unknown key '{key}'{tail}"


def misplaced_key_message(written: str, meant: str) -> str:
    """A key written in a section it does not belong to, where the enclosing one takes it."""
    key = meant.rsplit(".", 1)[-1]
    return f"{written}: `{key}` is not a key of this section; it belongs one level up, as {meant}"


class Problems:
    """Collects the problems of several checks, so they are all reported together, once."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.hints: list[str] = []

    def add(self, problems: Iterable[str]) -> None:
        self.problems += list(problems)

    def absorb(self, exc: AlignError, prefix: str = "") -> None:
        self.problems += [f"{prefix}{p}" for p in exc.problems]
        if exc.hint:
            self.hints.append(exc.hint)

    def raise_if_any(self) -> None:
        """Raises:
        BadInput: with every problem collected, and their hints joined.
        """
        if self.problems:
            problems = list(dict.fromkeys(self.problems))
            raise BadInput(problems, hint="; ".join(dict.fromkeys(self.hints)) or None)
