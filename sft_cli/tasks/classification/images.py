"""Image datasets as train/val/test splits. Each builder is a `_target_` in configs/dataset/."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import to_absolute_path
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset, default_collate
from torchvision import datasets
from torchvision.transforms import v2

from sft_cli.errors import SFTError, not_one_of, unreadable
from sft_cli.task import Splits
from sft_cli.tasks.classification.fast import TensorImages
from sft_cli.tasks.files import stratified_split

log = logging.getLogger(__name__)
TRAIN_CROPS = ("pad", "resized", "none")
TRANSFORM_KEYS = ("image_size", "train_crop", "crop_padding", "hflip", "eval_resize", "mean", "std")
PIPELINES = ("auto", "fast", "torchvision")


class Transformed(Dataset):
    """The items `indices` of `base` (which yields (image, label)), with `transform` applied to the image.
    An image file that cannot be read is an SFTError naming it; with `skip_bad` it is logged and its item is
    None, which `DropSkipped` leaves out of the batch."""

    def __init__(self, base: Dataset, indices: list[int], transform, skip_bad: bool = False):
        self.base, self.indices, self.transform, self.skip_bad = base, indices, transform, skip_bad
        self.skipped: set[str] = set()  # per process: each DataLoader worker has its own copy

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            image, label = self.base[index]
        except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for truncated, corrupt or non-images
            samples = getattr(self.base, "samples", None)  # an image folder's (path, label) list
            if samples is None:
                raise
            return self._bad(samples[index][0], e)
        return self.transform(image), label

    def _bad(self, path: str, e: Exception) -> None:
        if isinstance(e, PermissionError) and not self.skip_bad:
            raise SFTError(f"could not read the image {unreadable(path, e)}") from e
        reason = "not an image file PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
        if not self.skip_bad:
            raise SFTError(f"could not read the image {path}: {reason}. Remove or replace it, or skip unreadable "
                           "images with dataset.skip_bad_images=true.") from e
        if path not in self.skipped:
            self.skipped.add(path)
            log.warning(f"skipped the unreadable image {path} ({reason}; dataset.skip_bad_images=true): "
                        f"{len(self.skipped)} skipped so far")
        return None


class DropSkipped:
    """A DataLoader collate_fn that leaves out the items a dataset skipped (None) and stacks the rest as torch's
    default does. A class, so that workers can pickle it."""

    def __call__(self, batch: list):
        kept = [item for item in batch if item is not None]
        if not kept:  # nothing to take the shape of an empty batch from
            raise SFTError(f"all {len(batch)} images of a batch could not be read (skipped with "
                           "dataset.skip_bad_images=true, see the warnings above): remove the unreadable images.")
        return default_collate(kept)


def image_transforms(train: bool, transforms: dict) -> v2.Compose:
    """PIL or tensor image -> normalised float RGB tensor; augmentation only when `train`. `transforms` is
    dataset.transforms, with exactly the keys TRANSFORM_KEYS."""
    if sorted(transforms) != sorted(TRANSFORM_KEYS):
        raise SFTError(f"dataset.transforms has the keys {', '.join(sorted(transforms))}; it needs exactly: "
                       f"{', '.join(TRANSFORM_KEYS)}")
    size, crop = transforms["image_size"], transforms["train_crop"]
    if crop not in TRAIN_CROPS:
        raise SFTError(not_one_of("dataset.transforms.train_crop", crop, TRAIN_CROPS))
    steps = [v2.ToImage(), v2.RGB()]  # grayscale sets (MNIST, digits) become 3-channel for RGB backbones
    if train and crop == "resized":
        steps.append(v2.RandomResizedCrop(size, antialias=True))
    elif train and crop == "pad":
        steps += [v2.Resize(size, antialias=True), v2.RandomCrop(size, padding=transforms["crop_padding"])]
    else:
        steps += [v2.Resize(transforms["eval_resize"], antialias=True), v2.CenterCrop(size)]
    if train and transforms["hflip"]:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(transforms["mean"], transforms["std"])]
    return v2.Compose(steps)


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


@dataclass(frozen=True)
class SplitSettings:
    """The dataset.* keys every image builder passes on to _make_splits."""

    val_size: float | int  # held out of train for validation, when the data has no val split
    split_seed: int
    transforms: dict  # dataset.transforms
    pipeline: str = "auto"  # dataset.pipeline: auto, fast or torchvision
    skip_bad: bool = False  # dataset.skip_bad_images (image folders)


def _split(base, indices: list[int], train: bool, settings: SplitSettings, fast: bool) -> Dataset:
    """The items `indices` of `base` with the train or eval transforms of the chosen pipeline."""
    if not fast:
        return Transformed(base, indices, image_transforms(train, settings.transforms), settings.skip_bad)
    rows = torch.tensor(indices, dtype=torch.long)
    targets = torch.as_tensor(base.targets, dtype=torch.long)[rows]
    return TensorImages(_pixels(base)[rows], targets, train, settings.transforms, indices=indices)


def _make_splits(train_base, test_base, classes, settings: SplitSettings, val_base=None) -> Splits:
    """Train/val/test from the base datasets; without `val_base`, validation is carved from `train_base`."""
    targets = [int(t) for t in train_base.targets]
    image_transforms(True, settings.transforms)  # checks the transforms whichever pipeline runs
    fast = _fast(settings.pipeline, settings.transforms, [train_base, val_base, test_base])
    log.info(f"input pipeline: {'fast (batched tensor ops on the device)' if fast else 'torchvision (per sample)'}")
    if val_base is None:
        train_idx, val_idx = stratified_split(targets, settings.val_size, settings.split_seed)
        val = _split(train_base, val_idx, False, settings, fast)
    else:
        train_idx = list(range(len(targets)))
        val = _split(val_base, list(range(len(val_base))), False, settings, fast)
    test = None if test_base is None else _split(test_base, list(range(len(test_base))), False, settings, fast)
    return Splits(_split(train_base, train_idx, True, settings, fast), val, test, list(classes),
                  [targets[i] for i in train_idx], collate=DropSkipped() if settings.skip_bad else None)


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
    return _make_splits(train, test, train.classes, SplitSettings(val_size, split_seed, transforms, pipeline))


def _image_folder(path: Path, key: str) -> datasets.ImageFolder:
    try:
        # torchvision skips a class folder it cannot list and then reports "no valid file" for the class
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir():
                    os.scandir(entry.path).close()
        return datasets.ImageFolder(str(path))
    except PermissionError as e:
        raise SFTError(f"{key}={path}: {unreadable(e.filename or path, e)}") from e
    except (FileNotFoundError, OSError) as e:
        raise SFTError(f"{key}={path}: {e}. Expected one subfolder per class holding images "
                       "(root/<class>/*.jpg, or root/train/<class>/ and root/val/<class>/).") from e


def image_folder(root: str, val_size: float | int, split_seed: int, transforms: dict,
                 pipeline: str = "auto", skip_bad_images: bool = False) -> Splits:
    """Your images: root/<class>/* (validation carved from it) or root/{train,val[,test]}/<class>/*.
    `skip_bad_images` skips image files that cannot be read (with a warning) instead of stopping; it is
    absent from configs saved before it existed, which get False."""
    path = Path(to_absolute_path(root))
    if not path.is_dir():
        raise SFTError(f"dataset.root={path} is not a directory. Point it at a folder of class subfolders.")
    settings = SplitSettings(val_size, split_seed, transforms, pipeline, skip_bad_images)
    if not (path / "train").is_dir():
        base = _two_classes(_image_folder(path, "dataset.root"), path)
        return _make_splits(base, None, base.classes, settings)
    train = _two_classes(_image_folder(path / "train", "dataset.root"), path / "train")
    parts = {split: _image_folder(path / split, "dataset.root") for split in ("val", "test") if (path / split).is_dir()}
    for split, part in parts.items():
        if part.classes != train.classes:
            raise SFTError(f"{path / split} has classes {part.classes} but {path / 'train'} has {train.classes}: "
                           "every split needs the same class subfolders.")
    return _make_splits(train, parts.get("test"), train.classes, settings, val_base=parts.get("val"))


def _two_classes(base: datasets.ImageFolder, path: Path) -> datasets.ImageFolder:
    # one class would train to a perfect, meaningless accuracy
    if len(base.classes) < 2:
        raise SFTError(f"dataset.root: {path} has a single class subfolder {base.classes[0]!r}: a classifier needs "
                       "two or more class subfolders (one per class, root/<class>/*.jpg).")
    return base


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
    settings = SplitSettings(val_size, split_seed, transforms, pipeline)
    splits = _make_splits(pool, None, [str(c) for c in range(10)], settings)
    splits.test = _split(base, test_idx, False, settings, fast=isinstance(splits.train, TensorImages))
    return splits


