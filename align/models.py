"""Model and tokenizer loading: hub id, local `save_pretrained` directory, `@stage`, or from scratch.

From scratch means an architecture built from a config (`model_type` plus size overrides) and a
byte-level BPE tokenizer trained on the stage's training text; both are saved with the stage's model,
so every later stage reuses the same tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import BadInput, closest, unknown_key_message
from align.recipe import ScratchModel

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"


def is_local_model(ref: str) -> bool:
    return Path(ref).expanduser().is_dir()


def hub_config(ref: str, where: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of a hub or local model: a cheap check that it can be loaded at all.

    Raises:
        BadInput: the model is neither a local directory nor reachable/cached on the hub.
    """
    from transformers import AutoConfig

    from align.runtime import hub_offline

    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if hub_offline():
            reason = "not in the local Hugging Face cache, and the hub is offline"
        else:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BadInput(
            f"{where}: cannot load model '{ref}': {reason}",
            hint="download it on a connected machine (huggingface-cli download MODEL), or set `model:` to a local "
            "directory holding a save_pretrained model and tokenizer",
        ) from None


def scratch_config(spec: ScratchModel, where: str, vocab_size: int | None = None) -> PretrainedConfig:
    """A config for `model_type` with the recipe's overrides, each checked against the config class.

    Raises:
        BadInput: an unknown model type or an override the config class does not have.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    if spec.model_type not in CONFIG_MAPPING:
        guess = closest(spec.model_type, CONFIG_MAPPING.keys())
        raise BadInput(
            f"{where}.model_type: unknown '{spec.model_type}'" + (f" (did you mean '{guess}'?)" if guess else "")
        )
    overrides = dict(spec.model_extra or {})
    base = AutoConfig.for_model(spec.model_type)
    known = set(base.to_dict()) | set(getattr(base, "attribute_map", {}))
    problems = [unknown_key_message(f"{where} ({type(base).__name__})", k, known) for k in overrides if k not in known]
    if problems:
        raise BadInput(problems)
    overrides["vocab_size"] = vocab_size or spec.vocab_size
    # Our tokenizer's one special token, <|endoftext|>, is id 0: bos, eos and pad all point at it.
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        overrides.setdefault(name, 0)
    return AutoConfig.for_model(spec.model_type, **overrides)


def model_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings allow, where it has a limit."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer (GPT-2 style) trained on the given text, with `<|endoftext|>` as eos/bos/pad."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS)
    logger.info("trained a byte-level BPE tokenizer: %d tokens", len(tokenizer))
    return tokenizer


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    """A hub or local tokenizer, with a pad token set (to eos, else unk) where it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
            logger.debug("tokenizer has no pad token: using %r", fallback)
    return tokenizer


def build_model(
    ref: str | ScratchModel, where: str, texts: Iterable[str] | None, dtype: Any = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or build) the model and tokenizer a stage starts from.

    `ref` is a local directory or hub id (stage references are resolved to directories by the pipeline),
    or a `ScratchModel`, which needs the training `texts` for its tokenizer.

    Raises:
        BadInput: the model cannot be found or its config is wrong.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(ref, ScratchModel):
        if texts is None:
            raise BadInput(f"{where}: a from-scratch model needs training text for its tokenizer")
        tokenizer = train_tokenizer(texts, ref.vocab_size)
        config = scratch_config(ref, where, vocab_size=len(tokenizer))
        model = AutoModelForCausalLM.from_config(config)
        logger.info("built %s from scratch: %.2fM parameters", ref.model_type, model.num_parameters() / 1e6)
        return model, tokenizer

    hub_config(ref, where)  # fails fast, with a clear message, when the model cannot be had
    tokenizer = load_tokenizer(ref)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    logger.info("loaded %s: %.2fM parameters", ref, model.num_parameters() / 1e6)
    return model, tokenizer


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """Weights as safetensors, config and tokenizer: a directory any later stage or user can load."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
