"""An eval's progress files: each model's answers, kept as soon as they are made under a key of what made them, so
that a stopped eval goes on from them and a changed one does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from align.evaluation import Answer


def _write_progress(path: Path, key: str, answers: list[list[Answer]]) -> None:
    from align.files import write_text_atomic

    data = {"key": key, "answers": [[[a.text, list(a.token_ids), a.ended, a.prompt_truncated, a.reasoning,
                                      a.thought_cut] for a in per] for per in answers]}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data))


def _read_progress(path: Path, key: str) -> list[list[Answer]] | None:
    from align.evaluation import Answer
    from align.files import read_json

    data = read_json(path)
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    # Files written before answers kept their reasoning apart hold four fields.
    return [[Answer(text, tuple(ids), ended, truncated, *rest) for text, ids, ended, truncated, *rest in per]
            for per in data["answers"]]  # fmt: skip
