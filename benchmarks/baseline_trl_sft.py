"""The baseline of bench_overhead.py: bare TRL SFTTrainer, the work align's SFT stage does, written by hand.

    python benchmarks/baseline_trl_sft.py MODEL_DIR TRAIN.jsonl VALID.jsonl OUT_DIR SETTINGS_JSON

Load the model and tokenizer, the prompt/completion files, evaluate, train, evaluate, save: what a user who
skips align would write. SETTINGS_JSON holds the recipe's `train:` keys, so both sides train identically.
"""

from __future__ import annotations

import json
import sys


def main(model_dir: str, train_file: str, valid_file: str, out: str, settings: str) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_dataset("json", data_files={"train": train_file, "validation": valid_file})
    args = SFTConfig(
        output_dir=f"{out}/checkpoints",
        report_to=[],
        seed=42,
        eval_strategy="steps",
        save_total_limit=2,
        use_cpu=True,
        # TRL turns bf16 on by default, also on a CPU, where it made this very run 5x slower (169.6 s vs 33.8 s
        # at 40 steps): the baseline must train in fp32, as align chooses on a CPU.
        bf16=False,
        dataloader_pin_memory=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        **json.loads(settings),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
    )
    # An evaluation draws from torch's generator (each DataLoader iterator takes a seed from it), which moves
    # training's dropout masks: put it back, as align does for its own measurements before training. Without this
    # the two runs' final eval losses differ by about 7e-4 at this size, from the masks alone.
    state = torch.get_rng_state()
    before = trainer.evaluate()
    torch.set_rng_state(state)
    result = trainer.train()
    after = trainer.evaluate()
    trainer.save_model(f"{out}/model")
    print(json.dumps({"eval_loss_before": before["eval_loss"], "eval_loss": after["eval_loss"],
                      "train_runtime_s": result.metrics["train_runtime"]}))  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:6])
