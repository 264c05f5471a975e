"""metrics, loss, checkpoint and data: the recipe's building blocks, on hand-made inputs and on-disk fixtures."""

import argparse
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from fixtures import CIFAR10_CLASSES, separable_images, write_cifar10, write_image_folder
from sft_cli import checkpoint, data, loss, metrics, models
from sft_cli.errors import SFTError

# ---------------------------------------------------------------------------------------------- metrics


def one_hot_logits(predictions, num_classes):
    return nn.functional.one_hot(torch.tensor(predictions), num_classes).float()


def test_confusion_counts_true_class_by_row_and_prediction_by_column():
    cm = metrics.confusion(one_hot_logits([0, 0, 1, 1, 2, 2, 3], 5), torch.tensor([0, 0, 0, 1, 1, 2, 2]), 5)
    assert cm.tolist() == [[2, 1, 0, 0, 0],
                           [0, 1, 1, 0, 0],
                           [0, 0, 1, 1, 0],
                           [0, 0, 0, 0, 0],
                           [0, 0, 0, 0, 0]]


def test_scores_on_a_hand_made_example():
    # class 3 is predicted but never true (F1 0, counted); class 4 is absent from both (left out of macro-F1)
    cm = metrics.confusion(one_hot_logits([0, 0, 1, 1, 2, 2, 3], 5), torch.tensor([0, 0, 0, 1, 1, 2, 2]), 5)
    s = metrics.scores(cm)
    assert s["accuracy"] == pytest.approx(4 / 7)
    assert s["precision"] == pytest.approx([1.0, 0.5, 0.5, 0.0, 0.0])
    assert s["recall"] == pytest.approx([2 / 3, 0.5, 0.5, 0.0, 0.0])
    assert s["f1"] == pytest.approx([0.8, 0.5, 0.5, 0.0, 0.0])
    assert s["support"] == [3, 2, 2, 0, 0]
    assert s["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.5 + 0.0) / 4)


def test_macro_f1_matches_scikit_learn_over_the_classes_that_occur():
    from sklearn.metrics import f1_score

    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 6, (200,), generator=g)  # class 6 and 7 never occur
    predictions = torch.where(torch.rand(200, generator=g) < 0.6, targets, torch.randint(0, 6, (200,), generator=g))
    s = metrics.scores(metrics.confusion(one_hot_logits(predictions.tolist(), 8), targets, 8))
    present = sorted(set(targets.tolist()) | set(predictions.tolist()))
    assert s["macro_f1"] == pytest.approx(f1_score(targets, predictions, labels=present, average="macro"))
    assert s["accuracy"] == pytest.approx((targets == predictions).float().mean().item())


def test_scores_of_an_empty_confusion_matrix_are_zero():
    s = metrics.scores(torch.zeros(3, 3, dtype=torch.long))
    assert (s["accuracy"], s["macro_f1"], s["support"]) == (0.0, 0.0, [0, 0, 0])


# ---------------------------------------------------------------------------------------------- loss


def test_balanced_class_weights_are_n_over_classes_times_count():
    targets = [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    w = loss.class_weights("balanced", targets, 3)
    assert w.tolist() == pytest.approx([12 / (3 * 6), 12 / (3 * 2), 12 / (3 * 4)])
    from sklearn.utils.class_weight import compute_class_weight

    assert w.tolist() == pytest.approx(compute_class_weight("balanced", classes=np.arange(3), y=targets).tolist())


def test_class_weights_null_and_explicit_list():
    assert loss.class_weights(None, [0, 1], 2) is None
    assert loss.class_weights([1, 2.5, 3], [0, 1, 2], 3).tolist() == [1.0, 2.5, 3.0]


@pytest.mark.parametrize("spec", [[1.0, 2.0], [1, 2, 3, 4], "inverse"])
def test_bad_class_weights_are_an_error_naming_the_key(spec):
    with pytest.raises(SFTError, match="loss.class_weights"):
        loss.class_weights(spec, [0, 1, 2], 3)


def test_balanced_class_weights_with_an_empty_class_is_an_error():
    with pytest.raises(SFTError, match=r"loss.class_weights=balanced.*\[1\]"):
        loss.class_weights("balanced", [0, 0, 2], 3)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(body=nn.Linear(4, 3), act=nn.ReLU(), fc=nn.Linear(3, 2)))


