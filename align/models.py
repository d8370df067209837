"""Model and tokenizer loading: hub id, local `save_pretrained` directory, `@stage`, or from scratch.

From scratch means an architecture built from a config (`model_type` plus size overrides) and a
byte-level BPE tokenizer trained on the stage's training text; both are saved with the stage's model,
so every later stage reuses the same tokenizer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import BadInput, StageFailed, closest, unknown_key_message
from align.families import complete_stops, pin_date
from align.recipe import ScratchModel

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"


def is_local_model(ref: str) -> bool:
    return Path(ref).expanduser().is_dir()


def looks_like_path(ref: str) -> bool:
    """Whether a `model:` can only mean a directory: `./x`, `../x`, `/x`, `~/x`, `a/b/c` or `x/` (a hub id is `name`
    or `org/name`)."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or ref.endswith(("/", os.sep))


def hub_config(ref: str, where: str, trust_remote_code: bool = False, base_dir: Path | None = None) -> PretrainedConfig:
    """The config of a hub or local model: a cheap check that it can be loaded at all.

    `base_dir` is the recipe's folder: where, with the working directory, a local path was looked for (the recipe
    made found ones absolute), so that a missing one can be named with both places.

    Raises:
        BadInput: the model is neither a local directory nor reachable/cached on the hub.
    """
    from transformers import AutoConfig

    from align.recipe import search_paths
    from align.runtime import hub_offline

    places = " and ".join(map(str, search_paths(ref, base_dir or Path.cwd())))
    if looks_like_path(ref) and not is_local_model(ref):
        raise BadInput(
            f"{where}: '{ref}': no such directory (looked in {places})",
            hint="a relative `model:` path is looked for in the recipe's folder, then the working directory",
        )
    if is_adapter_dir(ref):
        # LoRA adapters hold no config of their own: what must load is the base they name.
        base = adapter_base(ref)
        if not base:
            raise BadInput(f"{where}: '{ref}' holds LoRA adapters but its adapter_config.json names no base model")
        return hub_config(base, f"{where} (the base model of the adapters in {ref})", trust_remote_code, base_dir)
    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if is_local_model(ref):
            raise BadInput(
                f"{where}: cannot load model from directory '{ref}': {first}",
                hint="a local `model:` is a directory written by save_pretrained (config.json, safetensors weights, "
                "tokenizer)",
            ) from None
        if hub_offline():
            first = (
                "not in the local Hugging Face cache, the hub is offline, and there is no local directory of that "
                f"name either (looked in {places})"
            )
        raise BadInput(
            f"{where}: cannot load model '{ref}': {first}",
            hint=f"download it on a connected machine (hf download {ref}), or name a local directory "
            "holding a save_pretrained model and tokenizer",
        ) from None


def scratch_config(spec: ScratchModel, where: str, vocab_size: int | None = None) -> PretrainedConfig:
    """A config for `model_type` with the recipe's overrides, each checked against the config class.

    Raises:
        BadInput: an unknown model type or an override the config class does not have.
    """
    from huggingface_hub.errors import StrictDataclassError  # how transformers' configs refuse values
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
    try:
        return AutoConfig.for_model(spec.model_type, **overrides)
    except (TypeError, ValueError, StrictDataclassError) as exc:
        raise BadInput(config_problem(exc, where, dict(spec.model_extra or {}))) from None


def config_problem(exc: Exception, where: str, given: dict[str, Any]) -> str:
    """A config class's refusal as one line naming the recipe's key and giving the library's own reason: a field's
    type error names its key; a check of several fields (heads that do not divide the hidden size) names the keys
    whose values the reason quotes, or the model alone."""
    import re

    reason = exc.__cause__ or exc
    # "... doesn't match any type in (<class 'int'>, <class 'NoneType'>). Errors: <the same, per type>"
    text = " ".join(str(reason).split()).split(". Errors:")[0]
    text = re.sub(r"<class '(\w+)'>", r"\1", text)
    field = re.search(r"field '(\w+)'", str(exc))
    if field is not None:
        keys = [field.group(1)]
    else:
        quoted = set(re.findall(r"\(([^()]+)\)", text))
        keys = [k for k, v in given.items() if str(v) in quoted]
    named = ", ".join(f"{where}.{k}" for k in keys) if keys else where
    return f"{named}: {text}"


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


