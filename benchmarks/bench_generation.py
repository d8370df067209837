"""Generation for evaluation: answers per second, left-padded batches of 16 against one prompt at a time.

Same model (the quickstart's GPT-2 shape, from scratch, untrained: its greedy answers run to the length limit, so
both sides generate exactly the same number of tokens), same tokenizer, same 32 instruction prompts, greedy, 32 new
tokens; both go through `align.evaluation.generate_batched`, with `batch_size` 16 and 1. 2 alternating pairs after a
warm-up, medians. Target: batched >= 2x the answers per second, with the same greedy answers.

    python benchmarks/bench_generation.py
"""

from __future__ import annotations

import statistics
import sys
import time

PROMPTS, MAX_NEW_TOKENS, BATCH, PAIRS = 32, 32, 16, 2


def main() -> int:
    import torch
    from _shared import SMALL_GPT2
    from transformers import AutoModelForCausalLM

    from align.builtin import python_docs_instruct
    from align.evaluation import generate_batched
    from align.models import scratch_config, train_tokenizer
    from align.recipe import ScratchModel

    rows = python_docs_instruct()
    prompts = rows["prompt"][:PROMPTS]
    tokenizer = train_tokenizer(rows["prompt"] + rows["completion"], SMALL_GPT2["vocab_size"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        scratch_config(ScratchModel(**SMALL_GPT2), "bench", vocab_size=len(tokenizer))
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    def answers_per_second(batch_size: int) -> tuple[float, list]:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        answers = generate_batched(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size)
        if device == "cuda":
            torch.cuda.synchronize()
        return len(prompts) / (time.perf_counter() - started), answers

    answers_per_second(BATCH)  # warm-up: first-call allocations and kernel selection
    batched_rates, single_rates = [], []
    for _ in range(PAIRS):
        rate, batched = answers_per_second(BATCH)
        batched_rates.append(rate)
        rate, single = answers_per_second(1)
        single_rates.append(rate)
    same = sum(b[0].token_ids == s[0].token_ids for b, s in zip(batched, single, strict=True)) / len(prompts)
    tokens = sum(b[0].tokens for b in batched) / len(prompts)
    ratio = statistics.median(batched_rates) / statistics.median(single_rates)
    ok = ratio >= 2.0 and same == 1.0
    print(
        f"generation ({device}, {PROMPTS} prompts, {tokens:.0f} tokens each): batched by {BATCH} "
        f"{statistics.median(batched_rates):.1f} answers/s vs one at a time {statistics.median(single_rates):.1f} "
        f"= {ratio:.2f}x, same greedy answers {same:.0%} (target >= 2x, 100%) {'ok' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
