"""The guards that stop a command before it runs: a bare sft-train, config values that need no data, run
folders that hold a run or are in use (any spelling of hydra.run.dir), outputs that exist. Each is one
clear line naming the key and the fix, exit code 1, no traceback, and nothing the user had is changed."""

import fcntl
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from test_cli_errors import digest, refused

from sft_cli import checks, cli, config, sweep
from sft_cli.errors import SFTError

from conftest import FAST, run_cli

CONFIGS = Path(config.find_config_dir())
QUICK = ["+experiment=quickstart", "trainer.progress_bar=false"]


def compose_train(overrides: list[str]):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


def finished_run(folder: Path) -> Path:
    """A run folder as a finished sft-train leaves it, with a checkpoint that sft-eval/predict/export find
    (its weights are a placeholder: every command here must stop before loading them)."""
    step = folder / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"not loaded")
    (step / "config.yaml").write_text(OmegaConf.to_yaml(compose_train(["+experiment=quickstart"]), resolve=True))
    (folder / "checkpoints" / "last").symlink_to(step.name, target_is_directory=True)
    (folder / ".hydra").mkdir()
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (folder / ".hydra" / name).write_text("# the run's own\n")
    (folder / "train.log").write_text("the run's log\n")
    (folder / "summary.json").write_text('{"status": "completed"}')
    (folder / "metrics.jsonl").write_text("{}\n")
    return folder


@pytest.fixture
def torch_tripwire(tmp_path_factory) -> tuple[dict, Path]:
    """An environment for run_cli in which `import torch` leaves a marker file (and fails): a command that
    answers before torch loads leaves none. (What users notice is the time: ~0.5 s against 2-4 s for torch.)"""
    folder = tmp_path_factory.mktemp("tripwire")
    (folder / "torch").mkdir()
    (folder / "torch" / "__init__.py").write_text(
        "import os, pathlib\npathlib.Path(os.environ['TORCH_IMPORTED_MARKER']).touch()\n"
        "raise ImportError('torch was imported')\n")
    marker = folder / "torch_imported"
    return {"PYTHONPATH": str(folder), "TORCH_IMPORTED_MARKER": str(marker)}, marker


def test_the_torch_tripwire_catches_a_command_that_imports_torch(tmp_path: Path, torch_tripwire):
    env, marker = torch_tripwire
    result = run_cli("sft-train", *QUICK, "hydra.run.dir=run", cwd=tmp_path, env=env)
    assert result.returncode != 0 and marker.is_file()  # a valid config gets as far as training: torch


def test_a_bare_sft_train_lists_the_experiments_and_downloads_nothing(tmp_path: Path, torch_tripwire):
    env, torch_imported = torch_tripwire
    result = run_cli("sft-train", cwd=tmp_path, env=env)
    refused(result, "+experiment=NAME", "sft-train +experiment=quickstart",
            ", ".join(sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))))
    assert len(result.stderr.strip().splitlines()) == 1 and not torch_imported.exists()  # answered before torch
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "torch_home").exists()
    refused(run_cli("sft-train", "-m", "optimizer.lr=0.1,0.01", cwd=tmp_path), "+experiment=NAME")
    for flags in (["--help"], ["--cfg", "job"], ["--info", "defaults"], ["dataset=digits", "--cfg", "job"]):
        result = run_cli("sft-train", *flags, cwd=tmp_path)
        assert result.returncode == 0 and "needs an experiment" not in result.output, (flags, result.output[-2000:])


