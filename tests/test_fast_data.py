"""The fast in-memory image pipeline (dataset.pipeline=fast): the torchvision pipeline's images, crops,
flips and labels; DDP shards; and the benchmark script's report."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from sft_cli.errors import SFTError
from sft_cli.task import Splits
from sft_cli.tasks.classification import fast
from sft_cli.tasks.classification import images as image_data
from sft_cli.tasks.classification.fast import TensorImages
from sft_cli.training.distributed import Context

from fixtures import separable_images, write_cifar10, write_image_folder

CPU = torch.device("cpu")
RAW = dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])  # no normalisation: output x 255 gives the pixels back
CIFAR = dict(image_size=32, train_crop="pad", crop_padding=4, hflip=True, eval_resize=32,
             mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def pixels(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().to(torch.uint8)


def coded_images(n: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Images that carry their label (channel 0: 10 + 20 x label) and index (channel 1: index + 1) in every
    pixel, so a batch tells which sample each image is; crops only add zero borders."""
    labels = torch.arange(n) % 10
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    images[:, 0] = (10 + 20 * labels).to(torch.uint8)[:, None, None]
    images[:, 1] = (torch.arange(n) + 1).to(torch.uint8)[:, None, None]
    return images, labels


def decode(batch: torch.Tensor) -> tuple[list[int], list[int]]:
    top = pixels(batch).amax(dim=(2, 3)).long()
    return ((top[:, 0] - 10) // 20).tolist(), (top[:, 1] - 1).tolist()


def coded(n: int, train: bool = True) -> TensorImages:
    images, labels = coded_images(n)
    return TensorImages(images, labels, train, dict(image_size=8, train_crop="pad", crop_padding=2, hflip=True,
                                                    eval_resize=8, **RAW))


def test_crops_and_flips_have_the_torchvision_distribution():
    size, pad, n = 6, 2, 2000
    image = (torch.arange(1, size * size + 1, dtype=torch.uint8).reshape(1, size, size) * 7).repeat(3, 1, 1)
    tf = dict(image_size=size, train_crop="pad", crop_padding=pad, hflip=True, eval_resize=size, **RAW)
    padded = nn.functional.pad(image, (pad, pad, pad, pad))
    outcomes = [(dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (False, True)]
    windows = [(padded[:, dy:dy + size, dx:dx + size], flip) for dy, dx, flip in outcomes]
    crops = torch.stack([crop.flip(-1) if flip else crop for crop, flip in windows])

    def counts(outputs: torch.Tensor) -> Counter:
        hits = (pixels(outputs)[:, None] == crops[None]).flatten(2).all(dim=2)
        assert (hits.sum(dim=1) == 1).all()  # every output is one of the 50 crops, nothing else
        return Counter(outcomes[i] for i in hits.int().argmax(dim=1).tolist())

    torch.manual_seed(0)
    fast = TensorImages(image[None].expand(n, -1, -1, -1), torch.zeros(n), True, tf).loader(500, True, CPU)
    fast_counts = counts(torch.cat([x for x, _ in fast]))
    reference = image_data.image_transforms(True, tf)
    torchvision_counts = counts(torch.stack([reference(image) for _ in range(n)]))
    for c in (fast_counts, torchvision_counts):  # 50 equally likely outcomes: 40 each expected
        assert set(c) == set(outcomes) and 20 <= min(c.values()) and max(c.values()) <= 60


def test_normalised_training_batches_have_the_torchvision_mean_and_std():
    images, _ = separable_images(400, 10, 32, seed=0)
    images = torch.from_numpy(images).permute(0, 3, 1, 2)
    torch.manual_seed(0)
    fast = torch.cat([x for x, _ in TensorImages(images, torch.zeros(400), True, CIFAR).loader(128, True, CPU)])
    reference = image_data.image_transforms(True, CIFAR)
    slow = torch.stack([reference(image) for image in images])
    assert fast.shape == slow.shape == (400, 3, 32, 32)
    # per channel; without the zero-filled padding the mean would be off by about 0.12
    assert torch.allclose(fast.mean((0, 2, 3)), slow.mean((0, 2, 3)), atol=0.005)
    assert torch.allclose(fast.std((0, 2, 3)), slow.std((0, 2, 3)), atol=0.005)


def test_labels_stay_with_their_images_through_shuffling_and_augmentation():
    loader = coded(203).loader(16, shuffle=True, device=CPU)
    orders = []
    for _ in range(2):
        seen = []
        for images, targets in loader:
            labels, indices = decode(images)
            assert labels == targets.tolist() == [i % 10 for i in indices]
            seen += indices
        assert sorted(seen) == list(range(203))  # each image once per epoch
        orders.append(seen)
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])  # shuffled, anew each epoch


