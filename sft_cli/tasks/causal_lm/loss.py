"""The causal-LM task's loss (configs/loss/token_cross_entropy.yaml)."""

import torch
from torch import nn


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
