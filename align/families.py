"""Model families' chat habits: chat templates by name, end-of-turn tokens, stop ids, dated templates, and
assistant masks derived from a template that marks no turns.

A family shows itself in its tokenizer and chat template, not in its name: what a template renders decides its
end-of-turn token, whether it injects a system prompt, and which tokens mark assistant turns. So every decision
here renders a probe conversation and reads the text, and works the same for a family align has never seen.

The templates TRL ships (`trl/chat_templates/*.jinja`) can be named in a recipe (`chat_template: qwen2_5`); their
training variants (with `{% generation %}` marks) are TRL's to choose.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import BadInput, closest

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# The date a dated template renders ("Today Date: ..."): the fallback Llama 3.1/3.2's own templates use when no
# clock is given. Pinned, so a prompt's tokens (and every cache and fingerprint hashed from them) do not change at
# midnight.
PINNED_DATE = "26 Jul 2024"
_PIN = '{%- if date_string is not defined %}{%- set date_string = "' + PINNED_DATE + '" %}{%- endif %}\n'

# Tokens a template writes literally: `<|im_start|>`-style turn markers, Gemma's `<start_of_turn>`, and the
# thinking and tool-call tags (added as plain tokens, as Qwen's tokenizers have them).
SPECIAL_LITERAL = re.compile(r"<\|[A-Za-z0-9_]+\|>|<(?:start|end)_of_[a-z_]+>")
PLAIN_LITERAL = re.compile(r"</?(?:think|tool_call|tool_response)>")

# A probe conversation: content no template writes itself, so its place in the rendered text is unambiguous.
PROBE_USER, PROBE_ANSWER, PROBE_SYSTEM = "Zq1user", "Zq2answer", "Zq3system"


def shipped_templates() -> dict[str, Path]:
    """The chat templates the installed TRL ships, by name (the training variants are TRL's to pick)."""
    import trl

    folder = Path(trl.__file__).parent / "chat_templates"
    return {p.stem: p for p in sorted(folder.glob("*.jinja")) if not p.stem.endswith("_training")}


def shipped_name(template: str | None) -> str | None:
    """The name of the template TRL ships that `template` is, character for character (a model's own, or the one an
    earlier stage's `chat_template:` gave it); None for any other."""
    if not isinstance(template, str):
        return None
    return next((name for name, path in shipped_templates().items() if path.read_text(encoding="utf-8") == template),
                None)  # fmt: skip


def read_template(value: str, where: str) -> str:
    """The template text a stage's `chat_template:` names: a template TRL ships (by name) or a `.jinja` file.

    Raises:
        BadInput: an unknown name (the closest shipped names in the hint), or a file that cannot be read.
    """
    if value.endswith(".jinja"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise BadInput(f"{where}: '{value}': no such file", hint="a .jinja path is looked for in the recipe's "
                           "folder, then the working directory")  # fmt: skip
        return path.read_text(encoding="utf-8")
    shipped = shipped_templates()
    if value not in shipped:
        guesses = closest_names(value, shipped)
        raise BadInput(
            f"{where}: '{value}' is not a chat template TRL ships"
            + (f" (closest: {', '.join(guesses)})" if guesses else ""),
            hint=f"a name TRL {trl_version()} ships ({', '.join(sorted(shipped))}), a .jinja file, or own (the "
            "model's template; align's own for a model without one)",
        )
    return shipped[value].read_text(encoding="utf-8")


def closest_names(value: str, names: Any, n: int = 3) -> list[str]:
    import difflib

    found = difflib.get_close_matches(value, list(names), n=n, cutoff=0.5)
    first = closest(value, names)
    return list(dict.fromkeys(([first] if first else []) + found))[:n]


def trl_version() -> str:
    import trl

    return trl.__version__


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], prompt: bool = False, **kw: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **kw)


# --------------------------------------------------------------------------------------------------
# What a template renders


@dataclass(frozen=True)
class TemplateFacts:
    """What a chat template does, read from what it renders (see `template_facts`)."""

    end_of_turn: str | None  # the token after an assistant's content (`<|im_end|>`, `<|eot_id|>`, eos)
    system_prompt: str | None  # the system text it writes of its own, and when
    dated: bool  # renders today's date unless `date_string` is given
    pinned: bool  # align pinned its date

    def describe(self) -> str:
        parts = [f"end of turn {self.end_of_turn}" if self.end_of_turn else "end of turn unknown"]
        if self.system_prompt:
            parts.append(f"a system prompt of its own ({self.system_prompt})")
        if self.pinned:
            parts.append(f"date pinned to {PINNED_DATE} (date_string)")
        return "; ".join(parts)