def test_l2sp_is_zero_at_start_grows_when_the_backbone_moves_and_ignores_the_head():
    model = tiny_model()
    model.sft_stages, model.sft_new_stages = [("body", ["body"]), ("fc", ["fc"])], ["fc"]
    penalty = loss.L2SP(model, weight=0.5)
    assert float(penalty(model).detach()) == 0.0
    with torch.no_grad():
        model.fc.weight.add_(1.0)
        model.fc.bias.add_(1.0)
    assert float(penalty(model).detach()) == 0.0  # the head is free
    with torch.no_grad():
        model.body.weight.add_(0.1)
    value = penalty(model)
    assert float(value.detach()) == pytest.approx(0.5 * 12 * 0.1 ** 2)
    value.backward()  # differentiable: pulls the backbone back towards its start
    assert torch.allclose(model.body.weight.grad, torch.full((3, 4), 0.5 * 2 * 0.1))
    assert model.fc.weight.grad is None


def test_l2sp_does_not_anchor_a_new_small_input_stem_to_its_random_start():
    model = models.torchvision_classifier("resnet18", list("0123456789"), None, True, ["conv1", "bn1"], [])
    anchored = loss.L2SP(model, weight=1.0).start
    assert not any(n.startswith(("conv1.", "bn1.", "fc.")) for n in anchored)
    assert {n for n, _ in model.named_parameters() if n.startswith("layer")} <= anchored.keys()


# ---------------------------------------------------------------------------------------------- checkpoint


CLASSES = ["cat", "dog"]


def save(folder, step, tags, model):
    state = {"step": step, "epoch": step // 10, "best": 0.5, "rng": {"torch": torch.get_rng_state()},
             "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()}
    cfg = OmegaConf.create({"seed": 1, "model": {"name": "tiny"}, "lr": "${seed}"})
    meta = {"classes": CLASSES, "epoch": step // 10, "step": step}
    return checkpoint.save(folder, tags, model, state, cfg, meta)


def steps_on_disk(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-"))


def test_save_points_tags_and_removes_unreferenced_step_folders(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    model = tiny_model()
    save(folder, 10, ["last", "best"], model)
    assert os.readlink(folder / "last") == os.readlink(folder / "best") == "step-00000010"
    save(folder, 20, ["last"], model)
    assert os.readlink(folder / "last") == "step-00000020"
    assert os.readlink(folder / "best") == "step-00000010"
    assert steps_on_disk(folder) == ["step-00000010", "step-00000020"]
    save(folder, 30, ["last", "best"], model)
    assert os.readlink(folder / "last") == os.readlink(folder / "best") == "step-00000030"
    assert steps_on_disk(folder) == ["step-00000030"]
    assert sorted(p.name for p in folder.iterdir()) == ["best", "last", "step-00000030"]  # no temporaries left


def test_saved_files_load_with_plain_readers(tmp_path):
    model = tiny_model()
    ckpt = save(tmp_path / "checkpoints", 20, ["last", "best"], model)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 20 and state["best"] == 0.5
    assert state["rng"]["torch"].dtype == torch.uint8 and state["optimizer"]["param_groups"][0]["lr"] == 0.1
    fresh = nn.Sequential(OrderedDict(body=nn.Linear(4, 3), act=nn.ReLU(), fc=nn.Linear(3, 2)))
    fresh.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert checkpoint.load_meta(ckpt) == {"classes": CLASSES, "epoch": 2, "step": 20}
    assert checkpoint.load_config(ckpt).lr == 1  # written resolved


def test_load_weights_and_state_round_trip(tmp_path):
    model = tiny_model()
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], model)
    fresh = nn.Sequential(OrderedDict(body=nn.Linear(4, 3), act=nn.ReLU(), fc=nn.Linear(3, 2)))
    checkpoint.load_weights(ckpt, fresh)
    assert torch.equal(fresh.body.weight, model.body.weight)
    assert checkpoint.load_state(ckpt)["step"] == 10


def test_load_weights_into_another_architecture_is_an_error_naming_the_file(tmp_path):
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], tiny_model())
    with pytest.raises(SFTError, match="model.safetensors"):
        checkpoint.load_weights(ckpt, nn.Linear(4, 2))


