"""Tiny datasets written in the real on-disk formats, for tests that must never download anything."""

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def separable_images(n: int, num_classes: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """uint8 (n, size, size, 3) images whose class is easy to see: class c brightens horizontal band c
    (plus noise), so a small model learns it in a few steps."""
    rng = np.random.default_rng(seed)
    labels = [i % num_classes for i in range(n)]
    images = rng.integers(0, 80, size=(n, size, size, 3), dtype=np.uint8)
    band = max(1, size // num_classes)
    for i, c in enumerate(labels):
        images[i, c * band:(c + 1) * band, :, :] += 150
    return images, labels


def write_cifar10(root: Path, n_train: int = 250, n_test: int = 60, seed: int = 0) -> Path:
    """root/cifar-10-batches-py/ in the official python-pickle layout (data_batch_1..5, test_batch,
    batches.meta): rows of 3072 uint8 values, channel-major, as torchvision's CIFAR10 reads them.
    The md5s differ from the official files, so loading needs dataset.verify=false."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = separable_images(n_train + n_test, 10, 32, seed)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    chunks = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(chunks, 1):
        _pickle(folder / f"data_batch_{i}", {"data": rows[idx], "labels": [labels[j] for j in idx]})
    _pickle(folder / "test_batch", {"data": rows[n_train:], "labels": labels[n_train:]})
    _pickle(folder / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": len(chunks[0])})
    return folder


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_image_folder(root: Path, classes: list[str], per_class: int, size: int = 24, seed: int = 0) -> Path:
    """root/<class>/<i>.png with separable images, as torchvision's ImageFolder reads them."""
    images, labels = separable_images(per_class * len(classes), len(classes), size, seed)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = Path(root) / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    return Path(root)
