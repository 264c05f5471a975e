"""Text classification as a user runs it: a tiny BERT (saved with save_pretrained) on TSV/CSV files,
then sft-eval on another file, sft-predict on texts, and sft-export for plain transformers."""

import csv
import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from conftest import assert_kill_and_resume_is_bitwise, ok, read_json, run_cli
from fixtures import sentiment_rows, write_tiny_bert
from inprocess import train_offline
from test_cli_errors import refused


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    """Fine-tune the tiny BERT on 1,000 string-labelled TSV rows (and one bad row, skipped) with freeze=lower
    freeze.n=1."""
    cwd = tmp_path_factory.mktemp("text")
    write_tiny_bert(cwd / "tiny-bert")
    with open(cwd / "train.tsv", "w") as f:
        f.write("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in sentiment_rows(1000, seed=1)) + "a row with no label\n")
    with open(cwd / "test.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *sentiment_rows(60, seed=2)])
    train_offline(["+experiment=text_classification", "dataset.train_file=train.tsv",
                   f"model.name_or_path={cwd / 'tiny-bert'}", "freeze=lower", "freeze.n=1", "optimizer.lr=1e-3",
                   "trainer.max_epochs=5", "trainer.batch_size=16", "trainer.progress_bar=false",
                   "dataset.skip_bad_rows=true"], "run", cwd=cwd)
    return cwd


@pytest.mark.slow  # 20 s; the default suite keeps the image pipelines' and the chat tokens' kill tests
def test_a_kill_within_an_epoch_resumes_text_training_bitwise(tmp_path: Path):
    # dropout draws from the RNG between batches; group_by_length draws the batches from it
    write_tiny_bert(tmp_path / "tiny-bert")
    with open(tmp_path / "train.tsv", "w") as f:
        f.write("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in sentiment_rows(300, seed=3)))
    args = ["+experiment=text_classification", "dataset.train_file=train.tsv", "dataset.group_by_length=true",
            f"model.name_or_path={tmp_path / 'tiny-bert'}", "optimizer.lr=1e-3", "trainer.max_epochs=2",
            "trainer.batch_size=16", "trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=2"]
    assert_kill_and_resume_is_bitwise(args, tmp_path)


def test_a_tiny_bert_learns_a_separable_labelling_with_string_labels(text_run: Path):
    summary = read_json(text_run / "run" / "summary.json")
    assert summary["best_value"] > 0.9, summary  # two classes: chance is 0.5
    assert summary["skipped_rows"] == {"dataset.train_file": 1}  # dataset.skip_bad_rows=true
    assert read_json(text_run / "run" / "checkpoints" / "best" / "meta.json")["classes"] == ["neg", "pos"]


def test_freeze_lower_n_keeps_the_embeddings_and_the_first_n_layers_unchanged(text_run: Path):
    tuned = load_file(text_run / "run" / "checkpoints" / "last" / "model.safetensors")
    original = load_file(text_run / "tiny-bert" / "model.safetensors")
    for key, value in original.items():
        key = key if key.startswith("bert.") else f"bert.{key}"
        frozen = key.startswith(("bert.embeddings.", "bert.encoder.layer.0."))
        assert torch.equal(tuned[f"model.{key}"], value) == frozen, key


def test_eval_on_another_file_and_predict_agree_on_every_text(text_run: Path):
    elsewhere = text_run / "elsewhere"  # the checkpoint's relative train.tsv still resolves from another folder
    elsewhere.mkdir()
    ok(run_cli("sft-eval", "checkpoint=../run", f"dataset.test_file={text_run / 'test.csv'}", "hydra.run.dir=ev",
               cwd=elsewhere))
    report = read_json(elsewhere / "ev" / "eval.json")
    assert report["samples"] == 60 and report["classes"] == ["neg", "pos"]

    rows = sentiment_rows(60, seed=2)
    (text_run / "texts.txt").write_text("".join(t + "\n" for t, _ in rows))
    ok(run_cli("sft-predict", "checkpoint=run", "input=texts.txt", "output=pred.jsonl", cwd=text_run))
    predictions = [json.loads(line) for line in (text_run / "pred.jsonl").read_text().splitlines()]
    assert [p["input"] for p in predictions] == [t for t, _ in rows]
    assert all(p["label"] in ("neg", "pos") and len(p["top_k"]) == 2 for p in predictions)
    confusion = [[sum(1 for p, (_, y) in zip(predictions, rows) if (y, p["label"]) == (a, b)) for b in ("neg", "pos")]
                 for a in ("neg", "pos")]
    assert confusion == report["confusion"]  # the same prediction for every text, not just the same count

    # as a shell passes it: commas and an apostrophe are part of the text, not Hydra syntax
    single = ok(run_cli("sft-predict", "checkpoint=run", "text=it's really good, great film", cwd=text_run))
    assert "it's really good, great film" in single.output and "pos" in single.output


def test_export_loads_in_plain_transformers_with_the_label_names(text_run: Path):
    ok(run_cli("sft-export", "checkpoint=run/checkpoints/best", "output=exported", cwd=text_run))
    assert not (text_run / "export.log").exists()  # nothing but the exported folder where you run it
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (text_run / "exported").iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as the other files (were 0600)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(text_run / "exported").eval()
    tokenizer = AutoTokenizer.from_pretrained(text_run / "exported")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    with torch.no_grad():
        logits = model(**tokenizer(["awful film", "great book"], return_tensors="pt", padding=True)).logits
    assert [model.config.id2label[i] for i in logits.argmax(1).tolist()] == ["neg", "pos"]
    again = run_cli("sft-export", "checkpoint=run/checkpoints/best", "output=exported", cwd=text_run)
    assert again.returncode == 1 and "not empty" in again.output
    before = sorted(p.relative_to(text_run) for p in (text_run / "run").rglob("*"))
    for inside in ("run/checkpoints/best/x", "run/exported"):
        refused = run_cli("sft-export", "checkpoint=run/checkpoints/best", f"output={inside}", cwd=text_run)
        assert refused.returncode == 1 and "lies inside the run folder" in refused.output, refused.output[-800:]
    assert sorted(p.relative_to(text_run) for p in (text_run / "run").rglob("*")) == before


@pytest.mark.parametrize("args, expected", [
    (["batch_size=0"], ["batch_size=0 must be at least 1"]),
    (["batch_size=many"], ["'many'", "could not be converted to Integer", "full_key: batch_size"]),
    (["output=/proc/no/such/predictions.csv"],
     ["output=/proc/no/such/predictions.csv cannot be written", "choose a path in a folder you can write to"]),
])
def test_predict_option_mistakes_are_one_message_naming_the_key(text_run: Path, args, expected):
    refused(run_cli("sft-predict", "checkpoint=run", "text=great film", *args, cwd=text_run), *expected)


def test_export_options_are_typed(text_run: Path):
    refused(run_cli("sft-export", "checkpoint=run", "output=out", "merge=maybe", cwd=text_run),
            "'maybe'", "is not a valid bool", "full_key: merge")
    assert not (text_run / "out").exists()


@pytest.mark.parametrize("error", [
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                    'device" })'),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_full_disk_during_export_says_so_and_leaves_nothing_half_written(text_run: Path, tmp_path: Path,
                                                                          monkeypatch, error):
    from omegaconf import OmegaConf
    from transformers import PreTrainedModel

    from sft_cli.errors import SFTError
    from sft_cli.export import export
    from sft_cli.training import checkpoint

    ckpt = text_run / "run" / "checkpoints" / "best"
    out = tmp_path / "exported"
    cfg = OmegaConf.merge(checkpoint.load_config(ckpt), {"checkpoint": str(ckpt), "output": str(out), "merge": True})

    def fills_the_disk(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text("{")  # something was written before the disk filled up
        raise error

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fills_the_disk)
    with pytest.raises(SFTError, match=rf"the export to {out} could not be written \(.*No space left on device.*\): "
                                       r"free some space on that disk, then run again. What was written is removed"):
        export(cfg)
    assert not out.exists()
