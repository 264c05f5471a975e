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


class L2SP:
    """L2-SP (Li et al., 2018): weight x the summed squared distance of the pretrained parameters from
    their values when this object was made (before training). Layers the model builder created from
    scratch (model.sft_new_stages: the new head, a new stem) have no pretrained values and are not pulled.
    It holds the parameters themselves, not their names, so it works the same through a DDP wrapper."""

    def __init__(self, model: nn.Module, weight: float):
        new = [m for name, members in model.sft_stages if name in model.sft_new_stages for m in members]
        self.weight = weight
        self.anchors = [(p, p.detach().clone()) for n, p in model.named_parameters()
                        if not any(n == m or n.startswith(m + ".") for m in new)]

    def __call__(self) -> torch.Tensor:
        return self.weight * sum((p - p0).pow(2).sum() for p, p0 in self.anchors if p.requires_grad)


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


class TokenCrossEntropy:
    """configs/loss/token_cross_entropy.yaml: next-token cross-entropy over the learned tokens of a causal LM
    (labels of -100, the prompt and the padding, are left out)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed loss, learned tokens, correctly predicted tokens) of a batch; position t predicts token t+1."""
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        learned = labels != -100
        summed = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                             reduction="sum", label_smoothing=self.label_smoothing)
        correct = ((logits.argmax(-1) == labels) & learned).sum()
        return summed, learned.sum(), correct
