"""Packing: the LM stage's blocks against a Trainer that pads each example to the maximum length.

Same model (the quickstart's GPT-2 shape, from scratch), same data (the builtin python-docs corpus), same
tokenizer, batch and steps; 3 alternating pairs, medians. Targets: align's share of real tokens >= 0.99, and
real (non-padding) tokens per second >= 2x the padded Trainer's.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("WANDB_MODE", "disabled")

BLOCK, BATCH, STEPS, PAIRS = 128, 16, 8, 3


def train_seconds(dataset, collator, tokenizer) -> float:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from align.models import scratch_config
    from align.recipe import ScratchModel

    torch.manual_seed(0)
    spec = ScratchModel(model_type="gpt2", vocab_size=4096, n_layer=4, n_head=4, n_embd=128, n_positions=256)
    model = AutoModelForCausalLM.from_config(scratch_config(spec, "bench", vocab_size=len(tokenizer)))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out, max_steps=STEPS, per_device_train_batch_size=BATCH, report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, use_cpu=True,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        trainer.remove_callback(PrinterCallback)
        started = time.perf_counter()
        trainer.train()
        return time.perf_counter() - started


def main() -> int:
    from datasets import Dataset
    from transformers import DataCollatorWithPadding

    from align.builtin import python_docs
    from align.data import pack_text_blocks
    from align.models import train_tokenizer
    from align.stages.lm import collate_blocks

    texts = python_docs()["text"]
    tokenizer = train_tokenizer(texts, 4096)
    blocks, stats = pack_text_blocks(Dataset.from_dict({"text": texts}), tokenizer, BLOCK)
    share_align = stats["block_tokens"] / (len(blocks) * BLOCK)  # every position of every block is a real token

    # The baseline: one example per paragraph, truncated and padded to the block length.
    padded = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=BLOCK), batched=True, remove_columns=["text"]
    )
    pad = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=BLOCK)

    def collate_padded(rows):
        batch = pad(rows)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    real_per_padded_example = sum(len(ids) for ids in padded["input_ids"]) / len(padded)
    share_padded = real_per_padded_example / BLOCK
    align_rates, padded_rates = [], []
    for _ in range(PAIRS):
        padded_rates.append(STEPS * BATCH * real_per_padded_example / train_seconds(padded, collate_padded, tokenizer))
        align_rates.append(STEPS * BATCH * BLOCK / train_seconds(blocks, collate_blocks, tokenizer))
    ratio = statistics.median(align_rates) / statistics.median(padded_rates)
    ok = share_align >= 0.99 and ratio >= 2.0
    print(
        f"packing: real-token share {share_align:.3f} vs padded {share_padded:.3f}; real tokens/s "
        f"{statistics.median(align_rates):.0f} vs {statistics.median(padded_rates):.0f} = {ratio:.2f}x "
        f"(target share >= 0.99, >= 2x) {'ok' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
