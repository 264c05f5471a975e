"""Classification losses (configs/loss/): cross-entropy with class weights, plus extra terms such as L2-SP."""

import torch
from torch import nn

from sft_cli.errors import SFTError


def resolve_class_weights(spec, targets: list[int], num_classes: int) -> torch.Tensor | None:
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


class CrossEntropy:
    """configs/loss/cross_entropy.yaml: cross-entropy with label smoothing and class weights (computed on the
    train split), plus an optional extra term built on the model (loss=l2sp): L = L_task + L_extra.
    The recipe passes what exists only at run time: the train labels, the class count and the model."""

    def __init__(self, label_smoothing: float, class_weights, extra, train_targets: list[int], num_classes: int,
                 model: nn.Module):
        weights = resolve_class_weights(class_weights, train_targets, num_classes)
        device = next(model.parameters()).device
        self.task = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                                        label_smoothing=label_smoothing, reduction="sum")
        self.extra = extra(model) if extra is not None else None  # a `_partial_` target, completed here

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's summed task loss (each example's cross-entropy times its class weight): what is reported.
        The loop divides the sum over a whole optimizer step by that step's batch_weight()s, once."""
        return self.task(logits.float(), targets)

    def batch_weight(self, targets: torch.Tensor) -> float | torch.Tensor:
        """What the batch's summed loss counts for: its size (known on the host, so no copy to the GPU), or
        with class weights the sum of its examples' weights (a device tensor), as torch's weighted mean divides."""
        if self.task.weight is None:
            return float(len(targets))
        return self.task.weight[targets].sum()


