"""L2-SP, a penalty that pulls pretrained weights towards their starting values (configs/loss/l2sp.yaml): an
extra term of any task's loss, built on the model."""

import torch
from torch import nn


class L2SP:
    """L2-SP (Li et al., 2018): weight x the summed squared distance of the pretrained parameters from
    their values when this object was made (before training). Layers the model builder created from
    scratch (model.sft.new_stages: the new head, a new stem) have no pretrained values and are not pulled.
    It holds the parameters themselves, not their names, so it works the same through a DDP wrapper."""

    def __init__(self, model: nn.Module, weight: float):
        new = [m for name, members in model.sft.stages if name in model.sft.new_stages for m in members]
        self.weight = weight
        self.anchors = [(p, p.detach().clone()) for n, p in model.named_parameters()
                        if not any(n == m or n.startswith(m + ".") for m in new)]

    def __call__(self) -> torch.Tensor:
        return self.weight * sum((p - p0).pow(2).sum() for p, p0 in self.anchors if p.requires_grad)
