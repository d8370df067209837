"""The stage-kind registry: a kind is declared in its own module and registered in one line; nothing else in align
names it; align's modules import each other one way; fingerprints are pinned, and a saved recipe has its own."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Annotated, Any

import yaml

from tests.conftest import REPO

PACKAGE = REPO / "align"


def registered() -> tuple[str, ...]:
    """Every registered kind but eval, which is also a split's name (the Trainer's `eval_` prefix, metrics rows), so
    its literal is not counted."""
    from align import stages as registry

    return tuple(name for name in registry.names() if name != "eval")


KINDS = registered()


def test_every_kind_is_named_only_in_its_module_and_its_registry_line():
    from align import stages as registry

    assert set(KINDS) <= set(registry.names())
    registry_lines = (PACKAGE / "stages" / "__init__.py").read_text().splitlines()
    for kind in KINDS:
        pattern = re.compile(rf"""["']{kind}["']""")
        outside = [str(f.relative_to(REPO)) for f in PACKAGE.rglob("*.py")
                   if f.name not in (f"{kind}.py", "__init__.py") and pattern.search(f.read_text())]  # fmt: skip
        assert not outside, f"'{kind}' is named outside align/stages/{kind}.py: {outside}"
        assert sum(bool(pattern.search(line)) for line in registry_lines) <= 1
        for init in PACKAGE.rglob("__init__.py"):
            if init.parent != PACKAGE / "stages":
                assert not pattern.search(init.read_text()), f"'{kind}' in {init}"
        assert registry.get(kind).name == kind


def test_an_unknown_kind_lists_the_registered_ones(tmp_path, run_cli):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "stages": [{"kind": "ppo2", "data": {"card": "python-docs"}}]}))
    code, _, err = run_cli(path, "--dry-run")
    from align import stages as registry

    assert code == 2 and f"unknown kind 'ppo2' (kinds: {', '.join(registry.names())})" in err


