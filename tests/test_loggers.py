"""Trackers mirror metrics.jsonl: what TensorBoard and MLflow read back equals the records, a resumed run appends
to its source's series and MLflow run, a failing tracker is dropped with one warning, a missing package names
its pip extra, and every `logger=` spelling composes with the shipped configs."""

import importlib.util
import inspect
import logging
import re
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.utils import _locate
from omegaconf import OmegaConf

from sft_cli import config
from sft_cli.errors import SFTError
from sft_cli.extras import install_command
from sft_cli.results import loggers

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

RECORDS = [  # as train.py writes them to metrics.jsonl
    {"epoch": 1, "step": 10, "split": "train", "loss": 2.07, "accuracy": 0.28, "samples": 640,
     "samples_per_s": 369.5, "lr": 0.0081, "elapsed": 5.2},
    {"epoch": 1, "step": 11, "split": "val", "loss": 2.09, "accuracy": 0.17, "samples_per_s": 4208.4, "lr": 0.0073,
     "elapsed": 5.6},
    {"epoch": 2, "step": 20, "split": "train", "loss": 1.04, "accuracy": 0.65, "samples": 576,
     "samples_per_s": 377.0, "lr": 0.0001, "elapsed": 8.7},
    {"epoch": 2, "step": 22, "split": "val", "loss": 1.35, "accuracy": 0.53, "samples_per_s": 3109.9, "lr": 0.0001,
     "elapsed": 9.4},
]
SUMMARY = {"name": "unit", "status": "completed", "monitor": "val/accuracy", "best_value": 0.53, "steps": 22,
           "test": {"loss": 1.3, "accuracy": 0.55, "samples": 360}}
TAGS = {"train/loss", "train/accuracy", "train/samples", "train/samples_per_s", "val/loss", "val/accuracy",
        "val/samples_per_s", "lr", "epoch"}


def series(records: list[dict], tag: str) -> list[tuple[int, float]]:
    split, _, key = tag.rpartition("/")
    return [(r["step"], r[key]) for r in records if key in r and split in ("", r["split"])]


def make_cfg(name: str, uri: str | None = None, lr: float = 0.1):
    return OmegaConf.create({
        "name": name, "seed": 0, "resume": None,
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": lr, "betas": [0.9, 0.99]},
        "trainer": {"monitor": "val/accuracy", "max_epochs": 2},
        "dataset": {"classes": "x" * 7000, "size": "${trainer.max_epochs}"},  # longer than MLflow takes
        "logger": {"tensorboard": {"_target_": "sft_cli.results.loggers.TensorBoard", "log_dir": "tensorboard"},
                   "mlflow": {"_target_": "sft_cli.results.loggers.MLflow", "tracking_uri": uri, "experiment": None,
                              "log_checkpoints": True}}})


