"""Training throughput of sft-cli next to a minimal PyTorch loop and a naive tutorial loop.

    python scripts/bench.py --task vision --model resnet18 --image-size 32 --batch-size 128 --steps 50
    python scripts/bench.py --task text --model <local BERT dir> --seq-len 128 --steps 50
    python scripts/bench.py --task ner --model <local BERT dir> --seq-len 64 --batch-size 16 --steps 10
    python scripts/bench.py --all --json bench.json          # vision and text

All loops run in one process, on the same device, with the same model, data, batch size, precision and
optimizer:
  (a) a minimal hand-written loop over batches already on the device: the practical upper bound;
  (b) a naive tutorial loop. Vision: torchvision's CIFAR10 dataset with per-sample transforms and a
      DataLoader. Text: the batch is tokenized and padded to max_length at every step;
  (c) sft-cli's recipe, sft_cli.train.train() as sft-train runs it. Its samples/s come from the run's
      metrics.jsonl;
  (d) text and ner: the Hugging Face transformers.Trainer on the same tokenized examples, with
      DataCollatorWithPadding (ner: DataCollatorForTokenClassification), the same lr, weight decay, linear
      warmup/decay and gradient clipping (its default max_grad_norm=1.0, which the text and ner recipes also
      use); timed by a callback at the same steps. For ner, the entity F1 on the val split of (c)'s last
      validation and of (d)'s model, scored the same way (seqeval, strict), are reported beside each other;
  (e) the data pipeline alone (the model is replaced by the identity).
ner runs (a), (c) and (d) only (no naive loop). The data are synthetic: a CIFAR-10-format pickle folder, a TSV
of random sentences, or CoNLL files of random sentences holding names, places and companies, in a temp folder.
Each figure is the median of --repeats windows of --steps steps, after warm-up, and CUDA is synchronised
before every clock read. (a) is timed half before (b) and half after (c) (and (d)), so that a machine whose speed
drifts (a shared CPU does, by 10% or more) does not bias c/a.
"""

import argparse
import contextlib
import io
import itertools
import json
import math
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from torch import nn
from torch.utils.data import DataLoader

from sft_cli import config
from sft_cli.models import stages
from sft_cli.tasks.classification import images
from sft_cli.training import checkpoint, optim, runtime
from sft_cli.training.loading import LoaderOptions, make_loader, to_device

WORDS = ["good", "great", "fine", "enjoyed", "bad", "awful", "poor", "hated",
         "the", "a", "movie", "film", "book", "it", "was", "is", "very", "really", "and"]
# ner: (type, first words, words that may follow them) of the entities put into the filler sentences
ENTITIES = [("PER", ["alice", "bob", "carol", "dave", "erin"], ["smith", "jones", "brown"]),
            ("LOC", ["paris", "berlin", "rome", "oslo", "lima"], []),
            ("ORG", ["acme", "globex", "initech", "umbrella"], ["corp", "labs"])]
BIN = Path(sys.executable).parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("vision", "text", "ner"), default="vision")
    p.add_argument("--all", action="store_true", help="vision (resnet18, 32x32, batch 128) and text (tiny BERT)")
    p.add_argument("--model", default=None, help="vision: a torchvision model name (default resnet18); "
                   "text, ner: a local BERT folder or hub name (default: a tiny BERT built here)")
    p.add_argument("--bert", default=None, help="--all: the text model (default: a tiny BERT built here)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128, help="text, ner: max_length")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (vision), 32 (text, ner)")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per timed window")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=config.PRECISIONS, default="32")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of the per-sample pipelines")
    p.add_argument("--seed", type=int, default=0, help="training seed of (c) and (d) (new head, shuffling): "
                   "run a few to see the run-to-run noise of the F1s")
    p.add_argument("--json", default=None, help="also write every figure to this file")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: "5" resets the process's peak RSS (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")


def forever(loader):
    while True:
        yield from loader


def time_windows(step, batches, args, device, windows: int | None = None) -> list[float]:
    """samples/s of `step(batch) -> batch size` in each of `windows` (default --repeats) windows of --steps
    batches, after --warmup batches."""
    for _ in range(args.warmup):
        step(next(batches))
    rates = []
    for _ in range(args.repeats if windows is None else windows):
        sync(device)
        start, samples = time.perf_counter(), 0
        for _ in range(args.steps):
            samples += step(next(batches))
        sync(device)
        rates.append(samples / (time.perf_counter() - start))
    return rates


