"""sft-predict: classify new texts or images with a checkpoint alone."""

import csv
import io
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image

from sft_cli import disk
from sft_cli.errors import SFTError
from sft_cli.results import console
from sft_cli.tasks.classification import images
from sft_cli.tasks.classification.texts import read_inputs
from sft_cli.training import checkpoint, restore, runtime
from sft_cli.training.loading import to_device

log = logging.getLogger("sft_cli.predict")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def predict(cfg: DictConfig, out_dir: Path) -> list[dict]:
    """Label, score and top-k probabilities for cfg.text or every text/image in cfg.input; written to
    cfg.output (.csv or .jsonl) or printed as a table."""
    if (cfg.text is None) == (cfg.input is None):
        raise SFTError("give exactly one of text=\"...\" or input=<file or folder>")
    if cfg.top_k < 1:
        raise SFTError(f"top_k={cfg.top_k} must be at least 1")
    if cfg.batch_size < 1:
        raise SFTError(f"batch_size={cfg.batch_size} must be at least 1 (inputs per forward pass)")
    _check_output(cfg)
    ckpt = checkpoint.resolve(cfg.checkpoint)
    device = runtime.pick_device(cfg.trainer.device)
    task, model = restore.load_model(cfg, ckpt, device)
    classes = task.info()["classes"]
    is_text = model.sft.tokenizer is not None
    pair_field = cfg.dataset.get("text_pair_field") if is_text else None
    if cfg.text is not None:
        if not is_text:
            raise SFTError(f"{cfg.checkpoint} classifies images, not text: give input=<an image file or a folder "
                           "of images> instead of text=")
        if pair_field:
            raise SFTError(f"this checkpoint classifies text pairs ({cfg.dataset.text_field}, {pair_field}): give "
                           "input= a .csv/.tsv/.jsonl file with both fields")
        items = [(str(cfg.text), None)]
    else:
        items = _texts(Path(cfg.input), cfg.dataset.text_field, pair_field) if is_text else _images(Path(cfg.input))
    transform = None if is_text else images.image_transforms(False, cfg.dataset.transforms)  # as evaluation does
    rows = []
    with torch.inference_mode(), runtime.autocast(device, cfg.trainer.precision):
        for start in range(0, len(items), cfg.batch_size):
            batch = items[start:start + cfg.batch_size]
            inputs = _encode_texts(model.tokenizer, batch, cfg.dataset.max_length) if is_text \
                else _encode_images(batch, transform)
            probs = model(to_device(inputs, device)).float().softmax(dim=1).cpu()
            top = probs.topk(min(cfg.top_k, len(classes)), dim=1)
            for item, scores, indices in zip(batch, top.values.tolist(), top.indices.tolist()):
                shown = item[0] if is_text and item[1] is None else " [SEP] ".join(item) if is_text else str(item)
                rows.append({"input": shown, "label": classes[indices[0]], "score": scores[0],
                             "top_k": [{"label": classes[i], "score": s} for i, s in zip(indices, scores)]})
    _write(rows, cfg.output)
    return rows


def _check_output(cfg: DictConfig) -> None:
    """Before the model loads: output= names a new .csv/.jsonl file, or an existing one with overwrite=true."""
    if cfg.output is None:
        return
    path = Path(cfg.output)
    if path.suffix not in (".csv", ".jsonl"):
        raise SFTError(f"output={cfg.output} must end in .csv or .jsonl (or leave it out to print a table)")
    if path.is_dir():
        raise SFTError(f"output={cfg.output} is a folder: give a file name ending in .csv or .jsonl")
    if path.exists() and not cfg.get("overwrite", False):
        raise SFTError(f"output={cfg.output} already exists and is left untouched: choose a new file name, or "
                       "add overwrite=true to replace it")
    if why := disk.cannot_write(path):
        raise SFTError(f"output={cfg.output} cannot be written ({why}): choose a path in a folder you can write to")


def _texts(path: Path, text_field: str, pair_field: str | None) -> list[tuple[str, str | None]]:
    """(text, pair) per input: a .txt file holds one text per line; .csv/.tsv/.jsonl are read as training
    reads them, with dataset.text_field (and text_pair_field)."""
    if not path.is_file():
        raise SFTError(f"input={path} is not a file: give a .txt (one text per line), .csv, .tsv or .jsonl file")
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl"):
        return read_inputs(path, text_field, pair_field)
    if pair_field:
        raise SFTError(f"input={path}: this checkpoint classifies text pairs, so give a .csv/.tsv/.jsonl file "
                       f"with the fields {text_field} and {pair_field}")
    return [(line, None) for line in path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]


def _images(path: Path) -> list[Path]:
    paths = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not paths or not paths[0].is_file():
        raise SFTError(f"input={path} is neither an image file nor a folder holding images "
                       f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def _encode_texts(tokenizer, items: list[tuple[str, str | None]], max_length: int) -> dict:
    texts, pairs = [t for t, _ in items], [p for _, p in items]
    return dict(tokenizer(texts, pairs if pairs[0] is not None else None, truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt"))


def _encode_images(paths: list[Path], transform) -> torch.Tensor:
    images = []
    for p in paths:
        try:
            images.append(transform(Image.open(p).convert("RGB")))  # as ImageFolder reads them: palettes, alpha
        except (OSError, ValueError) as e:
            raise SFTError(f"could not read the image {p}: {e}") from e
    return torch.stack(images)


def _write(rows: list[dict], output: str | None) -> None:
    if output is None:
        console.print_ranking([{"input": r["input"], "label": r["label"], "score": r["score"],
                                "top_k": ", ".join(f"{t['label']} {t['score']:.3f}" for t in r["top_k"])}
                               for r in rows], ["input", "label", "score", "top_k"], "predictions")
        return
    path = Path(output)
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:  # .csv
        f = io.StringIO(newline="")
        writer = csv.writer(f)
        writer.writerow(["input", "label", "score", "top_k"])
        for r in rows:
            writer.writerow([r["input"], r["label"], r["score"],
                             ";".join(f"{t['label']}:{t['score']:.6f}" for t in r["top_k"])])
        text = f.getvalue()
    disk.write_output("output", path, text)
    log.info(f"wrote {len(rows)} predictions to {path}")
