"""Batches for the loop: a split's DataLoader (or a dataset's own batched loader), DDP shards, batches of similar
lengths, and a batch moved to the device. Nothing here knows which task it feeds."""

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from sft_cli.errors import SFTError
from sft_cli.task import Splits
from sft_cli.training import distributed


class LengthGroupedBatches(Sampler):
    """Train batches of similar lengths, so that padding each batch to its longest wastes little: the Hugging
    Face Trainer's group_by_length order (shuffle, sort windows of up to 50 batches by length, the longest
    batch first so an out-of-memory shows at once). It draws from torch's global RNG, which checkpoints hold,
    so resume sees the same batches."""

    def __init__(self, lengths: list[int], batch_size: int, window: int | None = None):
        self.lengths, self.batch_size, self.window = lengths, batch_size, window

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = get_length_grouped_indices(self.lengths, self.batch_size, self.window)
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


@dataclass(frozen=True)
class LoaderOptions:
    """How a run's batches are made, the same for every split."""

    device: torch.device
    num_workers: int = 0
    persistent_workers: bool = False
    seed: int = 0  # DDP: DistributedSampler's shuffling follows (seed, epoch)
    ctx: distributed.Context = distributed.Context()


def make_loader(splits: Splits, split: str, batch_size: int, options: LoaderOptions):
    """Batches of splits.<split> ("train" shuffles and augments; "val", "test" do not) on the device's side:
    the dataset's own batched loader when it has one (images held in memory), else a DataLoader. Under DDP
    each process gets its shard: training shards are padded to equal length (DistributedSampler), evaluation
    shards are not, so every example counts exactly once."""
    dataset, shuffle, ctx = getattr(splits, split), split == "train", options.ctx
    if hasattr(dataset, "loader"):
        return dataset.loader(batch_size, shuffle=shuffle, device=options.device, ctx=ctx, seed=options.seed)
    # A last train batch of one sample would make BatchNorm fail, so it is dropped in that case only (never the
    # only batch: a split of one sample, e.g. a few examples packed into one row).
    # Workers are not persistent by default: fresh ones draw their seeds from the torch RNG each epoch, which
    # the checkpoint holds, so a resumed run sees the same augmentations as an uninterrupted one.
    common = {"num_workers": options.num_workers, "collate_fn": splits.collate,
              "pin_memory": options.device.type == "cuda",
              "persistent_workers": options.persistent_workers and options.num_workers > 0}
    if shuffle and splits.group_lengths is not None:
        if ctx.enabled:
            raise SFTError("dataset.group_by_length=true does not work with several processes yet: set "
                           "dataset.group_by_length=false for DDP (dynamic padding still applies).")
        return DataLoader(dataset, batch_sampler=LengthGroupedBatches(splits.group_lengths, batch_size), **common)
    if ctx.enabled:
        sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, seed=options.seed) if shuffle \
            else distributed.EvalShard(len(dataset), ctx)
        size = len(sampler)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                          drop_last=shuffle and size % batch_size == 1 and size > 1, **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      drop_last=shuffle and len(dataset) % batch_size == 1 and len(dataset) > 1, **common)


def set_epoch(loader, epoch: int) -> None:
    # DistributedSampler and the in-memory loader derive their shuffling from (seed, epoch)
    target = loader if hasattr(loader, "set_epoch") else getattr(loader, "sampler", None)
    if hasattr(target, "set_epoch"):
        target.set_epoch(epoch)


def to_device(batch, device: torch.device):
    """A batch on the device: a tensor, or the tensors inside a (nested) tuple, list or dict, e.g. an image
    batch (images, labels) or a text batch ({input_ids, attention_mask, ...}, labels)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
