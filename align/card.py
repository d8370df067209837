"""The model card (`model/README.md`) of every saved model: hub metadata, then how the model was made.

Written once a stage's summary.json is complete, from the run's own records: pipeline.json and each stage's
summary.json (chain, fingerprints, metrics, versions), recipe.yaml (already redacted; data cards expanded), and the
model's align_prompts.json (how its prompts were formatted). A pushed model then says how it was made. Known secret
values are redacted once more from the whole card.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from align import stages as registry
from align.files import read_json, write_text_atomic
from align.prompt_format import read_prompt_format, tool_signature
from align.secrets import redact, secret_values
from align.values import same_decimals

logger = logging.getLogger(__name__)

# The hub's license identifiers that align's data cards use (and a few common ones); any other license is
# `other`, with its name in `license_name`.
HUB_LICENSES = {
    "apache-2.0", "mit", "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc0-1.0",
    "bsd-3-clause", "gpl-3.0", "llama2", "llama3", "openrail", "odc-by", "unknown",
}  # fmt: skip
OTHER_METRICS = ("train_loss", "global_step", "best_step", "stopped_early", "train_runtime_s", "train_tokens")


def write_model_card(run_dir: Path, stage: str) -> Path | None:
    """Write `<run_dir>/<stage>/model/README.md` (main process only). A card that cannot be written costs a
    warning, never the run."""
    from align.runtime import is_main_process

    if not is_main_process():
        return None
    try:
        text = model_card(Path(run_dir), stage)
        path = Path(run_dir) / stage / "model" / "README.md"
        write_text_atomic(path, text)
        logger.info("model card: %s", path)
        return path
    except Exception as exc:  # the model is saved; its card is documentation
        logger.warning("%s: the model card could not be written: %s", stage, exc)
        return None


def model_card(run_dir: Path, stage: str, merged: bool = False) -> str:
    """The card's text: YAML metadata, then the chain, metrics, prompt format, usage, versions and recipe.
    `merged` (`align merge`): the card of the stage's adapters merged into their base, plain weights."""
    import yaml
    from huggingface_hub import ModelCardData

    recipe_text = (run_dir / "recipe.yaml").read_text(encoding="utf-8")
    recipe = yaml.safe_load(recipe_text) or {}
    stages = {s["name"]: s for s in recipe.get("stages", [])}
    chain = stage_chain(stages, stage)
    summaries = {name: read_json(run_dir / name / "summary.json") or {} for name in chain}
    summary = summaries[stage]
    model_dir = run_dir / stage / "model"
    adapter = (model_dir / "adapter_config.json").is_file() and not merged
    if merged:  # the table's last row says what this folder holds
        summaries[stage] = summary = {**summary, "saved": "merged (align merge)"}
    root = stages[chain[0]].get("model")
    # The saved config: full weights, or adapters with the base built from scratch beside them (`base/`).
    built = read_json(model_dir / "config.json") or read_json(model_dir / "base" / "config.json")
    base = base_model(root)
    sources = [part for n in chain for part in data_sources(stages[n].get("data") or {})]
    datasets = list(dict.fromkeys(d for d in map(dataset_id, sources) if d))
    licenses = [x for x in dict.fromkeys(part.get("license") for part in sources) if x]
    kind = summary.get("kind") or stages[stage].get("kind", "")
    declared = registry.get(kind)
    metadata = ModelCardData(
        base_model=base,
        datasets=datasets or None,
        tags=["align", kind],
        library_name="peft" if adapter else "transformers",
        pipeline_tag=declared.pipeline_tag,
        **hub_license(licenses),
    )
    prompts = read_prompt_format(model_dir, has_chat_template=(model_dir / "chat_template.jinja").is_file())
    title = f"{recipe.get('name', run_dir.name)} / {stage}"
    steps = " -> ".join(f"`{n}` ({stages[n].get('kind')})" for n in chain)
    body = [
        f"# {title}",
        "",
        f"Stage `{stage}` ({kind}) of the align recipe `{recipe.get('name')}`: {describe_root(root, built)}, then "
        f"{steps}.",
        "",
        "## How it was made",
        "",
        "| # | stage | kind | input model | data | fingerprint | saved |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, name in enumerate(chain, start=1):
        s, entry = summaries[name], stages[name]
        data = entry.get("data") or {}
        body.append(
            f"| {i} | `{name}` | {entry.get('kind')} | {short_input(s.get('input_model'), root if i == 1 else None)} "
            f"| {data_label(data, (s.get('data') or {}).get('mix'))} | `{s.get('fingerprint', '-')}` "
            f"| {s.get('saved', 'full')} |"
        )
    fingerprints = {
        e["name"]: e.get("fingerprint") for e in (read_json(run_dir / "pipeline.json") or {}).get("stages", [])
    }
    read = [f"`{name}` read {refs}." for name in chain if (refs := other_models(stages[name], fingerprints))]
    if read:  # a teacher, a reward model: every model a stage declares beside the one it trains
        body += ["", *read]
    body += ["", "## Key metrics", "", "Each stage on its own held-out split, before and after it trained.", ""]
    body += ["| stage | metric | before | after |", "|---|---|---|---|"]
    for name in chain:
        metrics = summaries[name].get("metrics") or {}
        known = registry.kinds().get(str(stages[name].get("kind")))
        for key in [figure.key for figure in known.figures] if known is not None else []:
            if key in metrics:
                before, after = metrics.get(f"{key}_before"), metrics[key]
                shown = same_decimals(before, after) if before is not None else ["-", _fmt(after)]
                # As the console labels it: a token mean (or the Trainer's mean of batch means), the verdict's per
                # example.
                label = f"{key} ({known.eval_loss_label})" if key == "eval_loss" else key
                body.append(f"| `{name}` | {label} | {shown[0]} | {shown[1]} |")
    metrics = summary.get("metrics") or {}
    others = ", ".join(f"{k} {_fmt(metrics[k])}" for k in OTHER_METRICS if metrics.get(k) is not None)
    if others:
        body += ["", f"`{stage}`: {others}."]
    verdict = summary.get("verdict")
    if isinstance(verdict, dict) and verdict.get("status"):
        reasons = "; ".join(map(str, verdict.get("reasons") or []))
        body += ["", f"Verdict: **{verdict['status']}**" + (f" ({reasons})" if reasons else "") + "."]
        # The warnings travel with the model: a card that says "improved" without them says too much.
        body += [f"- warning: {w}" for w in verdict.get("warnings") or []]
    later = later_evaluations(run_dir, stage)
    if later:
        body += [
            "",
            "## Later evaluations",
            "",
            "What the run's eval stages found of this model, after it trained:",
            "",
        ]
        body += later
    how = declared.card_usage(prompts, adapter)
    body += ["", "## Prompt format", "", prompt_section(prompts), "", "## Usage", "", how]
    versions = summary.get("versions") or {}
    if versions:
        body += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    body += ["", "## Recipe", "", "As run (secrets redacted, data cards expanded):", ""]
    body += ["```yaml", recipe_text.rstrip(), "```", ""]
    text = f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(body)
    return redact(text, secret_values())


def later_evaluations(run_dir: Path, stage: str) -> list[str]:
    """A line for each completed stage of the run that compared `stage`'s model with others (an eval): its verdict on
    this model, not on the whole stage, and what it says of it (a stage's own "improved" and a later eval's "worse"
    belong on the same card; another model's "worse" does not)."""
    lines = []
    for entry in (read_json(run_dir / "pipeline.json") or {}).get("stages", []):
        summary = read_json(run_dir / str(entry.get("name")) / "summary.json") or {}
        metrics = summary.get("metrics") or {}
        kind = registry.kinds().get(str(entry.get("kind")))
        if kind is None or not kind.compares_models or summary.get("status") not in ("completed", "cached"):
            continue
        if stage not in (metrics.get("models") or {}):
            continue
        if entry.get("stale"):  # an --only run retrained a model it compared: its figures are of the one before
            lines.append(f"- `{entry['name']}`: stale, measured before a later `--only` run retrained this model "
                         "or one it was compared with; run the recipe again to measure it anew.")  # fmt: skip
            continue
        verdict = summary.get("verdict") or {}
        said = [r.removeprefix(f"{stage}: ") for r in verdict.get("reasons") or [] if r.startswith(f"{stage}: ")]
        warned = [w.removeprefix(f"{stage}: ") for w in verdict.get("warnings") or [] if w.startswith(f"{stage}: ")]
        if stage == metrics.get("baseline"):
            lines.append(f"- `{entry['name']}`: the baseline the other models were compared against.")
            continue
        own = (metrics["models"][stage].get("verdict") or {}).get("status")
        status = f"**{own}**" if own else "no verdict"
        lines.append(f"- `{entry['name']}`: {status}" + (f": {'; '.join(said)}" if said else "") + ".")
        lines += [f"  - warning: {w}" for w in warned]
    return lines


def other_models(entry: dict[str, Any], fingerprints: dict[str, Any]) -> str:
    """The models a stage's resolved recipe entry names beside the one it trains (its kind's declared model-valued
    fields: a teacher, a reward model), as the card says them: "teacher `@big` (fingerprint `3f2a...`)", the
    fingerprint of the run's stage an `@stage` names; empty where it names none."""
    from pydantic import ValidationError

    kind = registry.kinds().get(str(entry.get("kind")))
    if kind is None:
        return ""
    try:
        refs = kind.keys.model_validate(entry).model_refs()
    except ValidationError:  # a recipe of another version of align
        return ""

    def said(key: str, value: str) -> str:
        fingerprint = fingerprints.get(value[1:]) if value.startswith("@") else None
        return f"{key} `{value}`" + (f" (fingerprint `{fingerprint}`)" if fingerprint else "")

    return ", ".join(said(key, value) for key, value in refs.items() if key != "model")


def stage_chain(stages: dict[str, dict[str, Any]], stage: str) -> list[str]:
    """The stages whose outputs led to `stage`, first to last: each one's `model: "@<stage>"` followed back (the
    resolved recipe spells an omitted model as `@<previous stage>`)."""
    chain = [stage]
    while True:
        model = stages[chain[0]].get("model")
        ref = model[1:] if isinstance(model, str) and model.startswith("@") else None
        if ref is None or ref not in stages or ref in chain:
            return chain
        chain.insert(0, ref)


def base_model(root: Any) -> str | None:
    """The hub id the chain started from; a local directory's own card's `base_model`; None for a scratch model."""
    if not isinstance(root, str) or not root:
        return None
    local = Path(root).expanduser()
    if local.is_dir():
        card = local / "README.md"
        if card.is_file():
            match = re.search(r"^base_model:\s*(\S+)\s*$", card.read_text(encoding="utf-8").split("\n---", 1)[0], re.M)
            return match.group(1) if match else None
        return None
    return None if root.startswith((".", "/", "~")) else root


def describe_root(root: Any, built: dict[str, Any] | None = None) -> str:
    """The model the chain started from; for one built from scratch, its sizes, the vocabulary as `built` (the saved
    config) has it: the tokenizer trained on a small corpus can have fewer tokens than the recipe asked for."""
    if isinstance(root, dict):
        sizes = {k: v for k, v in root.items() if k != "model_type"}
        actual = (built or {}).get("vocab_size")
        if isinstance(actual, int) and actual != sizes.get("vocab_size"):
            sizes["vocab_size"] = (
                f"{actual} ({sizes.get('vocab_size')} asked; the tokenizer trained on the data has {actual})"
            )
        return f"a `{root.get('model_type')}` built from scratch ({', '.join(f'{k} {v}' for k, v in sizes.items())})"
    return f"`{root}`"


def short_input(input_model: str | None, root: Any) -> str:
    """`@lm` for an earlier stage (its local path dropped: it means nothing elsewhere), else the model as named."""
    if root is not None:
        return "scratch " + str(root.get("model_type")) if isinstance(root, dict) else f"`{root}`"
    return f"`{(input_model or '-').split(' (')[0]}`"


def dataset_id(data: dict[str, Any]) -> str | None:
    """The hub id of a stage's data (`source.hub`), else its card's name (builtin and file sets)."""
    hub = (data.get("source") or {}).get("hub")
    return hub or data.get("card") or data.get("name")


def data_sources(data: dict[str, Any]) -> list[dict[str, Any]]:
    """A stage's data sets as the resolved recipe holds them: a mix's sources, else the one."""
    return list(data.get("mix") or ([data] if data else []))


def data_label(data: dict[str, Any], taken: list[dict[str, Any]] | None = None) -> str:
    """A stage's data in a line; a mix's sources each with its share of the train rows (`taken`: summary.json's
    `data.mix`, the realized counts)."""
    if data.get("mix"):
        realized = {m["name"]: m for m in taken or []}
        parts = []
        for part in data["mix"]:
            got = realized.get(part.get("name"))
            share = f"{got['taken']} rows, {got['share']:.0%}" if got else f"weight {part.get('weight')}"
            parts.append(f"{data_label(part)}: {share}" + (" (repeated)" if got and got.get("repeated") else ""))
        return "mix of " + "; ".join(parts)
    name = data.get("card") or data.get("name") or "inline data"
    hub = (data.get("source") or {}).get("hub")
    where = f"hub `{hub}`" if hub else ", ".join(f"{k} `{v}`" for k, v in (data.get("source") or {}).items())
    return f"{name} ({data.get('format')}; {where})" if where else f"{name} ({data.get('format')})"


def hub_license(licenses: list[str]) -> dict[str, Any]:
    """The data cards' licenses as the hub's `license` field: one identifier where they agree, else `other` with
    their names."""
    ids = list(dict.fromkeys(_license_id(x) for x in licenses))
    if not ids:
        return {}
    if len(ids) == 1 and ids[0] in HUB_LICENSES:
        return {"license": ids[0]}
    return {"license": "other", "license_name": "-and-".join(ids)}


def _license_id(text: str) -> str:
    name = re.sub(r"\(.*?\)", "", text).strip().lower()
    return re.sub(r"[^a-z0-9.]+", "-", name).strip("-")


def prompt_section(prompts: Any) -> str:
    lines = [f"Prompts: {prompts.describe()}."]
    if prompts.format == "plain" and prompts.data_format != "text":
        lines.append(
            "The tokenizer carries a chat template (align's default `### user:` headers where the base had none) "
            "that this model **never saw in training**: render prompts as plain text, as below, not through "
            '`apply_chat_template` or `pipeline("text-generation")` with messages. A multi-turn conversation is '
            "the turns concatenated (prompt, answer, end-of-text, next prompt), as `align chat` renders it."
        )
        if prompts.example_prompt:
            ending = f" (it ends in {prompts.prompt_suffix!r})" if prompts.prompt_suffix else ""
            lines += ["", f"A training prompt{ending}:", "", "```text", prompts.example_prompt.rstrip(), "```"]
    elif prompts.format == "plain":
        lines.append("Give it text to continue; it knows no chat template.")
    else:
        lines.append("Render conversations with the tokenizer's chat template (`apply_chat_template`).")
    if prompts.tools:
        shown = "; ".join(f"`{tool_signature(schema)}`" for schema in prompts.tools)
        lines += [
            "",
            f"Trained to call tools: {shown}. Pass their schemas as `apply_chat_template(..., tools=...)` "
            "renders them (`align_prompts.json` holds them); `align chat` runs them where it can load them.",
        ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
