"""An ordinary Hugging Face Trainer script, fine-tuning a causal LM on SST-2 by ZO: the only ZO lines
are the import of ``ZOTrainer`` and its ``zo=`` settings (MeZO's defaults otherwise).

The prompt is MeZO's ("<sentence> It was great/terrible"); the loss is the LM loss on the label word;
accuracy compares the two label words' logits at the answer position.

    python examples/hf_trainer_sst2.py                                       # SmolLM2-135M, the shipped SST-2 sample
    python examples/hf_trainer_sst2.py --model tiny-llama --steps 20         # a tiny random model: seconds
    torchrun --nproc_per_node 2 examples/hf_trainer_sst2.py --model tiny-llama --steps 20
    python examples/hf_trainer_sst2.py --model facebook/opt-1.3b --data glue # with the hub: GLUE SST-2 itself
"""

from __future__ import annotations

import argparse
from importlib import resources

import numpy as np
import torch
from datasets import load_dataset
from transformers import TrainingArguments

from zo_scale.integrations import ZOTrainer
from zo_scale.models.loading import load_model

LABEL_WORDS = (" terrible", " great")  # label 0, 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a zo-scale built-in, a folder or a hub id")
    parser.add_argument("--data", choices=("sample", "glue"), default="sample",
                        help="sample: the SST-2 files shipped in zo_scale; glue: nyu-mll/glue from the hub")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--output-dir", default="runs/hf_trainer_sst2")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    if args.data == "sample":
        folder = resources.files("zo_scale") / "demo_data"
        files = {"train": str(folder / "sst2_train_sample.tsv"), "validation": str(folder / "sst2_dev.tsv")}
        data = load_dataset("csv", data_files=files, delimiter="\t")
    else:
        data = load_dataset("nyu-mll/glue", "sst2")
    label_ids = [tokenizer(w, add_special_tokens=False).input_ids[-1] for w in LABEL_WORDS]

    def encode(row: dict) -> dict:
        prompt = tokenizer(f"{row['sentence'].strip()} It was", add_special_tokens=False).input_ids
        ids = prompt + [label_ids[int(row["label"])]]
        return {"input_ids": ids, "labels": [-100] * len(prompt) + [ids[-1]]}  # LM loss on the label word

    train = data["train"].shuffle(seed=0).select(range(args.num_train)).map(encode, remove_columns=["sentence",
                                                                                                      "label"])
    dev = data["validation"].select(range(args.num_eval)).map(encode, remove_columns=["sentence", "label"])

    def collate(rows: list[dict]) -> dict:  # left padding: the label word is the last position of every row
        width = max(len(r["input_ids"]) for r in rows)
        gaps = [width - len(r["input_ids"]) for r in rows]
        pairs = list(zip(gaps, rows, strict=True))
        return {"input_ids": torch.tensor([[tokenizer.pad_token_id] * g + r["input_ids"] for g, r in pairs]),
                "attention_mask": torch.tensor([[0] * g + [1] * (width - g) for g in gaps]),
                "labels": torch.tensor([[-100] * g + r["labels"] for g, r in pairs])}

    def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per row, 1.0 where the label word with the larger logit (at the position predicting it) is the gold one."""
        chosen = logits[:, -2, label_ids].argmax(-1)
        return (chosen == (labels[:, -1] == label_ids[1]).long()).float()[:, None]

    def accuracy(prediction: tuple) -> dict:
        return {"accuracy": float(np.mean(prediction[0]))}

    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        per_device_train_batch_size=16, per_device_eval_batch_size=32, logging_steps=10, eval_strategy="steps",
        eval_steps=max(1, args.steps // 2), save_steps=max(1, args.steps // 2), seed=0, report_to=[],
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
    )
    trainer = ZOTrainer(model=model, args=training, train_dataset=train, eval_dataset=dev, data_collator=collate,
                        preprocess_logits_for_metrics=correct, compute_metrics=accuracy,
                        zo={"eps": 1e-3, "sampler": "rademacher"})
    before = trainer.evaluate()
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    after = trainer.evaluate()
    if trainer.is_world_process_zero():
        print(f"accuracy {100 * before['eval_accuracy']:.1f}% -> {100 * after['eval_accuracy']:.1f}% "
              f"in {args.steps} ZO steps")
    if torch.distributed.is_initialized():  # the Trainer's process group, ended before the interpreter's teardown
        torch.distributed.destroy_process_group()  # (left to it, gloo's threads once aborted a rank at exit)


if __name__ == "__main__":
    main()
