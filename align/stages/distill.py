"""`kind: distill` — on-policy distillation with TRL's DistillationTrainer: the student (the stage's model) answers
each training prompt itself, and the teacher scores every token of that answer; the loss is TRL's generalised JSD
between their next-token distributions (`beta` 0: forward KL, 0.5: JSD, 1: reverse KL, TRL's default).

The teacher (`teacher:`) is an earlier stage's policy (`@stage`), a directory or a hub id, loaded frozen and in eval
mode with `teacher_loading:` (the keys of `loading:`), and never saved. It must share the student's vocabulary token
for token: the plan compares both tokenizers id by id before any stage trains.

The held-out measure is the KL from the student to the teacher, KL(student ‖ teacher), per answer token, on fixed
tokens: the teacher's greedy answers to the first held-out prompts, generated once when the stage starts (their hash
is in summary.json) and scored before and after training. `gap_closed` is 1 − after / before, and the verdict a
paired bootstrap over prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from align.errors import BadInput
from align.recipe import MODEL_REF, Loading, Strict, TrainingStage, policy_list, stage_ref
from align.stages.base import Figure, TrainingKind
from align.stages.runner import generation_table, show_prompt
from align.values import HeldOut, Setting, StageParts

if TYPE_CHECKING:
    from align.plan import PlanInputs
    from align.recipe import Stage

logger = logging.getLogger(__name__)

DIRECTION = "KL(student ‖ teacher) per answer token, on the teacher's greedy answers to held-out prompts"
# A KL to the teacher below this before training: two copies of one model (nothing to learn from it).
SAME = 1e-6


class DistillMeasure(Strict):
    """The held-out measure: the teacher's greedy answers to the first validation prompts, scored by both models."""

    prompts: int = Field(32, ge=2, description="held-out prompts (the validation split's first), the bootstrap's units")
    max_new_tokens: int = Field(48, ge=1, description="the longest teacher answer the measure scores")


class DistillKeys(TrainingStage):
    """A distill stage's recipe keys: those of every training stage, its teacher, and its held-out measure."""

    kind: Literal["distill"]
    teacher: Annotated[str, MODEL_REF] = Field(
        description="the teacher: @<an earlier stage's policy>, a local directory or a hub id (same vocabulary)"
    )
    teacher_loading: Loading | None = Field(None, description="how the teacher is loaded (the keys of `loading:`)")
    measure: DistillMeasure = Field(default_factory=DistillMeasure)

    def problems(self, earlier: list[Stage]) -> list[str]:
        problems = super().problems(earlier)
        where = f"stages.{self.name}"
        for key, meant in (("teacher_model_name_or_path", "teacher"), ("teacher_model_init_kwargs", "teacher_loading")):
            if key in self.train:
                problems.append(f"{where}.train.{key}: the teacher is the stage's `{meant}:` (beside `model:`)")
        policies = [s for s in earlier if s.makes == "policy"]
        student = self.model if self.model is not None else (f"@{policies[-1].name}" if policies else None)
        ref, by_name = stage_ref(self.teacher), {s.name: s for s in earlier}
        if self.teacher == student:
            problems.append(f"{where}.teacher: {self.teacher!r} is the student itself (the stage's model); name a "
                            "larger or better model to learn from")  # fmt: skip
        elif ref is not None and ref not in by_name:
            problems.append(f"{where}.teacher: '@{ref}' is not an earlier stage (earlier policies: "
                            f"{policy_list(earlier)})")  # fmt: skip
        elif ref is not None and by_name[ref].makes != "policy":
            problems.append(f"{where}.teacher: '@{ref}' is {by_name[ref].a_kind()} stage, not a language model to "
                            f"learn from (earlier policies: {policy_list(earlier)})")  # fmt: skip
        return problems


