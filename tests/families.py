"""Tiny models of the families users post-train, shaped like each family's instruct release.

Each is built from its config (2 layers, a few hundred parameters wide) with a byte-level BPE tokenizer trained on
the fixture text, the family's special tokens (thinking and tool-call tags as plain added tokens, as the real
tokenizers have them), eos and pad as the family sets them, a BOS the tokenizer adds itself where the family's does,
every stop id in `generation_config.json`, and the family's real chat template read from the installed TRL (never
copied into this repository). Nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "max_position_embeddings": 256}  # fmt: skip


@dataclass(frozen=True)
class Family:
    """How one family's instruct release sets up its tokenizer and config.

    `template`: the name of TRL's shipped template (`trl/chat_templates/<name>.jinja`), None for a base model.
    `specials`: added special tokens; `plain`: added tokens that are not special (Qwen's `<think>`, `<tool_call>`).
    `eos`/`pad`/`bos`: the tokens the tokenizer names (pad None: the release has none). `adds_bos`: the tokenizer's
    post-processor puts BOS first. `stops`: every id the release's generation_config stops at, as tokens. `eot`: the
    end-of-turn token chat stops at.
    """

    name: str
    model_type: str
    template: str | None
    specials: tuple[str, ...]
    eos: str
    eot: str
    stops: tuple[str, ...]
    pad: str | None = None
    bos: str | None = None
    adds_bos: bool = False
    plain: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)


QWEN_PLAIN = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
FAMILIES = {
    "gpt2": Family("gpt2", "gpt2", None, ("<|endoftext|>",), "<|endoftext|>", "<|endoftext|>", ("<|endoftext|>",),
                   pad=None, bos="<|endoftext|>",
                   config={"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 256}),
    "llama3": Family("llama3", "llama", "llama3",
                     ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eom_id|>", "<|eot_id|>"),
                     "<|eot_id|>", "<|eot_id|>", ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
                     pad=None, bos="<|begin_of_text|>", adds_bos=True),
    "qwen2_5": Family("qwen2_5", "qwen2", "qwen2_5", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                      "<|im_end|>", "<|im_end|>", ("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>",
                      plain=QWEN_PLAIN[:4]),
    "qwen3": Family("qwen3", "qwen3", "qwen3", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                    "<|im_end|>", "<|im_end|>", ("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>",
                    plain=QWEN_PLAIN, config={"head_dim": 16}),
    "gemma3": Family("gemma3", "gemma3_text", "gemma3", ("<pad>", "<eos>", "<bos>", "<start_of_turn>",
                                                         "<end_of_turn>"),
                     "<eos>", "<end_of_turn>", ("<eos>", "<end_of_turn>"), pad="<pad>", bos="<bos>", adds_bos=True,
                     config={"head_dim": 16, "sliding_window": 64}),
    "phi3": Family("phi3", "phi3", "phi3", ("<s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>",
                                            "<|user|>"),
                   "<|endoftext|>", "<|end|>", ("<|endoftext|>", "<|assistant|>", "<|end|>"), pad="<|endoftext|>",
                   bos="<s>", adds_bos=True),
    "qwen3_moe": Family("qwen3_moe", "qwen3_moe", "qwen3", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                        "<|im_end|>", "<|im_end|>", ("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>",
                        plain=QWEN_PLAIN,
                        config={"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 32, "decoder_sparse_step": 1,
                                "router_aux_loss_coef": 0.01}),
}  # fmt: skip

WORDS = ["red", "blue", "green", "apple", "river", "stone", "light", "quick", "slow", "seven", "three", "answer",
         "question", "model", "token"]  # fmt: skip


def conversations(n: int = 160, seed: int = 0) -> list[dict[str, Any]]:
    """System + user + assistant rows: the assistant repeats the user's last word, a task a tiny model learns."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 5))  # rows of different lengths: batches are padded
        rows.append({"messages": [
            {"role": "system", "content": "You repeat the last word."},
            {"role": "user", "content": " ".join(words)},
            {"role": "assistant", "content": words[-1]},
        ]})  # fmt: skip
    return rows


def pairs(n: int = 80, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        rows.append({
            "prompt": [{"role": "user", "content": " ".join(words)}],
            "chosen": [{"role": "assistant", "content": words[-1]}],
            "rejected": [{"role": "assistant", "content": words[0]}],
        })  # fmt: skip
    return rows


def prompts(n: int = 40, seed: int = 2) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        rows.append({"prompt": [{"role": "user", "content": " ".join(words)}], "answer": words[-1]})
    return rows


def write_data(directory: Path) -> dict[str, Path]:
    """conv.jsonl, pairs.jsonl and prompts.jsonl in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, rows in (("conv", conversations()), ("pairs", pairs()), ("prompts", prompts())):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = path
    return out


def trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def build_tokenizer(family: Family) -> Any:
    """A byte-level BPE trained on the fixture text, with the family's special and plain added tokens."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    text = [json.dumps(r) for r in conversations() + pairs()] + WORDS
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=400, min_frequency=1, special_tokens=list(family.specials),
                            show_progress=False)  # fmt: skip
    if family.adds_bos:
        bos_id = bpe.token_to_id(family.bos)
        bpe._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A $B", special_tokens=[(family.bos, bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=family.eos, pad_token=family.pad,
                                        bos_token=family.bos)  # fmt: skip
    if family.plain:
        tokenizer.add_tokens(list(family.plain))
    if family.template is not None:
        tokenizer.chat_template = trl_template(family.template)
    return tokenizer


