"""Image datasets as train/val/test splits. Each builder is a `_target_` in configs/dataset/."""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import to_absolute_path
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets
from torchvision.transforms import v2

from sft_cli import distributed
from sft_cli.errors import SFTError, not_one_of
from sft_cli.fast_data import TensorImages

log = logging.getLogger(__name__)
TRAIN_CROPS = ("pad", "resized", "none")
PIPELINES = ("auto", "fast", "torchvision")


@dataclass
class Splits:
    """What every dataset builder returns. `test` is None when the data has no held-out split.
    Items are (input, label): an image tensor, or for text a dict of token lists that `collate` pads."""

    train: Dataset
    val: Dataset
    test: Dataset | None
    classes: list[str]
    train_targets: list[int]  # for class weights, without decoding a single input
    collate: Callable | None = None  # the DataLoader's collate_fn (None: torch's default stacking)
    group_lengths: list[int] | None = None  # train lengths: when set, train batches group similar lengths


class LengthGroupedBatches(Sampler):
    """Train batches of similar lengths, so that padding each batch to its longest wastes little: shuffle,
    cut into windows of `window` batches, sort each window by length, cut it into batches, shuffle those.
    It draws from torch's global RNG, which checkpoints hold, so resume sees the same batches."""

    def __init__(self, lengths: list[int], batch_size: int, window: int = 50):
        self.lengths, self.batch_size, self.window = lengths, batch_size, window

    def __iter__(self):
        order, size = torch.randperm(len(self.lengths)).tolist(), self.batch_size * self.window
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start:start + size], key=lambda i: -self.lengths[i])
            batches += [chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        for k in torch.randperm(len(batches)).tolist():
            yield batches[k]

    def __len__(self) -> int:
        size = self.batch_size * self.window
        return sum(-(-min(size, len(self.lengths) - s) // self.batch_size) for s in range(0, len(self.lengths), size))


class Transformed(Dataset):
    """The items `indices` of `base` (which yields (image, label)), with `transform` applied to the image."""

    def __init__(self, base: Dataset, indices: list[int], transform):
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.base[self.indices[i]]
        return self.transform(image), label


def image_transforms(train: bool, image_size: int, train_crop: str, crop_padding: int, hflip: bool,
                     eval_resize: int, mean: list[float], std: list[float]) -> v2.Compose:
    """PIL or tensor image -> normalised float RGB tensor; augmentation only when `train`."""
    if train_crop not in TRAIN_CROPS:
        raise SFTError(not_one_of("dataset.transforms.train_crop", train_crop, TRAIN_CROPS))
    steps = [v2.ToImage(), v2.RGB()]  # grayscale sets (MNIST, digits) become 3-channel for RGB backbones
    if train and train_crop == "resized":
        steps.append(v2.RandomResizedCrop(image_size, antialias=True))
    elif train and train_crop == "pad":
        steps += [v2.Resize(image_size, antialias=True), v2.RandomCrop(image_size, padding=crop_padding)]
    else:
        steps += [v2.Resize(eval_resize, antialias=True), v2.CenterCrop(image_size)]
    if train and hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def stratified_split(targets: list[int], size: float | int, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (keep, held_out), holding out `size` (a fraction or a count) of each class."""
    n = len(targets)
    if not isinstance(size, (int, float)) or isinstance(size, bool):
        raise SFTError(f"dataset.val_size={size!r} must be a fraction in (0, 1) or a count of examples")
    fraction = size if isinstance(size, float) and size < 1 else size / n
    if not 0 < fraction < 1:
        raise SFTError(f"dataset.val_size={size} must be a fraction in (0, 1) or a count below {n}")
    generator = torch.Generator().manual_seed(seed)
    keep, held_out = [], []
    for c in sorted(set(targets)):
        members = [i for i, t in enumerate(targets) if t == c]
        members = [members[j] for j in torch.randperm(len(members), generator=generator)]
        k = min(round(len(members) * fraction), len(members) - 1)  # never take a class out of training
        held_out += members[:k]
        keep += members[k:]
    if not held_out:
        raise SFTError(f"dataset.val_size={size} holds out no example of {n} ({len(set(targets))} classes): "
                       "raise it, e.g. dataset.val_size=0.2")
    return sorted(keep), sorted(held_out)


def _pixels(base) -> torch.Tensor | None:
    """All images of `base` as one uint8 (N, C, H, W) tensor, when it holds them in memory as one array and
    its items are exactly those pixels (torchvision's CIFAR and MNIST families, digits); else None."""
    if isinstance(base, InMemoryImages):
        return base.images.unsqueeze(1)
    item = type(base).__getitem__  # a subclass that reads its items differently (e.g. QMNIST) is left out
    if item is datasets.CIFAR10.__getitem__:  # numpy (N, H, W, 3)
        return torch.from_numpy(base.data).permute(0, 3, 1, 2)
    if item is datasets.MNIST.__getitem__ and isinstance(base.data, torch.Tensor):  # (N, H, W)
        return base.data.unsqueeze(1)
    return None


def _fast(pipeline: str, transforms: dict, bases: list) -> bool:
    """Whether dataset.pipeline (auto, fast, torchvision) gives the fast pipeline for these images."""
    if pipeline not in PIPELINES:
        raise SFTError(not_one_of("dataset.pipeline", pipeline, PIPELINES))
    if pipeline == "torchvision":
        return False
    reason = None
    if transforms["train_crop"] == "resized":
        reason = ("dataset.transforms.train_crop=resized (RandomResizedCrop) has no batched version; "
                  "train_crop=pad or none has")
    elif any(base is not None and _pixels(base) is None for base in bases):
        reason = "its images are not held in memory as one array (an image folder is read file by file)"
    if reason and pipeline == "fast":
        raise SFTError(f"dataset.pipeline=fast does not apply to this dataset: {reason}. Use "
                       "dataset.pipeline=torchvision (per-sample transforms), or auto (fast where it applies).")
    return reason is None


def _split(base, indices: list[int], train: bool, transforms: dict, fast: bool) -> Dataset:
    """The items `indices` of `base` with the train or eval transforms of the chosen pipeline."""
    if not fast:
        return Transformed(base, indices, image_transforms(train, **transforms))
    rows = torch.tensor(indices, dtype=torch.long)
    targets = torch.as_tensor(base.targets, dtype=torch.long)[rows]
    return TensorImages(_pixels(base)[rows], targets, train, indices=indices, **transforms)


def _make_splits(train_base, test_base, classes, val_size, split_seed, transforms, val_base=None,
                 pipeline: str = "auto") -> Splits:
    targets = [int(t) for t in train_base.targets]
    image_transforms(True, **transforms)  # checks train_crop whichever pipeline runs
    fast = _fast(pipeline, transforms, [train_base, val_base, test_base])
    log.info(f"input pipeline: {'fast (batched tensor ops on the device)' if fast else 'torchvision (per sample)'}")
    if val_base is None:
        train_idx, val_idx = stratified_split(targets, val_size, split_seed)
        val = _split(train_base, val_idx, False, transforms, fast)
    else:
        train_idx = list(range(len(targets)))
        val = _split(val_base, list(range(len(val_base))), False, transforms, fast)
    test = None if test_base is None else _split(test_base, list(range(len(test_base))), False, transforms, fast)
    return Splits(_split(train_base, train_idx, True, transforms, fast), val, test, list(classes),
                  [targets[i] for i in train_idx])


def _skip_checksums(cls):
    # torchvision's CIFAR classes compare every file with the official md5 (a user's subset or re-pickled
    # copy fails); its check_integrity() treats an md5 of None as "the file exists", so clear them.
    return type(f"Unverified{cls.__name__}", (cls,), {
        "train_list": [[name, None] for name, _ in cls.train_list],
        "test_list": [[name, None] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


def torchvision_dataset(name: str, root: str, download: bool, verify: bool, val_size: float | int,
                        split_seed: int, transforms: dict, pipeline: str = "auto") -> Splits:
    """A torchvision dataset with a train= flag (CIFAR10/100, MNIST, FashionMNIST, ...): validation is
    carved from train; the official test split is kept for the final test evaluation. `pipeline`
    (dataset.pipeline) is absent from configs saved before it existed: they get auto."""
    cls = getattr(datasets, name, None)
    if cls is None:
        raise SFTError(f"dataset.name={name!r} is not a torchvision.datasets class (e.g. CIFAR10, CIFAR100, "
                       "MNIST, FashionMNIST)")
    if not verify and hasattr(cls, "train_list"):
        cls = _skip_checksums(cls)
    root = to_absolute_path(root)
    try:
        train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; "Dataset not found" a RuntimeError
        folder = Path(root) / getattr(cls, "base_folder", "")
        hint = " A local copy whose checksums differ from the official files loads with dataset.verify=false." \
            if verify and folder.is_dir() and hasattr(cls, "train_list") else ""
        raise SFTError(f"could not load {name} from dataset.root={root} ({type(e).__name__}: {e}). "
                       f"Put the official files in {folder} (or point dataset.root at the folder that holds "
                       f"them), or run once with network access and dataset.download=true.{hint}") from e
    return _make_splits(train, test, train.classes, val_size, split_seed, transforms, pipeline=pipeline)


def _image_folder(path: Path, key: str) -> datasets.ImageFolder:
    try:
        return datasets.ImageFolder(str(path))
    except (FileNotFoundError, OSError) as e:
        raise SFTError(f"{key}={path}: {e}. Expected one subfolder per class holding images "
                       "(root/<class>/*.jpg, or root/train/<class>/ and root/val/<class>/).") from e


def image_folder(root: str, val_size: float | int, split_seed: int, transforms: dict,
                 pipeline: str = "auto") -> Splits:
    """Your images: root/<class>/* (validation carved from it) or root/{train,val[,test]}/<class>/*."""
    path = Path(to_absolute_path(root))
    if not path.is_dir():
        raise SFTError(f"dataset.root={path} is not a directory. Point it at a folder of class subfolders.")
    if not (path / "train").is_dir():
        base = _image_folder(path, "dataset.root")
        return _make_splits(base, None, base.classes, val_size, split_seed, transforms, pipeline=pipeline)
    train = _image_folder(path / "train", "dataset.root")
    parts = {split: _image_folder(path / split, "dataset.root") for split in ("val", "test") if (path / split).is_dir()}
    for split, part in parts.items():
        if part.classes != train.classes:
            raise SFTError(f"{path / split} has classes {part.classes} but {path / 'train'} has {train.classes}: "
                           "every split needs the same class subfolders.")
    return _make_splits(train, parts.get("test"), train.classes, val_size, split_seed, transforms,
                        val_base=parts.get("val"), pipeline=pipeline)


class InMemoryImages(Dataset):
    """uint8 images (N, H, W) held in memory, yielded as (tensor image, label) pairs."""

    def __init__(self, images: torch.Tensor, targets: list[int]):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i].unsqueeze(0), self.targets[i]


def sklearn_digits(val_size: float, test_size: float, split_seed: int, transforms: dict,
                   pipeline: str = "auto") -> Splits:
    """scikit-learn's bundled 8x8 handwritten digits: a real dataset that needs no download."""
    from sklearn.datasets import load_digits  # only this dataset needs scikit-learn

    digits = load_digits()
    images = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8)  # pixel values 0..16
    targets = [int(t) for t in digits.target]
    rest, test_idx = stratified_split(targets, test_size, split_seed)
    base = InMemoryImages(images, targets)
    pool = InMemoryImages(images[rest], [targets[i] for i in rest])
    splits = _make_splits(pool, None, [str(c) for c in range(10)], val_size, split_seed, transforms, pipeline=pipeline)
    splits.test = _split(base, test_idx, False, transforms, fast=isinstance(splits.train, TensorImages))
    return splits


def make_loader(dataset, batch_size: int, num_workers: int, device: torch.device, shuffle: bool, collate=None,
                group_lengths: list[int] | None = None, ctx=distributed.Context(), seed: int = 0,
                persistent_workers: bool = False):
    """Batches of `dataset` on `device`'s side: the dataset's own batched loader when it has one (images held
    in memory), else a DataLoader. Under DDP each process gets its shard: training shards are padded to equal
    length (DistributedSampler), evaluation shards are not, so every example counts exactly once."""
    if hasattr(dataset, "loader"):
        return dataset.loader(batch_size, shuffle=shuffle, device=device, rank=ctx.rank,
                              world_size=ctx.world_size, seed=seed)
    # A last train batch of one sample would make BatchNorm fail, so it is dropped in that case only.
    # Workers are not persistent by default: fresh ones draw their seeds from the torch RNG each epoch, which
    # the checkpoint holds, so a resumed run sees the same augmentations as an uninterrupted one.
    common = {"num_workers": num_workers, "collate_fn": collate, "pin_memory": device.type == "cuda",
              "persistent_workers": persistent_workers and num_workers > 0}
    if group_lengths is not None:
        if ctx.enabled:
            raise SFTError("dataset.group_by_length=true does not work with several processes yet: set "
                           "dataset.group_by_length=false for DDP (dynamic padding still applies).")
        return DataLoader(dataset, batch_sampler=LengthGroupedBatches(group_lengths, batch_size), **common)
    if ctx.enabled:
        sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, seed=seed) if shuffle \
            else distributed.EvalShard(len(dataset), ctx)
        size = len(sampler)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                          drop_last=shuffle and size % batch_size == 1, **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      drop_last=shuffle and len(dataset) % batch_size == 1, **common)


def set_epoch(loader, epoch: int) -> None:
    # DistributedSampler and the in-memory loader derive their shuffling from (seed, epoch)
    target = loader if hasattr(loader, "set_epoch") else getattr(loader, "sampler", None)
    if hasattr(target, "set_epoch"):
        target.set_epoch(epoch)


def to_device(inputs, device: torch.device):
    """A batch's inputs on the device: an image tensor, or the dict of token tensors of a text batch."""
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)
