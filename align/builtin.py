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


def _prose_paragraphs() -> list[tuple[str, str, list[str]]]:
    """(topic, title, sentences) for every prose paragraph of the help topics with two sentences or more.

    Code, grammar rules and lists are left out: they have no sentences to continue.
    """
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        text = topics[name]
        title = text.strip().splitlines()[0].strip()
        for paragraph in re.split(r"\n\s*\n", text)[1:]:
            if (
                paragraph.startswith((" ", "\t"))
                or "::=" in paragraph
                or paragraph.lstrip().startswith(("*", "-", "+", "="))
            ):
                continue
            flat = " ".join(paragraph.split())
            sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", flat)
            if len(sentences) >= 2 and len(flat) >= 80:
                out.append((name, title, sentences))
    return out


def instruct_prompt(title: str, first_sentence: str) -> str:
    """The prompt of the instruction sets: a passage's first sentence and the request to continue it."""
    return f"Continue this passage from the Python documentation on {title}.\n\n{first_sentence}\n\n"


def python_docs_instruct() -> Rows:
    """Prompt/completion pairs: continue a documentation paragraph from its first sentence.

    The completion is the next one or two sentences of the same paragraph, so it is verifiably the right
    continuation. Columns `prompt`, `completion`, `topic`.
    """
    prompts, completions, names = [], [], []
    for name, title, sentences in _prose_paragraphs():
        prompts.append(instruct_prompt(title, sentences[0]))
        completions.append(" ".join(sentences[1:3]))
        names.append(name)
    return {"prompt": prompts, "completion": completions, "topic": names}


def _loop(words: list[str], index: int) -> str:
    """A degenerate answer of the same length: the start of the right one, then stuck in a loop.

    Two failure shapes small models really produce (see the quickstart's SFT generations): a phrase repeated
    over and over, or one word stuttered.
    """
    keep = max(3, len(words) // 4)
    head = words[:keep]
    unit = head[-3:] if index % 2 == 0 else head[-1:]
    out = list(head)
    while len(out) < len(words):
        out += unit
    return " ".join(out[: len(words)])


def python_docs_preferences() -> dict[str, Rows]:
    """Preference pairs about form: the right continuation (chosen) against one that falls into a loop.

    The prompts are those of `python-docs-instruct`; chosen is the paragraph's next sentence, verifiably right;
    rejected starts the same way, then repeats itself to the same length. Columns `prompt`, `chosen`,
    `rejected`, `topic`; splits `train` and `validation` (every tenth prompt, held out whole).
    """
    splits: dict[str, Rows] = {
        s: {"prompt": [], "chosen": [], "rejected": [], "topic": []} for s in ("train", "validation")
    }
    usable = [(n, t, s) for n, t, s in _prose_paragraphs() if len(s[1].split()) >= 8]  # shorter: too short to loop
    for index, (name, title, sentences) in enumerate(usable):
        # Every tenth prompt is held out with both its pairs, so no held-out prompt or answer is trained on.
        rows = splits["validation" if index % 10 == 0 else "train"]
        for shape in (0, 1):  # both failure shapes for every prompt: twice the pairs
            rows["prompt"].append(instruct_prompt(title, sentences[0]))
            rows["chosen"].append(sentences[1])
            rows["rejected"].append(_loop(sentences[1].split(), shape))
            rows["topic"].append(name)
    return splits


BUILTINS: dict[str, Callable[[], Rows | dict[str, Rows]]] = {
    "python-docs": python_docs,
    "python-docs-instruct": python_docs_instruct,
    "python-docs-preferences": python_docs_preferences,
}


def load_builtin(name: str) -> dict[str, Rows]:
    """The named builtin set by split (`train`, and `validation` where it defines one), as columns of lists.

    Raises:
        KeyError: no builtin set has that name.
    """
    data = BUILTINS[name]()
    return data if "train" in data and isinstance(data["train"], dict) else {"train": data}