@pytest.mark.parametrize("target", ["save_file", "torch.save"])
def test_a_failed_save_leaves_last_on_the_previous_complete_checkpoint(tmp_path, monkeypatch, target):
    folder = tmp_path / "run" / "checkpoints"
    model = tiny_model()
    save(folder, 10, ["last", "best"], model)
    saved_weight = model.body.weight.detach().clone()

    def boom(*args, **kwargs):
        raise OSError("No space left on device")

    if target == "save_file":
        monkeypatch.setattr(checkpoint, "save_file", boom)
    else:
        monkeypatch.setattr(torch, "save", boom)
    with torch.no_grad():
        model.body.weight.add_(1.0)
    with pytest.raises(OSError, match="No space"):
        save(folder, 20, ["last", "best"], model)
    monkeypatch.undo()

    assert steps_on_disk(folder) == ["step-00000010"]  # no half-written step folder
    for tag in ("last", "best"):
        ckpt = checkpoint.resolve(folder / tag)
        assert ckpt.resolve().name == "step-00000010"
        assert sorted(p.name for p in ckpt.iterdir()) == ["config.yaml", "meta.json", "model.safetensors",
                                                          "state.pt"]
        fresh = tiny_model()
        checkpoint.load_weights(ckpt, fresh)
        assert torch.equal(fresh.body.weight, saved_weight)
        assert checkpoint.load_state(ckpt)["step"] == 10
    # the next save of the same step succeeds and cleans up after the failed one
    save(folder, 20, ["last"], model)
    assert os.readlink(folder / "last") == "step-00000020"
    assert sorted(p.name for p in folder.iterdir()) == ["best", "last", "step-00000010", "step-00000020"]


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_model_file_is_an_error_naming_it(tmp_path):
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], tiny_model())
    truncate(ckpt / "model.safetensors")
    with pytest.raises(SFTError, match="model.safetensors") as e:
        checkpoint.load_weights(ckpt, tiny_model())
    assert str(ckpt) in str(e.value)


def test_truncated_state_file_is_an_error_naming_it(tmp_path):
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], tiny_model())
    truncate(ckpt / "state.pt")
    with pytest.raises(SFTError, match="state.pt"):
        checkpoint.load_state(ckpt)


def test_missing_state_file_is_an_error_saying_the_checkpoint_is_incomplete(tmp_path):
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], tiny_model())
    (ckpt / "state.pt").unlink()
    with pytest.raises(SFTError, match="incomplete: state.pt is missing"):
        checkpoint.load_state(ckpt)


def test_state_file_that_weights_only_load_refuses_is_an_error_naming_it(tmp_path):
    ckpt = save(tmp_path / "checkpoints", 10, ["last"], tiny_model())
    torch.save({"step": 10, "args": argparse.Namespace(lr=0.1)}, ckpt / "state.pt")
    with pytest.raises(SFTError, match="state.pt"):
        checkpoint.load_state(ckpt)


def test_resolve_accepts_run_dir_checkpoints_dir_tag_link_and_file_inside(tmp_path):
    run = tmp_path / "outputs" / "run"
    folder = run / "checkpoints"
    model = tiny_model()
    save(folder, 10, ["last", "best"], model)
    save(folder, 20, ["last"], model)
    for given in (run, str(run), folder, folder / "last", folder / "last" / "model.safetensors",
                  folder / "step-00000020" / "meta.json"):
        assert checkpoint.resolve(given).resolve() == (folder / "step-00000020").resolve(), given
    assert checkpoint.resolve(folder / "best").resolve() == (folder / "step-00000010").resolve()