def as_reloaded(
    tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, sample: list[str]
) -> PreTrainedTokenizerBase:
    """A from-scratch tokenizer as `AutoTokenizer` gives it back once saved beside `config`, where that differs.

    transformers 5 rebuilds the tokenizer of some model types (qwen2, phi3, ...) from the saved vocabulary with the
    type's own pre-tokenizer, whatever `tokenizer.json` holds: Qwen2's splits digits one by one, where the trained
    byte-level one keeps " 876" whole. A stage that trained on the tokenizer as built would be read back by every
    later stage (and every user) with other ids. Where the two tokenize `sample` and a probe of digits, punctuation,
    spacing and accents alike (GPT-2's), it is kept as it is: the probe covers what a sample of prose may lack.
    """
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        config.save_pretrained(folder)
        reloaded = AutoTokenizer.from_pretrained(folder)
    probe = "What is 876 * 530?  It's 464,280 (12.5%) — café\n\tdone"
    if all(tokenizer(t)["input_ids"] == reloaded(t)["input_ids"] for t in [*sample, probe]):
        return tokenizer
    logger.info("%s tokenizers reload with %s's own pre-tokenizer: the stage trains on the tokenizer as it reloads",
                config.model_type, type(reloaded).__name__)  # fmt: skip
    return reloaded


