"""data.py (image datasets, splits, transforms) and text_data's file reading: on-disk fixtures, errors that
name the path or key and the fix."""

import logging
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sft_cli.errors import SFTError
from sft_cli.task import Splits
from sft_cli.tasks import files
from sft_cli.tasks.classification import images as image_data
from sft_cli.tasks.classification.texts import text_files
from sft_cli.training import loading

from fixtures import (
    CIFAR10_CLASSES,
    separable_images,
    write_cifar10,
    write_image_folder,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

CIFAR_TRANSFORMS = dict(image_size=32, train_crop="pad", crop_padding=4, hflip=True, eval_resize=32,
                        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
FOLDER_TRANSFORMS = dict(image_size=16, train_crop="resized", crop_padding=0, hflip=True, eval_resize=18,
                         mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    targets = [0] * 50 + [1] * 30 + [2] * 20
    keep, held = files.stratified_split(targets, 0.2, seed=0)
    assert sorted(keep + held) == list(range(100))
    assert [sum(targets[i] == c for i in held) for c in range(3)] == [10, 6, 4]
    assert files.stratified_split(targets, 0.2, seed=0) == (keep, held)
    assert files.stratified_split(targets, 0.2, seed=1) != (keep, held)
    assert files.stratified_split(targets, 20, seed=0) == (keep, held)  # a count: 20 of 100


@pytest.mark.parametrize("targets,size", [([0] * 4 + [1] * 4 + [2] * 4, 0.1), ([0] * 3 + [1] * 3, 1)])
def test_a_val_size_that_rounds_to_no_image_is_refused_naming_the_key(targets, size):
    with pytest.raises(SFTError, match="dataset.val_size"):
        files.stratified_split(targets, size, seed=0)


def test_a_val_split_never_takes_a_whole_class_out_of_training():
    keep, held = files.stratified_split([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 0.6, seed=0)
    assert 0 in keep and held


@pytest.mark.parametrize("size", [0, 0.0, 100, 250])
def test_stratified_split_rejects_sizes_that_leave_nothing(size):
    with pytest.raises(SFTError, match="dataset.val_size"):
        files.stratified_split([0, 1] * 50, size, seed=0)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, n_train=250, n_test=60)
    return root


def test_cifar10_with_verify_true_points_at_dataset_verify_false(cifar_root):
    with pytest.raises(SFTError, match="dataset.verify=false") as e:
        image_data.torchvision_dataset("CIFAR10", str(cifar_root), download=False, verify=True, val_size=50,
                                 split_seed=0, transforms=CIFAR_TRANSFORMS)
    assert str(cifar_root) in str(e.value)


def test_cifar10_with_verify_false_loads_the_local_copy(cifar_root):
    splits = image_data.torchvision_dataset("CIFAR10", str(cifar_root), download=False, verify=False, val_size=50,
                                      split_seed=0, transforms=CIFAR_TRANSFORMS)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (200, 50, 60)
    assert splits.classes == CIFAR10_CLASSES
    assert sorted(set(splits.train_targets)) == list(range(10))
    assert [splits.train_targets.count(c) for c in range(10)] == [20] * 10  # 25 per class, 5 held out each
    assert set(splits.train.indices).isdisjoint(splits.val.indices)
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    # eval images are the pickled pixels, channel-major, normalised with the configured mean/std
    images, labels = separable_images(310, 10, 32, seed=0)
    j = 7
    image, label = splits.val[j]
    base = splits.val.indices[j]
    mean, std = torch.tensor(CIFAR_TRANSFORMS["mean"]), torch.tensor(CIFAR_TRANSFORMS["std"])
    pixels = (image * std[:, None, None] + mean[:, None, None]) * 255
    assert label == labels[base]
    assert torch.equal(pixels.round().to(torch.uint8), torch.from_numpy(images[base]).permute(2, 0, 1))
    test_image, test_label = splits.test[3]
    assert test_image.shape == (3, 32, 32) and test_label == labels[253]


def test_missing_dataset_without_download_is_an_error_naming_the_root(tmp_path):
    root = tmp_path / "no_data_here"
    root.mkdir()
    with pytest.raises(SFTError) as e:
        image_data.torchvision_dataset("CIFAR10", str(root), download=False, verify=True, val_size=0.1, split_seed=0,
                                 transforms=CIFAR_TRANSFORMS)
    assert f"dataset.root={root}" in str(e.value)
    assert "dataset.verify=false" not in str(e.value)  # nothing there to verify: no misleading hint
    assert not any(root.iterdir())  # nothing downloaded


def test_unknown_torchvision_dataset_name_is_an_error(tmp_path):
    with pytest.raises(SFTError, match="dataset.name='CIFAR11'"):
        image_data.torchvision_dataset("CIFAR11", str(tmp_path), download=False, verify=True, val_size=0.1,
                                 split_seed=0, transforms=CIFAR_TRANSFORMS)


def test_image_folder_with_class_subfolders_carves_validation_and_has_no_test(tmp_path):
    write_image_folder(tmp_path, ["ant", "bee", "cow"], per_class=10, size=24)
    splits = image_data.image_folder(str(tmp_path), val_size=0.2, split_seed=0, transforms=FOLDER_TRANSFORMS)
    assert splits.classes == ["ant", "bee", "cow"]
    assert (len(splits.train), len(splits.val), splits.test) == (24, 6, None)
    assert [splits.train_targets.count(c) for c in range(3)] == [8, 8, 8]
    assert set(splits.train.indices).isdisjoint(splits.val.indices)
    image, label = splits.val[0]
    assert image.shape == (3, 16, 16) and label in (0, 1, 2)
    assert splits.train[0][0].shape == (3, 16, 16)


def test_image_folder_with_train_val_test_subfolders_uses_them(tmp_path):
    classes = ["ant", "bee"]
    write_image_folder(tmp_path / "train", classes, per_class=6, size=24)
    write_image_folder(tmp_path / "val", classes, per_class=2, size=24, seed=1)
    write_image_folder(tmp_path / "test", classes, per_class=3, size=24, seed=2)
    splits = image_data.image_folder(str(tmp_path), val_size=0.5, split_seed=0, transforms=FOLDER_TRANSFORMS)
    assert splits.classes == classes
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 4, 6)
    assert splits.train_targets == [0] * 6 + [1] * 6  # val_size is not used: nothing carved
    assert splits.val.base.root == str(tmp_path / "val") and splits.test.base.root == str(tmp_path / "test")
    assert splits.val[0][0].shape == (3, 16, 16)


def test_image_folder_val_with_different_classes_is_an_error(tmp_path):
    write_image_folder(tmp_path / "train", ["ant", "bee"], per_class=2, size=8)
    write_image_folder(tmp_path / "val", ["ant", "wasp"], per_class=1, size=8)
    with pytest.raises(SFTError, match="same class subfolders") as e:
        image_data.image_folder(str(tmp_path), val_size=0.5, split_seed=0, transforms=FOLDER_TRANSFORMS)
    assert str(tmp_path / "val") in str(e.value) and "wasp" in str(e.value)


def test_image_folder_root_that_is_not_a_directory_is_an_error(tmp_path):
    with pytest.raises(SFTError, match="is not a directory"):
        image_data.image_folder(str(tmp_path / "missing"), val_size=0.5, split_seed=0, transforms=FOLDER_TRANSFORMS)


def test_unknown_train_crop_is_an_error_naming_the_key():
    with pytest.raises(SFTError, match="dataset.transforms.train_crop"):
        image_data.image_transforms(True, {**CIFAR_TRANSFORMS, "train_crop": "random"})


def test_a_misspelled_transforms_key_is_an_error_listing_the_keys():
    with pytest.raises(SFTError, match="dataset.transforms has the keys .*hfilp.*it needs exactly: image_size"):
        image_data.image_transforms(True, {**FOLDER_TRANSFORMS, "hfilp": False})


def test_pad_crop_yields_every_offset_and_eval_is_deterministic():
    size, pad = 6, 2
    tf = dict(image_size=size, train_crop="pad", crop_padding=pad, hflip=False, eval_resize=size,
              mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    image = (torch.arange(1, size * size + 1, dtype=torch.uint8).reshape(1, size, size) * 7).repeat(3, 1, 1)
    padded = nn.functional.pad(image, (pad, pad, pad, pad))
    crops = {(dy, dx): padded[:, dy:dy + size, dx:dx + size] for dy in range(2 * pad + 1)
             for dx in range(2 * pad + 1)}
    train = image_data.image_transforms(True, tf)
    torch.manual_seed(0)
    seen = set()
    for _ in range(300):
        out = (train(image) * 255).round().to(torch.uint8)
        hits = [offset for offset, crop in crops.items() if torch.equal(out, crop)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == set(crops)  # all 25 offsets, and nothing else
    evaluate = image_data.image_transforms(False, tf)
    assert torch.equal((evaluate(image) * 255).round().to(torch.uint8), image)


# ---------------------------------------------------------------------------------------------- val_size


def test_a_val_size_count_leaving_less_to_train_on_than_to_validate_is_refused():
    """The issue: val_size: 5000 (a count) on a 5,482-image copy of CIFAR-10 trained on 483 images (here 480:
    these classes are balanced)."""
    targets = [i % 10 for i in range(5482)]
    with pytest.raises(SFTError) as e:
        files.stratified_split(targets, 5000, seed=0)
    assert str(e.value) == ("dataset.val_size=5000 is a count: it holds out 5002 of the 5482 examples for validation "
                            "and leaves 480 to train on. Use a fraction, e.g. dataset.val_size=0.1, which scales "
                            "with the data.")


def test_a_val_size_count_over_a_quarter_of_the_data_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sft_cli.tasks.classification.images"):
        keep, held = files.stratified_split([i % 2 for i in range(100)], 40, seed=0)
    assert (len(keep), len(held)) == (60, 40)
    assert ("dataset.val_size=40 is a count: it holds out 40 of the 100 examples for validation and leaves 60 to "
            "train on (40%); a fraction, e.g. dataset.val_size=0.1, scales with the data.") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sft_cli.tasks.classification.images"):
        files.stratified_split([i % 2 for i in range(100)], 0.4, seed=0)  # a fraction says what it means
        files.stratified_split([i % 2 for i in range(100)], 25, seed=0)
    assert caplog.text == ""


def test_val_size_0_1_gives_the_same_split_as_the_old_count_on_full_cifar10_and_mnist():
    cifar = [c for c in range(10) for _ in range(5000)]
    assert files.stratified_split(cifar, 0.1, seed=0) == files.stratified_split(cifar, 5000, seed=0)
    assert len(files.stratified_split(cifar, 0.1, seed=0)[1]) == 5000
    mnist = [i * 7 % 10 for i in range(60000)]
    assert files.stratified_split(mnist, 0.1, seed=0) == files.stratified_split(mnist, 6000, seed=0)


def test_every_dataset_config_carves_validation_as_a_fraction():
    sizes = {p.stem: OmegaConf.load(p).get("val_size") for p in sorted((CONFIGS / "dataset").glob("*.yaml"))}
    assert sizes["cifar10"] == sizes["mnist"] == 0.1  # cifar100 and fashion_mnist inherit these
    assert all(size is None or 0 < size < 1 for size in sizes.values()), sizes


# ---------------------------------------------------------------------------------------------- bad images

SMALL = dict(FOLDER_TRANSFORMS, train_crop="none")
HINT = "Remove or replace it, or skip unreadable images with dataset.skip_bad_images=true."


def bad_images(root: Path) -> dict[Path, str]:
    """A train/val image folder whose val/ holds a truncated PNG and a text file named .png: {path: reason}."""
    write_image_folder(root / "train", ["ant", "bee"], per_class=4, size=16)
    write_image_folder(root / "val", ["ant", "bee"], per_class=4, size=16, seed=1)
    truncated, text = root / "val" / "ant" / "2.png", root / "val" / "bee" / "5.png"
    truncated.write_bytes(truncated.read_bytes()[:300])
    text.write_text("label,text\nant,not an image\n")
    return {truncated: "image file is truncated", text: "not an image file PIL can read"}


def batches(splits: Splits, split: str, workers: int) -> list:
    options = loading.LoaderOptions(device=torch.device("cpu"), num_workers=workers)
    return list(loading.make_loader(splits, split, 2, options))


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_one_error_naming_the_file(tmp_path, workers):
    bad = bad_images(tmp_path)
    splits = image_data.image_folder(str(tmp_path), val_size=0.5, split_seed=0, transforms=SMALL)
    with pytest.raises(SFTError) as e:
        batches(splits, "val", workers)
    message = str(e.value)  # also from a worker: its message, not the traceback torch wraps it in
    path = next(p for p in bad if str(p) in message)
    assert message.startswith(f"could not read the image {path}: {bad[path]}")
    assert message.endswith(HINT) and "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_bad_images_leaves_them_out_with_a_warning_naming_each(tmp_path, caplog, workers):
    bad = bad_images(tmp_path)
    splits = image_data.image_folder(str(tmp_path), val_size=0.5, split_seed=0, transforms=SMALL, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="sft_cli.tasks.classification.images"):
        val = batches(splits, "val", workers)
        train = batches(splits, "train", workers)
    assert sum(len(labels) for _, labels in val) == 8 - 2
    assert all(images.shape[1:] == (3, 16, 16) for images, _ in val)
    assert sum(len(labels) for _, labels in train) == 8
    if workers == 0:  # a worker's log records go to its own process's handlers
        for path, reason in bad.items():
            assert f"skipped the unreadable image {path} ({reason}" in caplog.text
        assert "2 skipped so far" in caplog.text


def test_a_batch_of_only_unreadable_images_is_an_error(tmp_path):
    bad_images(tmp_path)
    splits = image_data.image_folder(str(tmp_path), val_size=0.5, split_seed=0, transforms=SMALL, skip_bad_images=True)
    with pytest.raises(SFTError, match="all 1 images of a batch could not be read"):
        splits.collate([None])


def test_a_single_class_image_folder_is_refused(tmp_path):
    write_image_folder(tmp_path, ["ant"], per_class=6, size=8)
    with pytest.raises(SFTError) as e:
        image_data.image_folder(str(tmp_path), val_size=0.5, split_seed=0, transforms=FOLDER_TRANSFORMS)
    assert str(e.value) == (f"dataset.root: {tmp_path} has a single class subfolder 'ant': a classifier needs two or "
                            "more class subfolders (one per class, root/<class>/*.jpg).")
    write_image_folder(tmp_path / "train", ["ant"], per_class=6, size=8)
    with pytest.raises(SFTError, match=f"{tmp_path / 'train'} has a single class subfolder 'ant'"):
        image_data.image_folder(str(tmp_path), val_size=0.5, split_seed=0, transforms=FOLDER_TRANSFORMS)


# ---------------------------------------------------------------------------------------------- unreadable


PERMISSIONS = "is not readable (Permission denied): check its permissions, and those of the folders above it."


def test_an_unlistable_class_folder_is_an_error_naming_it(tmp_path, monkeypatch):
    write_image_folder(tmp_path, ["ant", "bee"], per_class=3, size=8)
    folder = tmp_path / "bee"
    if os.geteuid() != 0:
        folder.chmod(0)
    else:  # root lists any folder: fail the listing as chmod 000 would for a user
        scandir = os.scandir
        monkeypatch.setattr(os, "scandir", lambda path=".": (_ for _ in ()).throw(
            PermissionError(13, "Permission denied", str(path))) if str(path) == str(folder) else scandir(path))
    try:
        with pytest.raises(SFTError) as e:
            image_data.image_folder(str(tmp_path), val_size=0.5, split_seed=0, transforms=FOLDER_TRANSFORMS)
    finally:
        folder.chmod(0o755)
    assert str(e.value) == f"dataset.root={tmp_path}: {folder} {PERMISSIONS}"


def test_an_unreadable_text_file_is_an_error_naming_it(tmp_path, monkeypatch):
    train = tmp_path / "train.tsv"
    train.write_text("good movie\tpos\nbad movie\tneg\n")
    if os.geteuid() != 0:
        train.chmod(0)
    else:  # root reads any file: fail the open as chmod 000 would for a user
        opener = Path.open
        monkeypatch.setattr(Path, "open", lambda self, *a, **k: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied", str(self))) if self == train else opener(self, *a, **k))
    with pytest.raises(SFTError) as e:
        text_files(str(train), tokenizer="never-loaded")
    assert str(e.value) == f"dataset.train_file={train}: {train} {PERMISSIONS}"