@pytest.mark.parametrize("override,expected", [
    ("optimizer.lr=fast", "optimizer.lr='fast' must be a positive number"),
    ("optimizer.lr=-1", "optimizer.lr=-1 must be a positive number"),
    ("optimizer.lr=0", "optimizer.lr=0 must be a positive number"),
    ("dataset.val_size=fast", "dataset.val_size='fast' must be a fraction in (0, 1) or a count of examples"),
    ("dataset.val_size=true", "dataset.val_size=True must be a fraction in (0, 1) or a count of examples"),
    ("dataset.val_size=0", "dataset.val_size=0 must be a fraction in (0, 1) or a count of examples"),
    ("dataset.val_size=-0.1", "dataset.val_size=-0.1 must be a fraction in (0, 1)"),
    ("dataset.test_size=2.5", "dataset.test_size=2.5 must be a fraction in (0, 1) or a count of examples"),
    ("trainer.checkpoint_every_n_steps=0", "trainer.checkpoint_every_n_steps=0 must be at least 1, or null"),
    ("trainer.monitor=accuracy", "trainer.monitor='accuracy' must name a validation metric: val/<name>"),
    ("trainer.mode=min", "trainer.mode=min would keep the worst val/accuracy as best: set trainer.mode=max"),
])
def test_a_value_that_needs_no_data_is_refused_before_torch_loads(tmp_path: Path, torch_tripwire, override,
                                                                  expected):
    env, torch_imported = torch_tripwire
    result = run_cli("sft-train", *QUICK, override, "hydra.run.dir=run", cwd=tmp_path, env=env)
    refused(result, expected)
    assert not torch_imported.exists()  # ~0.5 s; torch alone would take 2-4 s to import
    assert result.output.count(expected) == 1  # on the terminal once...
    assert expected in (tmp_path / "run" / "train.log").read_text()  # ...and in the run's log