def load_tokenizer(ref: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A hub or local tokenizer, with a pad token set (to eos, else unk) where it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
            logger.debug("tokenizer has no pad token: using %r", fallback)
    pin_date(tokenizer)
    return tokenizer


def build_model(
    ref: str | ScratchModel,
    where: str,
    texts: Callable[[], Iterable[str]] | None = None,
    dtype: Any = None,
    trust_remote_code: bool = False,
    planned: tuple[PreTrainedTokenizerBase, PretrainedConfig] | None = None,
    reward_head: bool = False,
    loading: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or build) the model and tokenizer a stage starts from.

    `ref` is a local directory or hub id (stage references are resolved to directories by the pipeline),
    or a `ScratchModel`, built on the `planned` tokenizer and config where the stage's plan made them, else on a
    tokenizer trained on `texts()` (called only then: reading every row of a large set costs seconds that a
    pretrained model should not pay).

    `reward_head` (an rm stage): the same body with a sequence-classification head of one output, a new head
    (initialised from the seed) on a causal LM; LoRA adapters are loaded onto that body (their module names are the
    body's, so they fit it as they fit the causal LM). `loading`: the stage's `loading:` (`align.recipe.Loading`),
    its options passed to `from_pretrained` / `from_config`; its dtype, where given, replaces `dtype`.

    Raises:
        BadInput: the model cannot be found or its config is wrong.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto: Any = AutoModelForCausalLM
    extra: dict[str, Any] = {}
    if reward_head:
        auto, extra = AutoModelForSequenceClassification, {"num_labels": 1}
    options = loading_kwargs(loading)
    dtype = options.pop("dtype", dtype)
    extra.update(options)

    if isinstance(ref, ScratchModel):
        if planned is not None:
            tokenizer, config = planned
        elif texts is not None:
            sample = list(texts())
            tokenizer = train_tokenizer(sample, ref.vocab_size)
            config = scratch_config(ref, where, vocab_size=len(tokenizer))
            tokenizer = as_reloaded(tokenizer, config, sample[:64])
        else:
            raise BadInput(f"{where}: a from-scratch model needs training text for its tokenizer")
        if reward_head:
            config = copy.deepcopy(config)
            config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
        model = auto.from_config(config, **({"dtype": dtype} if dtype not in (None, "auto") else {}), **options)
        logger.info("built %s from scratch: %.2fM parameters", ref.model_type, model.num_parameters() / 1e6)
        return model, tokenizer

    if is_adapter_dir(ref):
        # LoRA adapters from an earlier stage: the base model with the adapters on top, still trainable.
        from peft import AutoPeftModelForCausalLM

        tokenizer = load_tokenizer(ref)
        if reward_head:
            from peft import PeftModel

            with quiet_new_head(reward_head):
                body = auto.from_pretrained(adapter_base(ref), dtype=dtype, use_safetensors=True, **extra)
            model = PeftModel.from_pretrained(body, ref, is_trainable=True)
        else:
            model = AutoPeftModelForCausalLM.from_pretrained(ref, is_trainable=True, dtype=dtype, **options)
        logger.info("loaded LoRA adapters from %s on %s", ref, model.peft_config["default"].base_model_name_or_path)
        complete_stops(model, tokenizer)
        return model, tokenizer

    hub_config(ref, where, trust_remote_code)  # fails fast, with a clear message, when the model cannot be had
    tokenizer = load_tokenizer(ref, trust_remote_code)
    if trust_remote_code:
        logger.warning("%s: trust_remote_code is on: the model repository's own Python code runs here", ref)
    try:
        # Safetensors only: pickled (.bin) weights can run arbitrary code when they are loaded.
        with quiet_new_head(reward_head):
            model = auto.from_pretrained(
                ref, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **extra
            )
    except OSError as exc:
        if "safetensors" not in str(exc):
            raise
        raise StageFailed(
            f"{where}: '{ref}' has no safetensors weights; align does not load pickled (.bin) weights",
            hint="convert them once (transformers: load, then save_pretrained(..., safe_serialization=True)) and "
            "point `model:` at the converted directory",
        ) from None
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    complete_stops(model, tokenizer)
    if "quantization_config" in options:
        from peft import prepare_model_for_kbit_training

        # QLoRA: the quantized base frozen, its norms in float32, inputs requiring grad for checkpointing.
        model = prepare_model_for_kbit_training(model)
    logger.info("loaded %s: %.2fM parameters", ref, model.num_parameters() / 1e6)
    return model, tokenizer


def loading_kwargs(loading: Any) -> dict[str, Any]:
    """A stage's `loading:` as `from_pretrained` keywords (none for an unset one)."""
    if loading is None:
        return {}
    out: dict[str, Any] = {}
    if loading.attn_implementation is not None:
        out["attn_implementation"] = loading.attn_implementation
    if loading.dtype is not None:
        import torch

        out["dtype"] = "auto" if loading.dtype == "auto" else getattr(torch, loading.dtype)
    if loading.quantization is not None:
        import torch
        from transformers import BitsAndBytesConfig

        out["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
            if loading.quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True)
        )  # fmt: skip
    return out


def loading_problems(loading: Any, where: str) -> BadInput | None:
    """What this machine cannot do of a stage's `loading:`, found when planning (before any stage trains)."""
    if loading is None:
        return None
    import importlib.util

    import torch

    problems, hints = [], []
    if loading.quantization is not None:
        if not torch.cuda.is_available():
            problems.append(f"{where}.quantization: bitsandbytes {loading.quantization} quantization needs a CUDA "
                            "GPU, and this machine has none")  # fmt: skip
            hints.append("remove loading.quantization: LoRA trains on the unquantized model here")
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"{where}.quantization: bitsandbytes is not installed")
            hints.append("pip install bitsandbytes")
    if (loading.attn_implementation or "").startswith("flash_attention"):
        if not torch.cuda.is_available():
            problems.append(f"{where}.attn_implementation: {loading.attn_implementation} needs a CUDA GPU, and this "
                            "machine has none")  # fmt: skip
            hints.append("attn_implementation: sdpa (or eager) runs everywhere")
        elif importlib.util.find_spec("flash_attn") is None and loading.attn_implementation == "flash_attention_2":
            problems.append(f"{where}.attn_implementation: flash_attention_2 needs the flash-attn package")
            hints.append("pip install flash-attn --no-build-isolation, or attn_implementation: sdpa")
    return BadInput(problems, hint="; ".join(hints)) if problems else None


