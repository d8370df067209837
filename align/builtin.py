"""Offline data sets generated deterministically from material that ships with Python itself.

`pydoc_data.topics` holds the text of Python's interactive help topics (about 465k characters of real
English technical prose with code). It is part of CPython, so these sets need no network and no files.
The text differs slightly between Python versions; within one version it is fixed.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Rows = dict[str, list]


def python_docs() -> Rows:
    """One row per paragraph of every help topic, topics in sorted order: columns `text`, `topic`."""
    from pydoc_data.topics import topics

    texts, names = [], []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            paragraph = paragraph.strip("\n")
            if paragraph.strip():
                texts.append(paragraph)
                names.append(name)
    return {"text": texts, "topic": names}


BUILTINS: dict[str, Callable[[], Rows]] = {"python-docs": python_docs}


def load_builtin(name: str) -> Rows:
    """Columns of the named builtin set, as a dict of equal-length lists.

    Raises:
        KeyError: no builtin set has that name.
    """
    return BUILTINS[name]()
