"""Offline data sets generated deterministically from material that ships with Python itself.

`pydoc_data.topics` holds the text of Python's interactive help topics (about 465k characters of real
English technical prose with code). It is part of CPython, so these sets need no network and no files.
The text differs slightly between Python versions; within one version it is fixed.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import zlib
from collections.abc import Callable

Rows = dict[str, list]

# Bumped whenever what the builtin sets contain changes: it is part of a stage's fingerprint, so a run made with the
# old contents is not taken as cached. 2: the held-out topics (`test` splits) and the reward split. 3: multiplication
# calls `calculator`, answers with the equation and keeps the schema on one row in eight.
BUILTIN_VERSION = 3
# The held-out topics: at least this many prose paragraphs (instruction prompts) between them.
HELD_OUT_PROMPTS = 110
# Topics with more prose paragraphs than this are never held out: one of them alone would take a large share of
# the training text (`compound` has 77 of the ~500).
HELD_OUT_LARGEST_TOPIC = 40


@functools.cache
def held_out_topics() -> frozenset[str]:
    """The help topics no stage trains on, the same in every builtin set: their paragraphs are the `test` split of
    `python-docs`, `python-docs-instruct` and `python-docs-preferences`, and nowhere else.

    So an eval stage asks about topics the lm stage never read, the sft stage never answered and the dpo and rm
    stages never ranked. Topics are taken in the order of the CRC-32 of their names (a fixed, arbitrary order, the
    same on every machine) until their prose paragraphs reach HELD_OUT_PROMPTS: about 31 of 79 topics, 125
    instruction prompts and a quarter of the text on Python 3.11.
    """
    from pydoc_data.topics import topics

    sizes: dict[str, int] = {}
    for name, _, _ in _prose_paragraphs():
        sizes[name] = sizes.get(name, 0) + 1
    held, count = [], 0
    for name in sorted(topics, key=lambda t: zlib.crc32(t.encode())):
        if count >= HELD_OUT_PROMPTS:
            break
        if sizes.get(name, 0) > HELD_OUT_LARGEST_TOPIC:
            continue
        held.append(name)
        count += sizes.get(name, 0)
    return frozenset(held)


@functools.cache
def _held_out_sentences() -> tuple[str, ...]:
    """The held-out topics' prompt sentences and reference continuations, whitespace collapsed. The help topics
    repeat some paragraphs under several names (`attribute-access`'s text is also in `specialnames`): a training
    row holding one of these would teach the answer to a held-out prompt."""
    held = held_out_topics()
    out = set()
    for name, _, sentences in _prose_paragraphs():
        if name in held:
            out.update((_flat(sentences[0]), _flat(" ".join(sentences[1:3]))))
    return tuple(sorted(text for text in out if len(text) >= 40))  # shorter: common phrases, not the answer


def _flat(text: str) -> str:
    return " ".join(text.split())


def _place(topic: str, text: str) -> str | None:
    """Where a row of the builtin sets goes: `test` (a held-out topic), `train`, or None (dropped: it repeats text
    of a held-out topic under another topic's name)."""
    if topic in held_out_topics():
        return "test"
    flat = _flat(text)
    return None if any(sentence in flat for sentence in _held_out_sentences()) else "train"


def _by_holdout(rows: Rows, texts: list[str]) -> dict[str, Rows]:
    """Rows split into `train` and `test` (the held-out topics) by `_place`, `texts` being each row's paragraph."""
    out: dict[str, Rows] = {"train": {k: [] for k in rows}, "test": {k: [] for k in rows}}
    for i, (topic, text) in enumerate(zip(rows["topic"], texts, strict=True)):
        split = _place(topic, text)
        if split is None:
            continue
        for key, values in rows.items():
            out[split][key].append(values[i])
    return out


def python_docs() -> Rows:
    """One row per paragraph of every help topic, topics in sorted order: columns `text`, `topic`. Every row: the
    `python-docs` set splits them into `train` and `test` (`python_docs_splits`)."""
    from pydoc_data.topics import topics

    texts, names = [], []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            paragraph = paragraph.strip("\n")
            if paragraph.strip():
                texts.append(paragraph)
                names.append(name)
    return {"text": texts, "topic": names}


def python_docs_splits() -> dict[str, Rows]:
    """`python-docs`: its `train` split, and `test`, the paragraphs of the held-out topics."""
    rows = python_docs()
    return _by_holdout(rows, rows["text"])


@functools.cache
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
    continuation. Columns `prompt`, `completion`, `topic`. Every row: the `python-docs-instruct` set splits them
    into `train` and `test` (`python_docs_instruct_splits`).
    """
    prompts, completions, names = [], [], []
    for name, title, sentences in _prose_paragraphs():
        prompts.append(instruct_prompt(title, sentences[0]))
        completions.append(" ".join(sentences[1:3]))
        names.append(name)
    return {"prompt": prompts, "completion": completions, "topic": names}


def python_docs_instruct_splits() -> dict[str, Rows]:
    """`python-docs-instruct`: its `train` split, and `test`, the prompts of the held-out topics."""
    paragraphs = [" ".join(sentences) for _, _, sentences in _prose_paragraphs()]
    return _by_holdout(python_docs_instruct(), paragraphs)


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
    `rejected`, `topic`. Splits, each prompt with both its pairs in one split only:
    - `test`: the held-out topics' prompts (no stage trains on them);
    - of the rest, `validation` every tenth prompt, `reward` three in ten (a reward model's own training pairs,
      whose prompts the dpo stage never sees), `train` the other six (the dpo stage's).
    """
    names = ("train", "validation", "reward", "test")
    splits: dict[str, Rows] = {s: {"prompt": [], "chosen": [], "rejected": [], "topic": []} for s in names}
    usable = [(n, t, s) for n, t, s in _prose_paragraphs() if len(s[1].split()) >= 8]  # shorter: too short to loop
    kept = [row for row in usable if _place(row[0], " ".join(row[2])) == "train"]
    test = [row for row in usable if _place(row[0], " ".join(row[2])) == "test"]
    # Some prompts repeat (two paragraphs starting "1."): a repeated prompt goes where its first one went.
    first: dict[str, str] = {}
    for i, (_, title, sentences) in enumerate(kept):
        split = "validation" if i % 10 == 0 else "reward" if i % 10 in (2, 5, 8) else "train"
        first.setdefault(instruct_prompt(title, sentences[0]), split)
    placed = [(first[instruct_prompt(t, s[0])], (n, t, s)) for n, t, s in kept] + [("test", row) for row in test]
    for split, (name, title, sentences) in placed:
        rows = splits[split]
        for shape in (0, 1):  # both failure shapes for every prompt: twice the pairs
            rows["prompt"].append(instruct_prompt(title, sentences[0]))
            rows["chosen"].append(sentences[1])
            rows["rejected"].append(_loop(sentences[1].split(), shape))
            rows["topic"].append(name)
    return splits


def python_docs_feedback() -> dict[str, Rows]:
    """The preference pairs as KTO's unpaired rows, in the same splits as `python-docs-preferences`: each prompt once
    with its right continuation (`label` true) and once with a loop (false). Of a prompt's two pairs the first gives
    the right answer and the second its loop, so every answer appears once. Rows alternate desirable and undesirable,
    the undesirable ones from the prompts half the split away: KTO trains rows in order and estimates its KL term from
    each row's prompt with the next row's answer, which must answer another prompt. Columns `prompt`, `completion`,
    `label`, `topic`."""
    out: dict[str, Rows] = {}
    for split, rows in python_docs_preferences().items():
        good = list(range(0, len(rows["prompt"]), 2))  # each prompt's pairs come in twos (both loop shapes)
        n = len(good)
        feedback: Rows = {"prompt": [], "completion": [], "label": [], "topic": []}
        for i in range(n):
            for index, label in ((good[i], True), (good[(i + n // 2) % n] + 1, False)):
                feedback["prompt"].append(rows["prompt"][index])
                feedback["completion"].append(rows["chosen" if label else "rejected"][index])
                feedback["label"].append(label)
                feedback["topic"].append(rows["topic"][index])
        out[split] = feedback
    return out


def arithmetic() -> dict[str, Rows]:
    """Sums of four digits with their exact answers: a task a reward function can verify, and one a model of half a
    million parameters learns part of in a minute on a CPU (a sum of two-digit numbers, one token each, it does not).

    Columns `prompt` ("What is 3 + 5 + 0 + 7? Answer:"), `answer` ("15") and `completion` (" 15", for an sft stage).
    All 10,000 ordered problems. Splits by construction, from the digits alone: a hash of the sorted digits
    (`_digits_place`) puts one problem in ten in `test`, one in `validation` and the other eight in `train`; every
    ordering of the same four digits is one problem, in one split. So no held-out problem is in a training split,
    however it is ordered, whatever the text of the prompts (they are too short for the eval's text leakage check).
    """
    splits: dict[str, Rows] = {s: {"prompt": [], "answer": [], "completion": []} for s in ("train", "validation",
                                                                                          "test")}  # fmt: skip
    for digits in itertools.product(range(10), repeat=4):
        place = _digits_place(digits)
        split = "test" if place == 0 else "validation" if place == 1 else "train"
        rows = splits[split]
        rows["prompt"].append(f"What is {' + '.join(map(str, digits))}? Answer:")
        rows["answer"].append(str(sum(digits)))
        rows["completion"].append(f" {sum(digits)}")
    return splits


# How many products `multiplication` draws (seeded), before its split by the numbers.
MULTIPLICATION_ROWS = 10_000
# One transcript in this many carries the tool's schema in its `tools` column (measured: see the function).
SCHEMA_EVERY = 8


def multiplication() -> dict[str, Rows]:
    """Products of two three-digit numbers: a task no small model does reliably in its head, and one any model
    that calls align's builtin `calculator` does exactly, by copying the question's expression into its call and
    the tool's result into its answer (data_cards/multiplication.md has what a from-scratch model learns of it).

    Columns: `prompt` (one user turn, "What is 347 * 582?"), `answer` ("347 * 582 = 201954": the equation, as the
    calculator returns it and the answer quotes it), `product` ("201954"), `messages` (the transcript an sft stage
    learns the calling from: the user turn, the assistant's call with its arguments as a JSON string, the tool's
    result, the assistant's answer) and `tools` (the calculator's schema as a JSON string, as a data set stores
    them, on one transcript in SCHEMA_EVERY, else null: the schema and Qwen 2.5's tool instructions are 200 of a
    transcript's 260 tokens, and a small model built from scratch learned to copy the numbers in a third of the steps
    on such rows, measured; prompts for grpo and eval get the schema from `tools:` as always). 10,000 problems drawn
    with a fixed seed; split by construction from the two numbers alone (`_digits_place` of the pair, in either
    order): one in ten in `test`, one in `validation`, the rest in `train`.
    """
    import json
    import random

    from transformers.utils import get_json_schema

    from align.tools import calculator

    schemas = json.dumps([get_json_schema(calculator)])
    rng = random.Random(0)
    seen: set[tuple[int, int]] = set()
    columns = ("prompt", "answer", "product", "messages", "tools")
    splits: dict[str, Rows] = {s: {c: [] for c in columns} for s in ("train", "validation", "test")}
    while len(seen) < MULTIPLICATION_ROWS:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        place = _digits_place((a, b))
        rows = splits["test" if place == 0 else "validation" if place == 1 else "train"]
        question = [{"role": "user", "content": f"What is {a} * {b}?"}]
        expression = f"{a} * {b}"
        result = calculator(expression)
        call = {"type": "function", "function": {"name": "calculator",
                                                 "arguments": json.dumps({"expression": expression})}}  # fmt: skip
        rows["prompt"].append(question)
        rows["answer"].append(result)
        rows["product"].append(str(a * b))
        rows["messages"].append(question + [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculator", "content": result},
            {"role": "assistant", "content": result},
        ])  # fmt: skip
        rows["tools"].append(schemas if len(rows["tools"]) % SCHEMA_EVERY == 0 else None)
    return splits


def _digits_place(digits: tuple[int, ...]) -> int:
    """0 to 9 from the digits alone, whatever their order (sha256 of the sorted digits): arithmetic's split."""
    return int(hashlib.sha256("+".join(map(str, sorted(digits))).encode()).hexdigest(), 16) % 10


BUILTINS: dict[str, Callable[[], Rows | dict[str, Rows]]] = {
    "python-docs": python_docs_splits,
    "python-docs-instruct": python_docs_instruct_splits,
    "python-docs-preferences": python_docs_preferences,
    "python-docs-feedback": python_docs_feedback,
    "arithmetic": arithmetic,
    "multiplication": multiplication,
}


def load_builtin(name: str) -> dict[str, Rows]:
    """The named builtin set by split (`train`, and `validation` where it defines one), as columns of lists.

    Raises:
        KeyError: no builtin set has that name.
    """
    data = BUILTINS[name]()
    return data if "train" in data and isinstance(data["train"], dict) else {"train": data}
