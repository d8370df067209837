"""`align chat MODEL`: talk to a trained model, its tokens streamed as they are generated.

MODEL is a `model/` directory, a stage folder, or a run directory (`--stage NAME`; by default its last completed
lm, sft or dpo stage). Prompts are rendered the way the model was trained (`model/align_prompts.json`, see
align/saved.py): through the chat template for a model trained on message lists; as the plain concatenation of
the turns for one trained on string prompts or text, which never saw a chat template.

`--prompt TEXT` answers once and exits (the answer alone on stdout); `--compare RUN_DIR --prompt TEXT` answers it
with every policy stage's model of a run, one after another. Exit codes: 0, or 2 for bad input (one `error:` line).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from align.errors import AlignError, BadInput, print_error
from align.tools import BUILTIN_TOOLS

if TYPE_CHECKING:
    from align.prompt_format import PromptFormat
    from align.saved import SavedModel

logger = logging.getLogger(__name__)

COMMANDS = "/reset clears the conversation, /system TEXT sets a system prompt, /exit (or Ctrl-D, Ctrl-C) ends"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or more, not {value}")
    return value


def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {value}")
    return value


def build_parser(prog: str = "align chat") -> argparse.ArgumentParser:
    """The parser of `align chat` (no heavy import: `--help` is instant)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Chat with a trained model, prompts rendered as in its training; tokens stream as generated. "
        f"In the chat: {COMMANDS}.",
    )
    parser.add_argument("model", nargs="?", type=Path, help="a model/ directory, a stage folder or a run directory")
    parser.add_argument(
        "--stage", help="the run directory's stage (default: its last completed stage that makes a policy, not an rm)"
    )
    parser.add_argument(
        "--prompt", help=r"answer this prompt once and exit (the answer alone on stdout); \n is a new line"
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="RUN_DIR",
        help="answer --prompt with the model of every stage of this run that makes a policy, one after another",
    )
    parser.add_argument("--system", help="a system prompt to start with (the chat's /system sets it too)")
    parser.add_argument(
        "--temperature",
        type=_temperature,
        help="0 for greedy (default 0.7; with --compare 0, so that the answers differ by model, not by sampling)",
    )
    parser.add_argument("--top-p", type=_top_p, default=0.9, help="nucleus sampling's mass (default 0.9)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=256, help="per answer (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument(
        "--tools",
        action="append",
        metavar="TOOL",
        help="a tool the model may call: FILE.py (its public functions), FILE.py:NAME, module:NAME or a builtin "
        f"({', '.join(BUILTIN_TOOLS)}); repeat it for more. Each call and its result are shown on stderr",
    )
    parser.add_argument(
        "--no-tools",
        action="store_true",
        help="chat without the tools the model was trained to call (by default chat runs them, as its "
        "align_prompts.json records them)",
    )
    parser.add_argument(
        "--thinking",
        choices=("on", "off"),
        help="a thinking template's switch (Qwen 3's enable_thinking; default: the template's). The reasoning is "
        "shown apart from the answer, dimmed, on stderr",
    )
    return parser


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256

    def describe(self, limit: int) -> str:
        how = "greedy" if self.temperature == 0 else f"temperature {self.temperature:g}, top-p {self.top_p:g}"
        return f"{how}, up to {limit} new tokens"


# --------------------------------------------------------------------------------------------------
# The conversation, rendered as the model was trained


@dataclass
class Conversation:
    """The turns so far and the text the model reads next: chat-template messages, or the plain concatenation of
    the turns as training saw them (each prompt, its training suffix, the answer and end-of-text, in order)."""

    prompts: PromptFormat
    tokenizer: Any
    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # a thinking template's switch

    def render(self, user: str) -> str:
        """The text the model continues to answer `user` after the turns so far.

        Raises:
            BadInput: the chat template refuses the conversation (a system message it does not take).
        """
        if self.prompts.format == "chat_template":
            messages = self.messages(user)
            try:
                return self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, **self.template_kwargs
                )
            except Exception as exc:  # jinja's TemplateError: some templates refuse a system role
                raise BadInput(f"the chat template refused the conversation: {exc}") from None
        eos = self.tokenizer.eos_token or ""
        parts = [self._as_prompt(self.system)] if self.system else []
        for asked, answered in self.turns:
            parts.append(self._as_prompt(asked) + answered + eos)
        parts.append(self._as_prompt(user))
        return "".join(parts)

    def messages(self, user: str) -> list[dict[str, str]]:
        """The conversation so far and `user`'s turn, as chat messages."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for asked, answered in self.turns:
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
        return [*messages, {"role": "user", "content": user}]

    def _as_prompt(self, text: str) -> str:
        suffix = self.prompts.prompt_suffix
        return text if not suffix or text.endswith(suffix) else text + suffix

    def add(self, user: str, answer: str) -> None:
        self.turns.append((user, answer))

    def reset(self) -> None:
        self.turns.clear()


# --------------------------------------------------------------------------------------------------
# Loading and generating


def check_loadable(saved: SavedModel) -> None:
    """Fail fast, with one line, where the model cannot load here: adapters whose base is not available (a local
    directory that is gone, a hub id not in the cache while offline), a directory whose config is broken.

    Raises:
        BadInput: the model or its base cannot be had.
    """
    from align import stages as registry
    from align.models import adapter_base, hub_config, looks_like_path

    if saved.kind is not None and not registry.makes(saved.kind, "policy") or is_reward_model(saved.path):
        raise BadInput(
            f"{saved.path}: a reward model (it scores answers; it does not generate text)",
            hint=f"chat with a policy stage's model ({', '.join(registry.making('policy'))}); a reward model judges "
            "an eval stage's answers",
        )
    if not saved.is_adapter:
        hub_config(str(saved.path), str(saved.path))
        return
    base = adapter_base(str(saved.path))
    if not base:
        raise BadInput(f"{saved.path}: holds LoRA adapters, but its adapter_config.json names no base model")
    if not looks_like_path(base) and not Path(base).is_dir():
        from align.runtime import check_hub

        check_hub(False)  # a hub id: go offline at once where the hub cannot be reached, instead of retrying
    hub_config(base, f"{saved.path} (the base model of its adapters)")


def is_reward_model(path: Path) -> bool:
    """Whether a saved model is a sequence-classifier (a reward model) rather than a causal LM: its config's
    architectures, or its adapters' task type."""
    from align.files import read_json

    config = read_json(path / "config.json") or {}
    adapter = read_json(path / "adapter_config.json") or {}
    architectures = config.get("architectures") or []
    return adapter.get("task_type") == "SEQ_CLS" or any(a.endswith("ForSequenceClassification") for a in architectures)


def load(saved: SavedModel) -> tuple[Any, Any]:
    """The model (eval mode, on the GPU where there is one) and its tokenizer.

    Raises:
        BadInput: the model or its adapters' base cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from align.models import load_tokenizer

    hf_logging.set_verbosity_error()  # a chat is no place for loading notices and progress bars
    hf_logging.disable_progress_bar()
    check_loadable(saved)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if saved.is_adapter:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(saved.path), dtype="auto")
    else:
        # Safetensors only: pickled weights can run code when loaded.
        model = AutoModelForCausalLM.from_pretrained(str(saved.path), dtype="auto", use_safetensors=True)
    return model.to(device).eval(), load_tokenizer(str(saved.path))


def new_tokens_limit(model: Any, wanted: int) -> int:
    """`wanted`, capped at half the model's positions: the prompt needs room too."""
    from align.models import model_positions

    limit = model_positions(model.config)
    return min(wanted, max(1, limit // 2)) if limit else wanted


def streamer(tokenizer: Any, out: TextIO) -> Any:
    """transformers' TextStreamer, writing the answer's text to `out` as it is decoded (word by word)."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text)
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def answer(model: Any, tokenizer: Any, text: str, sampling: Sampling, out: TextIO | None) -> tuple[str, bool]:
    """Generate the answer to `text`, streamed to `out` as it is decoded; return it and whether the conversation's
    beginning had to be cut to fit the model's positions (its end is kept)."""
    import torch

    from align.families import generation_kwargs
    from align.models import model_positions

    max_new = new_tokens_limit(model, sampling.max_new_tokens)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    limit = model_positions(model.config)
    cut = limit is not None and ids.shape[1] > limit - max_new
    if cut:
        ids = ids[:, -(limit - max_new) :]
    if ids.shape[1] == 0:  # an empty plain prompt: start from end-of-text, as after a training row
        ids = torch.tensor([[tokenizer.eos_token_id]])
    device = next(model.parameters()).device
    ids = ids.to(device)
    sample = sampling.temperature > 0
    with torch.no_grad():
        output = model.generate(
            **generation_kwargs(model),
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=streamer(tokenizer, out) if out is not None else None,
        )
    answer = output[0, ids.shape[1] :]
    text = tokenizer.decode(answer, skip_special_tokens=True)
    if len(answer) >= max_new:  # stopped by the token limit, perhaps inside a character's bytes
        from align.evaluation.generation import cut_character

        text = cut_character(text)
    return text, cut


# --------------------------------------------------------------------------------------------------
# The command


def banner(saved: SavedModel, prompts: PromptFormat, sampling: Sampling, limit: int) -> str:
    lines = [f"align chat: {saved.label()}", f"prompts: {prompts.describe()}"]
    if prompts.example_prompt:
        lines.append(f"  a training prompt: {prompts.example_prompt[:160]!r}")
    lines.append(f"sampling: {sampling.describe(limit)}")
    return "\n".join(lines)


def chat(
    saved: SavedModel,
    args: argparse.Namespace,
    read_line: Callable[[str], str] = input,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The chat loop (or one `--prompt`): load, say how prompts are rendered, answer turn after turn."""
    from transformers import set_seed

    from align.prompt_format import read_prompt_format

    out, err = out or sys.stdout, err or sys.stderr
    model, tokenizer = load(saved)
    prompts = read_prompt_format(saved.path, bool(getattr(tokenizer, "chat_template", None)))
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens)
    conversation = Conversation(prompts, tokenizer, system=args.system)
    # --thinking, else the setting the model was trained with, else the template's default.
    asked = getattr(args, "thinking", None)
    trained = None if prompts.thinking is None else ("on" if prompts.thinking else "off")
    thinking = thinking_for(conversation, asked or trained)
    set_seed(args.seed)
    print(banner(saved, prompts, sampling, new_tokens_limit(model, sampling.max_new_tokens)), file=err)
    if thinking is not None:
        shown = asked or (f"{trained} (as trained)" if trained else "the template's default")
        print(f"thinking: {shown}; the reasoning is shown apart, on stderr", file=err)

    tools = chat_tools(tool_entries(args, prompts, err), conversation)

    def reply_to(text: str, stream: TextIO | None, user: str = "") -> tuple[str, bool]:
        """The answer (streamed where the model does not think and calls no tools; a thinking model's reasoning
        shown apart first; each tool call and its result on stderr)."""
        if tools:
            return answer_with_calls(model, tokenizer, conversation, user, tools, sampling, stream, err)
        if thinking is None:
            return answer(model, tokenizer, text, sampling, stream)
        from align.thinking import split_reasoning

        raw, cut = answer(model, tokenizer, text, sampling, None)
        reply, reasoning, unfinished = split_reasoning(raw, thinking)
        if reasoning is not None or unfinished:
            show_reasoning(reasoning or "", unfinished, err)
        if stream is not None:
            stream.write(reply)
        return reply, cut

    if args.prompt is not None:
        text, cut = reply_to(conversation.render(args.prompt), None, args.prompt)
        if cut:
            print("note: the prompt was longer than the model's positions: its beginning was cut", file=err)
        print(text, file=out)
        return 0

    print(COMMANDS, file=err)
    warned = False
    try:
        while True:
            try:
                line = read_line("you> ")
            except EOFError:  # Ctrl-D
                print(file=out)
                break
            command, _, rest = line.strip().partition(" ")
            if command == "/exit":
                break
            if command == "/reset":
                conversation.reset()
                print("(conversation cleared)", file=err)
                continue
            if command == "/system":
                conversation.system = rest.strip() or None
                print(f"(system prompt {'set' if conversation.system else 'cleared'})", file=err)
                continue
            if command.startswith("/"):
                print(f"(unknown command {command}: {COMMANDS})", file=err)
                continue
            if not line.strip():
                continue
            try:
                text = conversation.render(line)
            except BadInput as exc:
                print(f"({exc.problems[0]}; /system to clear it)", file=err)
                continue
            out.write("model> ")
            out.flush()
            reply, cut = reply_to(text, out, line)
            print(file=out)
            if not reply.strip():
                print(f"({'an empty answer' if not reply else 'an answer of whitespace only'})", file=err)
            if cut and not warned:
                warned = True
                print("(the conversation outgrew the model's positions: its beginning is cut; /reset starts over)",
                      file=err)  # fmt: skip
            conversation.add(line, reply)
    except KeyboardInterrupt:  # Ctrl-C, at the prompt or while answering: the chat ends, cleanly
        print(file=out)
    return 0


def tool_entries(args: argparse.Namespace, prompts: Any, err: TextIO) -> list[str]:
    """The tools to chat with: `--tools`, else those the model was trained to call where its record says how to
    load them (a grpo stage's `tools:`), unless `--no-tools`; each choice said on stderr."""
    asked = getattr(args, "tools", None) or []
    if asked or getattr(args, "no_tools", False) or not prompts.tools:
        return asked
    names = ", ".join(prompts.tool_names())
    if not prompts.tool_entries:  # an sft stage's transcripts: schemas only, no functions to run
        print(f"tools: the model was trained to call {names}; pass --tools to run them (without, its calls are shown "
              "as text)", file=err)  # fmt: skip
        return []
    print(f"tools: {names}, as the model was trained to call them (--no-tools to chat without)", file=err)
    return list(prompts.tool_entries)


def chat_tools(entries: list[str], conversation: Conversation) -> list[Any]:
    """The functions `--tools` names (a bare FILE.py: every public function it defines), checked as a recipe's
    tools are.

    Raises:
        BadInput: a tool that cannot be had, or a model whose template cannot call tools.
    """
    if not entries:
        return []
    import inspect

    from align.rewards import load_module
    from align.tools import TEMPLATE_HINT, resolve_tools, template_problems

    named = []
    for entry in entries:
        if entry.endswith(".py"):  # every public function the file defines
            module = load_module(entry, Path.cwd(), f"--tools {entry}")
            own = [
                name for name, fn in vars(module).items() if inspect.isfunction(fn) and fn.__module__ == module.__name__
            ]
            public = [f"{entry}:{name}" for name in own if not name.startswith("_")]
            if not public:
                raise BadInput(
                    f"--tools {entry}: the file defines no public function to call",
                    hint="name one: --tools FILE.py:NAME (an environment class is not a chat tool)",
                )
            named += public
        else:
            named.append(entry)
    bad = template_problems(conversation.tokenizer, "--tools") if conversation.prompts.format == "chat_template" else [
        "--tools: the model was trained on plain prompts, without a chat template"]  # fmt: skip
    if bad:
        raise BadInput(bad, hint=TEMPLATE_HINT)
    return resolve_tools(named, Path.cwd(), "--tools")


def answer_with_calls(
    model: Any,
    tokenizer: Any,
    conversation: Conversation,
    user: str,
    tools: list[Any],
    sampling: Sampling,
    out: TextIO | None,
    err: TextIO,
) -> tuple[str, bool]:
    """One answer through the tool loop (align/tools.py `answer_with_tools`): each call and its result shown on
    `err` as it was made, the final answer written to `out`. Returns it and False (the conversation is not cut)."""
    from align.tools import answer_with_tools

    reply = answer_with_tools(model, tokenizer, [conversation.messages(user)], tools, None,
                              max_new_tokens=new_tokens_limit(model, sampling.max_new_tokens),
                              temperature=sampling.temperature, top_p=sampling.top_p)[0][0]  # fmt: skip
    for turn in reply.turns or []:
        for call in turn.get("tool_calls") or []:
            function = call.get("function", call)
            arguments = ", ".join(f"{k}={v!r}" for k, v in (function.get("arguments") or {}).items())
            print(f"[call] {function.get('name')}({arguments})", file=err)
        if turn["role"] == "tool":
            print(f"[result] {turn['content']}", file=err)
    if out is not None:
        out.write(reply.text)
    return reply.text, False


def thinking_for(conversation: Conversation, asked: str | None) -> Any:
    """The template's reasoning block (None where it does not think), and its switch set as `--thinking` asks.

    Raises:
        BadInput: `--thinking` on a model whose template does not think, or one without a switch for it.
    """
    from align.thinking import thinking_of

    tokenizer = conversation.tokenizer
    setting = None if asked is None else asked == "on"
    thinking = thinking_of(tokenizer, setting) if conversation.prompts.format == "chat_template" else None
    if asked is None:
        return thinking
    if thinking is None:
        raise BadInput(f"--thinking {asked}: this model's chat template does not think", hint="leave --thinking out")
    if thinking.switch is None:
        raise BadInput(f"--thinking {asked}: this model's chat template has no switch for thinking",
                       hint="leave --thinking out")  # fmt: skip
    conversation.template_kwargs = thinking.kwargs(asked == "on")
    return thinking


def show_reasoning(reasoning: str, unfinished: bool, err: TextIO) -> None:
    """A thinking model's reasoning, apart from its answer: dimmed on a terminal, marked otherwise."""
    note = " (cut: it never closed within --max-new-tokens)" if unfinished else ""
    if getattr(err, "isatty", lambda: False)():
        print(f"\x1b[2m{reasoning}{note}\x1b[0m", file=err)
    else:
        print(f"[reasoning{note}] {reasoning}", file=err)


def compare(run_dir: Path, args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Answer one prompt with every policy stage's model of a run, each rendered as that model was trained.

    One model at a time, so only one is in memory; the eval stage's batched generator will take this over."""
    from transformers import set_seed

    from align.prompt_format import read_prompt_format
    from align.saved import policy_models

    out, err = out or sys.stdout, err or sys.stderr
    models = policy_models(run_dir)
    for saved in models:
        check_loadable(saved)  # every model is checked before the first one is loaded
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens)
    for saved in models:
        model, tokenizer = load(saved)
        prompts = read_prompt_format(saved.path, bool(getattr(tokenizer, "chat_template", None)))
        set_seed(args.seed)
        print(f"== {saved.stage} ({saved.kind}): {saved.path}", file=out)
        print(f"   prompts: {prompts.describe()}", file=err)
        conversation = Conversation(prompts, tokenizer, system=args.system)
        answer(model, tokenizer, conversation.render(args.prompt), sampling, out)
        print("\n", file=out)
        del model
    return 0


def settle(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on other flags, and what a shell cannot type: `--compare` answers greedily unless a
    temperature is given (sampled answers differ by chance, not by model); a `\\n` (`\\t`) typed in `--prompt` or
    `--system` is a new line (a tab)."""
    if args.temperature is None:
        args.temperature = 0.0 if args.compare is not None else 0.7
    for name in ("prompt", "system"):
        text = getattr(args, name)
        if text is not None:
            setattr(args, name, text.replace("\\n", "\n").replace("\\t", "\t"))
    return args


def main(argv: list[str] | None = None, prog: str = "align chat") -> int:
    args = build_parser(prog).parse_args(argv)
    # Heavy imports (torch, transformers) wait until the arguments are parsed, so --help is instant.
    from align.runtime import setup_logging

    setup_logging("warning")
    settle(args)
    try:
        if args.compare is not None:
            if args.model is not None or args.stage is not None:
                raise BadInput(
                    "--compare RUN_DIR takes no MODEL and no --stage: it answers with every stage's model",
                    hint=f"align chat --compare {args.compare} --prompt TEXT",
                )
            if args.prompt is None:
                raise BadInput("--compare answers one prompt: add --prompt TEXT")
            if args.tools:
                raise BadInput("--compare does not run tools yet: compare the models one at a time with --tools",
                               hint=f"align chat {args.compare} --stage NAME --tools ... --prompt TEXT")  # fmt: skip
            return compare(args.compare, args)
        if args.model is None:
            raise BadInput("MODEL is missing: a model/ directory or a run directory (or --compare RUN_DIR)")
        from align.saved import find_model

        return chat(find_model(args.model, args.stage), args)
    except AlignError as exc:
        return print_error(exc)
    except KeyboardInterrupt:  # while loading, before the chat began
        print(file=sys.stderr)
        return 0
    except Exception as exc:  # the last resort: one line
        logger.debug("unexpected error", exc_info=True)
        print(f"error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main(prog="python -m align.chat"))
