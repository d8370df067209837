"""A stage's fingerprint: a hash of everything that determines its output (its settings, its data and the data's
content, its input, the seed, the precision, align's version), which decides whether a run reuses, resumes or reruns it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

from align import __version__
from align import stages as registry
from align.recipe import DataSpec, Recipe, Stage


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_identity(spec: DataSpec, base_dir: Path) -> dict[str, Any]:
    """What pins the data's content: file hashes, the hub revision, or the Python version (builtin sets); for a mix,
    each source's, by name."""
    if spec.mix is not None:
        return {source.name: data_identity(source, base_dir) for source in spec.mix}
    source = spec.source
    if source.files is not None:
        from align.data_sources import resolve_files

        return {f"{split}:{path.name}": file_sha256(path)
                for split, paths in resolve_files(spec, base_dir).items() for path in paths}  # fmt: skip
    if source.disk is not None:
        from align.data_sources import disk_folder

        folder = disk_folder(spec, base_dir)
        return {
            str(path.relative_to(folder)): file_sha256(path) for path in sorted(folder.rglob("*")) if path.is_file()
        }
    if source.builtin is not None:
        from align.builtin import BUILTIN_VERSION

        # pydoc_data's text changes between Python versions, the sets' contents between align's versions of them.
        return {"python": platform.python_version(), "builtin": BUILTIN_VERSION}
    return {"revision": source.revision or "main"}


def fingerprint(stage: Stage, spec: DataSpec, input_fingerprint: str, recipe: Recipe, precision: str) -> str:
    """A hash of everything that determines a stage's output: config, data and its content, input, seed, align."""
    # The stage as recipe.yaml saves it (defaults its kind fills in spelt out) and its data as resolved (`spec`), not
    # as written: a saved recipe.yaml, which spells a card out in full, finds its stages cached.
    entry = stage.model_dump(mode="json", exclude={"data"})
    registry.get(stage.kind).resolve(entry, stage, recipe)
    payload = {
        "stage": entry,
        "data": spec.model_dump(mode="json"),
        "data_content": data_identity(spec, recipe.base_dir),
        "input": input_fingerprint,
        "seed": recipe.seed,
        "precision": precision,
        "align": __version__,
    }
    template = getattr(stage, "chat_template", None)
    if isinstance(template, str) and template.endswith(".jinja") and Path(template).is_file():
        payload["chat_template_content"] = file_sha256(Path(template))  # an edited template trains again
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_identity(stage: Stage, recipe: Recipe, outputs: Any) -> str:
    """What the stage's fingerprint takes from its input, as its kind says (an earlier stage's fingerprint, a hub
    id or path as written, every model and judge an eval reads)."""
    return registry.get(stage.kind).input_identity(stage, recipe, outputs)