def png(path: Path, width: int = 3, height: int = 2) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    rows = b"".join(b"\x00" + bytes([200, 30, 30] * width) for _ in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def read_tensorboard(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def scalars_of(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(tag)]  # float32 on disk


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One sqlite store for the module: creating one takes ~2 s."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def only_run(uri: str, name: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_tensorboard_and_mlflow_hold_the_records(tmp_path, uri):
    cfg = make_cfg("hold", uri)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints" / "best").mkdir(parents=True)
    (run_dir / "checkpoints" / "best" / "meta.json").write_text("{}")
    out = loggers.build(cfg.logger, run_dir, cfg)
    for record in RECORDS:
        out.metrics(record)
    out.image("confusion_matrix", png(tmp_path / "confusion_matrix.png"))
    out.text("samples", "| text | label |\n|---|---|\n| good | pos |")
    out.summary(SUMMARY)
    out.checkpoint(run_dir / "checkpoints" / "best")
    out.close()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "loggers.json", "tensorboard"]

    events = read_tensorboard(run_dir / "tensorboard")
    assert set(events.Tags()["scalars"]) == TAGS | {"test/loss", "test/accuracy", "test/samples",
                                                    "summary/best_value", "summary/steps"}
    for tag in TAGS:
        assert scalars_of(events, tag) == series(RECORDS, tag), tag
    assert scalars_of(events, "test/accuracy") == [(22, 0.55)]
    image = events.Images("confusion_matrix")[0]
    assert (image.step, image.width, image.height) == (22, 3, 2)
    assert image.encoded_image_string == (tmp_path / "confusion_matrix.png").read_bytes()
    assert {"config/text_summary", "samples/text_summary", "summary/text_summary"} <= set(events.Tags()["tensors"])

    client, run = only_run(uri, "hold")
    assert run.info.status == "FINISHED" and run.info.run_id == loggers._state(run_dir)["mlflow"]["run_id"]
    params = run.data.params
    assert params["optimizer.lr"] == "0.1" and params["optimizer.betas"] == "[0.9, 0.99]"
    assert params["dataset.size"] == "2"  # resolved
    assert len(params["dataset.classes"]) == 6000 and params["dataset.classes"].endswith("...")
    assert not any(key.startswith("logger") for key in params)  # a tracking URI may hold credentials
    for tag in TAGS:
        history = client.get_metric_history(run.info.run_id, tag)
        assert [(m.step, m.value) for m in history] == series(RECORDS, tag), tag
    assert run.data.metrics["test/accuracy"] == 0.55
    artifacts = {a.path for folder in ("", "plots", "text", "checkpoints/best")
                 for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"config.yaml", "summary.json", "plots/confusion_matrix.png", "text/samples.md",
            "checkpoints/best/meta.json"} <= artifacts


def test_a_resumed_run_continues_the_same_series_and_mlflow_run(tmp_path, uri):
    source, resumed = tmp_path / "source", tmp_path / "resumed"
    source.mkdir()
    out = loggers.build(make_cfg("resume", uri).logger, source, make_cfg("resume", uri))
    for record in RECORDS[:2] + [{**RECORDS[2], "loss": 9.0}]:  # step 20 comes after the checkpoint (step 11)
        out.metrics(record)
    out.close()
    resumed.mkdir()
    loggers.continue_from(source, resumed, step=11)
    cfg = make_cfg("resume", uri, lr=0.05)  # changed on resume
    out = loggers.build(cfg.logger, resumed, cfg)
    for record in RECORDS[2:]:
        out.metrics(record)
    out.close()

    events = read_tensorboard(resumed / "tensorboard")
    for tag in TAGS:  # the source's step-20 point, past the checkpoint, is hidden by the resumed run's
        assert scalars_of(events, tag) == series(RECORDS, tag), tag
    client, run = only_run(uri, "resume")
    assert loggers._state(resumed)["mlflow"]["run_id"] == loggers._state(source)["mlflow"]["run_id"]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
    assert steps == [11, 22]
    assert run.data.params["optimizer.lr"] == "0.1" and run.data.tags["resumed.optimizer.lr"] == "0.05"


def test_a_failing_logger_warns_once_and_the_others_go_on(tmp_path, uri, caplog, monkeypatch):
    cfg = make_cfg("failing", uri)
    out = loggers.build(cfg.logger, tmp_path, cfg)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(out.active["tensorboard"].writer, "_get_file_writer", full_disk)
    with caplog.at_level(logging.WARNING, logger="sft_cli.loggers"):
        for record in RECORDS:
            out.metrics(record)
        out.summary(SUMMARY)
        out.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "logger tensorboard failed" in warnings[0]
    assert "No space left on device" in warnings[0]
    client, run = only_run(uri, "failing")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [10, 20]


def test_a_tensorboard_writer_thread_that_fails_prints_no_traceback(tmp_path, caplog, monkeypatch):
    printed = []  # what threading would print: "Exception in thread Thread-1: Traceback ..."
    monkeypatch.setattr(threading, "excepthook", printed.append)
    cfg = OmegaConf.create({"logger": {"tensorboard": {"_target_": "sft_cli.results.loggers.TensorBoard",
                                                       "log_dir": "tensorboard"}}, "trainer": {"monitor": "val/loss"}})
    out = loggers.build(cfg.logger, tmp_path, cfg)
    worker = out.active["tensorboard"].writer._get_file_writer().event_writer._async_writer._worker

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(worker._record_writer, "write", full_disk)  # the writes the thread makes
    with caplog.at_level(logging.WARNING, logger="sft_cli.loggers"):
        for record in RECORDS:
            out.metrics(record)
            worker.join(timeout=5) if record is RECORDS[0] else None  # the thread has died of it
        out.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert printed == []


def test_a_broken_tracking_server_warns_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = make_cfg("broken", "http://127.0.0.1:9")  # nothing listens there
    node = OmegaConf.masked_copy(cfg.logger, ["mlflow"])
    with caplog.at_level(logging.WARNING, logger="sft_cli.loggers"):
        out = loggers.build(node, tmp_path, cfg)
        for record in RECORDS:
            out.metrics(record)
        out.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "logger mlflow failed" in warnings[0] and "127.0.0.1:9" in warnings[0]


def test_a_missing_package_names_its_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "mlflow") else real(name, *a))
    cfg = make_cfg("missing")
    problems = loggers.check(cfg.logger)
    assert len(problems) == 2
    assert install_command("tensorboard") in problems[0] and install_command("mlflow") in problems[1]
    with pytest.raises(SFTError, match=re.escape(install_command("mlflow"))):
        loggers.build(cfg.logger, tmp_path, cfg)
    assert loggers.check(None) == loggers.check(OmegaConf.create({})) == []
    assert not loggers.build(None, tmp_path, cfg) and not loggers.build(cfg.logger, tmp_path, cfg, enabled=False)
    assert list(tmp_path.iterdir()) == []