def test_config_check_imports_no_torch():
    code = ("import sys; from hydra import compose, initialize_config_dir; from sft_cli import checks, config\n"
            "with initialize_config_dir(config.find_config_dir(), version_base='1.3'):\n"
            "    cfg = compose('train', overrides=['+experiment=quickstart', 'trainer.device=cpu'])\n"
            "checks.check(cfg)\n"
            "assert 'torch' not in sys.modules, 'checks.check imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cuda_without_a_gpu_is_refused_before_torch_loads(tmp_path: Path):
    for hidden in ("", "-1"):
        result = run_cli("sft-train", *QUICK, "trainer.device=cuda:0", cwd=tmp_path,
                         env={"CUDA_VISIBLE_DEVICES": hidden})
        refused(result, "trainer.device=cuda:0 but no CUDA GPU is visible", f"CUDA_VISIBLE_DEVICES='{hidden}'",
                "use trainer.device=cpu or trainer.device=auto")


def test_no_cuda_reason_decides_only_when_it_is_certain(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert "CUDA_VISIBLE_DEVICES" in checks.no_cuda_reason()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert "macOS" in checks.no_cuda_reason()
    monkeypatch.setattr(sys, "platform", "win32")
    assert checks.no_cuda_reason() is None  # left to torch (runtime.pick_device)


def test_resume_from_a_folder_without_a_checkpoint_names_the_folder(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    result = run_cli("sft-train", *QUICK, "resume=empty", cwd=tmp_path)
    refused(result, "resume='empty'", "holds no checkpoint", "checkpoints/last")


def test_an_unexpected_error_goes_into_the_run_log_with_its_traceback(tmp_path: Path):
    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(ZeroDivisionError), cli._error_in_log():
            1 / 0
        with pytest.raises(SFTError), cli._error_in_log():
            raise SFTError("dataset.root=/x does not exist: set dataset.root")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    text = (tmp_path / "train.log").read_text()
    assert "run failed: ZeroDivisionError: division by zero" in text and "Traceback" in text
    assert "run failed: dataset.root=/x does not exist: set dataset.root" in text


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_every_spelling_of_hydra_run_dir_is_checked_before_hydra_writes(tmp_path: Path, prefix):
    run = finished_run(tmp_path / "run")
    before = digest(run)
    refused(run_cli("sft-train", *QUICK, f"{prefix}hydra.run.dir=run", cwd=tmp_path), "already holds a run")
    for command in ("sft-eval", "sft-predict"):  # into the training run, or into its checkpoint
        extra = ["text=hello"] if command == "sft-predict" else []
        refused(run_cli(command, f"{prefix}checkpoint=run", f"{prefix}hydra.run.dir=run", *extra, cwd=tmp_path),
                "already holds a run")
        refused(run_cli(command, "checkpoint=run/checkpoints/last", f"{prefix}hydra.run.dir=run/checkpoints/last",
                        *extra, cwd=tmp_path), f"{command} never writes there")
    assert digest(run) == before  # .hydra/, train.log, the checkpoint: nothing was written


def hold(folder: Path):
    """Claim `folder` as a running sft-cli process does: a lock on .sft-cli.lock holding the pid."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / cli.LOCK_FILE, "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path: Path):
    with hold(tmp_path / "run"):
        for command, args in (("sft-train", QUICK), ("sft-eval", ["checkpoint=ckpt"])):
            if command == "sft-eval":
                finished_run(tmp_path / "ckpt")
            result = run_cli(command, *args, "hydra.run.dir=run", cwd=tmp_path)
            refused(result, f"hydra.run.dir={tmp_path / 'run'} is in use by another sft-cli process "
                            f"(pid {os.getpid()})", "choose another folder")
            assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [cli.LOCK_FILE]  # Hydra wrote nothing
            assert (tmp_path / "run" / cli.LOCK_FILE).read_text() == str(os.getpid())


def test_a_claim_is_held_until_exit_and_passed_on_to_the_processes_it_starts(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_claim", None)
    monkeypatch.delenv(cli.CLAIMED_ENV, raising=False)
    monkeypatch.setattr(cli, "_fail", lambda error: pytest.fail(str(error)))
    cli._claim_run_dir(["+experiment=quickstart", "++hydra.run.dir=" + str(tmp_path / "run")])
    try:
        assert os.environ[cli.CLAIMED_ENV] == str(tmp_path / "run")  # torchrun's processes inherit it...
        cli._claim_run_dir(["+experiment=quickstart", f"hydra.run.dir={tmp_path / 'run'}"])  # ...and pass
        monkeypatch.delenv(cli.CLAIMED_ENV)
        monkeypatch.setattr(cli, "_fail", lambda error: (_ for _ in ()).throw(error))
        with pytest.raises(SFTError, match=f"pid {os.getpid()}"):  # anyone else is refused
            cli._claim_run_dir([f"hydra.run.dir={tmp_path / 'run'}"])
    finally:
        cli._claim.close()
    for argv in (["-m", "hydra.run.dir=x"], ["--cfg", "job", "hydra.run.dir=x"], ["hydra.run.dir=${now:%H}"]):
        cli._claim_run_dir(argv)  # a sweep, a print or an interpolation claims nothing
    assert not (tmp_path / "x").exists()


def test_an_existing_predict_output_is_kept_unless_overwrite(tmp_path: Path):
    finished_run(tmp_path / "run")
    (tmp_path / "mine.csv").write_text("my own file\n")
    refused(run_cli("sft-predict", "checkpoint=run", "text=hello", "output=mine.csv", cwd=tmp_path),
            "output=mine.csv already exists", "overwrite=true")
    assert (tmp_path / "mine.csv").read_text() == "my own file\n"
    result = run_cli("sft-predict", "checkpoint=run", "text=hello", "output=mine.csv", "overwrite=true", cwd=tmp_path)
    assert "already exists" not in result.output  # past the check: it loads the (placeholder) weights


def test_an_existing_export_output_file_is_refused_before_the_model_loads(tmp_path: Path):
    finished_run(tmp_path / "run")
    (tmp_path / "model.bin").write_text("mine\n")
    refused(run_cli("sft-export", "checkpoint=run", "output=model.bin", cwd=tmp_path),
            "output=model.bin is a file: output must be a new or empty folder")
    assert (tmp_path / "model.bin").read_text() == "mine\n"


def test_torchrun_starts_the_entry_point_module(tmp_path: Path, monkeypatch):
    result = subprocess.run([sys.executable, "-m", "sft_cli.cli"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1 and "+experiment=NAME" in result.stderr  # train_main ran
    from sft_cli.training import distributed

    calls = []
    monkeypatch.setattr(distributed.subprocess, "call", lambda command: calls.append(command) or 0)
    (tmp_path / "summary.json").write_text('{"best_value": 0.5}')
    assert distributed.launch(["+experiment=quickstart"], tmp_path, 2, "cpu") == 0.5
    assert calls[0][calls[0].index("-m", 3):][:3] == ["-m", "sft_cli.cli", "+experiment=quickstart"]


@pytest.mark.parametrize("monitor,mode,expected", [
    ("val/loss", None, "min"), ("val/perplexity", None, "min"), ("val/nll_loss", None, "min"),
    ("val/accuracy", None, "max"), ("val/macro_f1", None, "max"), ("val/loss", "max", "max"),
])
def test_mode_follows_the_monitored_metric_unless_set(monitor, mode, expected):
    assert config.mode_of(OmegaConf.create({"monitor": monitor, "mode": mode})) == expected
    assert config.optuna_direction(monitor, mode) == {"min": "minimize", "max": "maximize"}[expected]


class FakeTask:
    metrics = ("loss", "accuracy", "bleu")


def test_the_monitor_must_be_a_metric_the_task_reports():
    cfg = OmegaConf.create({"trainer": {"monitor": "val/acc"}})
    with pytest.raises(SFTError, match=r"trainer.monitor='val/acc' is not one of: val/accuracy, val/bleu, val/loss$"):
        checks.check_monitor(cfg, FakeTask.metrics)
    cfg.trainer.monitor = "val/bleu"
    checks.check_monitor(cfg, FakeTask.metrics)


def test_a_sweep_checks_the_monitor_against_the_task_class():
    ConfigStore.instance().store(group="task", name="fake_for_tests", node={"_target_": f"{__name__}.FakeTask"})
    task = "task=fake_for_tests" if (CONFIGS / "task").is_dir() else "+task=fake_for_tests"
    with pytest.raises(SFTError, match="is not one of: val/accuracy, val/bleu, val/loss"):
        sweep.check_config(["+experiment=quickstart", task, "trainer.monitor=val/f1", "optimizer.lr=0.1,0.01"])
    sweep.check_config(["+experiment=quickstart", task, "trainer.monitor=val/bleu", "optimizer.lr=0.1,0.01"])


def test_an_empty_hydra_run_dir_is_refused_before_anything_is_written(tmp_path: Path):
    (tmp_path / "mine.txt").write_text("a user's file")
    result = run_cli("sft-train", *FAST, "hydra.run.dir=", cwd=tmp_path)
    assert result.returncode == 1 and "hydra.run.dir= is empty" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_a_quoted_run_dir_is_guarded_as_the_folder_it_names(tmp_path: Path):
    finished = tmp_path / "finished run"
    (finished / ".hydra").mkdir(parents=True)
    for name, text in (("summary.json", "{}"), (".hydra/config.yaml", "original: true\n"), ("train.log", "old\n")):
        (finished / name).write_text(text)
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    for quoted in (f"'{finished}'", f'"{finished}"'):
        result = run_cli("sft-train", *FAST, f"hydra.run.dir={quoted}", cwd=tmp_path)
        assert result.returncode == 1 and "already holds a run" in result.output, result.output[-1500:]
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finished run"]  # no stray folder named ' or "


def test_a_run_dir_that_is_a_file_or_cannot_be_created_is_one_clear_error(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    for bad in ("notes.txt", "notes.txt/run", "/proc/sft-cli-run"):
        result = run_cli("sft-train", *FAST, f"hydra.run.dir={bad}", cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.output, result.output[-1500:]
        assert f"hydra.run.dir={bad} cannot be a run folder" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"