@contextlib.contextmanager
def quiet_new_head(reward_head: bool) -> Iterator[None]:
    """Loading a causal LM as a reward model, transformers warns with a table that `score.weight` is MISSING and
    "newly initialized": that is the point of an rm stage, so its load report stays out of the console (a head
    that was saved, a reward model loaded as a judge, has nothing missing to report)."""
    if not reward_head:
        yield
        return
    loader = logging.getLogger("transformers.modeling_utils")
    level = loader.level
    loader.setLevel(logging.ERROR)
    try:
        yield
    finally:
        loader.setLevel(level)
    logger.debug("reward head: loaded or newly initialised from the seed (a causal LM's body has no score head)")


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """Weights as safetensors, config and tokenizer: a directory any later stage or user can load."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    readable_weights(directory)


def readable_weights(directory: Path) -> None:
    """Give the saved weights the permissions the rest of the folder has (the umask's): transformers 5 writes
    `*.safetensors` owner-only (0600), so a server running as another user (vLLM, a container) could not read
    them."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for weights in directory.glob("*.safetensors"):
        weights.chmod(0o666 & ~umask)


# --------------------------------------------------------------------------------------------------
# Chat templates

# Set on tokenizers that have none (base GPT models, from-scratch models) and saved with the model, so later
# stages and users render prompts the same way. Role headers are plain text, so no embedding grows; the
# `{% generation %}` markers let TRL train on assistant turns only.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '### assistant:\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '### ' + message['role'] + ':\n' + message['content'] + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### assistant:\n' }}{%- endif -%}"
)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """Give the tokenizer a chat template if it has none; return which one it uses ('own' or 'default')."""
    if getattr(tokenizer, "chat_template", None):
        return "own"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    logger.info("the tokenizer has no chat template: using align's default (### role: headers), saved with the model")
    return "default"


def marks_assistant_turns(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether assistant tokens can be told apart: the template has generation markers, or TRL can add them."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return True
    try:
        return get_training_chat_template(tokenizer) is not None
    except Exception:  # TRL raises for templates it does not know how to patch
        return False


# --------------------------------------------------------------------------------------------------
# Packing


def attention_separates_sequences(model: PreTrainedModel) -> bool:
    """Whether the model keeps packed sequences apart when given restarting position ids.

    Padding-free packing puts several sequences in one row and relies on the attention to read sequence
    boundaries from `position_ids`. Some attention implementations do (flash attention, transformers'
    packed-mask detection); others let every token see the previous sequence, and models with learned
    positions may not accept the layout at all. So we ask the model: the second sequence's logits must be
    the same alone and packed behind another one, and must not move when the sequence before it changes.

    The probe runs the forward pass as TRL's SFT trains, without a KV cache (`use_cache=False`): transformers
    reads packed boundaries from `position_ids` only when there is no cache, so a probe that followed the
    config's `use_cache` answered differently for the same architecture saved by align (`use_cache: false`) and
    loaded from the hub (`true`), and two stages on one model gave two reasons for packing being off.
    """
    import torch

    was_training = model.training
    model.eval()
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab, (1, 7), generator=generator)
    other = torch.randint(0, vocab, (1, 7), generator=generator)
    second = torch.randint(0, vocab, (1, 5), generator=generator)
    device = next(model.parameters()).device
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)

    def logits(ids: Any, position_ids: Any) -> Any:
        try:
            return model(input_ids=ids.to(device), position_ids=position_ids, use_cache=False).logits.float()
        except TypeError:  # a model whose forward takes no `use_cache` has no cache to turn off
            return model(input_ids=ids.to(device), position_ids=position_ids).logits.float()

    try:
        with torch.no_grad():
            alone = logits(second, torch.arange(5, device=device)[None])
            packed = logits(torch.cat([first, second], dim=1), positions)[:, 7:]
            behind_other = logits(torch.cat([other, second], dim=1), positions)[:, 7:]
        # Same shapes, so separated samples give the same numbers whatever precedes them; a leak moves them by
        # far more than rounding, however small the model's weights.
        scale = max(1.0, float(alone.abs().max()))
        unmoved = float((packed - behind_other).abs().max()) <= 1e-5 * scale
        return unmoved and bool(torch.allclose(alone, packed, atol=1e-3 * scale, rtol=1e-3))
    except Exception as exc:  # the model rejects the layout: no packing for it
        logger.debug("packing probe failed: %s", exc)
        return False
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# LoRA


