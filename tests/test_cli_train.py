"""sft-train and sft-eval as a user runs them: learning, artefacts, resume, sweeps, evaluation."""

import csv
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchvision import models

from conftest import FAST, kill_within_an_epoch, ok, read_json, run_cli
from fixtures import write_cifar10, write_image_folder
from inprocess import train_offline


def test_quickstart_learns_and_leaves_every_artefact(quick_run: Path):
    summary = read_json(quick_run / "summary.json")
    assert summary["status"] == "completed" and summary["epochs"] == 3
    assert summary["test"]["accuracy"] > 0.5, summary  # 10 classes: chance is 0.1
    assert summary["best_value"] > 0.5 and 1 <= summary["best_epoch"] <= 3
    assert summary["trainable_params"] == summary["total_params"] > 0 and summary["device"] == "cpu"
    assert summary["wall_time_s"] > 0

    assert (quick_run / ".hydra" / "config.yaml").is_file() and (quick_run / "train.log").is_file()
    assert (quick_run / "report.html").is_file() and (quick_run / "plots" / "confusion.png").is_file()
    assert read_json(quick_run / "test.json")["confusion"]  # what the report's confusion matrix is drawn from
    records = [read_json_line(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert len(val) == 3 and len(train) >= 3
    for r in train:
        assert {"epoch", "step", "loss", "accuracy", "macro_f1", "lr", "samples_per_s", "elapsed"} <= r.keys()
        assert r["samples_per_s"] > 0 and 0 <= r["accuracy"] <= 1
    assert [r["epoch"] for r in val] == [1, 2, 3]
    with open(quick_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and all(r["val_accuracy"] for r in rows)
    assert max(float(r["val_accuracy"]) for r in rows) == summary["best_value"]

    # best and last are complete checkpoints; the weights load without sft-cli
    for tag in ("last", "best"):
        ckpt = quick_run / "checkpoints" / tag
        assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "state.pt", "config.yaml", "meta.json"}
    assert read_json(quick_run / "checkpoints" / "last" / "meta.json")["epoch"] == 3
    assert read_json(quick_run / "checkpoints" / "best" / "meta.json")["epoch"] == summary["best_epoch"]
    plain = models.resnet18(num_classes=10)
    plain.load_state_dict(load_file(quick_run / "checkpoints" / "best" / "model.safetensors"))
    state = torch.load(quick_run / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert state["epoch"] == 3 and state["step"] == summary["steps"] and "optimizer" in state


def read_json_line(line: str) -> dict:
    import json
    return json.loads(line)


def test_eval_reproduces_the_test_metrics_from_the_checkpoint_alone(quick_run: Path, tmp_path: Path):
    result = ok(run_cli("sft-eval", f"checkpoint={quick_run / 'checkpoints' / 'best'}", "hydra.run.dir=ev",
                        cwd=tmp_path))
    report = read_json(tmp_path / "ev" / "eval.json")
    test = read_json(quick_run / "summary.json")["test"]
    assert report["accuracy"] == test["accuracy"] and report["macro_f1"] == test["macro_f1"]
    assert report["samples"] == sum(report["support"]) == sum(map(sum, report["confusion"]))
    assert "confusion matrix" in result.output and "precision" in result.output
    assert not any(p.name == "eval.json" for p in quick_run.rglob("*"))  # never written into the run


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = (load_file(run / "checkpoints" / "last" / "model.safetensors") for run in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def metric_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("elapsed", "train_samples_per_s")} for r in csv.DictReader(f)]


def test_a_kill_in_the_middle_of_an_epoch_resumes_bitwise_equal_to_an_uninterrupted_run(quick_run: Path,
                                                                                         tmp_path: Path):
    # quick_run is the uninterrupted run (checkpoints within epochs change nothing it computes). An identical run
    # writing checkpoints/last every 3 steps is killed within its second or third epoch, then resumed.
    args = [*FAST, "trainer.max_epochs=3", "trainer.checkpoint_every_n_steps=3"]
    killed = kill_within_an_epoch(args, tmp_path)
    ok(run_cli("sft-train", *args, "resume=killed", "hydra.run.dir=resumed", cwd=tmp_path))
    assert f"batch {killed['batch']} of epoch {killed['epoch'] + 1}" in (tmp_path / "resumed" / "train.log").read_text()
    assert same_weights(tmp_path / "resumed", quick_run), "weights differ after resume"
    assert metric_rows(tmp_path / "resumed") == metric_rows(quick_run)  # the resumed epoch's train sums included
    a, b = read_json(tmp_path / "resumed" / "summary.json"), read_json(quick_run / "summary.json")
    assert (a["best_value"], a["best_epoch"], a["test"]) == (b["best_value"], b["best_epoch"], b["test"])
    assert (tmp_path / "killed" / "checkpoints" / "last" / "model.safetensors").is_file()  # source untouched


@pytest.mark.slow  # 20 s; the chat kill test covers the DataLoader path (collated batches) in the default suite
def test_a_kill_within_an_epoch_resumes_bitwise_on_the_dataloader_path_with_a_worker(tmp_path: Path):
    # torchvision's per-sample transforms in a DataLoader worker process, seeded from the checkpointed RNG
    args = [*FAST, "dataset.pipeline=torchvision", "trainer.max_epochs=1", "trainer.checkpoint_every_n_steps=3"]
    kill_within_an_epoch(args, tmp_path, after_epoch=0)
    ok(run_cli("sft-train", *args, "resume=killed", "hydra.run.dir=resumed", cwd=tmp_path))
    ok(run_cli("sft-train", *args, "hydra.run.dir=straight", cwd=tmp_path))
    assert same_weights(tmp_path / "resumed", tmp_path / "straight")
    assert metric_rows(tmp_path / "resumed") == metric_rows(tmp_path / "straight")


def test_accumulation_clipping_and_max_steps(tmp_path: Path):
    train_offline([*FAST, "trainer.accumulate_grad_batches=3", "trainer.gradient_clip_norm=1.0",
                   "trainer.max_steps=4", "trainer.log_every_n_steps=1"], "run", cwd=tmp_path)
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["steps"] == 4 and summary["epochs"] == 1  # 20 batches make 7 steps; stopped after 4
    records = [read_json_line(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["split"] for r in records][-1] == "val"  # a run cut short by max_steps still validates


def test_outside_a_terminal_progress_is_a_log_line_and_the_last_steps_are_logged(tmp_path: Path, caplog):
    # 3 steps, logged every 10: the run used to write no train row at all (single dots, an empty lr plot) and,
    # in a log file, nothing between the parameter table and the epoch line
    with caplog.at_level(logging.INFO, logger="sft_cli.train"):
        train_offline([*FAST, "trainer.max_steps=3", "trainer.log_every_n_steps=2"], "run", cwd=tmp_path)
    records = [read_json_line(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 3]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2 and lines[0].startswith("step 2/3  loss ") and lines[1].startswith("step 3/3  loss ")
    assert re.search(r"  lr \d\.\d\de-\d\d  [\d.]+ samples/s  ETA \d+s$", lines[0]), lines[0]


def test_multirun_grid_makes_four_runs_and_a_ranked_summary(tmp_path: Path):
    result = ok(run_cli("sft-train", "-m", *FAST, "trainer.max_steps=6", "optimizer.lr=0.1,0.01",
                        "freeze=none,head_only", "hydra.sweep.dir=sweep", cwd=tmp_path))
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name != "plots")
    assert [p.name for p in runs] == ["0", "1", "2", "3"]
    assert (tmp_path / "sweep" / "report.html").is_file() and (tmp_path / "sweep" / "plots").is_dir()
    assert all((p / "summary.json").is_file() and (p / "checkpoints" / "best").is_dir() for p in runs)
    with open(tmp_path / "sweep" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    values = [float(r["best_value"]) for r in rows]
    assert len(rows) == 4 and values == sorted(values, reverse=True)
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert {r["overrides"] for r in rows} == {f"optimizer.lr={lr} freeze={f}" for lr in ("0.1", "0.01")
                                              for f in ("none", "head_only")}
    assert (tmp_path / "sweep" / "summary.md").read_text().count("\n") == 6
    assert "sweep ranked by val/accuracy" in result.output
    head_only = next(p for p in runs if "freeze=head_only" in (p / ".hydra" / "overrides.yaml").read_text())
    s = read_json(head_only / "summary.json")
    assert s["trainable_params"] < s["total_params"] / 10


def fake_imagenet_resnet18(torch_home: Path) -> dict:
    """An untrained ResNet-18 saved where torchvision looks for the ImageNet weights (offline stand-in)."""
    hub = torch_home / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    state = models.resnet18().state_dict()
    torch.save(state, hub / "resnet18-f37072fd.pth")
    return state


def test_cifar10_resnet18_linear_probe_on_a_local_copy_with_other_checksums(tmp_path: Path):
    """The issue's command on a CIFAR copy whose md5s differ: refused until verify=false; then head_only
    keeps every pretrained stage bitwise (BN statistics included) while the new 3x3 stem and head train."""
    pretrained = fake_imagenet_resnet18(tmp_path / "torch_home")
    write_cifar10(tmp_path / "cifar", n_train=200, n_test=70)
    common = ["+experiment=cifar10_resnet18", "optimizer=adamw", "optimizer.lr=3e-4", "freeze=head_only",
              "trainer.max_epochs=1", f"dataset.root={tmp_path / 'cifar'}", "dataset.download=false",
              "dataset.val_size=50", "trainer.batch_size=32", "trainer.num_workers=0", "trainer.progress_bar=false"]
    refused = run_cli("sft-train", *common, "hydra.run.dir=a", cwd=tmp_path)
    assert refused.returncode == 1 and "dataset.verify=false" in refused.output
    train_offline([*common, "dataset.verify=false"], "b", cwd=tmp_path)  # past the check: in this process
    summary = read_json(tmp_path / "b" / "summary.json")
    meta = read_json(tmp_path / "b" / "checkpoints" / "best" / "meta.json")
    assert meta["classes"][:2] == ["airplane", "automobile"] and len(meta["classes"]) == 10
    assert summary["test"] is not None and summary["steps"] == 5  # 150 train images / 32 per batch
    tuned = load_file(tmp_path / "b" / "checkpoints" / "last" / "model.safetensors")
    assert tuned["conv1.weight"].shape == (64, 3, 3, 3)
    for key, value in tuned.items():
        if key.startswith("layer"):
            assert torch.equal(value, pretrained[key]), key
    assert summary["trainable_params"] == 64 * 27 + 2 * 64 + 512 * 10 + 10  # new conv1, bn1 and fc only


def test_predict_on_an_image_folder_agrees_with_eval_on_every_image(tmp_path: Path):
    for split, seed in (("train", 0), ("test", 1)):
        write_image_folder(tmp_path / "shapes" / split, ["circle", "square", "star"], per_class=10, size=24, seed=seed)
    train_offline(["+experiment=image_folder", f"dataset.root={tmp_path / 'shapes'}", "model.weights=null",
                   "dataset.transforms.image_size=32", "dataset.transforms.eval_resize=32", "dataset.val_size=0.2",
                   "trainer.max_epochs=2", "trainer.batch_size=8", "trainer.num_workers=0",
                   "trainer.progress_bar=false"], "run", cwd=tmp_path)
    ok(run_cli("sft-eval", "checkpoint=run", "hydra.run.dir=ev", cwd=tmp_path))
    report = read_json(tmp_path / "ev" / "eval.json")
    ok(run_cli("sft-predict", "checkpoint=run", f"input={tmp_path / 'shapes' / 'test'}", "output=pred.csv",
               cwd=tmp_path))
    with open(tmp_path / "pred.csv") as f:
        predictions = list(csv.DictReader(f))
    assert len(predictions) == report["samples"] == 30
    truth = [Path(p["input"]).parent.name for p in predictions]
    predicted = [p["label"] for p in predictions]
    assert sum(map(str.__eq__, truth, predicted)) / 30 == report["accuracy"]
    confusion = [[sum(1 for t, p in zip(truth, predicted) if (t, p) == (a, b)) for b in report["classes"]]
                 for a in report["classes"]]
    assert confusion == report["confusion"]  # the same prediction for every image, not just the same count

    # sft-eval on a folder whose classes differ from the checkpoint's is refused, naming both
    write_image_folder(tmp_path / "other" / "test", ["circle", "square", "wolf"], per_class=2, size=24)
    write_image_folder(tmp_path / "other" / "train", ["circle", "square", "wolf"], per_class=10, size=24)
    result = run_cli("sft-eval", "checkpoint=run", f"dataset.root={tmp_path / 'other'}", cwd=tmp_path)
    assert result.returncode == 1 and "wolf" in result.output and "star" in result.output
    assert "Traceback" not in result.output
