"""`align merge RUN_DIR [--stage NAME] OUT`: a stage's LoRA adapters merged into their base and saved as plain
weights (safetensors), with the tokenizer, the prompt format `align chat` follows and the model card, so that
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` (or a server such as vLLM) loads it without peft.

The folder it writes must not exist or be empty: nothing already on disk is overwritten. A stage that saved full or
merged weights has nothing to merge, and says so.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from align.errors import AlignError, BadInput, print_error

logger = logging.getLogger(__name__)

# Files of a stage's model/ that are not weights and travel with the merged model.
CARRIED = ("README.md", "align_prompts.json")


def build_parser(prog: str = "align merge") -> argparse.ArgumentParser:
    """The parser of `align merge` (no heavy import: `--help` is instant)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Save a stage's LoRA adapters merged into their base model, loadable by plain transformers.",
    )
    parser.add_argument("run_dir", type=Path, help="the run directory (or a stage's model/ directory)")
    parser.add_argument("out", type=Path, help="the folder to write (new or empty)")
    parser.add_argument("--stage", help="the stage whose adapters to merge (default: the last that saved adapters)")
    return parser


def merge_adapters(source: Path, out: Path, reward_model: bool = False, card: str | None = None) -> Path:
    """Merge the adapters in `source` (a model/ directory with adapter_config.json) into the base they name and
    save the result in `out`, with the tokenizer and align's files beside the weights. Returns `out`. `card`: the
    merged model's card (a run's stage: `align.card.model_card(..., merged=True)`); else the adapters' card is
    copied with a note.

    Raises:
        BadInput: `source` holds no adapters, or `out` is not new or empty.
    """
    if not (source / "adapter_config.json").is_file():
        raise BadInput(
            f"{source}: full weights, not LoRA adapters: nothing to merge",
            hint=f"load it as it is: AutoModelForCausalLM.from_pretrained('{source}')",
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out}: exists and is not empty: nothing overwritten", hint="give a new folder")
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

    auto = AutoPeftModelForSequenceClassification if reward_model else AutoPeftModelForCausalLM
    model = auto.from_pretrained(str(source), **({"num_labels": 1} if reward_model else {}))
    from align.families import complete_stops
    from align.models import load_tokenizer, save_model

    tokenizer = load_tokenizer(str(source))
    if (source / "generation_config.json").is_file():  # where the stage stopped, not the base's own stops
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(source))
    merged = model.merge_and_unload()
    complete_stops(merged, tokenizer)  # a named template's end-of-turn token among them
    if tokenizer.eos_token_id is not None:
        merged.config.eos_token_id = tokenizer.eos_token_id
    save_model(merged, tokenizer, out)  # safetensors, readable as the rest
    for name in CARRIED:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    note = (f"\n\n## Merged\n\nThe LoRA adapters of `{source}` merged into their base "
            f"(`{model.peft_config['default'].base_model_name_or_path}`) by `align merge`: plain weights, loadable "
            "without peft.\n")  # fmt: skip
    if card is not None:
        (out / "README.md").write_text(card.rstrip() + note, encoding="utf-8")
    elif (out / "README.md").is_file():
        (out / "README.md").write_text((out / "README.md").read_text(encoding="utf-8").rstrip() + note, "utf-8")
    logger.info("merged %s into %s", source, out)
    return out


def stage_with_adapters(run_dir: Path) -> str | None:
    """Without `--stage`, in a run directory: its last completed stage that saved LoRA adapters (None: not a run
    directory; `find_model` then reads the path).

    Raises:
        BadInput: a run directory where no completed stage saved adapters (it once picked the last stage anyway
            and said that stage's full weights had nothing to merge, as if the wrong stage had been asked for).
    """
    from align.errors import BadInput
    from align.saved import DONE, holds_model, run_stages

    run_dir = Path(run_dir)
    if not (run_dir / "pipeline.json").is_file():
        return None
    stages = run_stages(run_dir)
    done = [s["name"] for s in stages if s["status"] in DONE and holds_model(run_dir / s["name"] / "model")]
    with_adapters = [name for name in done if (run_dir / name / "model" / "adapter_config.json").is_file()]
    if not with_adapters:
        full = f"{', '.join(done)} saved full weights" if done else "no stage saved a model yet"
        raise BadInput(f"{run_dir}: no completed stage saved LoRA adapters ({full}): nothing to merge",
                       hint="each stage's model/ loads with plain transformers as it is; merge is for stages with "
                            "`peft:`")  # fmt: skip
    return with_adapters[-1]


def main(argv: list[str] | None = None, prog: str = "align merge") -> int:
    args = build_parser(prog).parse_args(argv)
    from align.runtime import setup_logging
    from align.saved import find_model

    setup_logging("info")
    try:
        stage = args.stage if args.stage is not None else stage_with_adapters(args.run_dir)
        saved = find_model(args.run_dir, stage, any_model=True)
        from align import stages as registry

        reward_model = saved.kind is not None and registry.makes(saved.kind, "reward_model")
        card = None
        if saved.run_dir is not None and saved.stage is not None and (saved.run_dir / "recipe.yaml").is_file():
            from align.card import model_card

            card = model_card(saved.run_dir, saved.stage, merged=True)
        merge_adapters(saved.path, args.out, reward_model=reward_model, card=card)
    except AlignError as exc:
        return print_error(exc)
    print(f"merged {saved.label()} into {args.out}: load it with AutoModelForCausalLM.from_pretrained('{args.out}')")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m align.merge"))
