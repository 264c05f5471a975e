"""The causal-LM task's loss (configs/loss/token_cross_entropy.yaml)."""

import torch
from torch import nn

from sft_cli.models.hf import next_token_positions


class TokenCrossEntropy:
    """configs/loss/token_cross_entropy.yaml: next-token cross-entropy over the learned tokens of a causal LM
    (labels of -100, the prompt and the padding, are left out)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed loss, learned tokens, correctly predicted tokens) of a batch. Either the logits of every
        position (batch, time, vocab) and the labels (batch, time): position t predicts token t+1; or, as
        CausalLM(inputs, labels) gives them, the logits at the learned positions alone (n, vocab) and the
        tokens they predict (n,)."""
        if logits.dim() == 3:
            logits, labels = next_token_positions(logits, labels)
        logits = logits.float()
        summed = nn.functional.cross_entropy(logits, labels, reduction="sum", label_smoothing=self.label_smoothing)
        return summed, labels.ne(-100).sum(), (logits.argmax(-1) == labels).sum()
