"""A checkpoint back into a task and a model: what sft-eval, sft-predict and sft-export start from (training
resumes into the model it has just built: train.resume)."""

from pathlib import Path

import torch
from omegaconf import DictConfig

from sft_cli.errors import SFTError
from sft_cli.models import parts
from sft_cli.training.checkpoint import load_meta, load_weights


def load_model(cfg: DictConfig, ckpt: Path, device: torch.device):
    """(task, model): the checkpoint's task, given what its meta.json records (a classifier's class names), and
    its model in eval mode on `device`, built from `cfg` (the checkpoint's config, possibly overridden) without
    fetching any pretrained weights. For a transformers model, cfg.model.name_or_path and cfg.dataset.tokenizer
    are pointed at the checkpoint's own hf/ copy."""
    from sft_cli.config import build

    task = build(cfg.task)
    meta = load_meta(ckpt)
    task.set_info(meta)
    adapter, hf = cfg.get("adapter"), ckpt / "hf"
    if hf.is_dir():
        if "tokenizer" in cfg.dataset:
            cfg.dataset.tokenizer = str(hf)
        if not adapter:  # an adapter's base weights come from its base model, not from the checkpoint
            cfg.model.name_or_path = str(hf)
    model = _adapted_base(cfg, task, meta, ckpt) if adapter else task.model(cfg.model, pretrained=False)
    parts.require(model, cfg.model._target_)
    if adapter and hf.is_dir():  # the tokenizer (chat template) the run saved, not the base's
        from transformers import AutoTokenizer

        model.tokenizer = model.sft.tokenizer = AutoTokenizer.from_pretrained(hf)
    load_weights(ckpt, model)
    return task, model.to(device).eval()


def _adapted_base(cfg: DictConfig, task, meta: dict, ckpt: Path):
    """An adapter checkpoint's model before its weights load: the pretrained base it names, checked against the
    fingerprint it recorded, with the same adapter injected."""
    from sft_cli.config import build
    from sft_cli.models import adapters

    recorded, key = meta.get("adapter_base") or {}, adapters.base_key(cfg.model)
    try:
        model = parts.require(task.model(cfg.model, pretrained=True), cfg.model._target_)
    except SFTError as e:
        raise SFTError(f"{adapters.missing_base(recorded, ckpt, key)}\n  ({e})") from e
    adapters.apply(model, build(cfg.adapter))
    adapters.check_base(recorded, model, ckpt, key)
    return model