def template_facts(tokenizer: PreTrainedTokenizerBase) -> TemplateFacts:
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    return TemplateFacts(end_of_turn(tokenizer), injected_system_prompt(tokenizer),
                         "strftime_now" in template, template.startswith(_PIN))  # fmt: skip


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The token the template writes right after an assistant's content: what a chat model emits to stop."""
    try:
        turns = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_ANSWER}]
        text = render(tokenizer, turns)
    except Exception:  # a template that needs roles or fields the probe lacks
        return None
    after = text[text.rfind(PROBE_ANSWER) + len(PROBE_ANSWER) :] if PROBE_ANSWER in text else ""
    added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
    stripped = after.lstrip()
    return next((token for token in added if stripped.startswith(token)), None)


def injected_system_prompt(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """What system text a template writes of its own, said as the plan shows it: into a conversation without a
    system prompt only (Qwen 2.5's "You are Qwen, ..."), or always, before the data's own (Llama 3.1's knowledge
    date); None where it writes none."""
    try:
        text = render(tokenizer, [{"role": "user", "content": PROBE_USER}])
        system = {"role": "system", "content": PROBE_SYSTEM}
        with_system = render(tokenizer, [system, {"role": "user", "content": PROBE_USER}])
    except Exception:
        return None
    before = text.split(PROBE_USER)[0]
    for token in tokenizer.get_added_vocab():
        before = before.replace(token, " ")
    roles = re.compile(r"[#:\s]*(?:system|user|assistant|model)?[#:\s]*")
    words = [w for w in before.split() if not roles.fullmatch(w)]
    if not words:
        return None
    own = " ".join(words)
    always = all(w in with_system.split(PROBE_SYSTEM)[0] for w in words)
    return f"{'always writes' if always else 'writes when the data has none'}: {own[:80]!r}"


def pin_date(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Pin a dated template's date (Llama 3.2's `strftime_now`) so that it renders the same on every day. Templates
    TRL swaps for a training variant by their exact text (gpt-oss) are left as they are: pinning would cost them
    their assistant masks. Returns whether the template is pinned."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or "strftime_now" not in template:
        return False
    if template.startswith(_PIN):
        return True
    if training_variant(template) is not None:
        logger.info("the chat template renders today's date, and TRL trains it as it is: left unpinned")
        return False
    tokenizer.chat_template = _PIN + template
    return True


def training_variant(template: str) -> str | None:
    """TRL's training variant of a template it ships (matched by text, as TRL matches it), or None."""
    for name, path in shipped_templates().items():
        if path.read_text(encoding="utf-8") == template:
            training = path.with_name(f"{name}_training.jinja")
            return training.read_text(encoding="utf-8") if training.is_file() else None
    return None


# --------------------------------------------------------------------------------------------------
# Giving a model a named template


def template_tokens(template: str) -> tuple[list[str], list[str]]:
    """(special, plain) tokens a template writes literally, in order of first use."""
    special = list(dict.fromkeys(SPECIAL_LITERAL.findall(template)))
    plain = list(dict.fromkeys(PLAIN_LITERAL.findall(template)))
    return special, plain


def parsed_arguments(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose tool calls' arguments are dicts: JSON strings (how Arrow stores arguments of varying shape)
    parsed back, so the template writes `{"a": 1}` and not a quoted string; empty fields Arrow filled in dropped."""
    import json

    message = {k: v for k, v in message.items() if v is not None}
    calls = []
    for call in message.get("tool_calls") or []:
        function = dict(call.get("function") or call)
        if isinstance(function.get("arguments"), str):
            function["arguments"] = json.loads(function["arguments"])
        calls.append({"type": "function", "function": function})
    if calls:
        message["tool_calls"] = calls
    return message


def template_texts(template: str, ds: Any, rows: int = 256) -> list[str]:
    """The first `rows` conversations of a split as the template writes them, its literal tokens taken out: text a
    from-scratch tokenizer trains on beside the data's own (the plan), so that what the template writes in every
    row (a default system prompt, the tool instructions, the tools' schemas, the call syntax) becomes a few tokens,
    as in a released tokenizer, not hundreds of bytes. Rows without a conversation add nothing."""
    import json

    from transformers.utils.chat_template_utils import render_jinja_template

    special, plain = template_tokens(template)
    literal = re.compile("|".join(re.escape(t) for t in special + plain)) if special or plain else None
    texts = []
    for row in ds.select(range(min(rows, len(ds)))):
        messages = row.get("messages") or (row.get("prompt") if isinstance(row.get("prompt"), list) else None)
        if not messages:
            continue
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        try:
            rendered, _ = render_jinja_template([[parsed_arguments(m) for m in messages]], tools=tools or None,
                                                chat_template=template)  # fmt: skip
        except Exception as exc:  # a row the template refuses is the data check's to report, not the tokenizer's
            logger.debug("template_texts: a row did not render (%s)", exc)
            continue
        texts.append(literal.sub("\n", rendered[0]) if literal else rendered[0])
    return texts


_TRAINING_TEMPLATES: dict[str, str] = {}


def training_template(tokenizer: Any) -> str:
    """The tokenizer's template with generation marks: its own where it has them, else TRL's training variant, else
    its own. Kept per template text: TRL's lookup renders probe conversations, too slow to repeat for every row."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if template not in _TRAINING_TEMPLATES:
        marked = template if has_generation_markers(template) else get_training_chat_template(tokenizer)
        _TRAINING_TEMPLATES[template] = marked or template
    return _TRAINING_TEMPLATES[template]


def apply_template(tokenizer: PreTrainedTokenizerBase, template: str, model: Any = None) -> list[str]:
    """Give a tokenizer (and its model) a chat template, as TRL's `clone_chat_template` does without a source
    tokenizer to copy: the template's literal tokens become single tokens (turn markers special, thinking and tool
    tags plain), the embeddings grow to fit them, and eos becomes the template's end-of-turn token. Returns the
    tokens added."""
    from tokenizers import AddedToken

    special, plain = template_tokens(template)
    vocab = tokenizer.get_vocab()
    new_special = [t for t in special if t not in vocab]
    new_plain = [t for t in plain if t not in vocab]
    if new_special:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in new_special])
    if new_plain:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in new_plain])
    tokenizer.chat_template = template
    pin_date(tokenizer)
    eot = end_of_turn(tokenizer)
    if eot is not None and eot != tokenizer.eos_token:
        tokenizer.eos_token = eot
    if model is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.config.eos_token_id = tokenizer.eos_token_id  # as the generation config: the Trainer checks they agree
        complete_stops(model, tokenizer)
    return new_special + new_plain


