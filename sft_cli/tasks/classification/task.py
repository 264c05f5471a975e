"""The classification task (configs/task/classification.yaml): images or texts in, one of N classes out.

Data come from a dataset builder (images.py for images, texts.py for labelled texts), the model from a
classifier builder with a new head for the data's classes (models/vision.py, models/hf.py), the loss from
configs/loss/ (loss.py).
It reports loss, accuracy and macro-F1 from a confusion matrix accumulated on the device.
"""

import torch
from omegaconf import DictConfig
from torch import nn

from sft_cli import config
from sft_cli.task import Splits
from sft_cli.tasks.classification.metrics import ConfusionWindow
from sft_cli.training.loading import to_device


class Classification:
    """Cross-entropy on a classifier's logits; the class names are what a checkpoint needs besides its config."""

    metrics = ("loss", "accuracy", "macro_f1")

    def __init__(self, samples: int = 0):
        self.samples = samples
        self.classes: list[str] | None = None
        self.criterion = None
        self.splits: Splits | None = None

    def data(self, dataset: DictConfig) -> Splits:
        splits = config.build(dataset)
        self.classes, self.splits = splits.classes, splits
        return splits

    def info(self) -> dict:
        return {"classes": self.classes}

    def set_info(self, info: dict) -> None:
        self.classes = info["classes"]

    def model(self, model: DictConfig, pretrained: bool = True) -> nn.Module:
        return config.build(model, classes=self.classes, **({} if pretrained else {"weights": None}))

    def set_loss(self, loss: DictConfig, splits: Splits, model: nn.Module) -> None:
        self.criterion = config.build(loss, train_targets=splits.train_targets, num_classes=len(self.classes),
                                      model=model)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, float | torch.Tensor, tuple]:
        inputs, targets = batch
        logits = model(inputs)
        summed, weight = self.criterion(logits, targets), self.criterion.batch_weight(targets)
        record = (summed.detach(), weight, logits.detach(), targets)
        if model.training and self.criterion.extra is not None:
            # weight x the penalty: once the loop divides the step's sum by the step's weight, it counts once
            summed = summed + weight * self.criterion.extra()
        return summed, weight, record

    def window(self, device: torch.device) -> ConfusionWindow:
        return ConfusionWindow(len(self.classes), device)

    def judge(self, model: nn.Module, split: str) -> dict:
        return {}  # nothing generated: the window's metrics say it

    def generate_samples(self, model: nn.Module) -> list[dict]:
        """A text classifier's predicted labels for the first `samples` validation texts (samples.jsonl, the
        report: misclassified ones stand out); nothing for images, whose confusion matrix says it."""
        val = self.splits.val if self.splits is not None else None
        if not self.samples or model.sft.tokenizer is None or val is None:
            return []
        items = [val[i] for i in range(min(self.samples, len(val)))]
        inputs, targets = self.splits.collate(items)
        model.eval()
        with torch.inference_mode():
            predicted = model(to_device(inputs, next(model.parameters()).device)).argmax(1).tolist()
        return [{"prompt": model.tokenizer.decode(features["input_ids"], skip_special_tokens=True),
                 "reference": self.classes[t], "response": self.classes[p]}
                for (features, _), t, p in zip(items, targets.tolist(), predicted)]

    def predict(self, cfg: DictConfig, out_dir) -> list[dict]:
        from sft_cli.tasks.classification.predict import (
            predict,  # PIL and the text readers: only sft-predict needs them
        )

        return predict(cfg, out_dir)