def imports_of(path: Path, module: str) -> set[str]:
    """The align modules `path` imports anywhere (at the top, inside functions), but not under TYPE_CHECKING (never
    executed: annotations only)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    skipped = {id(n) for block in guarded for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


def test_the_import_graph_has_no_cycle():
    from align import stages as registry

    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: {m for m in imports_of(path, name) if m in modules and m != name} for name, path in modules.items()}
    graph["align.stages"] |= set(registry.MODULES)  # the registry imports its kinds' modules by name
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


# Pinned: a change that moves a fingerprint makes every run directory made before it train again, so it is made on
# purpose (the last, 2026-12-07: the fingerprint reads the stage as recipe.yaml saves it, so a saved recipe is cached).
FINGERPRINTS = {"lm": "fbdd41ee714a20b0", "sft": "c5e8e6b80e702d4e", "rm": "204399bf4cdbfb26",
                "dpo": "31ae8ffc910d4f74", "eval": "568f2af600406876"}  # fmt: skip


def test_fingerprints_are_pinned_and_a_saved_recipe_has_the_recipes_own(tmp_path):
    """The fingerprints of a five-kind chain are those pinned above, and the recipe.yaml a run saves (cards spelt out,
    an omitted model as `@<previous>`, an eval's models listed) gives the very same: running it finds every stage
    cached."""
    from align.loader import load_recipe
    from align.pipeline import resolved_recipe
    from align.preflight import resolve_specs
    from align.run_records import planned_status

    rows = {
        "text.jsonl": [{"text": f"line {i} of a text"} for i in range(30)],
        "pc.jsonl": [{"prompt": f"Q{i}: ", "completion": f"A{i}"} for i in range(30)],
        "pairs.jsonl": [{"prompt": f"Q{i}: ", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(30)],
    }
    for name, data in rows.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    stages = [
        {"name": "lm", "kind": "lm", "model": "openai-community/gpt2",
         "data": {"source": {"files": ["text.jsonl"]}, "format": "text"}, "train": {"max_steps": 5}},
        {"name": "sft", "kind": "sft", "data": {"source": {"files": ["pc.jsonl"]}, "format": "prompt_completion"},
         "train": {"learning_rate": 1e-4}, "peft": {"r": 8}},
        {"name": "rm", "kind": "rm", "data": {"source": {"files": ["pairs.jsonl"]}, "format": "preference"}},
        {"name": "dpo", "kind": "dpo", "data": {"source": {"files": ["pairs.jsonl"]}, "format": "preference"},
         "train": {"beta": 0.2}, "early_stopping": {"patience": 2}},
        {"name": "eval", "kind": "eval", "data": {"source": {"files": ["pc.jsonl"]}, "format": "prompt_completion"},
         "judges": [{"reward_model": "@rm"}, {"reference": "rouge_l"}], "max_prompts": 10},
    ]  # fmt: skip
    recipe = {"name": "fp", "seed": 3, "precision": "fp32", "tracking": {"wandb": {"mode": "disabled"}},
              "stages": stages}  # fmt: skip
    stages[0]["data"] = {"card": "wikitext-2-raw-v1", "max_train_rows": 50}  # a card: recipe.yaml spells it out

    def fingerprints(path: Path) -> dict[str, str]:
        loaded = load_recipe(path)
        status = planned_status(loaded, resolve_specs(loaded), "fp32", tmp_path / "run")
        return {k: re.search(r"fingerprint (\w+)", v).group(1) for k, v in status.items()}

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    loaded = load_recipe(tmp_path / "r.yaml")
    saved = resolved_recipe(loaded, resolve_specs(loaded))
    assert saved["stages"][0]["data"]["source"]["hub"] == "wikitext" and saved["stages"][1]["model"] == "@lm"
    (tmp_path / "saved.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert fingerprints(tmp_path / "r.yaml") == fingerprints(tmp_path / "saved.yaml") == FINGERPRINTS


def test_each_stage_module_is_named_for_its_kind_and_the_help_lists_every_kind():
    """The registry's NAMES come from the module names, so `--help` lists the kinds without importing them (pydantic
    and all): each module must be named for the kind it declares."""
    from align import stages as registry
    from align.run import parse_args

    assert tuple(registry.names()) == registry.NAMES
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        parse_args(["--help"])
    assert f"its stages ({', '.join(registry.names())})" in " ".join(out.getvalue().split())


# A field of one of these names holds a model (a hub id, a directory, `@stage`); `teacher` is the next kind's.
MODEL_FIELD = re.compile(r"^(models?|teacher|.*_model)$")


def unmarked_model_fields(cls: type, path: str = "") -> list[str]:
    """Every field of a recipe-keys class, nested models included, that by its name holds a model but is not marked
    `MODEL_REF`: one the offline check and the run-directory check would never see."""
    import typing

    from pydantic import BaseModel

    from align.recipe import MODEL_REF

    def models_in(annotation: Any) -> list[type]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]

    found = []
    for name, info in cls.model_fields.items():
        if MODEL_FIELD.match(name) and MODEL_REF not in info.metadata:
            found.append(f"{path}{name}")
        for nested in models_in(info.annotation):
            found += unmarked_model_fields(nested, f"{path}{name}.")
    return found


def test_every_kinds_model_valued_fields_are_declared_and_reach_the_checks():
    """Conformance, from the registry: every field that holds a model is marked MODEL_REF, so `model_refs()` (the
    offline check before stage one, the run-directory check) reaches it by its declaration alone. A kind built here
    with a `teacher:` it did not mark fails the same check, as the next kind would."""
    from pydantic import Field

    from align import stages as registry
    from align.recipe import MODEL_REF, TrainingStage

    assert {name: unmarked_model_fields(kind.keys) for name, kind in registry.kinds().items()} == {
        name: [] for name in registry.names()
    }

    class Forgot(TrainingStage):
        teacher: str | None = Field(None, description="the model to distil from")

    class Declared(TrainingStage):
        teacher: Annotated[str | None, MODEL_REF] = Field(None, description="the model to distil from")

    assert unmarked_model_fields(Forgot) == ["teacher"]
    assert unmarked_model_fields(Declared) == []
    data = {"card": "python-docs"}
    assert Forgot(name="d", kind="x", model="org/student", teacher="org/teacher", data=data).model_refs() == {
        "model": "org/student"
    }, "an unmarked teacher escapes the checks: what the conformance test exists to catch"
    scratch = {"model_type": "gpt2", "n_layer": 2}
    assert Declared(name="d", kind="x", model=scratch, data=data).model_refs() == {}, "a config names no model"
    assert Declared(name="d", kind="x", model="org/student", teacher="@sft", data=data).model_refs() == {
        "model": "org/student",
        "teacher": "@sft",
    }


def test_a_declared_model_field_naming_an_earlier_stage_reaches_the_fingerprint():
    """The fingerprint, from the declaration alone: a kind whose `teacher:` names `@sft` runs again when sft's
    fingerprint changes, with no `input_identity` of its own; a kind with no such field keeps its fingerprint."""
    from pydantic import Field

    from align.recipe import MODEL_REF, Recipe, TrainingStage
    from align.stages.base import TrainingKind
    from align.values import StageOutput

    class TeacherKeys(TrainingStage):
        teacher: Annotated[str | None, MODEL_REF] = Field(None, description="the model to distil from")

    class WithTeacher(TrainingKind):
        name = "x"
        keys = TeacherKeys

    data = {"card": "python-docs"}
    stage = TeacherKeys(name="d", kind="x", model="@lm", teacher="@sft", data=data)
    plain = TeacherKeys(name="d", kind="x", model="@lm", data=data)
    recipe = Recipe.model_construct(name="r", stages=[stage])

    def identity(stage: Any, sft: str) -> str:
        outputs = {n: StageOutput(n, "sft", None, fp) for n, fp in (("lm", "lm-fp"), ("sft", sft))}
        return WithTeacher().input_identity(stage, recipe, outputs)

    assert identity(stage, "one") != identity(stage, "two")
    assert identity(plain, "one") == identity(plain, "two") == "lm-fp", "a kind without the field: as before"


def test_every_kinds_figures_reach_the_console_the_report_and_the_card(tmp_path):
    """Conformance, from the registry: a run directory with one completed stage of every training kind, each
    summary holding its kind's declared figures before and after; the console's headline, the report's stages table
    and the model card's metrics show every one, with no code of the kind's own in those modules. A new kind's
    figures reach them by its declaration alone."""
    from align import stages as registry
    from align.card import model_card
    from align.report import build_report

    training = [kind for kind in registry.kinds().values() if kind.trains]
    entries, stages = [], []
    for n, kind in enumerate(training):
        name = f"s{n}"
        model = {"model_type": "gpt2"} if n == 0 else f"@s{n - 1}"
        stages.append({"name": name, "kind": kind.name, "model": model, "data": {"card": "python-docs"}})
        metrics = {}
        for i, figure in enumerate(kind.figures):
            metrics |= {f"{figure.key}_before": 0.25 + i, figure.key: 0.75 + i}
        summary = {"stage": name, "kind": kind.name, "status": "completed", "fingerprint": f"fp{n}", "metrics": metrics,
                   "input_model": str(model), "saved": "full"}  # fmt: skip
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        entries.append({"name": name, "kind": kind.name, "status": "completed", "fingerprint": f"fp{n}"})
    (tmp_path / "pipeline.json").write_text(json.dumps({"name": "conformance", "stages": entries}))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"name": "conformance", "stages": stages}))

    report = build_report(tmp_path).read_text()
    for n, kind in enumerate(training):
        summary = json.loads((tmp_path / f"s{n}" / "summary.json").read_text())
        first = kind.figures[0]
        assert kind.headline(summary).startswith(f"{first.key} 0.25"), kind.name
        row = report.split(f"<tr><td>s{n}</td><td>{kind.name}</td>")[1].split("</tr>")[0]
        card = model_card(tmp_path, f"s{n}").split("## Key metrics")[1].split("##")[0]
        for figure in kind.figures:
            assert figure.key in row or figure.label in row, (kind.name, figure.key, "report")
            assert f"| `s{n}` | {figure.key}" in card, (kind.name, figure.key, "card")
