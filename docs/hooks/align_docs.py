"""MkDocs hook: the pages, and parts of pages, that come from the code. A plain `mkdocs build` makes them, so the
site is never older than the code it describes.

- `reference/recipe-keys.md`: every key of a recipe, from the JSON Schema that `align schema` prints (align/schema.py:
  the loader's pydantic classes and each kind's TRL config class), with the kinds that take it.
- `reference/commands.md`: every command's `--help`, as argparse prints it.
- From the registry (align/stages): the Kinds section of the navigation (a kind without `kinds/<kind>.md` fails the
  build), the kinds table (`<!-- align:kinds -->`), the summary figures table (`<!-- align:figures -->`) and each
  kind page's facts (`<!-- align:kind NAME -->`: what it trains, its trainer, formats, keys, figures, and its
  module's docstring).
"""

from __future__ import annotations

import contextlib
import html
import importlib
import inspect
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any

KEYS_PAGE = "reference/recipe-keys.md"
COMMANDS_PAGE = "reference/commands.md"
# A marker stands alone on its line (a page may quote one in running text).
MARKER = re.compile(r"^<!-- align:(kinds|figures|cards|kind (\w+)) -->$", re.M)
EVERY_KIND = "every kind"
EVERY_TRAINING_KIND = "every training kind"
SAVES = {"policy": "a policy (a later stage, chat and eval can use it)", "reward_model": "a reward model"}


# --------------------------------------------------------------------------------------------------
# The recipe-key reference


@dataclass(frozen=True)
class KeyRow:
    """One row of the key reference: a key's dotted path (`[]` marks a list's entries) and what the schema says of it,
    for the kinds that take it so (empty: a key of the recipe itself)."""

    path: str
    kinds: tuple[str, ...]
    type: str
    default: str
    description: str


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return _resolve(defs[ref.rsplit("/", 1)[1]], defs) if ref else node


def _branches(node: dict[str, Any], defs: dict[str, Any]) -> list[dict[str, Any]]:
    """A key's alternative shapes (`anyOf`: a string, an object, null), references resolved."""
    node = _resolve(node, defs)
    return [_resolve(branch, defs) for branch in node.get("anyOf", [node])]


def _type(node: dict[str, Any], defs: dict[str, Any]) -> str:
    names: list[str] = []
    for branch in _branches(node, defs):
        if "enum" in branch:
            names.append(" \\| ".join(f"`{json.dumps(value)}`" for value in branch["enum"]))
        elif "const" in branch:
            names.append(f"`{json.dumps(branch['const'])}`")
        elif branch.get("type") == "array":
            names.append(f"list of {_type(branch.get('items', {}), defs)}")
        elif isinstance(branch.get("type"), list):
            names.extend(branch["type"])
        elif "type" in branch:
            names.append(branch["type"])
        elif "properties" in branch:
            names.append("object")
    unique = list(dict.fromkeys(names))
    return " or ".join(unique) if unique else "any"


