"""The token-classification task (configs/task/token_classification.yaml): named-entity recognition and other
sequence labelling, a tag per word.

Data come from conll.conll_files (CoNLL or JSONL files, words aligned to sub-tokens, long sentences split
into windows of whole words), the model from model.hf_token_classifier (any AutoModelForTokenClassification),
the loss from configs/loss/tag_cross_entropy.yaml (loss.py). It reports entity-level precision, recall and
F1 (seqeval, strict, the files' tag scheme; per entity type in test.json and sft-eval) and word accuracy.
"""

import importlib.util

import torch
from omegaconf import DictConfig
from torch import nn

from sft_cli import config
from sft_cli.errors import SFTError
from sft_cli.extras import install_command
from sft_cli.task import Splits
from sft_cli.tasks.token_classification.metrics import SpanWindow


class TokenClassification:
    """Cross-entropy per labelled sub-token; the tags and their scheme are what a checkpoint needs besides its
    config."""

    predict_example = 'text="..."'  # what sft-train suggests after a run
    metrics = ("loss", "precision", "recall", "f1", "token_accuracy")

    def __init__(self):
        if importlib.util.find_spec("seqeval") is None:
            raise SFTError("task=token_classification scores entities with seqeval, which is not installed: "
                           + install_command("ner"))
        self.tags: list[str] | None = None
        self.scheme: str | None = None
        self.longest = 0
        self.criterion = None

    def data(self, dataset: DictConfig) -> Splits:
        splits = config.build(dataset)
        if not hasattr(splits, "scheme"):
            raise SFTError(f"task=token_classification needs tagged sentences (dataset=conll_files), not "
                           f"<{dataset._target_}>: set dataset=conll_files dataset.train_file=..., or use "
                           "+experiment=ner")
        self.tags, self.scheme, self.longest = splits.classes, splits.scheme, splits.longest
        return splits

    def info(self) -> dict:
        return {"tags": self.tags, "scheme": self.scheme}

    def set_info(self, info: dict) -> None:
        self.tags, self.scheme = info["tags"], info["scheme"]

    def model(self, model: DictConfig, pretrained: bool = True) -> nn.Module:
        from sft_cli.tasks.token_classification.model import position_limit

        built = config.build(model, classes=self.tags, **({} if pretrained else {"weights": None}))
        limit = position_limit(built)
        if limit is not None and self.longest > limit:
            raise SFTError(f"the longest example has {self.longest} tokens, but model {model.get('name_or_path')} "
                           f"takes at most {limit}: set dataset.max_length={limit} (longer sentences are split "
                           "into windows of whole words)")
        return built

    def set_loss(self, loss: DictConfig, splits: Splits, model: nn.Module) -> None:
        self.criterion = config.build(loss)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        inputs, target = batch
        logits = model(inputs)
        summed, labelled = self.criterion(logits, target["labels"])
        first = target["first"]  # each word's first sub-token: where its tag is scored
        record = (summed.detach(), labelled, torch.where(first, logits.detach().argmax(-1), -1),
                  torch.where(first, target["labels"], -1), target["sentence"], target["window"])
        return summed, labelled, record  # the loop divides by the labelled sub-tokens of the whole step

    def window(self, device: torch.device) -> SpanWindow:
        return SpanWindow(self.tags, self.scheme, device)

    def judge(self, model: nn.Module, split: str) -> dict:
        return {}  # nothing generated: the window's metrics say it

    def generate_samples(self, model: nn.Module) -> list[dict]:
        return []  # the entity scores say it

    def predict(self, cfg: DictConfig, out_dir) -> list[dict]:
        from sft_cli.tasks.token_classification.predict import predict

        return predict(cfg, out_dir)
