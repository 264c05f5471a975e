"""The fast input pipeline for image sets held in memory (CIFAR-10/100, MNIST, Fashion-MNIST, digits).

All images of a split live in one uint8 tensor, copied to the training device once. Each batch is taken
from it, then cropped, flipped and normalised with a few batched tensor ops on that device. There is no
per-sample Python, no PIL and no worker process. The result is what sft_cli.data.image_transforms gives
for train_crop pad|none: Resize(image_size), then RandomCrop(image_size, padding) with zero fill,
RandomHorizontalFlip, ToDtype(scale=True) and Normalize. dataset.pipeline chooses this pipeline, and
data.make_loader calls TensorImages.loader() for any dataset that has one.
"""

import math

import torch
from torch.nn import functional as nnf
from torchvision.transforms.v2 import functional as tvf

from sft_cli.errors import SFTError
from sft_cli.training.distributed import Context

# A resized copy up to this size is made once, at construction; a larger one (CIFAR at 224x224 is 7.5 GB)
# is resized batch by batch on the device instead.
RESIZE_ONCE_BYTES = 2 * 1024**3


class TensorImages:
    """One split: uint8 images (N, C, H, W) with C = 1 (grayscale) or 3, their labels, and the split's
    transforms (dataset.transforms, as sft_cli.data.image_transforms takes them). `train=True` marks the
    training split, which loader() augments when it shuffles. `indices` records which items of the source
    dataset these are.

    Indexing gives what evaluation sees: (normalised float (3, S, S), label), with no augmentation.
    Grayscale becomes 3 identical channels, as torchvision's RGB() makes them."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, train: bool, transforms: dict,
                 indices: list[int] | None = None):
        image_size, train_crop, crop_padding = (transforms[k] for k in ("image_size", "train_crop", "crop_padding"))
        if train_crop not in ("pad", "none"):
            raise SFTError(f"dataset.transforms.train_crop={train_crop!r}: the fast pipeline does pad or none only; "
                           "use dataset.pipeline=torchvision for it")
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3) \
                or images.shape[2] != images.shape[3]:
            raise SFTError(f"the fast pipeline needs square uint8 images (N, 1|3, H, H), not {tuple(images.shape)} "
                           f"{images.dtype}: use dataset.pipeline=torchvision")
        self.train, self.size = train, image_size
        self.augments = train and (transforms["hflip"] or (train_crop == "pad" and crop_padding > 0))
        # train_crop=pad resizes to image_size before the random crop; otherwise (eval, or train_crop=none)
        # the image is resized to eval_resize and center-cropped, exactly as image_transforms does.
        self.resize = image_size if train and train_crop == "pad" else transforms["eval_resize"]
        self.padding = crop_padding if train and train_crop == "pad" else 0
        self.hflip = train and transforms["hflip"]
        self.mean, self.std = transforms["mean"], transforms["std"]
        self.indices = indices if indices is not None else list(range(len(images)))
        self.resize_per_batch = self.resize != images.shape[-1] or image_size != images.shape[-1]
        if self.resize_per_batch and len(images) * images.shape[1] * image_size**2 < RESIZE_ONCE_BYTES:
            images = torch.cat([self._geometry(chunk) for chunk in images.split(4096)])  # chunks bound the memory
            self.resize_per_batch = False
        self.images, self.targets = images.contiguous(), torch.as_tensor(targets, dtype=torch.long)
        self._device, self._on_device, self._statistics = None, None, {}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.batch(self.images[i][None], None, None)[0], int(self.targets[i])

    def loader(self, batch_size: int, shuffle: bool, device: torch.device, ctx: Context = Context(),
               seed: int = 0) -> "TensorBatches":
        """Batches (float (B, 3, S, S), int64 (B,)) already on `device`; see TensorBatches."""
        return TensorBatches(self, batch_size, shuffle, device, ctx, seed)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels on `device`, copied there on first use and kept (one device at a time)."""
        if self._device != device:
            self._on_device = None  # free the old copy before making the new one
            self._on_device = (self.images.to(device), self.targets.to(device))
            self._device = device
        return self._on_device

    def batch(self, images: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> normalised float (B, 3, S, S). `offsets` (2, B) are the crops' top and
        left corners in the padded image, `flips` (B,) bools; None means no crop or no flip."""
        if self.resize_per_batch:
            images = self._geometry(images)
        if offsets is not None or flips is not None:
            images = self._crop_and_flip(images, offsets, flips)
        # the operations of ToDtype(scale=True) and Normalize, in their order, so values match bit for bit;
        # a grayscale image's single channel is broadcast to 3 by the subtraction
        if images.device not in self._statistics:  # made once per device, not copied there for every batch
            self._statistics[images.device] = tuple(torch.tensor(v, dtype=torch.float32, device=images.device)
                                                    .view(-1, 1, 1) for v in (self.mean, self.std))
        mean, std = self._statistics[images.device]
        x = images.to(torch.float32).mul_(1.0 / 255).sub(mean).div_(std)
        return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x

    def _geometry(self, images: torch.Tensor) -> torch.Tensor:
        if self.resize != images.shape[-1]:
            images = tvf.resize(images, [self.resize], antialias=True)
        if self.size != images.shape[-1]:
            images = tvf.center_crop(images, [self.size])
        return images

    def _crop_and_flip(self, images: torch.Tensor, offsets: torch.Tensor | None,
                       flips: torch.Tensor | None) -> torch.Tensor:
        # One gather does both: output pixel (b, c, i, j) is padded pixel (b, c, top_b + i, left_b + j), or
        # (b, c, top_b + i, left_b + S-1-j) when sample b is flipped (torchvision crops, then flips).
        b, c, s, device = images.shape[0], images.shape[1], self.size, images.device
        p = self.padding
        if p:
            images = nnf.pad(images, (p, p, p, p))  # zero fill, as RandomCrop(padding=p) pads
        top, left = offsets if offsets is not None else torch.zeros(2, b, dtype=torch.long, device=device)
        steps = torch.arange(s, device=device)
        rows = top[:, None] + steps
        cols = left[:, None] + (torch.where(flips[:, None], s - 1 - steps, steps) if flips is not None else steps)
        samples, channels = torch.arange(b, device=device)[:, None, None, None], torch.arange(c, device=device)
        return images[samples, channels[:, None, None], rows[:, None, :, None], cols[:, None, None, :]]


class TensorBatches:
    """The batches of one TensorImages, as a DataLoader would give them, built on `device`.

    shuffle=True (training): one process (world_size 1) draws each epoch's order from torch's global CPU
    RNG. It also draws the crop offsets and flips there, then moves them to the device. Checkpoints hold
    that RNG, so a resumed run sees the same batches. A last batch of exactly one sample is dropped, because
    BatchNorm cannot train on it. With ctx.world_size > 1 it works like torch's DistributedSampler: every rank
    draws the same order from a generator seeded with seed + epoch (call set_epoch), pads it to a multiple of
    world_size, and takes every world_size-th index from ctx.rank on. All ranks get the same number of
    batches of batch_size (the per-rank size).
    shuffle=False (evaluation): fixed order, no augmentation. Rank r takes the indices r, r + world_size, ...
    with no padding, so every sample is counted exactly once overall."""

    def __init__(self, data: TensorImages, batch_size: int, shuffle: bool, device: torch.device,
                 ctx: Context = Context(), seed: int = 0):
        self.data, self.batch_size, self.shuffle, self.device = data, batch_size, shuffle, torch.device(device)
        rank, world_size = ctx.rank, ctx.world_size
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        n = len(data)
        self.count = math.ceil(n / world_size) if shuffle else len(range(rank, n, world_size))
        self.drop_last = shuffle and self.count % batch_size == 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.count // self.batch_size if self.drop_last else math.ceil(self.count / self.batch_size)

    def order(self) -> torch.Tensor:
        """This rank's indices for the current epoch, in batch order (CPU)."""
        n = len(self.data)
        if not self.shuffle:
            return torch.arange(self.rank, n, self.world_size)
        if self.world_size == 1:
            return torch.randperm(n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        total = self.count * self.world_size
        perm = perm.repeat(math.ceil(total / n))[:total]  # pad with the first indices, as DistributedSampler does
        return perm[self.rank::self.world_size]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        # from pinned memory the copy to a GPU is asynchronous: the host does not wait for queued work
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def __iter__(self):
        order = self.order()
        offsets = flips = None
        if self.shuffle and self.data.augments:
            m, p = len(order), self.data.padding
            offsets = self._to_device(torch.randint(0, 2 * p + 1, (2, m))) if p else None
            flips = self._to_device(torch.rand(m) < 0.5) if self.data.hflip else None
        images, targets = self.data.on(self.device)
        order = self._to_device(order)
        for k in range(len(self)):
            part = slice(k * self.batch_size, (k + 1) * self.batch_size)
            idx = order[part]
            yield (self.data.batch(images.index_select(0, idx), None if offsets is None else offsets[:, part],
                                   None if flips is None else flips[part]), targets.index_select(0, idx))