def measured(rates: list[float], device: torch.device) -> dict:
    return {"samples_per_s": statistics.median(rates), "windows": rates,
            "peak_memory_bytes": runtime.peak_memory(device)}


def bracketing(before: dict, after: dict | None) -> dict:
    """One figure from the windows timed before and after the other loops."""
    if after is None:
        return before
    rates = before["windows"] + after["windows"]
    return {"samples_per_s": statistics.median(rates), "windows": rates,
            "peak_memory_bytes": max(before["peak_memory_bytes"], after["peak_memory_bytes"])}


@contextlib.contextmanager
def quiet():
    """sft-cli's own tables and config tree would bury the report; they go nowhere here."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ---------------------------------------------------------------------------------------------- synthetic data


def write_cifar(root: Path, n: int, n_test: int, seed: int = 0) -> Path:
    """root/cifar-10-batches-py in the official pickle layout: n train images (5 batches) and n_test test
    images; class c brightens band c, so the model has something to learn."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = np.arange(n + n_test) % 10
    images = rng.integers(0, 120, size=(n + n_test, 3, 32, 32), dtype=np.uint8)
    for c in range(10):
        images[labels == c, :, 3 * c:3 * c + 3, :] += 120
    rows = images.reshape(len(images), 3072)
    for i, idx in enumerate(np.array_split(np.arange(n), 5), 1):
        _pickle(folder / f"data_batch_{i}", {"data": rows[idx], "labels": labels[idx].tolist()})
    _pickle(folder / "test_batch", {"data": rows[n:], "labels": labels[n:].tolist()})
    _pickle(folder / "batches.meta", {"label_names": [f"class{c}" for c in range(10)]})
    return root


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_sentences(path: Path, n: int, seq_len: int, seed: int = 0) -> Path:
    """text<TAB>label rows of random words, seq_len / 8 to seq_len / 2 words long (uniformly): short, as
    sentences are, so padding each batch to its longest (about seq_len / 2) and to max_length differ. Every
    batch pads to about the same length, so windows of different batches (and loops) do the same work; a
    long tail (some longer than max_length) made the padded length of 50-step windows vary by 10-15%."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(3, seq_len // 8), seq_len // 2 + 1, size=n)
    lines = ["text\tlabel"]
    for i, length in enumerate(lengths):
        words = rng.choice(WORDS[8:], size=length)
        words[rng.integers(length)] = rng.choice(WORDS[:4] if i % 2 else WORDS[4:8])
        lines.append(" ".join(words) + ("\tpos" if i % 2 else "\tneg"))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tagged(path: Path, n: int, seq_len: int, seed: int = 0) -> Path:
    """CoNLL (word<TAB>tag, IOB2) sentences of filler words, seq_len / 8 to seq_len / 2 words long as
    write_sentences' are, each holding one to three entities: a person (a first name, sometimes a last), a
    place, a company (sometimes two words)."""
    rng = np.random.default_rng(seed)
    sentences = []
    for length in rng.integers(max(3, seq_len // 8), seq_len // 2 + 1, size=n):
        words, tags = [str(w) for w in rng.choice(WORDS[8:], size=length)], ["O"] * length
        for _ in range(rng.integers(1, 4)):
            kind, first, rest = ENTITIES[rng.integers(len(ENTITIES))]
            span = [str(rng.choice(first))] + ([str(rng.choice(rest))] if rest and rng.random() < 0.5 else [])
            at = int(rng.integers(len(words) + 1))
            while at < len(tags) and tags[at].startswith("I-"):  # never inside another entity
                at += 1
            words[at:at] = span
            tags[at:at] = [f"B-{kind}"] + [f"I-{kind}"] * (len(span) - 1)
        sentences.append("".join(f"{w}\t{t}\n" for w, t in zip(words, tags)))
    path.write_text("\n".join(sentences))
    return path


def write_tiny_bert(folder: Path, max_positions: int, words: list[str] = WORDS) -> Path:
    """A 2-layer, 128-wide BERT (the size of google/bert_uncased_L-2_H-128_A-2) with a WordPiece vocabulary
    of the benchmark's words, saved with save_pretrained: a stand-in when no local BERT is given."""
    import inspect

    from transformers import BertConfig, BertModel, BertTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    # transformers 5 takes vocab=, 4.x vocab_file= (and ignores the other)
    key = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    BertTokenizerFast(**{key: str(folder / "vocab.txt")}).save_pretrained(folder)
    torch.manual_seed(0)
    shape = BertConfig(vocab_size=len(words) + 5, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=512, max_position_embeddings=max(512, max_positions))
    BertModel(shape).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- the loops


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(config.find_config_dir(), version_base="1.3"):
        return compose(name, overrides=overrides)