class Distill(TrainingKind):
    """TRL's DistillationTrainer: the student samples, the frozen teacher scores every token; the KL to the teacher
    on its own held-out answers before and after."""

    name = "distill"
    keys = DistillKeys
    # The trainer reads prompts; the student writes the answers (a completion, a conversation's last assistant turn
    # are left out).
    formats = ("prompt_only", "prompt_completion", "messages")
    about = "on-policy distillation: the student answers, a frozen teacher scores every token (TRL's distillation)"
    figures = (Figure("KL to teacher", "kl_to_teacher", True),)
    key_settings = ("beta", "max_completion_length", "temperature", "top_p", "top_k", "disable_dropout")
    config = "trl:DistillationConfig"
    trainer_class = "trl:DistillationTrainer"
    unit = "prompts"

    # ----------------------------------------------------------------------------------------------
    # Plan

    def plan_parts(self, stage: Stage, inputs: PlanInputs) -> StageParts:
        """The teacher, what beta means, the measure and, with the tokenizers, the vocabulary check."""
        from align.plan import batch_figures

        cls = self.config_class()
        beta = stage.train.get("beta", cls.beta)
        parts = StageParts(
            fixed={
                # Its batches are prompts, with no input_ids for the Trainer to count (it warns at every step).
                "include_num_input_tokens_seen": Setting("no", "align (managed): distillation batches hold prompts"),
            },
            details={
                "input": inputs.start.summary(),
                "teacher": f"{stage.teacher}, frozen, in eval mode, never saved",
                "loss": f"generalised JSD, beta {beta} ({divergence(beta)}) on the student's own sampled answers",
                "held-out measure": f"{DIRECTION} ({stage.measure.prompts} prompts, up to "
                f"{stage.measure.max_new_tokens} tokens each), before and after",
            },
        )
        same = same_directory(stage, inputs)
        if same is not None:
            parts.problems.append(f"stages.{stage.name}.teacher: {stage.teacher!r} is {same}, the student itself (the "
                                  "stage's model); name a larger or better model to learn from")  # fmt: skip
            return parts
        if inputs.tokenizer is None:
            return parts
        try:
            teacher_tokenizer, teacher_config = teacher_of(stage, inputs)
        except BadInput as exc:
            parts.problems += exc.problems
            parts.hints += [exc.hint] if exc.hint else []
            return parts
        problem = vocabulary_problem(inputs.tokenizer, inputs.config, teacher_tokenizer, teacher_config)
        if problem is not None:
            parts.problems.append(f"stages.{stage.name}.teacher: {problem}")
            parts.hints.append("distil from a teacher of the student's family and tokenizer; two models built from "
                               "scratch share one when their stages train it on the same rows with the same "
                               "vocab_size")  # fmt: skip
        if inputs.data is not None:
            train = as_prompts(inputs.data["train"])
            answer = stage.train.get("max_completion_length", cls.max_completion_length)
            problem = room_problem(stage, inputs, [train, as_prompts(inputs.data["validation"])], answer)
            if problem is not None:
                parts.problems.append(problem)
                parts.hints.append("lower max_completion_length, shorten or leave out the longest prompts, or use a "
                                   "model with more positions")  # fmt: skip
            parts.details["train_prompts"] = len(train)
            parts.details["examples"] = [{"prompt": show_prompt(train[i]["prompt"])} for i in range(min(2, len(train)))]
            parts.count = lambda effective: batch_figures(effective, len(train))
        return parts

    # ----------------------------------------------------------------------------------------------
    # A run

    def setup(self) -> None:
        from align.data import first_unique
        from align.models import build_model, ensure_chat_template

        ensure_chat_template(self.tokenizer)
        stage = self.stage
        self.train, self.eval = (as_prompts(self.data[split]) for split in ("train", "validation"))
        ref = stage_ref(stage.teacher)
        path = str(self.ctx.outputs[ref].model_dir) if ref is not None else local_path(stage.teacher, self.ctx.recipe)
        teacher, _ = build_model(path, f"stages.{stage.name}.teacher", loading=stage.teacher_loading)
        self.teacher = teacher.to(self.model.device).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.held_out = first_unique(list(self.eval["prompt"]), stage.measure.prompts)
        self.prompts = self.held_out[: stage.generations]
        self.targets = teacher_answers(self.teacher, self.tokenizer, self.held_out, stage.measure.max_new_tokens)
        digest = hashlib.sha256(json.dumps(self.targets).encode()).hexdigest()[:16]
        logger.info("teacher: %s; its greedy answers to %d held-out prompts (sha256 %s) are the KL measure's tokens",
                    stage.teacher, len(self.targets), digest)  # fmt: skip
        self.extra = {"teacher": stage.teacher, "teacher_model": path, "kl_direction": DIRECTION,
                      "teacher_answers_sha256": digest}  # fmt: skip
        if ref is not None:  # which training of the teacher stage taught this student
            self.extra["teacher_fingerprint"] = self.ctx.outputs[ref].fingerprint

    def trainer(self, args: Any, callbacks: list[Any]) -> Any:
        return super().trainer(args, callbacks, teacher_model=self.teacher)

    def check(self, trainer: Any) -> None:
        self.extra.update(beta=trainer.args.beta, divergence=divergence(trainer.args.beta))

    def measure(self, trainer: Any) -> HeldOut:
        from align.verdict import greedy_answers

        model = trainer.model
        return HeldOut(
            kl_to_teacher(model, self.teacher, self.targets),
            greedy_answers(model, self.tokenizer, self.prompts, template_kwargs=self.template_kwargs),
        )

    def summarize(self, before, after, measured_before, measured_after):
        from align.verdict import Verdict, loss_verdict

        kl_before, kl_after = measured_before.figure, measured_after.figure
        metrics = {
            "kl_to_teacher_before": kl_before,
            "kl_to_teacher": kl_after,
            "gap_closed": 1 - kl_after / kl_before if kl_before > 0 else None,
        }
        verdict = loss_verdict("kl_to_teacher", measured_before.values, measured_after.values, unit="prompts",
                               **self.trained_with)  # fmt: skip
        if kl_before < SAME:  # the likely cause, instead of the learning rate or steps the verdict would cite
            cause = (f"the student already predicted as the teacher before training (KL {kl_before:.2g}): is the "
                     "teacher the student itself, under another path?")  # fmt: skip
            verdict = Verdict(verdict.status, [verdict.reasons[0], cause], verdict.warnings)
        table = generation_table(self.ctx, self.prompts, measured_before.texts, measured_after.texts)
        return metrics, {"generations": table, "verdict": verdict}

    def plots(self, rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, str, str]]:
        from align.plots import figure, png

        metrics = summary.get("metrics") or {}
        before, after = metrics.get("kl_to_teacher_before"), metrics.get("kl_to_teacher")
        if not isinstance(before, int | float) or not isinstance(after, int | float):
            return []
        fig, ax = figure(4.5, 3.2)
        ax.bar(["before", "after"], [before, after], color=["#7f7f7f", "#2ca02c"])
        ax.set_title("KL to the teacher (held out)", fontsize=9)
        ax.set_ylabel("nats per token")
        gap = metrics.get("gap_closed")
        alt = f"KL(student ‖ teacher) per token on held-out prompts: {before:.4g} before, {after:.4g} after"
        return [("KL to the teacher", png(fig), alt + (f", gap closed {gap:.1%}" if gap is not None else ""))]


