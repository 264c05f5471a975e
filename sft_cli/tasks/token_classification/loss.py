"""The token-classification task's loss (configs/loss/tag_cross_entropy.yaml)."""

import torch
from torch import nn


class TagCrossEntropy:
    """configs/loss/tag_cross_entropy.yaml: cross-entropy over the labelled sub-tokens of a token classifier
    (a word's first sub-token, or every sub-token with dataset.label_all_tokens; -100 marks the others and the
    padding, which are left out)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, labelled sub-tokens) of a batch: the loop divides a step's sum by its count, once."""
        summed = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                             reduction="sum", label_smoothing=self.label_smoothing)
        return summed, (labels != -100).sum()