def model_and_step(cfg, classes, device, tagged: bool = False):
    """The configured model and optimizer, and a plain training step: forward, loss, backward, step. tagged:
    a tag per token (ner), cross-entropy over the labelled sub-tokens (-100 elsewhere), as the recipe's."""
    torch.manual_seed(0)
    model = config.build(cfg.model, classes=classes).to(device).train()
    optimizer = optim.build_optimizer(cfg.optimizer, cfg.param_groups, model, stages.head_name(model))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.trainer.precision == "16-mixed")
    criterion = nn.CrossEntropyLoss()  # its ignore_index is -100: the sub-tokens a tagger does not score
    clip = cfg.trainer.gradient_clip_norm
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(batch) -> int:
        inputs, targets = to_device(batch[0], device), to_device(batch[1], device)
        if tagged:
            targets = targets["labels"]
        with runtime.autocast(device, cfg.trainer.precision):
            logits = model(inputs)
            loss = criterion(logits.flatten(0, 1), targets.flatten()) if tagged else criterion(logits, targets)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(trainable, clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return len(targets)

    return step


def minimal_loop(cfg, args, device, windows: int) -> dict | None:
    """(a) The upper bound: 8 batches made once and kept on the device, cycled through."""
    if windows == 0:
        return None
    splits = config.build(cfg.dataset)
    loader = make_loader(splits, "train", args.batch_size, LoaderOptions(device))
    batches = [to_device(batch, device) for batch in itertools.islice(loader, 8)]
    step = model_and_step(cfg, splits.classes, device, tagged=hasattr(splits, "scheme"))
    reset_peak_memory(device)
    return measured(time_windows(step, itertools.cycle(batches), args, device, windows), device)


def naive_vision_loop(cfg, args, device) -> dict:
    """(b) The tutorial loop: torchvision's CIFAR10 with per-sample transforms, a shuffling DataLoader."""
    from torchvision import datasets

    cifar = images._skip_checksums(datasets.CIFAR10)  # the synthetic files' md5s are not the official ones
    train_set = cifar(cfg.dataset.root, train=True, transform=images.image_transforms(True, cfg.dataset.transforms))
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    step = model_and_step(cfg, train_set.classes, device)
    reset_peak_memory(device)
    return measured(time_windows(step, forever(loader), args, device), device)


def naive_text_loop(cfg, rows, classes, args, device) -> dict:
    """(b) The tutorial loop: raw (text, label) pairs, tokenized and padded to max_length in every batch."""
    step = model_and_step(cfg, classes, device)
    loader = naive_text_batches(cfg, rows, classes, args)
    reset_peak_memory(device)
    return measured(time_windows(step, forever(loader), args, device), device)


def naive_text_batches(cfg, rows, classes, args) -> DataLoader:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    index = {c: i for i, c in enumerate(classes)}

    def collate(batch):
        texts, labels = zip(*batch)
        encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=args.seq_len,
                            return_tensors="pt")
        return dict(encoded), torch.tensor([index[label] for label in labels])

    return DataLoader(rows, batch_size=args.batch_size, shuffle=True, collate_fn=collate)


def recipe(cfg, work: Path, device) -> tuple[dict, Path]:
    """(c) sft_cli.train.train() in this process. It logs samples/s every --steps steps; the first window
    holds the warm-up, so only the later ones count."""
    from sft_cli.train import train

    run_dir = work / "recipe_run"
    run_dir.mkdir()
    reset_peak_memory(device)
    with quiet():
        train(cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if r["split"] == "train"][1:]
    return measured(rates, device), run_dir / "checkpoints" / "best"


