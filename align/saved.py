"""Saved models on disk: which stage's `model/` a path means.

`align chat`, `align push` and the model card all start from a path the user gives: a `model/` directory, a stage
folder, or a run directory (with a stage name, or its last completed policy stage). How the model's prompts were
formatted in training is align/prompt_format.py's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align import stages as registry  # chat, compare and push pick among policies, never a reward model or an eval
from align.errors import BadInput, closest
from align.files import read_json

logger = logging.getLogger(__name__)

DONE = ("completed", "cached")


@dataclass(frozen=True)
class SavedModel:
    """A saved model directory, with the stage and run that made it where known (a bare directory has neither)."""

    path: Path
    stage: str | None = None
    kind: str | None = None
    run_dir: Path | None = None

    @property
    def is_adapter(self) -> bool:
        return (self.path / "adapter_config.json").is_file()

    def label(self) -> str:
        if self.stage is None:
            return str(self.path)
        run = f" of run {self.run_dir}" if self.run_dir is not None else ""
        return f"stage {self.stage} ({self.kind}){run}: {self.path}"


def holds_model(path: Path) -> bool:
    """Whether a directory holds a save_pretrained model (config.json) or LoRA adapters (adapter_config.json)."""
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def find_model(path: str | Path, stage: str | None = None, any_model: bool = False) -> SavedModel:
    """The model a path means: a `model/` directory as it is; a stage folder (`runs/x/sft`) its `model/`; a run
    directory its stage `stage`, or without one its last completed policy stage (a kind that makes one).
    `any_model` (push, merge): a named stage may be a reward model too; else (chat) only a model that generates.

    Raises:
        BadInput: no such directory, no model in it, no such stage, or a stage with no saved model.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise BadInput(f"{path}: no such directory", hint="give a model/ directory or a run directory")
    if (path / "pipeline.json").is_file():
        return run_stage_model(path, stage, any_model)
    if stage is not None:
        raise BadInput(f"--stage {stage}: {path} is not a run directory (it has no pipeline.json)")
    if (path / "summary.json").is_file() and holds_model(path / "model"):
        summary = read_json(path / "summary.json") or {}
        return SavedModel(path / "model", summary.get("stage", path.name), summary.get("kind"), path.parent)
    if holds_model(path):
        summary = read_json(path.parent / "summary.json") or {}
        if summary.get("stage"):
            return SavedModel(path, summary["stage"], summary.get("kind"), path.parent.parent)
        return SavedModel(path)
    raise BadInput(
        f"{path}: no model here (no config.json or adapter_config.json, and no pipeline.json of a run)",
        hint="give a stage's model/ directory (runs/NAME/STAGE/model) or a run directory (runs/NAME)",
    )


def run_stages(run_dir: Path) -> list[dict[str, Any]]:
    """The run's stages in recipe order: name, kind, and status (its summary.json's where there is one)."""
    pipeline = read_json(run_dir / "pipeline.json")
    if not isinstance(pipeline, dict) or not isinstance(pipeline.get("stages"), list):
        raise BadInput(f"{run_dir / 'pipeline.json'}: unreadable: not an align run directory")
    stages = []
    for entry in pipeline["stages"]:
        summary = read_json(run_dir / entry["name"] / "summary.json") or {}
        stages.append({**entry, "status": summary.get("status", entry.get("status", "pending"))})
    return stages


def run_stage_model(run_dir: Path, stage: str | None, any_model: bool = False) -> SavedModel:
    """A run's stage `stage`, or its last completed policy stage (`any_model`: `stage` may make a reward model).

    Raises:
        BadInput: no such stage, a stage that is not a policy stage, or one without a saved model.
    """
    stages = run_stages(run_dir)
    if stage is None:
        done = [s for s in stages if registry.makes(s["kind"], "policy") and s["status"] in DONE]
        if not done:
            raise BadInput(f"{run_dir}: no completed {', '.join(registry.making('policy'))} stage yet: no model to use")
        entry = done[-1]
    else:
        names = [s["name"] for s in stages]
        if stage not in names:
            guess = closest(stage, names)
            raise BadInput(
                f"--stage {stage}: no such stage in {run_dir}"
                + (f" (did you mean '{guess}'?)" if guess else f" (its stages: {', '.join(names)})")
            )
        entry = stages[names.index(stage)]
        if any_model and not (registry.makes(entry["kind"], "policy") or registry.makes(entry["kind"], "reward_model")):
            raise BadInput(f"--stage {stage}: {registry.a_kind(entry['kind'])} stage, which saves no model")
        if not any_model and not registry.makes(entry["kind"], "policy"):
            only = ", ".join(registry.making("policy"))
            raise BadInput(f"--stage {stage}: {registry.a_kind(entry['kind'])} stage; only {only} stages generate")
    model = run_dir / entry["name"] / "model"
    if entry["status"] not in DONE or not holds_model(model):
        raise BadInput(f"--stage {entry['name']}: no saved model in {model} (the stage is {entry['status']})")
    warn_if_stale(entry, run_dir)
    return SavedModel(model, entry["name"], entry["kind"], run_dir)


def warn_if_stale(entry: dict[str, Any], run_dir: Path) -> None:
    """chat, push and merge use a stage an `--only` run left stale all the same, but never without saying so."""
    if entry.get("stale"):
        logger.warning("stage %s of %s is stale: %s", entry["name"], run_dir, entry["stale"])


def policy_models(run_dir: Path) -> list[SavedModel]:
    """Every completed policy stage's model of a run, in recipe order.

    Raises:
        BadInput: not a run directory, or no completed policy stage.
    """
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "pipeline.json").is_file():
        raise BadInput(f"{run_dir}: not a run directory (no pipeline.json)")
    out = []
    for s in run_stages(run_dir):
        if registry.makes(s["kind"], "policy") and s["status"] in DONE and holds_model(run_dir / s["name"] / "model"):
            out.append(SavedModel(run_dir / s["name"] / "model", s["name"], s["kind"], run_dir))
            warn_if_stale(s, run_dir)
    if not out:
        raise BadInput(f"{run_dir}: no completed {', '.join(registry.making('policy'))} stage yet: no model to use")
    return out
