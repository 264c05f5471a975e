"""The task loss (cross-entropy with class weights) and extra terms: L = L_task + weight x L_extra."""

import torch
from torch import nn

from sft_cli.errors import SFTError


def class_weights(spec, targets: list[int], num_classes: int) -> torch.Tensor | None:
    """loss.class_weights: null, `balanced` (n / (classes x count_c), as scikit-learn), or a list."""
    if spec is None:
        return None
    if spec == "balanced":
        counts = torch.bincount(torch.tensor(targets), minlength=num_classes).float()
        if (counts == 0).any():
            empty = torch.nonzero(counts == 0).flatten().tolist()
            raise SFTError(f"loss.class_weights=balanced: classes {empty} have no training examples")
        return len(targets) / (num_classes * counts)
    if isinstance(spec, str) or len(spec) != num_classes:
        raise SFTError(f"loss.class_weights={spec!r} must be null, balanced, or a list of {num_classes} numbers "
                       "(one per class, in class order)")
    return torch.tensor([float(w) for w in spec])


class L2SP:
    """L2-SP (Li et al., 2018): weight x the summed squared distance of the pretrained parameters from
    their values when this object was made (before training). Layers the model builder created from
    scratch (model.sft_new_stages: the new head, a new stem) have no pretrained values and are not pulled."""

    def __init__(self, model: nn.Module, weight: float):
        new = [m for name, members in model.sft_stages if name in model.sft_new_stages for m in members]
        self.weight = weight
        self.start = {n: p.detach().clone() for n, p in model.named_parameters()
                      if not any(n == m or n.startswith(m + ".") for m in new)}

    def __call__(self, model: nn.Module) -> torch.Tensor:
        named = dict(model.named_parameters())
        return self.weight * sum((named[n] - p0).pow(2).sum() for n, p0 in self.start.items()
                                 if named[n].requires_grad)


def cross_entropy(cfg, train_targets: list[int], num_classes: int, device: torch.device) -> nn.CrossEntropyLoss:
    """The task loss from configs/loss/: label smoothing and class weights (computed on the train split)."""
    weights = class_weights(cfg.class_weights, train_targets, num_classes)
    return nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                               label_smoothing=cfg.label_smoothing)
