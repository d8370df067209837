"""The docs site (docs/, mkdocs.yml): what it shows is what the code does.

- Every YAML block in docs/ and the README is a recipe, a stage or a fragment of one, valid under the recipe's JSON
  Schema; a whole recipe also loads, and is planned (`--dry-run`'s plan) where its models and data are local.
- Every shell block marked `<!-- runnable -->` runs (`<!-- runnable: slow -->`: in the slow suite).
- The generated key reference lists exactly the keys `align schema` emits; the kinds table, the help texts and the
  README's kinds table follow the registry.
- `align schema` and `--print-config` print only their document on stdout, under WANDB_MODE=offline too.
- A broken link fails `mkdocs build --strict` with this repository's settings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from align import stages as registry
from tests.conftest import REPO

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# A fence may be indented (a block inside a list item); its body is read dedented.
FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```", re.S | re.M)
RUNNABLE = re.compile(r"<!-- runnable(?:: (slow))? -->\s*\Z")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    number: int  # the page's n-th block of its language, from 1
    line: int
    text: str
    before: str  # the page's text before the block

    def __str__(self) -> str:
        return f"{self.page}, block {self.number} (line {self.line})"


def blocks(language: str) -> list[Block]:
    found = []
    for path in DOC_FILES:
        text = path.read_text()
        matches = [m for m in FENCE.finditer(text) if m.group(2) == language]
        for number, match in enumerate(matches, 1):
            line = text.count("\n", 0, match.start()) + 1
            body = textwrap.dedent(match.group(3))
            found.append(Block(str(path.relative_to(REPO)), number, line, body, text[: match.start()]))
    return found


def hooks() -> ModuleType:
    """docs/hooks/align_docs.py, the MkDocs hook that generates the reference pages."""
    spec = importlib.util.spec_from_file_location("align_docs", REPO / "docs/hooks/align_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def require_mkdocs() -> None:
    """The docs extra: CI installs it and sets ALIGN_REQUIRE_DOCS=1, so these tests never skip there."""
    if importlib.util.find_spec("mkdocs") is None:
        if os.environ.get("ALIGN_REQUIRE_DOCS") == "1":
            pytest.fail('mkdocs is not installed: pip install -e ".[docs]" -c constraints.txt')
        pytest.skip('the docs extra is not installed (pip install -e ".[docs]")')


# --------------------------------------------------------------------------------------------------
# Recipe blocks


def as_recipe(value: object) -> tuple[dict, bool]:
    """A YAML block as a whole recipe: (the recipe, whether the block was one). A stage, a list of stages or a
    fragment of a recipe or of a stage is wrapped in the smallest recipe that holds it (a stage shown without its
    `data:` gets a card's).

    Raises:
        ValueError: the block is none of these.
    """
    if isinstance(value, dict) and "stages" in value:
        return value, True
    if isinstance(value, dict) and "kind" in value:
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) and "kind" in v for v in value):
        return {"name": "docs", "stages": [{"data": {"card": "python-docs"}, **stage} for stage in value]}, False
    if isinstance(value, dict):
        from align.recipe import Recipe

        if set(value) <= set(Recipe.model_fields) - {"stages"}:
            stage = {"kind": registry.names()[0], "model": "gpt2", "data": {"card": "python-docs"}}
            return {"name": "docs", **value, "stages": [stage]}, False
        for kind in registry.kinds().values():  # a fragment of a stage: in the first kind that takes all its keys
            if set(value) <= set(kind.keys.model_fields):
                return {"name": "docs", "stages": [{"kind": kind.name, **value}]}, False
    raise ValueError("neither a recipe, a stage nor a fragment of either (use another fence language for other YAML)")


def is_local(recipe, specs) -> bool:
    """Whether a loaded recipe can be planned here: models built from scratch or made by its own stages, builtin
    data."""
    for stage in recipe.stages:
        if any(isinstance(ref, str) and not ref.startswith("@") for ref in stage.model_refs().values()):
            return False
        spec = specs[stage.name]
        sources = [entry.source for entry in spec.mix] if spec.mix else [spec.source]
        if any(source is None or source.builtin is None for source in sources):
            return False
    return True


@pytest.fixture(scope="module")
def schema() -> dict:
    from align.schema import recipe_schema

    return recipe_schema()


YAML_BLOCKS = blocks("yaml")


def test_the_docs_have_recipe_blocks_and_the_checker_sees_them():
    pages = {block.page for block in YAML_BLOCKS}
    assert len(YAML_BLOCKS) >= 20 and {"README.md", "docs/kinds/rloo.md", "docs/data.md"} <= pages


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=str)
def test_every_recipe_block_in_the_docs_is_valid(block: Block, schema, tmp_path):
    import jsonschema

    if block.text.lstrip().startswith("--8<--"):  # a shipped file shown as it is: tests/test_recipes.py checks it
        included = block.text.split('"')[1]
        assert included.startswith("recipes/") and (REPO / included).is_file(), f"{block}: includes {included}"
        return
    try:
        recipe, whole = as_recipe(yaml.safe_load(block.text))
    except (yaml.YAMLError, ValueError) as exc:
        pytest.fail(f"{block}: {exc}")
    problems = [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in jsonschema.Draft202012Validator(schema).iter_errors(recipe)
    ]
    assert not problems, f"{block} is not a valid recipe: {problems}"
    if not whole:
        return
    from align.errors import BadInput
    from align.loader import load_recipe
    from align.preflight import resolve_specs

    path = tmp_path / "docs_recipe.yaml"
    path.write_text(block.text)
    try:
        loaded = load_recipe(path)
        if is_local(loaded, resolve_specs(loaded)):
            from align.dry_run import dry_run

            assert "dry run: nothing was trained" in dry_run(loaded, tmp_path / "out")
    except BadInput as exc:
        pytest.fail(f"{block}: {exc.problems}")


def test_the_checker_names_the_page_and_block_of_a_broken_recipe(schema):
    """A typo in a docs block fails with the page and block named (the check above, on a block made to fail)."""
    import jsonschema

    broken = Block("docs/x.md", 2, 7, "- {kind: sft, lerning_rate: 1}\n", "")
    recipe, _ = as_recipe(yaml.safe_load(broken.text))
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(recipe))
    assert errors and "lerning_rate" in errors[0].message and str(broken) == "docs/x.md, block 2 (line 7)"
    with pytest.raises(ValueError):
        as_recipe({"not_a_key": 1})


# --------------------------------------------------------------------------------------------------
# Shell blocks marked runnable


def runnable(slow: bool) -> list[Block]:
    return [b for b in blocks("bash") if (m := RUNNABLE.search(b.before)) and bool(m.group(1)) == slow]


def run_block(block: Block, tmp_path: Path) -> None:
    """Run a block with bash in a scratch folder that sees the repository's recipes and data cards, with this
    Python's environment first on PATH (its `align` and `python`)."""
    for name in ("recipes", "data_cards"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.text], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"{block} failed (exit {proc.returncode}): {proc.stderr[-2000:]}"


def test_some_shell_blocks_are_marked_runnable():
    assert runnable(slow=False) and runnable(slow=True)


@pytest.mark.parametrize("block", runnable(slow=False), ids=str)
def test_runnable_shell_blocks_run(block: Block, tmp_path):
    run_block(block, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("block", runnable(slow=True), ids=str)
def test_slow_runnable_shell_blocks_run(block: Block, tmp_path):
    run_block(block, tmp_path)


# --------------------------------------------------------------------------------------------------
# Generated from the code


@pytest.fixture(scope="module")
def schema_on_stdout() -> subprocess.CompletedProcess:
    """`align schema` as a user runs it, with WANDB_MODE=offline (transformers then prints on stdout while loading)."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    command = [sys.executable, "-c", "import sys; from align.cli import main; sys.exit(main(['schema']))"]
    return subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)


def test_align_schema_prints_only_the_schema_under_wandb_offline(schema_on_stdout):
    assert schema_on_stdout.returncode == 0, schema_on_stdout.stderr
    assert json.loads(schema_on_stdout.stdout)["title"] == "align recipe"


def test_print_config_prints_only_the_resolved_recipe_under_wandb_offline():
    env = {**os.environ, "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "align.run", "recipes/quickstart.yaml", "--print-config"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["name"] == "quickstart" and [s["name"] for s in resolved["stages"]][0] == "lm"


def schema_keys(schema: dict) -> set[tuple[str, str]]:
    """(kind, dotted key) for every key the schema has; kind "recipe" for the recipe's own keys."""
    defs = schema["$defs"]

    def resolve(node: dict) -> list[dict]:
        node = defs[node["$ref"].split("/")[-1]] if "$ref" in node else node
        if "anyOf" in node:
            return [shape for branch in node["anyOf"] for shape in resolve(branch)]
        if node.get("type") == "array" and "items" in node:
            return [{"list": shape} for shape in resolve(node["items"])]
        return [node]

    def keys(properties: dict, prefix: str) -> set[str]:
        found = set()
        for name, node in properties.items():
            found.add(prefix + name)
            for shape in resolve(node):
                inner, mark = (shape["list"], "[]") if "list" in shape else (shape, "")
                found |= keys(inner.get("properties", {}), f"{prefix}{name}{mark}.")
        return found

    top = {k: v for k, v in schema["properties"].items() if k != "stages"}
    found = {("recipe", key) for key in keys(top, "")}
    for rule in schema["properties"]["stages"]["items"]["allOf"]:
        kind = rule["if"]["properties"]["kind"]["const"]
        found |= {(kind, key) for key in keys(defs[rule["then"]["$ref"].split("/")[-1]]["properties"], "")}
    return found


def documented_keys(page: str) -> set[tuple[str, str]]:
    """(kind, key) for every row of the key reference's tables, read as a reader reads them."""
    every = registry.names()
    training = [kind.name for kind in registry.kinds().values() if kind.trains]
    found = set()
    for line in page.splitlines():
        row = re.match(r"^\| `([^`]+)` \| ([^|]*) \|", line)
        if not row:
            continue
        key, cell = row.groups()
        cell = cell.strip()
        if cell == "recipe":
            kinds = ["recipe"]
        elif cell == "every kind":
            kinds = every
        elif cell == "every training kind":
            kinds = training
        else:
            kinds = re.findall(r"\[(\w+)\]\(", cell)
        found |= {(kind, key) for kind in kinds}
    return found


def test_the_key_reference_lists_every_key_align_schema_emits_and_no_other(schema_on_stdout, schema):
    emitted = json.loads(schema_on_stdout.stdout)
    page = hooks().recipe_keys_page(emitted)
    documented, expected = documented_keys(page), schema_keys(emitted)
    assert documented - expected == set(), "documented keys the schema lacks"
    assert expected - documented == set(), "keys of the schema the reference lacks"
    assert ("dpo", "train.beta") in documented and ("sft", "train.beta") not in documented
    assert ("grpo", "rewards[].weight") in documented and ("recipe", "tracking.wandb.mode") in documented
    assert hooks().recipe_keys_page(schema) == page, "the docs build reads the same classes as `align schema`"
    # A description's `<stage>` is text, not an HTML tag the browser would hide.
    model = next(line for line in page.splitlines() if line.startswith("| `model` |"))
    assert "@&lt;stage&gt;" in model and "<stage>" not in model, model


def test_the_kinds_table_and_the_help_texts_follow_the_registry(capsys):
    table = hooks().kinds_table()
    assert re.findall(r"^\| \[`(\w+)`\]", table, re.M) == registry.names()
    from align.cli import main

    assert main(["run", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in registry.names()), help_text
    assert "kind: grpo" in hooks().kind_facts("grpo") and "GRPOTrainer" in hooks().kind_facts("grpo")


def test_the_readme_kinds_table_has_every_kind_with_its_formats():
    rows = re.findall(
        r"^\| \[`(\w+)`\]\(docs/kinds/\1\.md\) \| [^|]+ \| ([^|]+) \|", (REPO / "README.md").read_text(), re.M
    )
    assert [name for name, _ in rows] == registry.names()
    for name, formats in rows:
        kind = registry.get(name)
        named = set(re.findall(r"`(\w+)`", formats))
        assert named <= set(kind.formats), (name, named)
        assert named or "format" in formats, name


def test_every_kind_has_a_page_and_the_readme_fits_in_15_kb():
    assert all((REPO / "docs/kinds" / f"{name}.md").is_file() for name in registry.names())
    assert len((REPO / "README.md").read_bytes()) <= 15_000


# --------------------------------------------------------------------------------------------------
# The build


def small_site(tmp_path: Path, page: str) -> Path:
    """This repository's mkdocs.yml (theme, extensions, link validation) over a two-page site, without the hook and
    the API pages that make a full build slow."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    config.pop("hooks")
    config["plugins"] = ["search"]
    config.update(docs_dir=str(tmp_path / "docs"), site_dir=str(tmp_path / "site"), nav=["index.md", "other.md"])
    config["markdown_extensions"] = [e for e in config["markdown_extensions"] if "pymdownx.snippets" not in str(e)]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/index.md").write_text(page)
    (tmp_path / "docs/other.md").write_text("# Other\n\n## A section\n")
    path = tmp_path / "mkdocs.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "link, fails",
    [("other.md#a-section", False), ("missing.md", True), ("other.md#no-such-section", True)],
)
def test_a_broken_link_fails_the_strict_build(tmp_path, link, fails):
    require_mkdocs()
    config = small_site(tmp_path, f"# Home\n\nSee [there]({link}).\n")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    assert (proc.returncode != 0) == fails, proc.stderr
    if fails:
        assert link.split("#")[0] in proc.stderr or link.split("#")[1] in proc.stderr


# --------------------------------------------------------------------------------------------------
# Measured figures


def test_run_all_writes_results_with_date_commit_and_machine():
    import datetime

    spec = importlib.util.spec_from_file_location("run_all", REPO / "benchmarks/run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    lines = ["startup: 0.04 s (target < 1 s, python alone 0.01 s) ok", "cache.py: no result (exit 1: boom) MISSED"]
    page = run_all.results_page(lines, 426.2, False, datetime.datetime(2026, 12, 7, 9, 30))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    assert "2026-12-07 09:30 UTC" in page and f"commit {head.strip()}" in page and "426 s, a target MISSED" in page
    assert f"{os.cpu_count()} CPU cores" in page and "torch " in page
    assert "| startup | 0.04 s (target < 1 s, python alone 0.01 s) | ok |" in page
    assert "| cache.py | no result (exit 1: boom) | MISSED |" in page
