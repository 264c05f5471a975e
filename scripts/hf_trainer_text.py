"""A plain Hugging Face Trainer script for a text classifier: the baseline that sft-train's text recipe is
timed against, end to end, on the same files (README, Performance).

    time python scripts/hf_trainer_text.py --model <local BERT dir> --train train.tsv --val dev.tsv \
        --test dev.tsv --epochs 1 --batch-size 32 --lr 5e-5 --max-length 128 --warmup-ratio 0.1
    time sft-train +experiment=text_classification model.name_or_path=<dir> dataset.train_file=train.tsv \
        dataset.val_file=dev.tsv dataset.test_file=dev.tsv trainer.max_epochs=1 optimizer.lr=5e-5 \
        scheduler.warmup_epochs=0.1 trainer.device=cpu

It is what a Trainer user writes, with the features sft-train has by default: read the TSV (header
`sentence<TAB>label` or `text<TAB>label`), tokenize once (truncated, unpadded), DataCollatorWithPadding,
AdamW with weight decay 0.01, linear warmup and decay, gradient clipping at 1.0, an evaluation of the val
file at each epoch end with a checkpoint (model and optimizer state) per epoch, the best model loaded at
the end, one evaluation of the test file, and the final model saved. It prints each evaluation's accuracy
and the passes it made.
"""

import argparse
import csv
import math
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a local transformers folder (or a cached hub name)")
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--test", default=None)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--output", default=None, help="where checkpoints and the final model go (default: a temp folder)")
    return p.parse_args(argv)


def read_tsv(path: str) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header, rows = rows[0], [r for r in rows[1:] if len(r) >= 2]
    text = header.index("sentence") if "sentence" in header else header.index("text")
    label = header.index("label")
    return [r[text] for r in rows], [r[label] for r in rows]


class Encoded(Dataset):
    def __init__(self, encoding, labels: list[int]):
        self.encoding, self.labels = encoding, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.encoding.items()}, "labels": self.labels[i]}


def accuracy(prediction) -> dict:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=1) == prediction.label_ids).mean())}


def main(argv=None) -> None:
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts, labels = read_tsv(args.train)
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}

    def encoded(path: str) -> Encoded:
        texts, labels = read_tsv(path)
        return Encoded(tokenizer(texts, truncation=True, max_length=args.max_length), [index[y] for y in labels])

    train, val = encoded(args.train), encoded(args.val)
    test = encoded(args.test) if args.test else None
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(classes))
    output = args.output or tempfile.mkdtemp(prefix="hf-trainer-")
    # transformers 5 dropped warmup_ratio; the same steps as sft-train's scheduler.warmup_epochs
    warmup = round(args.warmup_ratio * math.ceil(len(train) / args.batch_size) * args.epochs)
    settings = TrainingArguments(
        output_dir=output, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size, learning_rate=args.lr, weight_decay=0.01,
        lr_scheduler_type="linear", warmup_steps=warmup, max_grad_norm=1.0, eval_strategy="epoch",
        save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="accuracy",
        save_total_limit=2, logging_steps=20, report_to="none", disable_tqdm=True, seed=0,
        use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=settings, train_dataset=train, eval_dataset=val,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    result = trainer.train()
    passes = [f"val x {max(1, round(args.epochs))}"]
    if test is not None:
        print(f"test: {trainer.evaluate(test, metric_key_prefix='test')}")
        passes.append("test x 1")
    trainer.save_model(str(Path(output) / "final"))
    print(f"train samples/s {result.metrics['train_samples_per_second']:.1f}; evaluation passes: {', '.join(passes)}")
    print(f"wall time from the first import: {time.perf_counter() - START:.1f} s (output: {output})")


if __name__ == "__main__":
    sys.exit(main())