def is_adapter_dir(ref: str) -> bool:
    return (Path(ref).expanduser() / "adapter_config.json").is_file()


def adapter_base(ref: str) -> str | None:
    """The base model a directory of LoRA adapters names in its `adapter_config.json` (a hub id or directory)."""
    import json

    config = json.loads((Path(ref).expanduser() / "adapter_config.json").read_text())
    return config.get("base_model_name_or_path")


def lora_target_problems(settings: Any, config: Any, where: str, task_type: str = "CAUSAL_LM") -> BadInput | None:
    """A `target_modules` entry that names no module of the model, found before anything trains (peft finds it
    only when the stage starts, after the earlier stages trained): the model built from its config on the meta
    device (no weights, no memory), each name matched as peft matches it (the full name, or its last parts); a
    string other than 'all-linear' is a regular expression over full names. None where all match, or where the
    model cannot be built without weights (peft then checks at the start of the stage)."""
    import re

    targets = settings.target_modules
    if targets == "all-linear" or config is None:
        return None
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
        with torch.device("meta"):
            model = auto.from_config(config)
    except Exception as exc:  # remote code, an architecture transformers cannot build from a config alone
        logger.debug("%s: not checked before the stage (%s)", where, exc)
        return None
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if not missing:
        return None
    from transformers.pytorch_utils import Conv1D

    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)}
    linear = sorted(leaves - {"lm_head", "score"})  # the head: peft's all-linear leaves it out too
    hint = f"its linear layers: target_modules: [{', '.join(linear)}] (or all-linear)"
    experts = expert_parameters(model)
    if experts:
        hint += f"; its experts are parameters, not layers: peft.target_parameters: [{', '.join(experts)}]"
    return BadInput(f"{where}: {', '.join(map(repr, missing))}: no module of {type(model).__name__} is named so",
                    hint=hint)  # fmt: skip


def expert_parameters(model: Any) -> list[str]:
    """The names (past the layer index) of an MoE's expert weights held as 3-D parameters, not linear layers
    (transformers 5 fuses each layer's experts: `mlp.experts.gate_up_proj`), which peft adapts through
    `target_parameters`."""
    import re

    names = {
        re.sub(r"^.*?\.layers\.\d+\.", "", n) for n, p in model.named_parameters() if p.dim() == 3 and ".layers." in n
    }
    return sorted(names)


