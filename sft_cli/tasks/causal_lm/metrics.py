"""The causal-LM task's metric window: token-weighted loss, perplexity and next-token accuracy."""

import math
import time

import torch

from sft_cli.training import distributed


class TokenWindow:
    """Running sums of a language model on the device, between two reads: the summed loss over the learned
    tokens, their count, how many of them the model predicted exactly, the sequences and all their (unpadded)
    tokens. Summed over DDP processes before dividing, the loss is token-weighted (not a mean of per-batch
    means). The causal-LM task's window."""

    def __init__(self, device: torch.device):
        # loss, learned tokens, correct, sequences, tokens; float64 counts stay exact far beyond any run
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.device, self.start = device, time.perf_counter()

    def add(self, record: tuple) -> None:
        """record: (summed loss, learned tokens, correctly predicted ones, sequences, tokens): tensors or ints."""
        for k, value in enumerate(record):
            self.sums[k] += value

    def read(self) -> dict:
        """loss, perplexity, token_accuracy (over the learned tokens), samples (sequences), tokens, their rates."""
        loss_sum, learned, correct, sequences, tokens = distributed.all_reduce_sum(self.sums)[0].tolist()
        seconds = time.perf_counter() - self.start
        loss = loss_sum / max(learned, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "token_accuracy": correct / max(learned, 1),
                "samples": int(sequences), "samples_per_s": sequences / seconds, "tokens": int(tokens),
                "learned_tokens": int(learned), "tokens_per_s": tokens / seconds}

    def details(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"sums": self.sums}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["sums"].to(self.device)
