"""sft-export: a transformers checkpoint (a text classifier or a causal LM) as a save_pretrained() folder that
plain `transformers` loads, with its tokenizer (and chat template)."""

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from sft_cli import checkpoint
from sft_cli.errors import SFTError

log = logging.getLogger("sft_cli.export")


def export(cfg: DictConfig) -> Path:
    """Save a transformers checkpoint as a save_pretrained() folder (model + tokenizer) at cfg.output."""
    out = Path(cfg.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else "exists and is not empty"
        raise SFTError(f"output={out} {what}: output must be a new or empty folder (nothing is overwritten)")
    ckpt = checkpoint.resolve(cfg.checkpoint)
    if not (ckpt / "hf").is_dir():
        raise SFTError(f"{ckpt} holds a torchvision model: its weights are already a plain safetensors file, "
                       f"{ckpt / checkpoint.MODEL_FILE}; sft-export is for transformers models.")
    _, model = checkpoint.load_model(cfg, ckpt, torch.device("cpu"))
    model.model.save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    auto = "AutoModelForCausalLM" if model.model.config.architectures and \
        model.model.config.architectures[0].endswith("ForCausalLM") else "AutoModelForSequenceClassification"
    log.info(f"exported to {out}: transformers' {auto}.from_pretrained('{out}') loads it")
    return out