def test_batches_are_float_rgb_and_int64_labels_on_the_device():
    images, labels = coded_images(40)
    gray = TensorImages(images[:, :1], labels, True, dict(image_size=8, train_crop="none", crop_padding=0, hflip=True,
                                                          eval_resize=8, mean=[0.5] * 3, std=[0.25] * 3))
    x, y = next(iter(gray.loader(16, shuffle=True, device=CPU)))
    assert (x.shape, x.dtype, y.dtype, x.device) == ((16, 3, 8, 8), torch.float32, torch.int64, CPU)
    assert torch.equal(x[:, 0], x[:, 2])  # grayscale made 3 identical channels


def test_a_last_training_batch_of_one_sample_is_dropped_but_evaluation_keeps_it():
    train, evaluation = coded(33).loader(16, True, CPU), coded(33, train=False).loader(16, False, CPU)
    assert len(train) == 2 and [len(y) for _, y in train] == [16, 16]
    assert len(evaluation) == 3 and [len(y) for _, y in evaluation] == [16, 16, 1]


def test_resuming_from_the_global_rng_state_gives_the_same_batches():
    loader = coded(50).loader(16, shuffle=True, device=CPU)
    state = torch.get_rng_state()
    first = [x for x, _ in loader]
    torch.set_rng_state(state)  # what resume restores from a checkpoint
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in loader]))


def test_ddp_evaluation_shards_count_every_sample_exactly_once():
    data_ = coded(203, train=False)  # 203 is not a multiple of 3 ranks x 16
    seen = []
    for rank in range(3):
        for images, targets in data_.loader(16, shuffle=False, device=CPU, ctx=Context(rank, 3)):
            labels, indices = decode(images)
            assert labels == targets.tolist()
            seen += indices
    assert sorted(seen) == list(range(203))


def test_ddp_training_shards_are_equal_and_follow_distributed_sampler():
    data_ = coded(203)
    shards = {}
    for rank in range(3):
        loader = data_.loader(16, shuffle=True, device=CPU, ctx=Context(rank, 3), seed=7)
        loader.set_epoch(2)
        torch.manual_seed(rank)  # the order must not depend on the (per-rank) global RNG
        shards[rank] = [i for images, _ in loader for i in decode(images)[1]]
        assert len(loader) == 5  # 68 per rank: 4 x 16 + 4
        sampler = DistributedSampler(range(203), num_replicas=3, rank=rank, seed=7)
        sampler.set_epoch(2)
        assert shards[rank] == list(sampler)
    assert {len(s) for s in shards.values()} == {68}
    assert set().union(*shards.values()) == set(range(203))  # 204 slots: one sample twice, as DDP pads


@pytest.mark.parametrize("channels,native,tf", [
    (1, 8, dict(image_size=32, train_crop="pad", crop_padding=2, hflip=False, eval_resize=32, mean=[.5] * 3,
                std=[.5] * 3)),  # the digits quickstart
    (1, 28, dict(image_size=24, train_crop="none", crop_padding=0, hflip=True, eval_resize=30, mean=[.5] * 3,
                 std=[.25] * 3)),  # MNIST-like with resize then center crop
    (3, 32, CIFAR)])
@pytest.mark.parametrize("resize_per_batch", [False, True])
def test_evaluation_images_equal_the_torchvision_ones_bit_for_bit(channels, native, tf, resize_per_batch,
                                                                  monkeypatch):
    if resize_per_batch:  # as with images too large to resize once in memory (CIFAR at 224x224)
        monkeypatch.setattr(fast, "RESIZE_ONCE_BYTES", 0)
    images = torch.randint(0, 256, (20, channels, native, native), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    split = TensorImages(images, torch.arange(20), False, tf)
    reference = image_data.image_transforms(False, tf)
    expected = torch.stack([reference(image) for image in images])
    batches = torch.cat([x for x, _ in split.loader(8, shuffle=False, device=CPU)])
    assert torch.equal(batches, expected)
    assert torch.equal(split[3][0], expected[3]) and split[3][1] == 3


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, n_train=250, n_test=60)
    return root


