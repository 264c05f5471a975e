"""Accuracy and F1 from a confusion matrix accumulated on the device (no host sync per step), the on-device
window that accumulates them, and the metric files of a run."""

import time

import torch

from sft_cli.training import distributed


def confusion(logits: torch.Tensor, targets: torch.Tensor, num_classes: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """(num_classes, num_classes) counts: row = true class, column = predicted class; added into `out`
    when given. index_add_, unlike bincount, never waits for the GPU (bincount reads the maximum first)."""
    if out is None:
        out = torch.zeros(num_classes, num_classes, dtype=torch.long, device=targets.device)
    idx = targets * num_classes + logits.argmax(dim=1)
    out.view(-1).index_add_(0, idx, torch.ones_like(idx))
    return out


def scores(cm: torch.Tensor) -> dict:
    """accuracy, macro_f1 and per-class precision/recall/f1/support from a confusion matrix.

    Macro-F1 averages over classes that occur in the labels or the predictions; a class absent from both
    has no defined F1 and is left out (scikit-learn would count it as 0 and warn)."""
    cm = cm.double().cpu()
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = support + predicted
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    present = denom > 0
    return {
        "accuracy": (tp.sum() / cm.sum().clamp(min=1)).item(),
        "macro_f1": f1[present].mean().item() if present.any() else 0.0,
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": support.long().tolist(),
    }


class ConfusionWindow:
    """Running loss and confusion counts of a classifier on the device, between two reads. add() never waits
    for the device; read() syncs once, sums over DDP processes and returns plain numbers. It is what
    Classification.window() gives the loop (a task's window: add, read, details, state_dict, load_state_dict)."""

    def __init__(self, num_classes: int, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.weight_sum = 0.0  # a host float, or a device tensor once class weights are added
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
        self.num_classes, self.device, self.start = num_classes, device, time.perf_counter()

    def add(self, record: tuple) -> None:
        """record: (summed loss of the batch, its weight, logits, targets), all detached."""
        summed, weight, logits, targets = record
        self.loss_sum += summed.float()
        self.weight_sum += weight
        confusion(logits, targets, self.num_classes, out=self.confusion)

    def read(self) -> dict:
        """loss, accuracy, macro_f1, samples and samples_per_s; keeps the summed matrix for details()."""
        weight_sum = torch.as_tensor(self.weight_sum, dtype=torch.float32, device=self.device)
        loss_sum, weight_sum, self.total = distributed.all_reduce_sum(self.loss_sum, weight_sum, self.confusion)
        s = scores(self.total)
        samples = int(self.total.sum())
        return {"loss": (loss_sum / weight_sum.clamp(min=1e-12)).item(), "accuracy": s["accuracy"],
                "macro_f1": s["macro_f1"], "samples": samples,
                "samples_per_s": samples / (time.perf_counter() - self.start)}

    def details(self) -> dict:
        """After read(): per-class precision/recall/F1/support and the confusion matrix (what sft-eval shows)."""
        return {**scores(self.total), "confusion": self.total.tolist()}

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum, "weight_sum": self.weight_sum, "confusion": self.confusion}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum = state["loss_sum"].to(self.device)
        weight = state["weight_sum"]
        self.weight_sum = weight.to(self.device) if isinstance(weight, torch.Tensor) else weight
        self.confusion = state["confusion"].to(self.device)