def test_check_imports_neither_torch_nor_a_tracker():
    code = ("import sys; from sft_cli.results import loggers; "
            "loggers.check({'mlflow': {'_target_': 'sft_cli.results.loggers.MLflow'}}); "
            "print(sorted(m for m in ('torch', 'mlflow', 'tensorboard') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    """The shipped configs, with `- logger: csv` in train.yaml's defaults if it is not there yet."""
    folder = tmp_path_factory.mktemp("configs") / "configs"
    shutil.copytree(config.find_config_dir(), folder)
    train = (folder / "train.yaml").read_text()
    if "- logger:" not in train:
        train = train.replace("  - trainer: default", "  - trainer: default\n  - logger: csv", 1)
        assert "- logger: csv" in train
        (folder / "train.yaml").write_text(train)
    return folder


@pytest.mark.parametrize("overrides, layout", [
    ([], {}),
    (["logger=csv"], {}),
    (["logger=tensorboard"], {"tensorboard": {"_target_": "sft_cli.results.loggers.TensorBoard", "log_dir": "tensorboard"}}),
    (["logger=mlflow", "logger.mlflow.tracking_uri=http://host:5000"],
     {"mlflow": {"_target_": "sft_cli.results.loggers.MLflow", "tracking_uri": "http://host:5000", "experiment": None,
                 "log_checkpoints": False}}),
    (["logger=[tensorboard,mlflow]"], {"tensorboard": {"_target_": "sft_cli.results.loggers.TensorBoard",
                                                       "log_dir": "tensorboard"},
                                       "mlflow": {"_target_": "sft_cli.results.loggers.MLflow", "tracking_uri": None,
                                                  "experiment": None, "log_checkpoints": False}}),
])
def test_every_spelling_composes(configs, overrides, layout, tmp_path):
    with initialize_config_dir(str(configs), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=quickstart", *overrides])
    assert OmegaConf.to_container(cfg.logger) == layout
    assert loggers.check(cfg.logger) == []
    for node in cfg.logger.values():  # each target takes its YAML keys and the runtime ones
        kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
        inspect.signature(_locate(node._target_)).bind(run_dir=tmp_path, cfg=cfg, **kwargs)


@pytest.mark.slow  # 25 s; the fast tests above drive the same loggers directly
def test_a_run_with_both_trackers_logs_what_metrics_jsonl_holds_and_a_resumed_run_continues_them(tmp_path):
    """sft-train 'logger=[tensorboard,mlflow]' as a user runs it, then resume: one MLflow run, one TensorBoard
    series, each equal to the run's own metrics.jsonl."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    import json

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import FAST, ok, run_cli

    args = [*FAST, "logger=[tensorboard,mlflow]", "trainer.log_every_n_steps=5", "scheduler=cosine"]  # no shell quotes here
    ok(run_cli("sft-train", *args, "trainer.max_epochs=1", "hydra.run.dir=first", cwd=tmp_path))
    ok(run_cli("sft-train", *args, "trainer.max_epochs=2", "resume=first", "hydra.run.dir=second", cwd=tmp_path))
    records = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["loss"]) for r in records if r["split"] == "val"]
    assert len(val) == 2  # one validation per epoch, the first copied from the source run

    events = EventAccumulator(str(tmp_path / "second" / "tensorboard")).Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("val/loss")] == val

    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # the resumed run continued the first one's MLflow run
    history = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "val/loss"))
    assert history == [(s, pytest.approx(v, rel=1e-6)) for s, v in val]
    assert runs[0].data.params["optimizer.lr"] == "0.01"