def hf_trainer(cfg, splits, args, device) -> tuple[dict | None, nn.Module | None]:
    """(d) transformers.Trainer as its users run it: the same tokenized examples, DataCollatorWithPadding (a
    tagger: AutoModelForTokenClassification and DataCollatorForTokenClassification), the same optimizer
    settings and schedule. A callback reads the clock at the same steps as (a) and (c). Also the trained model."""
    try:
        import accelerate  # noqa: F401  (the Trainer refuses to start without it)
        from transformers import (
            AutoModelForSequenceClassification,
            AutoModelForTokenClassification,
            DataCollatorForTokenClassification,
            DataCollatorWithPadding,
            Trainer,
            TrainerCallback,
            TrainingArguments,
        )
    except ImportError as e:
        print(f"   (d) skipped: the Hugging Face Trainer needs transformers and accelerate ({e}); "
              'pip install -e ".[dev]"')
        return None, None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t, steps = cfg.trainer, args.steps
    tagged = hasattr(splits, "scheme")  # token classification: a tag per word
    # (features, label) of a text example, (features, labels, first, sentence, window) of a tagged one
    examples = [{**row[0], "labels": row[1]} for row in map(splits.train.__getitem__, range(len(splits.train)))]
    torch.manual_seed(args.seed)
    auto, collator = ((AutoModelForTokenClassification, DataCollatorForTokenClassification) if tagged
                      else (AutoModelForSequenceClassification, DataCollatorWithPadding))
    model = auto.from_pretrained(cfg.model.name_or_path, num_labels=len(splits.classes))
    total = (args.repeats + 1) * steps  # what the recipe runs: its schedule and (d)'s are the same
    warmup = round(cfg.scheduler.warmup_epochs * math.ceil(len(splits.train) / args.batch_size))
    marks = {args.warmup + k * steps for k in range(args.repeats + 1)}
    clock: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step in marks:
                sync(device)
                clock.append(time.perf_counter())

    settings = TrainingArguments(
        output_dir=str(Path(cfg.dataset.cache_dir).parent / "hf_trainer"), per_device_train_batch_size=args.batch_size,
        learning_rate=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay, adam_beta1=cfg.optimizer.betas[0],
        adam_beta2=cfg.optimizer.betas[1], lr_scheduler_type="linear", warmup_steps=warmup, max_steps=total,
        max_grad_norm=t.gradient_clip_norm or 0.0, logging_steps=steps, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=args.seed, use_cpu=device.type == "cpu",
        bf16=args.precision == "bf16-mixed", fp16=args.precision == "16-mixed")
    trainer = Trainer(model=model, args=settings, train_dataset=examples,
                      data_collator=collator(splits.collate.tokenizer), callbacks=[Clock()])
    reset_peak_memory(device)
    with quiet():
        trainer.train()
    rates = [steps * args.batch_size / (b - a) for a, b in zip(clock, clock[1:])]
    return measured(rates, device), trainer.model


def pipeline_alone(loader, args, device) -> dict:
    """(e) The batches alone, delivered on the device, with the model replaced by the identity."""
    def step(batch) -> int:
        to_device(batch[0], device)
        return len(batch[1])

    return measured(time_windows(step, forever(loader), args, device), device)


def eval_throughput(ckpt: Path, args, device) -> float:
    """samples/s of sft-eval's evaluation of the test split (its own figure), median of --repeats runs."""
    from sft_cli.eval import evaluate_checkpoint

    ConfigStore.instance().store(name="_checkpoint_", node=checkpoint.load_config(ckpt))
    cfg = compose_config("eval", [f"checkpoint={ckpt}", f"trainer.device={device}"])
    rates = []
    for i in range(args.repeats):
        out = ckpt.parents[2] / f"eval_{i}"
        out.mkdir()
        with quiet():
            rates.append(evaluate_checkpoint(cfg, out)["samples_per_s"])
    return statistics.median(rates)


def predict_throughput(ckpt: Path, inputs: Path, count: int, args, device, tagged: bool = False) -> float:
    """items/s of sft-predict over a file or folder of `count` inputs, end to end: checkpoint load,
    reading and decoding the files, the forward passes, writing the CSV (a tagger: JSONL); median of
    --repeats runs."""
    if tagged:
        from sft_cli.tasks.token_classification.predict import predict
    else:
        from sft_cli.tasks.classification.predict import predict

    ConfigStore.instance().store(name="_checkpoint_", node=checkpoint.load_config(ckpt))
    output = ckpt.parents[2] / ("predictions.jsonl" if tagged else "predictions.csv")
    cfg = compose_config("predict", [f"checkpoint={ckpt}", f"input={inputs}", f"trainer.device={device}",
                                     f"output={output}", "overwrite=true"])
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        with quiet():
            predict(cfg, ckpt.parents[2])
        sync(device)
        times.append(time.perf_counter() - start)
    return count / statistics.median(times)


