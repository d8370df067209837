"""Saved models on disk: which stage's `model/` a path means, and how that model's prompts were formatted in training.

`align chat`, `align push` and the model card all start from a path the user gives: a `model/` directory, a stage
folder, or a run directory (with a stage name, or its last completed policy stage). Each saved `model/` records
how its training prompts were written (`align_prompts.json`), because the tokenizer's chat template alone can
mislead: a model trained on plain string prompts still carries align's default `### user:` template, which it
never saw in training, and chatting with it through that template gives it a format it does not know.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import BadInput, closest
from align.files import read_json, write_text_atomic
from align.recipe import POLICY_KINDS, a_kind  # chat, compare and push pick among these, never an rm or eval stage

logger = logging.getLogger(__name__)

PROMPTS_FILE = "align_prompts.json"
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


def find_model(path: str | Path, stage: str | None = None) -> SavedModel:
    """The model a path means: a `model/` directory as it is; a stage folder (`runs/x/sft`) its `model/`; a run
    directory its stage `stage`, or without one its last completed policy stage (lm, sft or dpo).

    Raises:
        BadInput: no such directory, no model in it, no such stage, or a stage with no saved model.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise BadInput(f"{path}: no such directory", hint="give a model/ directory or a run directory")
    if (path / "pipeline.json").is_file():
        return run_stage_model(path, stage)
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


def run_stage_model(run_dir: Path, stage: str | None) -> SavedModel:
    """A run's stage `stage`, or its last completed policy stage.

    Raises:
        BadInput: no such stage, a stage that is not a policy stage, or one without a saved model.
    """
    stages = run_stages(run_dir)
    if stage is None:
        done = [s for s in stages if s["kind"] in POLICY_KINDS and s["status"] in DONE]
        if not done:
            raise BadInput(f"{run_dir}: no completed {', '.join(POLICY_KINDS)} stage yet: no model to use")
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
        if entry["kind"] not in POLICY_KINDS:
            only = ", ".join(POLICY_KINDS)
            raise BadInput(f"--stage {stage}: {a_kind(entry['kind'])} stage; only {only} stages generate")
    model = run_dir / entry["name"] / "model"
    if entry["status"] not in DONE or not holds_model(model):
        raise BadInput(f"--stage {entry['name']}: no saved model in {model} (the stage is {entry['status']})")
    return SavedModel(model, entry["name"], entry["kind"], run_dir)


def policy_models(run_dir: Path) -> list[SavedModel]:
    """Every completed policy stage's model of a run, in recipe order.

    Raises:
        BadInput: not a run directory, or no completed policy stage.
    """
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "pipeline.json").is_file():
        raise BadInput(f"{run_dir}: not a run directory (no pipeline.json)")
    out = [
        SavedModel(run_dir / s["name"] / "model", s["name"], s["kind"], run_dir)
        for s in run_stages(run_dir)
        if s["kind"] in POLICY_KINDS and s["status"] in DONE and holds_model(run_dir / s["name"] / "model")
    ]
    if not out:
        raise BadInput(f"{run_dir}: no completed {', '.join(POLICY_KINDS)} stage yet: no model to use")
    return out


# --------------------------------------------------------------------------------------------------
# How prompts were formatted in training


@dataclass(frozen=True)
class PromptFormat:
    """How a model's training prompts were written, so chat and users render theirs the same way.

    `format`: "plain" (strings, the answer appended with nothing between: TRL's convention; text for an lm stage)
    or "chat_template" (message lists rendered by the tokenizer's chat template). `prompt_suffix`: the whitespace
    every sampled training prompt ended with (plain only), which chat adds to a typed turn that lacks it.
    `recorded`: False when the model directory holds no record (saved before align wrote one, or not by align).
    """

    format: str
    data_format: str | None = None
    stage: str | None = None
    kind: str | None = None
    prompt_suffix: str = ""
    example_prompt: str | None = None
    recorded: bool = True

    def describe(self) -> str:
        """One line for chat's banner and the model card."""
        if self.format == "chat_template":
            how = "message lists rendered by the tokenizer's chat template"
        elif self.kind == "lm" or self.data_format == "text":
            how = "plain text, no chat template: the model continues the text it is given"
        else:
            end = f", each ending in {self.prompt_suffix!r}" if self.prompt_suffix else ""
            how = f"plain strings, no chat template: the prompt as is{end}, the answer appended with nothing between"
        if not self.recorded:
            return f"{how} (not recorded with the model: guessed from its tokenizer)"
        return f"{how}; as stage {self.stage} ({self.kind}) was trained on {self.data_format} data"


def prompt_format_of(kind: str, data_format: str, sample: list[dict[str, Any]]) -> PromptFormat:
    """How a stage's training rows present prompts: from its data format and whether they are strings or messages."""
    if kind == "lm" or data_format == "text":
        return PromptFormat("plain", data_format, kind=kind)
    first = sample[0] if sample else {}
    prompt = first.get("prompt", first.get("chosen"))
    if "messages" in first or isinstance(prompt, list) or data_format in ("messages", "preference_messages"):
        return PromptFormat("chat_template", data_format, kind=kind)
    prompts = [row["prompt"] for row in sample if isinstance(row.get("prompt"), str)]
    return PromptFormat("plain", data_format, kind=kind, prompt_suffix=_shared_whitespace_end(prompts),
                        example_prompt=prompts[0][:400] if prompts else None)  # fmt: skip


def _shared_whitespace_end(texts: list[str]) -> str:
    """The trailing whitespace every text ends with ("\\n\\n" for the builtin instruction prompts), or ""."""
    if not texts:
        return ""
    ends = [t[len(t.rstrip()) :] for t in texts]
    shortest = min(ends, key=len)
    while shortest and not all(e.endswith(shortest) for e in ends):
        shortest = shortest[1:]
    return shortest


def record_prompt_format(model_dir: Path, stage: str, kind: str, data_format: str, rows: Any) -> PromptFormat:
    """Write `model_dir/align_prompts.json`: how this stage's training prompts were formatted (from its data
    format and its first training rows), which `align chat` follows and the model card states."""
    sample = [rows[i] for i in range(min(32, len(rows)))] if rows is not None else []
    found = prompt_format_of(kind, data_format, sample)
    record = {
        "format": found.format,
        "data_format": data_format,
        "stage": stage,
        "kind": kind,
        "prompt_suffix": found.prompt_suffix,
        "example_prompt": found.example_prompt,
    }
    write_text_atomic(model_dir / PROMPTS_FILE, json.dumps(record, indent=2) + "\n")
    return PromptFormat(**{k: v for k, v in record.items()})


def read_prompt_format(model_dir: Path, has_chat_template: bool | None = None) -> PromptFormat:
    """The recorded prompt format of a saved model; without a record, the tokenizer's chat template if it has one
    (a model from elsewhere), else plain text."""
    record = read_json(Path(model_dir) / PROMPTS_FILE)
    if isinstance(record, dict) and record.get("format") in ("plain", "chat_template"):
        fields = ("format", "data_format", "stage", "kind", "prompt_suffix", "example_prompt")
        return PromptFormat(**{k: record[k] for k in fields if record.get(k) is not None})
    return PromptFormat("chat_template" if has_chat_template else "plain", recorded=False)