def divergence(beta: float) -> str:
    """What TRL's generalised JSD is at this beta."""
    return {0.0: "forward KL", 0.5: "JSD", 1.0: "reverse KL"}.get(float(beta), "between forward and reverse KL")


def as_prompts(rows: Any) -> Any:
    """The rows the trainer reads: their prompts. A completion column is left out, and a conversation ends before
    its last assistant turn: the student writes its own answer."""
    if "prompt" in rows.column_names:
        return rows.select_columns(["prompt"])

    def before_last_answer(row: dict[str, Any]) -> dict[str, Any]:
        turns = row["messages"]
        last = max((i for i, turn in enumerate(turns) if turn["role"] == "assistant"), default=len(turns))
        return {"prompt": turns[:last]}

    return rows.map(before_last_answer, remove_columns=rows.column_names)


def local_path(name: str, recipe: Any) -> str:
    """A teacher written as a local directory, found as a stage's `model:` is (the recipe's folder first); else the
    name as written (a hub id)."""
    from align.recipe import search_paths

    found = next((p for p in search_paths(name, recipe.base_dir) if p.is_dir()), None)
    return str(found) if found is not None else name


def same_directory(stage: Stage, inputs: PlanInputs) -> str | None:
    """Where the teacher is the student's own directory under another spelling (`@student` and
    `runs/x/student/model`, `./m` and `m/`): that directory; else None."""
    from align.recipe import model_source

    def directory(name: Any) -> Path | None:
        if not isinstance(name, str):
            return None  # a model built from scratch here
        ref = stage_ref(name)
        path = inputs.run_dir / ref / "model" if ref is not None else Path(local_path(name, inputs.recipe))
        return path.resolve() if path.is_dir() or ref is not None else None

    student, teacher = directory(model_source(stage, inputs.recipe)), directory(stage.teacher)
    return str(teacher) if teacher is not None and teacher == student else None


