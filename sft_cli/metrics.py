"""Accuracy and F1 from a confusion matrix accumulated on the device (no host sync per step)."""

import json

import torch


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


class MetricsFiles:
    """metrics.jsonl (a record per logging interval and per validation) and metrics.csv (a row per epoch)
    in the run folder. Each write is flushed, so a killed run keeps everything up to its last record.
    With enabled=False (DDP ranks other than 0) it writes nothing."""

    CSV_COLUMNS = ("epoch", "step", "train_loss", "train_accuracy", "train_macro_f1", "val_loss", "val_accuracy",
                   "val_macro_f1", "lr", "train_samples_per_s", "elapsed")

    def __init__(self, run_dir, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.csv = open(run_dir / "metrics.csv", "a")
        if self.csv.tell() == 0:
            self.csv.write(",".join(self.CSV_COLUMNS) + "\n")

    def record(self, record: dict) -> None:
        if self.enabled:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def epoch_row(self, row: dict) -> None:
        if self.enabled:
            self.csv.write(",".join(_csv_value(row.get(c)) for c in self.CSV_COLUMNS) + "\n")
            self.csv.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.csv.close()


def _csv_value(value) -> str:
    return "" if value is None else str(value)  # str(float) round-trips exactly
