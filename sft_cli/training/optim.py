"""Optimizer parameter groups and lr schedules. Schedules share one signature,
(optimizer, num_training_steps, steps_per_epoch, **yaml), and all but `plateau` step once per optimizer step."""

import logging
import math

from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau

from sft_cli.config import build
from sft_cli.errors import SFTError
from sft_cli.training import distributed

log = logging.getLogger("sft_cli.optim")


def param_groups(model: nn.Module, head: str, lr: float, weight_decay: float, head_lr: float | None,
                 layer_decay: float | None = None) -> list[dict]:
    """Parameter groups by (backbone | head) x (decay | no decay), and by stage with layer_decay.

    Biases and normalisation weights (every 1-D parameter) get no weight decay. With layer_decay
    (layer-wise lr decay, the standard BERT/ViT fine-tuning recipe), the stage k stages below the top
    (model.sft.stages) trains at lr x layer_decay**k. Each group's `lr_scale` is its lr / optimizer.lr.
    Frozen parameters are included so that gradual unfreezing can wake them up; optimizers skip a
    parameter whose .grad is None, so they cost nothing while frozen. An adapter's base weights, which never
    train, are left out (model.sft.trainable)."""
    depth = {}  # parameter name -> stages below the top
    if layer_decay is not None:
        # the top is the head, or for transformers everything above the last encoder layer (pooler too)
        top = model.sft.depth_zero
        below = [stage for stage in model.sft.stages if stage[0] not in top]
        for k, (_, members) in enumerate(reversed(below), 1):
            for member in members:
                for name, _ in model.named_parameters():
                    if name == member or name.startswith(member + "."):
                        depth[name] = k
    groups: dict[tuple[bool, bool, int], list[nn.Parameter]] = {}
    allowed = model.sft.trainable  # an adapter's: the base weights never train
    for name, p in model.named_parameters():
        if allowed is not None and name not in allowed:
            continue
        is_head = name.startswith(head + ".")
        groups.setdefault((is_head, p.ndim <= 1, depth.get(name, 0)), []).append(p)
    return [{"params": params,
             "name": f"{'head' if is_head else 'backbone'}{f'/depth{k}' if k else ''}{'/no_decay' if no_decay else ''}",
             "lr": (head_lr if is_head and head_lr is not None else lr) * (layer_decay ** k if k else 1.0),
             "lr_scale": (head_lr / lr if is_head and head_lr is not None else 1.0) * (layer_decay ** k if k else 1.0),
             "weight_decay": 0.0 if no_decay else weight_decay}
            for (is_head, no_decay, k), params in sorted(groups.items())]


# The optimizers whose fused kernel takes FSDP's sharded parameters (DTensors); SGD's fails at its first step
SHARDED_FUSED = ("torch.optim.Adam", "torch.optim.AdamW")


def build_optimizer(cfg: DictConfig, groups: DictConfig, model: nn.Module, head: str) -> Optimizer:
    """instantiate(configs/optimizer/*) over param_groups(): `groups` is sft-cli's own node (train.yaml's
    param_groups: head_lr, layer_decay), kept apart from the torch.optim constructor's arguments."""
    params = param_groups(model, head, cfg.lr, cfg.get("weight_decay", 0.0), groups.head_lr, groups.layer_decay)
    if cfg.get("fused") and distributed.is_sharded(model) and cfg.get("_target_") not in SHARDED_FUSED:
        log.warning(f"optimizer.fused=true: {cfg.get('_target_')} has no fused kernel for FSDP's sharded parameters "
                    "(only Adam and AdamW have), so it runs unfused (set optimizer.fused=false to say so)")
        cfg = OmegaConf.merge(cfg, {"fused": False})
    try:
        return build(cfg, params=params)
    except SFTError as e:
        if cfg.get("fused") and "fused" in str(e) and "takes no argument" not in str(e):  # no fused kernel here
            raise SFTError(f"optimizer.fused=true is not supported here ({str(e)[:200]}): set "
                           "optimizer.fused=false") from e
        raise


def _warmup_then(optimizer, warmup_steps: int, after) -> LambdaLR:
    """LambdaLR: linear warmup from 0 over `warmup_steps`, then after(progress in [0, 1])."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return after(step - warmup_steps)

    return LambdaLR(optimizer, factor)


def constant(optimizer, num_training_steps: int, steps_per_epoch: int, warmup_epochs: float = 0) -> LambdaLR:
    return _warmup_then(optimizer, round(warmup_epochs * steps_per_epoch), lambda s: 1.0)


def step(optimizer, num_training_steps: int, steps_per_epoch: int, step_epochs: int, gamma: float,
         warmup_epochs: float = 0) -> LambdaLR:
    warmup = round(warmup_epochs * steps_per_epoch)
    return _warmup_then(optimizer, warmup, lambda s: gamma ** ((s + warmup) // (step_epochs * steps_per_epoch)))


def cosine(optimizer, num_training_steps: int, steps_per_epoch: int, warmup_epochs: float = 0,
           min_lr_ratio: float = 0.0) -> LambdaLR:
    warmup = round(warmup_epochs * steps_per_epoch)
    decay = max(1, num_training_steps - warmup)
    return _warmup_then(optimizer, warmup, lambda s: min_lr_ratio + (1 - min_lr_ratio) *
                        0.5 * (1 + math.cos(math.pi * min(s, decay) / decay)))


def linear(optimizer, num_training_steps: int, steps_per_epoch: int, warmup_epochs: float = 0) -> LambdaLR:
    warmup = round(warmup_epochs * steps_per_epoch)
    decay = max(1, num_training_steps - warmup)
    return _warmup_then(optimizer, warmup, lambda s: max(0.0, 1 - s / decay))


def onecycle(optimizer, num_training_steps: int, steps_per_epoch: int, **kwargs) -> OneCycleLR:
    """torch's OneCycleLR, peaking at each group's lr (so head_lr keeps its ratio)."""
    peaks = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=peaks, total_steps=num_training_steps, **kwargs)


def plateau(optimizer, num_training_steps: int, steps_per_epoch: int, **kwargs) -> ReduceLROnPlateau:
    """torch's ReduceLROnPlateau; the recipe steps it with the monitored metric after each validation."""
    return ReduceLROnPlateau(optimizer, **kwargs)