def sft_train_command() -> list[str]:
    return [str(BIN / "sft-train")] if (BIN / "sft-train").exists() else [sys.executable, "-m", "sft_cli.train"]


def help_startup(args) -> float:
    """Seconds for `sft-train --help` to answer (a new process each time), median of --repeats."""
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        subprocess.run([*sft_train_command(), "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_step(overrides: list[str], work: Path) -> float:
    """Seconds from launching sft-train to its first training step being logged (metrics.jsonl is polled);
    the run is stopped there."""
    run_dir, log = work / "first_step_run", work / "first_step.log"
    metrics_file = run_dir / "metrics.jsonl"
    ours = ["trainer.max_steps=2", "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}"]
    overrides = [o for o in overrides if o.split("=")[0] not in {x.split("=")[0] for x in ours}] + ours
    start = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen([*sft_train_command(), *overrides], stdout=output, stderr=subprocess.STDOUT)
        while process.poll() is None:
            if metrics_file.exists() and '"train"' in metrics_file.read_text():
                seconds = time.perf_counter() - start
                process.terminate()  # the rest (validation, test, checkpoints) is not start-up
                process.wait()
                return seconds
            time.sleep(0.01)
    raise RuntimeError(f"sft-train exited ({process.returncode}) before its first step:\n{log.read_text()[-2000:]}")


# ---------------------------------------------------------------------------------------------- the two tasks


def validation_size(batch_size: int, n_train: int) -> int:
    """8 evaluation batches (2 x batch size), a multiple of the 10 classes, never more than the train split."""
    return 10 * max(1, min(16 * batch_size, n_train) // 10)


def bench_vision(args, device, work: Path) -> dict:
    b, steps, model = args.batch_size, args.steps, args.model or "resnet18"
    n_train = ((args.repeats + 1) * steps + 1) * b  # one epoch covers every step of the recipe's run
    n_val = validation_size(b, n_train)
    root = write_cifar(work / "cifar", n_train + n_val, n_val)
    model_args = [f"model={model}"] if (Path(config.find_config_dir()) / "model" / f"{model}.yaml").is_file() \
        else [f"model.name={model}", "model.stem=[]"]
    overrides = ["dataset=cifar10", *model_args, "model.weights=null", f"dataset.root={root}",
                 "dataset.download=false", "dataset.verify=false", f"dataset.val_size={n_val}",
                 f"dataset.transforms.image_size={args.image_size}",
                 f"trainer.num_workers={args.num_workers}", *common_overrides(args, device)]
    cfg = compose_config("train", overrides)
    result = {"task": "vision", "model": model, "image_size": args.image_size}
    # each loop builds its own data and model, so no loop's device memory counts in the next one's peak
    # (a) is timed before and after (b) and (c), half of its windows each time
    first_half = minimal_loop(cfg, args, device, math.ceil(args.repeats / 2))
    result["b_naive"] = naive_vision_loop(cfg, args, device)
    result["c_sft_cli"], ckpt = recipe(cfg, work, device)
    result["a_minimal"] = bracketing(first_half, minimal_loop(cfg, args, device, args.repeats // 2))
    fast = config.build(cfg.dataset)
    result["data"] = (f"synthetic CIFAR-10 format, {len(fast.train)} train / {len(fast.val)} val / {len(fast.test)} "
                      "test images")
    chosen = "fast" if hasattr(fast.train, "loader") else "torchvision"
    result["recipe_pipeline"] = f"{cfg.dataset.pipeline} -> {chosen}"
    result["e_pipeline_fast"] = pipeline_alone(make_loader(fast, "train", b, LoaderOptions(device, args.num_workers)),
                                               args, device)
    del fast
    per_sample = config.build(cfg.dataset, pipeline="torchvision")
    result["e_pipeline_torchvision"] = pipeline_alone(
        make_loader(per_sample, "train", b, LoaderOptions(device, args.num_workers)), args, device)
    result["eval_samples_per_s"] = eval_throughput(ckpt, args, device)
    images = work / "predict_images"
    images.mkdir()
    from PIL import Image

    count = min(256, len(per_sample.test))
    for i in range(count):
        Image.fromarray(per_sample.test.base.data[i]).save(images / f"{i}.png")
    result["predict_samples_per_s"] = predict_throughput(ckpt, images, count, args, device)
    if args.first_step:
        result["first_step_s"] = first_step(overrides, work)
    return finish(result)


def bench_text(args, device, work: Path) -> dict:
    b, steps = args.batch_size, args.steps
    model = args.model or args.bert
    result = {"task": "text", "seq_len": args.seq_len}
    if model is None:
        model = str(write_tiny_bert(work / "tiny_bert", args.seq_len))
        result["model"] = "a tiny BERT built here (2 layers, 128 wide; no local BERT given)"
    else:
        result["model"] = model
    n_train = ((args.repeats + 1) * steps + 1) * b
    n_val = validation_size(b, n_train)
    tsv = write_sentences(work / "sentences.tsv", n_train + n_val, args.seq_len)
    test_tsv = write_sentences(work / "test.tsv", n_val, args.seq_len, seed=1)
    overrides = ["+experiment=text_classification", f"dataset.train_file={tsv}", f"dataset.test_file={test_tsv}",
                 f"dataset.val_size={n_val}", f"dataset.max_length={args.seq_len}", f"model.name_or_path={model}",
                 f"dataset.cache_dir={work / 'token_cache'}", *common_overrides(args, device)]
    cfg = compose_config("train", overrides)
    splits = config.build(cfg.dataset)
    rows = [tuple(line.split("\t")) for line in tsv.read_text().splitlines()[1:]]
    result["data"] = f"synthetic sentences, {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test"
    first_half = minimal_loop(cfg, args, device, math.ceil(args.repeats / 2))  # and the rest after (b) and (c)
    result["b_naive"] = naive_text_loop(cfg, rows, splits.classes, args, device)
    result["c_sft_cli"], ckpt = recipe(cfg, work, device)
    result["d_hf_trainer"], _ = hf_trainer(cfg, splits, args, device)
    result["a_minimal"] = bracketing(first_half, minimal_loop(cfg, args, device, args.repeats // 2))
    result["e_pipeline_sft_cli"] = pipeline_alone(
        make_loader(splits, "train", b, LoaderOptions(device)), args, device)
    result["e_pipeline_naive"] = pipeline_alone(naive_text_batches(cfg, rows, splits.classes, args), args, device)
    result["eval_samples_per_s"] = eval_throughput(ckpt, args, device)
    texts = work / "predict_texts.txt"
    texts.write_text("\n".join(text for text, _ in rows[:256]) + "\n")
    result["predict_samples_per_s"] = predict_throughput(ckpt, texts, min(256, len(rows)), args, device)
    if args.first_step:
        result["first_step_s"] = first_step(overrides, work)
    # tokens: what the model really reads (truncated to max_length) and what a batch pads to
    lengths = torch.tensor([len(ids) for ids in splits.train.features["input_ids"]], dtype=torch.float)
    torch.manual_seed(0)
    batch_max = [lengths[i].max().item() for i in torch.randperm(len(lengths)).split(b)]
    result["tokens_per_sample"] = lengths.mean().item()
    result["padded_length_dynamic"] = statistics.mean(batch_max)
    result["padded_length_max_length"] = args.seq_len
    for key in ("a_minimal", "b_naive", "c_sft_cli", "d_hf_trainer"):
        if result[key] is not None:
            result[key]["tokens_per_s"] = result[key]["samples_per_s"] * result["tokens_per_sample"]
    return finish(result)


def bench_ner(args, device, work: Path) -> dict:
    b, steps = args.batch_size, args.steps
    model = args.model or args.bert
    result = {"task": "ner", "seq_len": args.seq_len, "b_naive": None}
    if model is None:
        words = WORDS + [w for _, first, rest in ENTITIES for w in first + rest]
        model = str(write_tiny_bert(work / "tiny_bert", args.seq_len, words))
        result["model"] = "a tiny BERT built here (2 layers, 128 wide; no local BERT given)"
    else:
        result["model"] = model
    n_train = ((args.repeats + 1) * steps + 1) * b
    n_val = validation_size(b, n_train)
    files = {name: write_tagged(work / f"{name}.conll", n, args.seq_len, seed)
             for name, n, seed in (("train", n_train, 0), ("val", n_val, 1), ("test", n_val, 2))}
    overrides = ["+experiment=ner", f"dataset.train_file={files['train']}", f"dataset.val_file={files['val']}",
                 f"dataset.test_file={files['test']}", f"dataset.max_length={args.seq_len}",
                 f"model.name_or_path={model}", f"dataset.cache_dir={work / 'token_cache'}",
                 *common_overrides(args, device)]
    cfg = compose_config("train", overrides)
    splits = config.build(cfg.dataset)
    result["data"] = (f"synthetic tagged sentences (CoNLL, IOB2, PER/LOC/ORG), {len(splits.train)} train / "
                      f"{len(splits.val)} val / {len(splits.test)} test")
    first_half = minimal_loop(cfg, args, device, math.ceil(args.repeats / 2))  # and the rest after (c) and (d)
    result["c_sft_cli"], ckpt = recipe(cfg, work, device)
    result["d_hf_trainer"], trained = hf_trainer(cfg, splits, args, device)
    result["a_minimal"] = bracketing(first_half, minimal_loop(cfg, args, device, args.repeats // 2))
    # the same steps, schedule and val split: (c)'s entity F1 (its validation at the last step) beside (d)'s
    rows = [json.loads(line) for line in (ckpt.parents[1] / "metrics.jsonl").read_text().splitlines()]
    result["val_f1_sft_cli"] = [r["f1"] for r in rows if r["split"] == "val"][-1]
    result["val_f1_hf_trainer"] = tagger_f1(trained, splits, b, device) if trained is not None else None
    result["eval_samples_per_s"] = eval_throughput(ckpt, args, device)
    sentences = [" ".join(line.split("\t")[0] for line in block.splitlines())
                 for block in files["test"].read_text().split("\n\n")][:256]
    texts = work / "predict_texts.txt"
    texts.write_text("\n".join(sentences) + "\n")
    result["predict_samples_per_s"] = predict_throughput(ckpt, texts, len(sentences), args, device, tagged=True)
    if args.first_step:
        result["first_step_s"] = first_step(overrides, work)
    return finish(result)


def tagger_f1(model: nn.Module, splits, batch_size: int, device) -> float:
    """Entity F1 of a transformers token classifier on the val split, scored as the recipe scores its own: the
    tag at each word's first sub-token, the sentence's windows joined, seqeval strict (the task's span window)."""
    from sft_cli.tasks.token_classification.metrics import SpanWindow

    window = SpanWindow(splits.classes, splits.scheme, device)
    model.eval()
    with torch.inference_mode():
        for inputs, target in make_loader(splits, "val", batch_size, LoaderOptions(device)):
            inputs, target = to_device(inputs, device), to_device(target, device)
            predicted, first = model(**inputs).logits.argmax(-1), target["first"]
            window.add((torch.zeros((), device=device), first.sum(), torch.where(first, predicted, -1),
                        torch.where(first, target["labels"], -1), target["sentence"], target["window"]))
    return window.read()["f1"]


def common_overrides(args, device) -> list[str]:
    steps = args.steps
    return [f"trainer.device={device}", f"trainer.batch_size={args.batch_size}", f"trainer.precision={args.precision}",
            "trainer.progress_bar=false", "trainer.max_epochs=1",
            f"trainer.max_steps={(args.repeats + 1) * steps}", f"trainer.log_every_n_steps={steps}", "name=bench",
            f"seed={args.seed}"]


def finish(result: dict) -> dict:
    a, c = (result[k]["samples_per_s"] for k in ("a_minimal", "c_sft_cli"))
    result["c_over_a"] = c / a
    if result.get("b_naive"):  # ner has no naive loop
        result["c_over_b"] = c / result["b_naive"]["samples_per_s"]
    if result.get("d_hf_trainer"):
        result["c_over_d"] = c / result["d_hf_trainer"]["samples_per_s"]
    for key in [k for k in result if k.startswith("e_pipeline")]:
        result[key]["times_a_model_step"] = result[key]["samples_per_s"] / a
    return result


# ---------------------------------------------------------------------------------------------- report


def report(r: dict, args, device) -> None:
    gib = 1024**3
    memory = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
    print(f"\n== {r['task']}: {r['model']}" + (f", {r['image_size']}x{r['image_size']}" if r["task"] == "vision"
                                              else f", max_length {r['seq_len']}"))
    around = "half before (b), half after (c)" if r["b_naive"] is not None else "half before (c), half after (d)"
    print(f"   {r['data']}; batch {args.batch_size}; precision {args.precision}; device {device}; "
          f"{args.warmup} warm-up steps, median of {args.repeats} x {args.steps} steps ((a): {around})")
    print(f"   {'training loop':<64}{'samples/s':>11}{'(windows)':>18}{memory:>20}")
    rows = [("a_minimal", "(a) minimal PyTorch loop, batches already on the device"),
            ("b_naive", "(b) naive: CIFAR10 + per-sample transforms + DataLoader" if r["task"] == "vision"
             else "(b) naive: tokenize + pad to max_length every batch"),
            ("c_sft_cli", f"(c) sft-cli recipe (dataset.pipeline={r['recipe_pipeline']})" if r["task"] == "vision"
             else "(c) sft-cli recipe (tokenized once, padded per batch)")]
    if r["task"] in ("text", "ner"):
        rows.append(("d_hf_trainer", "(d) transformers.Trainer + DataCollatorWithPadding" if r["task"] == "text"
                     else "(d) transformers.Trainer + DataCollatorForTokenClassification"))
    for key, label in [(k, label) for k, label in rows if r[k] is not None]:
        spread = f"({min(r[key]['windows']):.0f}-{max(r[key]['windows']):.0f})"
        print(f"   {label:<64}{r[key]['samples_per_s']:>11.1f}{spread:>18}"
              f"{r[key]['peak_memory_bytes'] / gib:>16.2f} GiB")
    print(f"   c/a = {r['c_over_a']:.3f} (target >= 0.97)"
          + (f"    c/b = {r['c_over_b']:.2f}" if "c_over_b" in r else "")
          + (f"    c/d = {r['c_over_d']:.3f} (target >= 1.0)" if "c_over_d" in r else ""))
    if r["task"] == "text":
        print(f"   tokens/s (real tokens, {r['tokens_per_sample']:.1f} per sample): "
              f"(a) {r['a_minimal']['tokens_per_s']:.0f}, (b) {r['b_naive']['tokens_per_s']:.0f} padded to "
              f"{r['padded_length_max_length']}, (c) {r['c_sft_cli']['tokens_per_s']:.0f} with dynamic padding "
              f"(batches pad to {r['padded_length_dynamic']:.1f} on average)"
              + (f", (d) {r['d_hf_trainer']['tokens_per_s']:.0f}" if r["d_hf_trainer"] else ""))
    if r["task"] == "ner":
        print(f"   val entity F1 (seqeval strict) after the same steps and settings: (c) {r['val_f1_sft_cli']:.3f}"
              + (f", (d) {r['val_f1_hf_trainer']:.3f}" if r["val_f1_hf_trainer"] is not None else ""))
    if any(k.startswith("e_pipeline") for k in r):
        print("   data pipeline alone (model = identity), on the device:")
    for key in [k for k in r if k.startswith("e_pipeline")]:
        name = key.removeprefix("e_pipeline_")
        print(f"     {name:<21}{r[key]['samples_per_s']:>11.0f} samples/s = {r[key]['times_a_model_step']:.1f}x "
              f"the samples/s of a {r['model'] if r['task'] == 'vision' else 'model'} step (a)"
              + ("  (target >= 10x)" if name == "fast" else ""))
    items = {"vision": "images", "text": "texts", "ner": "sentences"}[r["task"]]
    print(f"   sft-eval {r['eval_samples_per_s']:.0f} samples/s; sft-predict {r['predict_samples_per_s']:.0f} "
          f"{items}/s end to end (load, decode, forward, write)")
    if "first_step_s" in r:
        print(f"   time to the first training step: {r['first_step_s']:.2f} s (sft-train launched -> step 1 logged)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = runtime.pick_device(args.device)
    torch.backends.cudnn.benchmark = True  # as the recipe sets it
    results = {"device": str(device), "seed": args.seed, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "help_startup_s": help_startup(args)}
    print(f"sft-cli benchmark on {device}{' (' + results['gpu'] + ')' if results['gpu'] else ''}, torch "
          f"{torch.__version__}, {results['threads']} CPU threads")
    print(f"start-up: sft-train --help answers in {results['help_startup_s']:.2f} s")
    tasks = [("vision", None), ("text", None)] if args.all else [(args.task, args.model)]
    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    try:
        for task, model in tasks:
            # a new sft-train process costs seconds of CPU, so --all times the first step of the first task only
            task_args = argparse.Namespace(**{**vars(args), "model": model if args.all else args.model,
                                              "batch_size": args.batch_size or (128 if task == "vision" else 32),
                                              "first_step": task == tasks[0][0]})
            (work / task).mkdir()
            bench = {"vision": bench_vision, "text": bench_text, "ner": bench_ner}[task]
            results[task] = bench(task_args, device, work / task)
            report(results[task], task_args, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