def embedding_modules(model: Any) -> list[str]:
    """The names (last part) of the model's input embedding and output head: what trains beside LoRA adapters where
    a named template added tokens, since their rows start untrained (peft's `modules_to_save`)."""
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if id(module) in wanted})


def complete_stops(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Make the model's generation config stop at every id it stopped at before, the tokenizer's eos and the
    template's end-of-turn token: generation everywhere (chat, the eval stage, grpo rollouts, held-out answers) reads
    it, and `save_pretrained` keeps it. Returns the stop ids."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    have = config.eos_token_id
    ids = [] if have is None else [have] if isinstance(have, int) else list(have)
    eot = end_of_turn(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    for token_id in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(eot) if eot else None):
        if isinstance(token_id, int) and token_id not in ids and token_id != tokenizer.unk_token_id:
            ids.append(token_id)
    if ids and ids != ([] if have is None else [have] if isinstance(have, int) else list(have)):
        config.eos_token_id = ids[0] if len(ids) == 1 else ids
        logger.debug("generation stops at %s", tokenizer.convert_ids_to_tokens(ids))
    return ids


# --------------------------------------------------------------------------------------------------
# Assistant masks a template does not mark


def derived_masks(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of a conversation whose template has no `{% generation %}` marks and no TRL
    training variant (Llama 3.1/3.2): each assistant turn is the text between the conversation rendered up to it
    with the generation prompt and rendered through it, so the mask covers the turn's content, its end-of-turn token
    and the whitespace the template writes around them, and never a system, user or tool token.

    Raises:
        ValueError: the template is not prefix-preserving (an earlier render is not the start of a later one), so
            no turn can be placed.
    """
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(tokenizer, messages[:i], prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (text.startswith(start) and text.startswith(through) and through.startswith(start)):
            raise ValueError("the chat template renders earlier turns differently as the conversation grows")
        spans.append((len(start), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def derives_masks(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `derived_masks` can place the assistant turns of this template (a fast tokenizer, a template that
    renders earlier turns the same as the conversation grows)."""
    if not getattr(tokenizer, "is_fast", False):
        return False
    probe = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_ANSWER},
             {"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_ANSWER}]  # fmt: skip
    try:
        ids, mask = derived_masks(tokenizer, probe)
    except Exception:
        return False
    return sum(mask) > 0


# --------------------------------------------------------------------------------------------------
# Mixture of experts


def is_moe(config: Any) -> bool:
    text = getattr(config, "text_config", None) or config
    return any(getattr(text, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts"))


def router_loss(config: Any, asked: float | None = None) -> str | None:
    """What the router's load-balancing loss does for an MoE model (None for a dense one): TRL adds it to the loss
    with `train.router_aux_loss_coef` (`asked`), else the config's, and logs it as `aux_loss`."""
    if not is_moe(config):
        return None
    text = getattr(config, "text_config", None) or config
    coef = getattr(text, "router_aux_loss_coef", None) if asked is None else asked
    source = "the config's" if asked is None else "the recipe's"
    if not coef:
        return (f"off: {source} router_aux_loss_coef is 0, so no load-balancing term (the router still learns from "
                "the loss; set train.router_aux_loss_coef to balance the experts)")  # fmt: skip
    return f"on: TRL adds {source} router_aux_loss_coef {coef} x the load-balancing loss, logged as aux_loss"


# --------------------------------------------------------------------------------------------------
# A stage's choice


def use_stage_template(stage: Any, tokenizer: PreTrainedTokenizerBase | None, model: Any = None) -> list[str]:
    """Apply a stage's `chat_template:` (a shipped name or a .jinja file; `own`/unset keeps the model's) to the
    planned tokenizer, or at run time to the loaded tokenizer and model. Either way a dated template is pinned.
    Returns the tokens it added to the tokenizer.

    Raises:
        BadInput: an unknown name or a missing file (found when planning, before any stage trains).
    """
    if tokenizer is None:
        return []
    choice = getattr(stage, "chat_template", None)
    if choice not in (None, "own"):
        added = apply_template(tokenizer, read_template(choice, f"stages.{stage.name}.chat_template"), model)
        if added and model is not None:
            logger.info("chat template %s: added %s to the tokenizer (embeddings resized to %d); eos is %s",
                        choice, ", ".join(added), len(tokenizer), tokenizer.eos_token)  # fmt: skip
        return added
    if pin_date(tokenizer) and model is not None:
        complete_stops(model, tokenizer)
    return []


def describe_template(stage: Any, tokenizer: PreTrainedTokenizerBase, marks: bool | str | None, default: bool) -> str:
    """The plan's line on the chat template: which (`default`: align's own, given to a model without one),
    whether assistant turns can be told apart (`marks`: None where the stage trains no conversations), and what the
    template does (end of turn, injected system prompt, pinned date)."""
    choice = getattr(stage, "chat_template", None) or "own"
    if choice == "own":
        same = None if default else shipped_name(getattr(tokenizer, "chat_template", None))
        label = "align's default (### role: headers)" if default else f"own (TRL's {same})" if same else "own"
    else:
        label = f"{choice} (TRL {trl_version()}'s)" if not choice.endswith(".jinja") else choice
    if marks is not None:
        label += {True: "; marks assistant turns", False: "; assistant turns not marked",
                  "derived": "; no generation marks (align derives the assistant masks)"}[marks]  # fmt: skip
    return f"{label}; {template_facts(tokenizer).describe()}"


def generation_kwargs(model: Any) -> dict[str, Any]:
    """What `generate` needs for this family beyond its settings: an MoE's router logits off. TRL turns
    `output_router_logits` on in the config to train the router; in a cached decode step transformers' load-balancing
    loss then meets one new token per row against the whole attention mask, and fails ("The size of tensor a (2)
    must match the size of tensor b (48)"). Generation never needs the router's loss."""
    config = getattr(model, "config", None)
    return {"output_router_logits": False} if config is not None and hasattr(config, "output_router_logits") else {}


def router_logits_off(model: Any) -> None:
    """Save an MoE as its family releases it, router logits off (training turned them on in its config): any
    `generate` on the saved model (a user's, vLLM's) would otherwise fail at its first cached decode step."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "output_router_logits", False):
        config.output_router_logits = False


def plan_family(stage: Any, plan: Any, added: list[str], adapts: str | None, default: bool) -> None:
    """What a training stage's plan (`StagePlan`) shows of its model's family: the tokens its chat template adds
    (and, with fresh LoRA, the embeddings and head that then train whole), what LoRA adapts, the template
    (`default`: align's own), and an MoE's router loss. (A `thinking:` the template cannot follow is refused by
    align/thinking.py's `refuse_unfollowable`.)"""
    tokenizer, config = plan.tokenizer, plan.config
    if stage.peft is not None and added and plan.start.lora == "new":
        # The rows of the tokens the template added start untrained: the embeddings and head train whole.
        plan.prepared["train_embeddings"] = True
        adapts = (adapts + "; " if adapts else "") + (f"and the embeddings and head whole (modules_to_save): the "
                                                      f"template added {len(added)} tokens")  # fmt: skip
    if adapts is not None:
        plan.details["lora_adapts"] = adapts
    if added:  # what the stage's chat template does to the tokenizer and model, before anything trains
        plan.details["template_tokens"] = (f"adds {', '.join(added)} (the embeddings grow to {len(tokenizer)}); eos "
                                           f"is {tokenizer.eos_token}")  # fmt: skip
    if tokenizer is not None and getattr(tokenizer, "chat_template", None) and "chat_template" not in plan.details:
        # Every kind that renders conversations shows its template (sft adds whether it marks assistant turns).
        plan.details["chat_template"] = describe_template(stage, tokenizer, None, default)
    if config is not None:
        router = router_loss(config, stage.train.get("router_aux_loss_coef"))
        if router is not None:
            plan.details["router_aux_loss"] = router