def lora_adapts(settings: Any, config: Any, task_type: str = "CAUSAL_LM", where: str = "peft") -> str | None:
    """What a stage's LoRA adapts, by layer name, read from peft applied to the model built on the meta device (no
    weights): on an MoE, whether the experts (3-D parameters) and the router are among them. None where the model
    cannot be built from its config.

    Where peft wraps expert parameters, which it does only without dropout, align's default dropout becomes 0
    (`settings` is changed, and the line says so); a dropout the recipe sets is refused.

    Raises:
        BadInput: peft refuses the settings (a recipe's dropout on experts).
    """
    try:
        import torch
        from peft import get_peft_model
        from peft.tuners.lora import LoraLayer
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
        with torch.device("meta"):
            base = auto.from_config(config)
            experts = expert_parameters(base)
            model = get_peft_model(base, lora_config(settings, task_type))
    except ValueError as exc:
        if "dropout" not in str(exc) or not settings.dropout:
            raise BadInput(f"{where}: peft cannot adapt this model as asked: {exc}") from None
        # peft adapts 3-D expert parameters (an MoE's, through `target_parameters` or all-linear) only without
        # dropout: the recipe's own dropout is refused, align's default gives way.
        if "dropout" in settings.model_fields_set:
            raise BadInput(
                f"{where}.dropout: {settings.dropout}: peft adapts this MoE's experts only without dropout",
                hint="peft.dropout: 0, or target_modules naming only linear layers (the attention projections)",
            ) from None
        settings.dropout = 0.0
        shown = lora_adapts(settings, config, task_type, where)
        return f"{shown}; dropout 0 (align: peft adapts an MoE's experts only without dropout)" if shown else None
    except Exception as exc:  # remote code, an architecture transformers cannot build from a config alone
        logger.debug("LoRA targets not listed before the stage (%s)", exc)
        return None
    import re

    adapted = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            short = re.sub(r"^.*\.\d+\.", "", name).replace(".base_layer", "")
            parameter = getattr(module, "parameter_name", None)
            adapted.add(f"{short}.{parameter}" if parameter else short)
    shown = ", ".join(sorted(adapted)) or "nothing"
    left = [e for e in experts if e not in adapted]
    if left:
        shown += f" (not the experts' {', '.join(left)}: add them to peft.target_parameters)"
    return shown


def lora_config(settings: Any, task_type: str = "CAUSAL_LM", embeddings: list[str] | None = None) -> Any:
    """peft's LoraConfig from a stage's `peft:`; `task_type` "SEQ_CLS" (an rm stage) also trains and saves the new
    score head (peft adds it to `modules_to_save`); `embeddings`: the embedding and head modules that train and save
    whole beside the adapters (a named chat template added tokens, whose rows start untrained), kept tied where the
    model ties them. peft's `trainable_token_indices` would train only those rows, but TRL's chunked LM head reads
    the head's `bias`, which peft's token wrapper lacks (TRL 1.16, peft 0.21: the first step fails)."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type=task_type,
        # peft's target_parameters where given (`settings` may be any object with the LoRA fields)
        **({"target_parameters": targets} if (targets := getattr(settings, "target_parameters", None)) else {}),
        **({"modules_to_save": embeddings, "ensure_weight_tying": True} if embeddings else {}),
    )


def save_trained(
    model: Any, tokenizer: PreTrainedTokenizerBase, directory: Path, merge: bool, base_ref: str | None
) -> str:
    """Save a stage's model: full weights, adapters only, or adapters merged into the base. Returns which.

    Adapters record where their base model is (`base_ref`: a hub id or a directory, made absolute). A base built
    from scratch exists nowhere else, so it is saved beside the adapters, in `base/`.
    """
    import json

    from peft import PeftModel

    from align.families import router_logits_off

    router_logits_off(model)
    directory.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, PeftModel):
        save_model(model, tokenizer, directory)
        return "full"
    if merge:
        save_model(model.merge_and_unload(), tokenizer, directory)
        return "merged"
    # The trained adapters only: continuing on earlier adapters, TRL's DPO adds a frozen copy named "ref".
    model.save_pretrained(directory, selected_adapters=[model.active_adapter])
    tokenizer.save_pretrained(directory)
    # Where generation stops (a named template's end-of-turn token among them): peft saves no generation config (a
    # reward model generates nothing, and has none).
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    readable_weights(directory)
    if base_ref is None:
        save_model(model.unload(), tokenizer, directory / "base")
        base_ref = str((directory / "base").resolve())
    elif Path(base_ref).is_dir():
        base_ref = str(Path(base_ref).resolve())
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_ref
    config_path.write_text(json.dumps(config, indent=2))
    return "adapter"