def room_problem(stage: Stage, inputs: PlanInputs, splits: list[Any], answer: int) -> str | None:
    """Why some prompt leaves no room for an answer of `answer` tokens (max_completion_length) in the model's
    positions, or None: TRL's distillation trainer does not cut prompts, so such a prompt would stop training mid-way
    with an index error in the position embedding."""
    from align.evaluation.generation import prompt_ids
    from align.models import ensure_chat_template, model_positions

    positions = model_positions(inputs.config) if inputs.config is not None else None
    if positions is None:
        return None
    ensure_chat_template(inputs.tokenizer)
    lengths = [len(prompt_ids(inputs.tokenizer, prompt, None)) for rows in splits for prompt in rows["prompt"]]
    over = [n for n in lengths if n + answer > positions]
    if not over:
        return None
    return (f"stages.{stage.name}.train.max_completion_length: {len(over)} of {len(lengths)} prompts leave no room "
            f"for an answer of {answer} tokens in the model's {positions} positions (the longest prompt is "
            f"{max(over)} tokens); TRL's distillation trainer does not cut prompts, so training would stop at the "
            "first")  # fmt: skip


def teacher_of(stage: Stage, inputs: PlanInputs) -> tuple[Any, Any]:
    """The teacher's tokenizer and config, without its weights: an earlier stage's plan, else loaded as the stage's
    own model would be (the offline check has refused an unreachable hub id already).

    Raises:
        BadInput: the teacher cannot be read (named under `teacher`)."""
    from align.plan import resolve_model

    as_model = stage.model_copy(update={"model": stage.teacher})
    try:
        _, _, tokenizer, config = resolve_model(as_model, inputs.recipe, inputs.plans, None, need_tokenizer=True)
    except BadInput as exc:
        named = [p.replace(f"stages.{stage.name}.model", f"stages.{stage.name}.teacher") for p in exc.problems]
        raise BadInput(named, hint=exc.hint and exc.hint.replace("`model:`", "`teacher:`")) from None
    return tokenizer, config


def vocabulary_problem(student: Any, student_config: Any, teacher: Any, teacher_config: Any) -> str | None:
    """Why the teacher cannot teach the student token by token, or None: their vocabularies must be the same, the
    same token at every id (the loss compares the two distributions id by id), not only the same size."""
    sizes = (len(student), len(teacher))
    rows = tuple(getattr(c.get_text_config(), "vocab_size", None) for c in (student_config, teacher_config))
    if sizes[0] != sizes[1] or rows[0] != rows[1]:
        return (f"the teacher's vocabulary has {sizes[1]} tokens ({rows[1]} embedding rows), the student's "
                f"{sizes[0]} tokens ({rows[0]} embedding rows); distillation compares their distributions token by "
                "token")  # fmt: skip
    ours, theirs = student.convert_ids_to_tokens(range(sizes[0])), teacher.convert_ids_to_tokens(range(sizes[1]))
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    if first is None:
        return None
    return (f"the teacher's vocabulary ({sizes[1]} tokens) is not the student's ({sizes[0]}): id {first} is "
            f"{theirs[first]!r} for the teacher and {ours[first]!r} for the student")  # fmt: skip


def teacher_answers(teacher: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int) -> list[list[list[int]]]:
    """[prompt ids, answer ids] per prompt: the teacher's greedy answer, its end-of-text token included where it
    stopped there (learning where to stop is part of what the student learns)."""
    from align.evaluation.generation import prompt_ids
    from align.verdict import greedy_answers

    answers = greedy_answers(teacher, tokenizer, prompts, max_new_tokens)
    out = []
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = list(answer.token_ids) + ([tokenizer.eos_token_id] if answer.ended else [])
        out.append([prompt_ids(tokenizer, prompt, None), ids])
    return [pair for pair in out if pair[1]]


def kl_to_teacher(student: Any, teacher: Any, targets: list[list[list[int]]]) -> list[float]:
    """Per prompt, the mean over the answer's tokens of KL(student ‖ teacher) between their next-token
    distributions, on the fixed teacher answers `targets` ([prompt ids, answer ids] each)."""
    import torch

    was_training = student.training
    student.eval()
    out = []
    try:
        with torch.no_grad():
            for prompt, answer in targets:
                ids = torch.tensor([prompt + answer], device=student.device)
                at = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)  # the positions that predict the answer
                s = torch.log_softmax(student(input_ids=ids).logits[0, at].float(), dim=-1)
                t = torch.log_softmax(teacher(input_ids=ids.to(teacher.device)).logits[0, at].float(), dim=-1)
                out.append(float((s.exp() * (s - t.to(s.device))).sum(-1).mean()))
    finally:
        student.train(was_training)
    return out
