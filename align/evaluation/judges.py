"""Judges: a score per answer, higher is better. `compare_pairwise` turns two models' scores into a win rate.

- `rouge_l_f1`: the answer against the data's reference completion (a reference judge).
- `reward_model_scores`: a sequence-classification model's score of prompt + answer (a reward-model judge).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from align.evaluation.generation import Prompt, PromptFormat, as_messages, resolve_format

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def rouge_l_f1(answers: Sequence[str], references: Sequence[str], *, use_stemmer: bool = True) -> list[float]:
    """ROUGE-L F1 of each answer against its reference, in [0, 1].

    ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries") measures the longest common
    subsequence of words: recall is LCS / reference length, precision LCS / answer length, F1 their harmonic mean,
    so an answer gains neither by rambling (precision falls) nor by stopping short (recall falls). Computed with
    Google's `rouge-score` package, whose tokenizer lowercases and keeps only ASCII letters and digits (text in
    other scripts scores 0); `use_stemmer` applies its Porter stemmer, as ROUGE-1.5.5's `-m` that most papers
    report. An empty answer or reference scores 0.

    Raises:
        ValueError: the two lists differ in length.
    """
    from rouge_score import rouge_scorer

    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    return [
        float(scorer.score(reference, answer)["rougeL"].fmeasure)
        for answer, reference in zip(answers, references, strict=True)
    ]


def reward_model_scores(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    prompt_format: PromptFormat | None = None,
) -> list[float]:
    """A reward model's score of each (prompt, answer) pair: the single logit of a sequence-classification model.

    Pairs are rendered as TRL's `RewardTrainer` renders them in training, so the model scores what it learned to
    score: a plain prompt and answer are joined and end with the eos token; a chat prompt gets the answer as an
    assistant turn, rendered by the chat template. Batches are right-padded (as in training): the model reads its
    score at the last token that is not padding. A pair longer than the model's positions keeps its end, where
    the answer is. The scale is the model's own (Bradley-Terry logits): differences mean something, the zero does
    not. Tiny float differences between batches are expected; `compare_pairwise` counts them as ties.

    Raises:
        ValueError: the two lists differ in length, or the model does not give one score per sequence.
    """

    from align.models import model_positions

    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    encoded = []
    for prompt, answer in zip(prompts, answers, strict=True):
        if resolve_format(prompt, prompt_format) == "plain":
            eos = tokenizer.eos_token or ""
            text = prompt + answer
            ids = tokenizer(text if text.endswith(eos) else text + eos)["input_ids"]
        else:
            messages = as_messages(prompt) + [{"role": "assistant", "content": answer}]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        encoded.append(list(ids))
    limit = model_positions(model.config)
    if limit is not None:
        encoded = [ids[-limit:] for ids in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return score_token_ids(model, encoded, pad_id, batch_size=batch_size)


def score_token_ids(model: Any, encoded: Sequence[Sequence[int]], pad_id: int, *, batch_size: int = 16) -> list[float]:
    """A reward model's score of each token sequence, in right-padded batches (see `reward_model_scores`): for
    sequences already rendered and tokenized, such as the pairs TRL's RewardTrainer prepared.

    Raises:
        ValueError: the model does not give one score per sequence.
    """
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if config.pad_token_id is None:
        # Sequence-classification heads find each row's last token by its padding; TRL's RewardTrainer sets this too.
        config.pad_token_id = pad_id
    device = next(model.parameters()).device
    scores: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start : start + batch_size]
                width = max(len(ids) for ids in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, ids in enumerate(batch):
                    input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[i, : len(ids)] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
                if logits.shape[-1] != 1:
                    raise ValueError(f"a reward model gives one score per sequence; this one gives {logits.shape[-1]}")
                scores.extend(logits[:, 0].float().cpu().tolist())
    finally:
        model.train(was_training)
    return scores
