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
