"""An eval's progress files: each model's answers, kept as soon as they are made under a key of what made them, so
that a stopped eval goes on from them and a changed one does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from align.evaluation import Answer


def _write_progress(path: Path, key: str, answers: list[list[Answer]]) -> None:
    import dataclasses

    from align.files import write_text_atomic

    data = {"key": key, "answers": [[{**dataclasses.asdict(a), "token_ids": list(a.token_ids)} for a in per]
                                    for per in answers]}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data))


def _read_progress(path: Path, key: str) -> list[list[Answer]] | None:
    from align.evaluation import Answer
    from align.files import read_json

    data = read_json(path)
    if not isinstance(data, dict) or data.get("key") != key:
        return None

    def answer(kept: Any) -> Answer:
        if isinstance(kept, list):  # files written before answers had reasoning and tools: four fields in order
            text, ids, ended, truncated = kept[:4]
            return Answer(text, tuple(ids), ended, truncated)
        return Answer(**{**kept, "token_ids": tuple(kept["token_ids"])})

    return [[answer(kept) for kept in per] for per in data["answers"]]