def _walk(properties: dict[str, Any], defs: dict[str, Any], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every key under `properties`, depth first: (path, type, default, description)."""
    found = []
    for name, node in properties.items():
        path = f"{prefix}{name}"
        described = node.get("description") or _resolve(node, defs).get("description", "")
        default = json.dumps(node["default"]) if "default" in node else ""
        found.append((path, _type(node, defs), default, " ".join(str(described).split())))
        for branch in _branches(node, defs):
            if branch.get("type") == "array":
                for item in _branches(branch.get("items", {}), defs):
                    found.extend(_walk(item.get("properties", {}), defs, f"{path}[]."))
            else:
                found.extend(_walk(branch.get("properties", {}), defs, f"{path}."))
    return found


def key_rows(schema: dict[str, Any]) -> dict[str, list[KeyRow]]:
    """The rows of the key reference by section ("recipe", "stage", "train"), from a recipe's JSON Schema. A key that
    several kinds take alike is one row; where kinds differ (a default, a description), one row per variant."""
    from align import stages as registry

    defs = schema.get("$defs", {})
    recipe_keys = {key: value for key, value in schema["properties"].items() if key != "stages"}
    rows: dict[str, list[KeyRow]] = {
        "recipe": [KeyRow(*entry[:1], (), *entry[1:]) for entry in _walk(recipe_keys, defs)]
    }
    variants: dict[str, dict[str, dict[tuple[str, str, str], list[str]]]] = {"stage": {}, "train": {}}
    for kind in registry.kinds().values():
        properties = dict(defs[kind.keys.__name__]["properties"])
        train = properties.get("train", {}).get("properties", {})
        for section, found in (("stage", _walk(properties, defs)), ("train", _walk(train, defs, "train."))):
            for path, *entry in found:
                variants[section].setdefault(path, {}).setdefault(tuple(entry), []).append(kind.name)
    for section, by_path in variants.items():
        rows[section] = [
            KeyRow(path, tuple(kinds), *entry) for path, found in by_path.items() for entry, kinds in found.items()
        ]
    return rows


def _kinds_cell(kinds: tuple[str, ...]) -> str:
    from align import stages as registry

    every = registry.names()
    training = [kind.name for kind in registry.kinds().values() if kind.trains]
    if not kinds:
        return "recipe"
    if list(kinds) == every:
        return EVERY_KIND
    if list(kinds) == training:
        return EVERY_TRAINING_KIND
    return ", ".join(f"[{name}](../kinds/{name}.md)" for name in kinds)


def _cell(text: str) -> str:
    """Text for a table cell: outside code spans, `<...>` shown as text (not read as an HTML tag) and `|` escaped;
    inside them as written (Python-Markdown keeps a code span's pipes in its cell)."""
    parts = re.split(r"(`[^`]+`)", text.replace("\n", " "))
    return "".join(p if p.startswith("`") else html.escape(p, quote=False).replace("|", "\\|") for p in parts)


def _table(rows: list[KeyRow]) -> list[str]:
    lines = ["| key | kinds | type | default | description |", "|---|---|---|---|---|"]
    for row in rows:
        default = f"`{row.default.replace(chr(10), ' ')}`" if row.default else ""
        lines.append(f"| `{row.path}` | {_kinds_cell(row.kinds)} | {row.type} | {default} | {_cell(row.description)} |")
    return lines


def recipe_keys_page(schema: dict[str, Any] | None = None) -> str:
    """The key reference page, from `schema` (default: `align.schema.recipe_schema()`, what `align schema` prints)."""
    if schema is None:
        from align.schema import recipe_schema

        schema = recipe_schema()
    rows = key_rows(schema)
    return "\n".join(
        [
            "# Recipe keys",
            "",
            "Every key a recipe takes, generated during the docs build from the JSON Schema that `align schema` prints",
            "(the loader's own pydantic classes, and each training kind's config class for `train:`): its type, its",
            "default and its description, and the kinds that take it. `a.b` is key `b` inside `a`; `a[].b` is key `b`",
            "of each entry of the list `a`. `--set` spells a stage's key `stages.<stage name>.<key>`. An unknown key",
            "is an error that names the closest valid one; `align run RECIPE --dry-run` is the full check.",
            "",
            "## The recipe",
            "",
            *_table(rows["recipe"]),
            "",
            "## A stage",
            "",
            "The keys of an entry of `stages:`. `kind` decides which keys the stage takes.",
            "",
            *_table(rows["stage"]),
            "",
            "## `train:` {#train}",
            "",
            "A training stage's `train:` takes the fields of its kind's config class (each kind's page names it), with",
            "the library's defaults shown here; where align sets another default, `--print-config` shows it with its",
            "source. align sets `output_dir`, `report_to`, `bf16`/`fp16`, `seed` and `run_name` itself, and refuses",
            "them in a recipe. A key whose default or help differs between kinds has a row per variant.",
            "",
            *_table(rows["train"]),
            "",
        ]
    )


# --------------------------------------------------------------------------------------------------
# The command reference


def command_help(args: list[str]) -> str:
    """What `align ARGS --help` prints, at a fixed width (argparse wraps to $COLUMNS)."""
    from align.cli import main

    buffer = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            main([*args, "--help"])
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return buffer.getvalue().rstrip()


def commands_page() -> str:
    from align.cli import COMMANDS

    lines = [
        "# Command-line help",
        "",
        "Each command's `--help`, generated during the docs build from its argparse parser. "
        "[Commands](../commands.md) explains what they do.",
        "",
        "## `align`",
        "",
        "```text",
        command_help([]),
        "```",
    ]
    for name, about in COMMANDS.items():
        lines += ["", f"## `align {name}`", "", f"{about}.", "", "```text", command_help([name]), "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# What the registry knows about each kind


def kinds_table() -> str:
    from align import stages as registry

    lines = ["| kind | what it does | trainer | data formats |", "|---|---|---|---|"]
    for kind in registry.kinds().values():
        formats = ", ".join(f"`{name}`" for name in kind.formats)
        lines.append(f"| [`{kind.name}`]({kind.name}.md) | {kind.about} | {_trainer(kind)} | {formats} |")
    return "\n".join(lines)


def figures_table(link_prefix: str = "kinds/") -> str:
    from align import stages as registry

    lines = ["| kind | figures (the first is its headline) |", "|---|---|"]
    for kind in registry.kinds().values():
        figures = ", ".join(f"`{figure.key}` ({_direction(figure)})" for figure in kind.figures)
        lines.append(f"| [`{kind.name}`]({link_prefix}{kind.name}.md) | {figures} |")
    return "\n".join(lines)


def cards_table() -> str:
    """The data cards in data_cards/, read as the loader reads them."""
    from align.data_cards import REPO_ROOT, read_card_fields

    lines = ["| card | source | format | stages it suits |", "|---|---|---|---|"]
    for path in sorted((REPO_ROOT / "data_cards").glob("*.md")):
        fields = read_card_fields(path)
        source = ", ".join(f"{key}: {value}" for key, value in (fields.get("source") or {}).items())
        suits = ", ".join(fields.get("stages") or [])
        lines.append(f"| `{fields.get('name', path.stem)}` | {source} | `{fields.get('format', '')}` | {suits} |")
    return "\n".join(lines)


def _direction(figure: Any) -> str:
    return "lower is better" if figure.lower_is_better else "higher is better"


def _trainer(kind: Any) -> str:
    path = getattr(kind, "trainer_class", "")
    if not path:
        # A training kind without a declared TRL class builds its Trainer itself (run_stage takes a transformers
        # Trainer from every training kind); one that trains nothing runs its own loop.
        return "transformers' `Trainer`" if kind.trains else "none: align's own loop (it trains nothing)"
    module, _, name = path.partition(":")
    return f"`{name}` ({module.split('.')[0]}{', experimental' if getattr(kind, 'experimental', False) else ''})"


def kind_facts(name: str) -> str:
    """A kind page's generated part: what the registry declares about the kind, and its module's docstring."""
    from align import stages as registry

    kind = registry.get(name)
    common = set.intersection(*(set(other.keys.model_fields) for other in registry.kinds().values()))
    trained = [other for other in registry.kinds().values() if other.trains]
    shared = set.intersection(*(set(other.keys.model_fields) for other in trained)) if kind.trains else common
    own = [key for key in kind.keys.model_fields if key not in shared]
    rows = [
        ("what it does", kind.about),
        ("trainer", _trainer(kind)),
        ("data formats", ", ".join(f"[`{fmt}`](../data.md#formats)" for fmt in kind.formats)),
        ("saves", SAVES.get(str(kind.makes), "no model")),
        ("summary figures", ", ".join(f"`{figure.key}` ({_direction(figure)})" for figure in kind.figures) or "none"),
    ]  # fmt: skip
    if kind.trains:
        config = type(kind).config
        rows.append(
            ("`train:` keys", f"the fields of `{config.replace(':', '.')}` ([all of them](../{KEYS_PAGE}#train))")
        )
    if own:
        keys = "every training stage's" if kind.trains else "every stage's"
        rows.append(
            ("its own keys", ", ".join(f"`{key}`" for key in own) + f", beside {keys} ([recipe keys](../{KEYS_PAGE}))")
        )
    doc = inspect.getdoc(importlib.import_module(type(kind).__module__)) or ""
    lines = [f'!!! abstract "`kind: {kind.name}`"', ""]
    lines += [f"    - **{label}**: {value}" for label, value in rows]
    lines += [
        "",
        f"From its module, `{type(kind).__module__}`:",
        "",
        *[f"> {line}".rstrip() for line in doc.splitlines()],
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The hooks MkDocs calls


def on_config(config: Any) -> Any:
    """The Kinds section of the navigation: its index, then one page per registered kind, in the registry's order."""
    from align import stages as registry

    for entry in config["nav"] or []:
        if isinstance(entry, dict) and "Kinds" in entry:
            entry["Kinds"] = ["kinds/index.md", *({name: f"kinds/{name}.md"} for name in registry.names())]
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for path, content in ((KEYS_PAGE, recipe_keys_page()), (COMMANDS_PAGE, commands_page())):
        files.append(File.generated(config, path, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def generated(match: re.Match[str]) -> str:
        if match.group(1) == "kinds":
            return kinds_table()
        if match.group(1) == "cards":
            return cards_table()
        if match.group(1) == "figures":
            return figures_table(link_prefix="" if page.file.src_uri.startswith("kinds/") else "kinds/")
        return kind_facts(match.group(2))

    return MARKER.sub(generated, markdown)