def build(family_name: str, directory: Path) -> Path:
    """The family's tiny model, tokenizer and generation config saved in `directory`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    family = FAMILIES[family_name]
    tokenizer = build_tokenizer(family)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*family.specials, *family.plain)}
    stops = [ids[t] for t in family.stops]
    options = dict(SMALL) if family.model_type != "gpt2" else {}
    options.update(family.config)
    config = AutoConfig.for_model(
        family.model_type, vocab_size=len(tokenizer), eos_token_id=stops[0] if len(stops) == 1 else stops,
        bos_token_id=ids.get(family.bos) if family.bos else None,
        pad_token_id=ids.get(family.pad) if family.pad else None, tie_word_embeddings=True, **options,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=stops, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def widened(model: Path, directory: Path, positions: int) -> Path:
    """A copy of a built model with more positions (a rotary model's weights do not depend on them)."""
    import shutil

    shutil.copytree(model, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))
    return directory


# A tool the `caller` below is taught to call; `lookup_tool(raises=True)` raises in every other call (the count lives
# in the module a stage imports from the recipe's folder). One schema either way: the caller's calls follow its text.
LOOKUP = '''
CALLS = []


def lookup(word: str) -> str:
    """Look a word up in the dictionary.

    Args:
        word: The word to look up.
    """
    CALLS.append(word)
    if {raises} and len(CALLS) % 2 == 0:
        raise RuntimeError("the dictionary is out of pages")
    return word.upper()
'''


def lookup_tool(raises: bool = False) -> str:
    """The source of a module holding `lookup`, to write beside a recipe."""
    return LOOKUP.format(raises=raises)


def caller(
    model: Path, directory: Path, tool: Any, arguments: dict[str, Any], steps: int = 100, reply: str | None = None
) -> Path:
    """A copy of a built model taught, in about 5 s, to answer every prompt with one call of `tool` (a Python function;
    its schema in the prompt as TRL renders it) with `arguments`: a real policy that calls, for tests of what happens
    to the calls (a tool that raises), where learning when to call is not the point. Only the assistant turn as the
    family's template writes it is trained. 100 steps: sampled at temperature 0.5 every answer to 40 unseen prompts
    was the call (at 1.0, 30 of 40 after 120 steps; measured 2026-12-07). `reply`: that text instead of the call
    (a call TRL cannot parse, say)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(model, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    call = {"type": "function", "function": {"name": tool.__name__, "arguments": arguments}}
    rows = []
    for row in prompts(n=40, seed=5):  # not the fixture's own prompts: the stage answers prompts it never saw
        head = tokenizer.apply_chat_template(row["prompt"], tools=[tool], add_generation_prompt=True, tokenize=False)
        answer = (
            {"role": "assistant", "content": "", "tool_calls": [call]}
            if reply is None
            else {"role": "assistant", "content": reply}
        )
        whole = tokenizer.apply_chat_template([*row["prompt"], answer], tools=[tool], tokenize=False)
        assert whole.startswith(head), "the template is not prefix-preserving"
        ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        target = tokenizer(whole[len(head) :].rstrip("\n"), add_special_tokens=False)["input_ids"]
        rows.append((ids + target, [-100] * len(ids) + target))
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(directory)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    batch_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = (torch.arange(width) < torch.tensor([len(ids) for ids, _ in rows])[:, None]).long()
    policy.train()
    for step in range(steps):
        picked = torch.arange(8) + 8 * (step % 5)
        loss = policy(input_ids=batch_ids[picked], attention_mask=mask[picked], labels=labels[picked]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    policy.save_pretrained(directory, safe_serialization=True)
    return directory
