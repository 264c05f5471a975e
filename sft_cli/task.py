"""What a task is: the seam between the one training loop (train.py) and what differs between kinds of
fine-tuning. A task is one module plus a YAML in configs/task/ whose `_target_` is its class; the recipe
builds it with `task = config.build(cfg.task)` and calls only what `Task` lists below. Nothing in the loop
asks which task it runs.

Call order: the loop calls data() first (a classifier learns its classes there), then info() and model();
restoring a checkpoint calls set_info() with what info() saved, then model(pretrained=False), and data() only
to evaluate. set_loss() comes after both, then loss() and window() for every batch.

The model a task builds is an nn.Module whose builder sets `model.sft`, a models.parts.Parts: its stages
(what freeze policies, layer-wise lr decay and the parameter table act on), the stages made from scratch (a
new head: never frozen, never pulled towards pretrained values by L2-SP), where its pretrained weights came
from, its tokenizer, and what rebuilds it without its source (save_extras). adapters.apply (adapter=lora)
adds Parts.adapter: what may train at all, and the base it needs.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset


@dataclass
class Splits:
    """What a task's data() returns: the train/val/test datasets (`test` None when there is no held-out split)
    and how to batch them. Classifiers also give their class names and the train labels (class weights are
    computed from them without decoding an input); other tasks leave them out."""

    train: Dataset
    val: Dataset
    test: Dataset | None
    classes: list[str] | None = None
    train_targets: list[int] | None = None
    collate: Callable | None = None  # the DataLoader's collate_fn (None: torch's default stacking)
    group_lengths: list[int] | None = None  # train lengths: when set, train batches group similar lengths
    skipped: dict[str, int] = field(default_factory=dict)  # dataset.<file key>: rows left out by skip_bad_rows
    # several train files (dataset.train_files): per file key, its path, examples, how many train drew, their share
    mix: dict[str, dict] = field(default_factory=dict)


class Window(Protocol):
    """Metrics accumulated on the device between two reads, so the training step never waits for the host."""

    def add(self, record: Any) -> None: ...

    def read(self) -> dict:
        """Every metric in Task.metrics plus `samples` and `samples_per_s`, as plain numbers (syncs once)."""

    def details(self) -> dict:
        """After read(): what an evaluation reports beyond the scalars (per-class scores, a confusion matrix)."""

    def state_dict(self) -> dict: ...  # saved in a checkpoint written within an epoch

    def load_state_dict(self, state: dict) -> None: ...


class Task(Protocol):
    metrics: tuple[str, ...]  # what read() (and judge()) report; trainer.monitor is val/<one of these>
    # optional, `metrics` when absent: those of train rows (metrics.csv's train_ columns): judge() reports on val only
    train_metrics: tuple[str, ...]
    # optional: metrics the task can report but its config turns off, each with what turns it on (named when
    # trainer.monitor asks for one)
    metrics_off: dict[str, str]
    # optional, False when absent: the loop scores the untrained model once (an epoch-0 val row) as a baseline
    validate_before_training: bool

    def data(self, dataset: DictConfig) -> Splits:
        """The train/val/test splits and their batching (Splits.collate, Splits.group_lengths)."""

    def info(self) -> dict:
        """What rebuilding the model needs beyond the config (classifiers: the class names, from data());
        saved in every checkpoint's meta.json, compared on resume, and passed back through set_info()."""

    def set_info(self, info: dict) -> None: ...

    def model(self, model: DictConfig, pretrained: bool = True) -> nn.Module:
        """The model for info(); pretrained=False builds the architecture alone (a checkpoint is loaded next)."""

    def set_loss(self, loss: DictConfig, splits: Splits, model: nn.Module) -> None:
        """Build configs/loss/* for this run's data and model (class weights, L2-SP anchors)."""

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, float | torch.Tensor, Any]:
        """(summed loss, weight, record) of one batch, on the device. The loss is a sum, not a mean: the loop
        adds the weights (examples, learned tokens, class weights) of every micro-batch of an optimizer step
        on every process and divides the step's gradient by that total once, so each example or token counts
        the same however the step is split (accumulation, DDP, length grouping). The record is what the
        window adds. In eval mode (model.training False) only the record matters: extra terms such as L2-SP
        are left out; in training they enter the sum times the batch's weight, so they count once a step."""

    def window(self, device: torch.device) -> Window: ...

    def generate_samples(self, model: nn.Module) -> list[dict]:
        """What the model makes of a few validation inputs, written to samples.jsonl before training and at each
        validation (a language model's greedy answers); [] when the metrics say it all (classifiers)."""

    def judge(self, model: nn.Module, split: str) -> dict:
        """Metrics of what the model generates for the split's ("val" or "test") inputs, computed after the window
        at every evaluation and merged into its result: a language model's answers compared with the references
        (exact_match, json_valid, ...: metric names, also in `metrics`), with details such as the answers. {} for
        a task whose window says it all, and for a validation it skips (the loop then leaves those metrics out
        of that validation's record and judges no improvement on them). Every DDP process calls it."""

    def predict(self, cfg: DictConfig, out_dir) -> list[dict]:
        """sft-predict for a checkpoint of this task."""