def cifar_splits(root, **kwargs) -> Splits:
    return image_data.torchvision_dataset("CIFAR10", str(root), download=False, verify=False, val_size=50, split_seed=0,
                                    transforms={**CIFAR, **kwargs.pop("transforms", {})}, **kwargs)


def test_cifar_runs_the_fast_pipeline_by_default_with_the_same_splits_and_images(cifar_root):
    fast, slow = cifar_splits(cifar_root), cifar_splits(cifar_root, pipeline="torchvision")
    assert all(isinstance(s, TensorImages) for s in (fast.train, fast.val, fast.test))
    assert isinstance(slow.train, image_data.Transformed)
    assert fast.train_targets == slow.train_targets and fast.val.indices == slow.val.indices
    for a, b in ((fast.val, slow.val), (fast.test, slow.test)):
        assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(len(b)))


def test_pipeline_fast_names_the_key_and_the_fix_when_it_cannot_apply(cifar_root, tmp_path):
    with pytest.raises(SFTError, match="dataset.pipeline=fast .*train_crop=resized.*dataset.pipeline=torchvision"):
        cifar_splits(cifar_root, pipeline="fast", transforms={"train_crop": "resized"})
    assert isinstance(cifar_splits(cifar_root, transforms={"train_crop": "resized"}).train, image_data.Transformed)  # auto
    write_image_folder(tmp_path, ["ant", "bee"], per_class=5, size=8)
    folder = dict(image_size=8, train_crop="pad", crop_padding=1, hflip=True, eval_resize=8, **RAW)
    with pytest.raises(SFTError, match="dataset.pipeline=fast .*image folder.*dataset.pipeline=torchvision"):
        image_data.image_folder(str(tmp_path), val_size=0.2, split_seed=0, transforms=folder, pipeline="fast")
    assert isinstance(image_data.image_folder(str(tmp_path), val_size=0.2, split_seed=0, transforms=folder).train,
                      image_data.Transformed)
    with pytest.raises(SFTError, match="dataset.pipeline='gpu' is not one of: auto, fast, torchvision"):
        cifar_splits(cifar_root, pipeline="gpu")


def test_a_digits_config_saved_before_dataset_pipeline_existed_still_builds():
    old = dict(val_size=0.15, test_size=0.2, split_seed=0,  # no `pipeline` key, as in older checkpoints
               transforms=dict(image_size=16, train_crop="pad", crop_padding=2, hflip=False, eval_resize=16,
                               mean=[0.5] * 3, std=[0.5] * 3))
    splits = image_data.sklearn_digits(**old)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1222, 216, 359)
    assert isinstance(splits.test, TensorImages) and splits.test[0][0].shape == (3, 16, 16)


BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.mark.slow  # a minute of benchmark windows: the default suite stays under 5 minutes
def test_the_benchmark_reports_every_figure(tmp_path, capsys):
    # in this process (torch is already imported), with the arguments a user would type
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--all", "--steps", "3", "--warmup", "1", "--repeats", "1", "--batch-size", "8", "--image-size", "16",
                "--seq-len", "16", "--num-workers", "0", "--device", "cpu", "--json", str(out)])
    text = capsys.readouterr().out
    for label in ("sft-train --help answers in", "(a) minimal PyTorch loop", "(b) naive", "(c) sft-cli recipe",
                  "c/a =", "c/b =", "data pipeline alone", "fast", "torchvision", "CIFAR10 + per-sample transforms",
                  "tokenize + pad to max_length", "tokens/s", "dynamic padding", "sft-eval", "sft-predict",
                  "time to the first training step", "peak RSS", "a tiny BERT built here"):
        assert label in text, label
    report = json.loads(out.read_text())
    for task in ("vision", "text"):
        r = report[task]
        for key in ("a_minimal", "b_naive", "c_sft_cli"):
            assert r[key]["samples_per_s"] > 0 and r[key]["peak_memory_bytes"] > 0
        assert r["c_over_a"] > 0 and r["c_over_b"] > 0
        assert r["eval_samples_per_s"] > 0 and r["predict_samples_per_s"] > 0
    assert report["vision"]["e_pipeline_fast"]["times_a_model_step"] > 0 and report["vision"]["first_step_s"] > 0
    assert report["text"]["b_naive"]["tokens_per_s"] > 0 and report["help_startup_s"] > 0