def test_resolve_rejects_missing_paths_and_folders_without_a_checkpoint(tmp_path):
    with pytest.raises(SFTError, match="does not exist"):
        checkpoint.resolve(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SFTError, match="holds no checkpoint"):
        checkpoint.resolve(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- data

CIFAR_TRANSFORMS = dict(image_size=32, train_crop="pad", crop_padding=4, hflip=True, eval_resize=32,
                        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
FOLDER_TRANSFORMS = dict(image_size=16, train_crop="resized", crop_padding=0, hflip=True, eval_resize=18,
                         mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    targets = [0] * 50 + [1] * 30 + [2] * 20
    keep, held = data.stratified_split(targets, 0.2, seed=0)
    assert sorted(keep + held) == list(range(100))
    assert [sum(targets[i] == c for i in held) for c in range(3)] == [10, 6, 4]
    assert data.stratified_split(targets, 0.2, seed=0) == (keep, held)
    assert data.stratified_split(targets, 0.2, seed=1) != (keep, held)
    assert data.stratified_split(targets, 20, seed=0) == (keep, held)  # a count: 20 of 100


@pytest.mark.parametrize("targets,size", [([0] * 4 + [1] * 4 + [2] * 4, 0.1), ([0] * 3 + [1] * 3, 1)])
def test_a_val_size_that_rounds_to_no_image_is_refused_naming_the_key(targets, size):
    with pytest.raises(SFTError, match="dataset.val_size"):
        data.stratified_split(targets, size, seed=0)


def test_a_val_split_never_takes_a_whole_class_out_of_training():
    keep, held = data.stratified_split([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 0.6, seed=0)
    assert 0 in keep and held


@pytest.mark.parametrize("size", [0, 0.0, 100, 250])
def test_stratified_split_rejects_sizes_that_leave_nothing(size):
    with pytest.raises(SFTError, match="dataset.val_size"):
        data.stratified_split([0, 1] * 50, size, seed=0)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, n_train=250, n_test=60)
    return root


def test_cifar10_with_verify_true_points_at_dataset_verify_false(cifar_root):
    with pytest.raises(SFTError, match="dataset.verify=false") as e:
        data.torchvision_dataset("CIFAR10", str(cifar_root), download=False, verify=True, val_size=50,
                                 split_seed=0, transforms=CIFAR_TRANSFORMS)
    assert str(cifar_root) in str(e.value)


def test_cifar10_with_verify_false_loads_the_local_copy(cifar_root):
    splits = data.torchvision_dataset("CIFAR10", str(cifar_root), download=False, verify=False, val_size=50,
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
        data.torchvision_dataset("CIFAR10", str(root), download=False, verify=True, val_size=0.1, split_seed=0,
                                 transforms=CIFAR_TRANSFORMS)
    assert f"dataset.root={root}" in str(e.value)
    assert "dataset.verify=false" not in str(e.value)  # nothing there to verify: no misleading hint
    assert not any(root.iterdir())  # nothing downloaded


def test_unknown_torchvision_dataset_name_is_an_error(tmp_path):
    with pytest.raises(SFTError, match="dataset.name='CIFAR11'"):
        data.torchvision_dataset("CIFAR11", str(tmp_path), download=False, verify=True, val_size=0.1,
                                 split_seed=0, transforms=CIFAR_TRANSFORMS)


def test_image_folder_with_class_subfolders_carves_validation_and_has_no_test(tmp_path):
    write_image_folder(tmp_path, ["ant", "bee", "cow"], per_class=10, size=24)
    splits = data.image_folder(str(tmp_path), val_size=0.2, split_seed=0, transforms=FOLDER_TRANSFORMS)
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
    splits = data.image_folder(str(tmp_path), val_size=0.5, split_seed=0, transforms=FOLDER_TRANSFORMS)
    assert splits.classes == classes
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 4, 6)
    assert splits.train_targets == [0] * 6 + [1] * 6  # val_size is not used: nothing carved
    assert splits.val.base.root == str(tmp_path / "val") and splits.test.base.root == str(tmp_path / "test")
    assert splits.val[0][0].shape == (3, 16, 16)


def test_image_folder_val_with_different_classes_is_an_error(tmp_path):
    write_image_folder(tmp_path / "train", ["ant", "bee"], per_class=2, size=8)
    write_image_folder(tmp_path / "val", ["ant", "wasp"], per_class=1, size=8)
    with pytest.raises(SFTError, match="same class subfolders") as e:
        data.image_folder(str(tmp_path), val_size=0.5, split_seed=0, transforms=FOLDER_TRANSFORMS)
    assert str(tmp_path / "val") in str(e.value) and "wasp" in str(e.value)


def test_image_folder_root_that_is_not_a_directory_is_an_error(tmp_path):
    with pytest.raises(SFTError, match="is not a directory"):
        data.image_folder(str(tmp_path / "missing"), val_size=0.5, split_seed=0, transforms=FOLDER_TRANSFORMS)


def test_unknown_train_crop_is_an_error_naming_the_key():
    with pytest.raises(SFTError, match="dataset.transforms.train_crop"):
        data.image_transforms(True, **{**CIFAR_TRANSFORMS, "train_crop": "random"})


def test_pad_crop_yields_every_offset_and_eval_is_deterministic():
    size, pad = 6, 2
    tf = dict(image_size=size, train_crop="pad", crop_padding=pad, hflip=False, eval_resize=size,
              mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    image = (torch.arange(1, size * size + 1, dtype=torch.uint8).reshape(1, size, size) * 7).repeat(3, 1, 1)
    padded = nn.functional.pad(image, (pad, pad, pad, pad))
    crops = {(dy, dx): padded[:, dy:dy + size, dx:dx + size] for dy in range(2 * pad + 1)
             for dx in range(2 * pad + 1)}
    train = data.image_transforms(True, **tf)
    torch.manual_seed(0)
    seen = set()
    for _ in range(300):
        out = (train(image) * 255).round().to(torch.uint8)
        hits = [offset for offset, crop in crops.items() if torch.equal(out, crop)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == set(crops)  # all 25 offsets, and nothing else
    evaluate = data.image_transforms(False, **tf)
    assert torch.equal((evaluate(image) * 255).round().to(torch.uint8), image)
