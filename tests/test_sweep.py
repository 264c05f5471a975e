"""Sweeps as a user runs them: Optuna search, failed runs, skip_finished, averages over seeds, launcher presets,
and the checks made before a sweep's first run. The runs are tiny (one optimizer step at 16x16); everything
about the summary is checked in-process on run folders built by hand."""

import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sft_cli import cli, config, sweep
from sft_cli.errors import SFTError
from sft_cli.extras import install_command

from conftest import ok, read_json, run_cli

# One optimizer step of the quickstart at 16x16: each run takes a few seconds.
TINY = ["+experiment=quickstart", "dataset.transforms.image_size=16", "trainer.max_epochs=1", "trainer.max_steps=1",
        "trainer.num_workers=0", "trainer.progress_bar=false"]


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(config.find_config_dir(), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_random_search_runs_three_trials_and_ranks_them_minimising_val_loss(tmp_path: Path):
    result = ok(run_cli("sft-train", "-m", *TINY, "model=mobilenet_v3_large", "model.name=mobilenet_v3_small",
                        "hparams_search=random", "hydra.sweeper.n_trials=3", "trainer.monitor=val/loss",
                        "trainer.mode=min", "optimizer.lr=tag(log, interval(1e-3, 1e-2))", "hydra.sweep.dir=sweep",
                        cwd=tmp_path))
    assert "Directions: ['minimize']" in result.output  # from trainer.mode=min
    rows = read_csv(tmp_path / "sweep" / "summary.csv")
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and {r["status"] for r in rows} == {"completed"}
    losses = [float(r["best_value"]) for r in rows]
    assert losses == sorted(losses)  # lowest val/loss first
    for r in rows:  # every trial drew every dimension of the space in hparams_search/random.yaml
        assert all(f"{key}=" in r["overrides"] for key in ("optimizer.lr", "optimizer.weight_decay", "freeze",
                                                            "loss.label_smoothing", "trainer.batch_size"))
        lr = next(float(o.split("=")[1]) for o in r["overrides"].split() if o.startswith("optimizer.lr="))
        assert 1e-3 <= lr <= 1e-2  # the range given on the command line replaced the preset's
    best = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert best.best_value == pytest.approx(losses[0])  # Optuna's best is our rank 1: it minimised too


def test_a_failed_run_is_recorded_and_skip_finished_reruns_only_the_failed_and_missing(tmp_path: Path):
    # a bad combination: a ViT takes 224x224 inputs only (found by the run's own config check, so it fails fast)
    first = ok(run_cli("sft-train", "-m", *TINY, "model.name=resnet18,vit_b_16", "sweep.root=sweeps", cwd=tmp_path))
    assert "1 of 2 runs failed" in first.output
    assert "run 1 (model.name=vit_b_16): invalid config:" in first.output
    (earlier,) = (tmp_path / "sweeps").glob("*/*")
    failed = read_json(earlier / "1" / "summary.json")
    assert failed["status"] == "failed" and "model.name=vit_b_16 takes 224x224 inputs only" in failed["error"]
    rows = {r["run"]: r for r in read_csv(earlier / "summary.csv")}
    assert rows["0"]["status"] == "completed" and rows["1"]["status"] == "failed" and rows["1"]["rank"] == "-"
    assert "model.name=vit_b_16 takes 224x224 inputs only" in rows["1"]["error"]

    # the same command again, with one more model (missing) and sweep.skip_finished=true
    again = ok(run_cli("sft-train", "-m", *TINY, "model.name=resnet18,vit_b_16,vit_b_32", "sweep.root=sweeps",
                       "sweep.skip_finished=true", cwd=tmp_path))
    (later,) = set((tmp_path / "sweeps").glob("*/*")) - {earlier}
    reused = read_json(later / "0" / "summary.json")
    assert reused["reused_from"] == str(earlier / "0") and not (later / "0" / "checkpoints").exists()
    assert reused["best_value"] == read_json(earlier / "0" / "summary.json")["best_value"]
    assert "run failed" not in (later / "0" / "train.log").read_text()
    for run, name in (("1", "vit_b_16"), ("2", "vit_b_32")):  # the failed one ran again, the missing one ran
        assert f"model.name={name} takes 224x224 inputs only" in (later / run / "train.log").read_text()
    assert "2 of 3 runs failed" in again.output
    assert [r["status"] for r in read_csv(later / "summary.csv")] == ["completed (reused)", "failed", "failed"]


def test_a_typo_in_the_monitored_metric_stops_a_sweep_before_its_first_run(tmp_path: Path):
    result = run_cli("sft-train", "-m", "+experiment=quickstart", "trainer.monitor=val/acc", "optimizer.lr=0.1,0.01",
                     "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.output, result.output[-2000:]
    assert "trainer.monitor='val/acc' is not one of: val/accuracy, val/loss, val/macro_f1" in result.output
    assert not (tmp_path / "sweep").exists()  # no run started


def test_a_required_value_given_only_as_swept_values_is_not_missing():
    # image_folder needs dataset.root: missing when not given at all...
    with pytest.raises(SFTError, match="missing required values: dataset.root"):
        sweep.check_config(["+experiment=image_folder", "optimizer.lr=0.1,0.01"])
    # ...but swept here, so the check before the sweep must not call it missing
    sweep.check_config(["+experiment=image_folder", "dataset.root=/a,/b"])
    # and the rest of that config is still checked (a composition that failed would check nothing)
    with pytest.raises(SFTError, match="optimizer.lr=-1 must be a positive number"):
        sweep.check_config(["+experiment=image_folder", "dataset.root=/a,/b", "optimizer.lr=-1"])


def test_a_sweep_folder_that_holds_runs_is_reused_only_with_skip_finished(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "sweep", 0, ["optimizer.lr=0.1"], finished(0.9, 0.9))
    with pytest.raises(SFTError, match="hydra.sweep.dir=sweep already holds the runs of an earlier sweep"):
        sweep.check_config(["+experiment=quickstart", "optimizer.lr=0.1,0.01", "hydra.sweep.dir=sweep"])
    sweep.check_config(["+experiment=quickstart", "optimizer.lr=0.1,0.01", "++hydra.sweep.dir=sweep",
                        "sweep.skip_finished=true"])


def test_a_finished_run_is_never_a_sweep_folder(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, "run", ["optimizer.lr=0.1"], finished(0.9, 0.9))  # a single run's folder
    for extra in ([], ["sweep.skip_finished=true"]):
        with pytest.raises(SFTError, match=r"hydra.sweep.dir=run is the folder of a run \(summary.json"):
            sweep.check_config(["+experiment=quickstart", "optimizer.lr=0.1,0.01", "hydra.sweep.dir=run", *extra])


def test_launcher_presets_compose(tmp_path: Path):
    result = ok(run_cli("sft-train", "+experiment=quickstart", "+launcher=slurm", "--cfg", "hydra", cwd=tmp_path))
    launcher = OmegaConf.to_container(OmegaConf.create(result.stdout))["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["timeout_min"] == 240
    assert launcher["gpus_per_node"] == "${trainer.devices}" and launcher["tasks_per_node"] == 1

    cfg = compose_with_hydra(["+experiment=quickstart", "+launcher=slurm", "trainer.devices=4"])
    assert cfg.hydra.launcher.gpus_per_node == 4  # one GPU per DDP process
    cfg = compose_with_hydra(["+experiment=quickstart", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3",
                              "hparams_search=tpe"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.sweeper.n_jobs == 3  # Optuna asks for as many trials at once as joblib runs


@pytest.mark.parametrize("preset", ["random", "tpe"])
def test_search_presets_optimise_in_the_direction_of_trainer_mode(preset):
    cfg = compose_with_hydra(["+experiment=quickstart", f"hparams_search={preset}"])
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.hydra.sweeper.max_failure_rate == 1.0
    assert cfg.hydra.sweeper.sampler.seed == cfg.seed and cfg.hydra.sweeper.n_jobs == 1
    cfg = compose_with_hydra(["+experiment=quickstart", f"hparams_search={preset}", "trainer.monitor=val/loss",
                              "trainer.mode=min"])
    assert cfg.hydra.sweeper.direction == "minimize"
    cfg = compose_with_hydra(["+experiment=quickstart", f"hparams_search={preset}", "trainer.monitor=val/loss"])
    assert cfg.hydra.sweeper.direction == "minimize"  # trainer.mode=null follows the monitor, as config.mode_of


def test_tpe_searches_the_space_of_random_with_another_sampler():
    random, tpe = (compose_with_hydra(["+experiment=quickstart", f"hparams_search={p}"]).hydra.sweeper
                   for p in ("random", "tpe"))
    assert tpe.params == random.params and len(tpe.params) == 5  # written once, in random.yaml
    assert (random.sampler._target_, tpe.sampler._target_) == ("optuna.samplers.RandomSampler",
                                                               "optuna.samplers.TPESampler")
    assert tpe.sampler.n_startup_trials == 5 and tpe.sampler.seed == random.sampler.seed
    assert {k: v for k, v in tpe.items() if k != "sampler"} == {k: v for k, v in random.items() if k != "sampler"}


@pytest.mark.parametrize("arg,extra", [("hparams_search=random", "search"), ("hydra/launcher=joblib", "search"),
                                       ("+launcher=slurm", "slurm")])
def test_a_missing_plugin_names_the_extra_to_install(monkeypatch, capsys, arg, extra):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.") else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        cli._require_plugins(["+experiment=quickstart", arg])
    assert exit_.value.code == 1
    assert install_command(extra) in capsys.readouterr().err


def make_run(sweep_dir: Path, num: int, overrides: list[str], summary: dict | None) -> Path:
    run = sweep_dir / str(num)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def finished(value: float, test_accuracy: float) -> dict:
    return {"status": "completed", "monitor": "val/accuracy", "mode": "max", "best_value": value, "epochs": 2,
            "wall_time_s": 1.0, "test": {"accuracy": test_accuracy, "macro_f1": test_accuracy}}


def test_seed_groups_report_mean_std_and_count_and_failures_are_listed(tmp_path: Path, capsys):
    # 3 learning rates x 2 seeds; lr=0.001 failed once and was killed once (no summary.json)
    results = {("0.1", "1"): finished(0.80, 0.70), ("0.1", "2"): finished(0.60, 0.50),
               ("0.01", "1"): finished(0.95, 0.91), ("0.01", "2"): finished(0.85, 0.89),
               ("0.001", "1"): {"status": "failed", "error": "loss is nan at step 3", "monitor": "val/accuracy",
                                "mode": "max", "best_value": None},
               ("0.001", "2"): None}
    for num, ((lr, seed), summary) in enumerate(results.items()):
        make_run(tmp_path, num, ["+experiment=quickstart", f"optimizer.lr={lr}", f"seed={seed}"], summary)

    sweep.SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))

    groups = read_csv(tmp_path / "summary_seeds.csv")
    assert [(g["rank"], g["overrides"], g["runs"], g["seeds"], g["failed"]) for g in groups] == [
        ("1", "optimizer.lr=0.01", "2", "1 2", "0"), ("2", "optimizer.lr=0.1", "2", "1 2", "0"),
        ("-", "optimizer.lr=0.001", "0", "", "2")]
    expected = [(0.90, 0.0707107, 0.90, 0.0141421), (0.70, 0.1414214, 0.60, 0.1414214)]
    for group, numbers in zip(groups, expected):
        assert [float(group[c]) for c in ("best_value_mean", "best_value_std", "test_accuracy_mean",
                                          "test_accuracy_std")] == pytest.approx(numbers, abs=1e-6)
    assert "| 1 | optimizer.lr=0.01 | 2 | 1 2 | 0.9000 | 0.0707 | 0.9000 | 0.0141 | 0.9000 | 0.0141 | 0 |" in \
        (tmp_path / "summary_seeds.md").read_text()  # best value, test accuracy, test macro-F1: mean and std

    runs = read_csv(tmp_path / "summary.csv")  # the per-run ranking is still there
    assert [r["overrides"] for r in runs[:2]] == ["optimizer.lr=0.01 seed=1", "optimizer.lr=0.01 seed=2"]
    out = capsys.readouterr().out
    assert "2 of 6 runs failed:" in out
    assert "run 4 (optimizer.lr=0.001 seed=1): loss is nan at step 3" in out
    assert "run 5 (optimizer.lr=0.001 seed=2): no summary.json" in out


def test_without_seeds_there_is_no_seed_summary(tmp_path: Path):
    for num, lr in enumerate(("0.1", "0.01")):
        make_run(tmp_path, num, [f"optimizer.lr={lr}"], finished(0.5 + num / 10, 0.5))
    sweep.SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert (tmp_path / "summary.csv").is_file() and not (tmp_path / "summary_seeds.csv").exists()


def test_skip_finished_finds_only_a_finished_run_with_the_same_overrides(tmp_path: Path):
    base = ["+experiment=quickstart", "optimizer.lr=0.1"]
    earlier = tmp_path / "root" / "2026-01-01" / "10-00-00_1"
    done = make_run(earlier, 0, base + ["sweep.skip_finished=false"], finished(0.9, 0.9))
    make_run(earlier, 1, base + ["seed=1"], finished(0.95, 0.9))  # other overrides
    make_run(earlier, 2, ["+experiment=quickstart", "optimizer.lr=0.01"], {"status": "failed", "best_value": None})
    current = tmp_path / "root" / "2026-01-02" / "10-00-00_2"
    run_dir = make_run(current, 0, base, None)

    # the order of the overrides and the sweep.* keys do not matter; failed runs are never reused
    assert sweep.find_finished(tmp_path / "root", current, run_dir, list(reversed(base))) == done
    assert sweep.find_finished(tmp_path / "root", current, run_dir, ["+experiment=quickstart",
                                                                     "optimizer.lr=0.01"]) is None
    assert sweep.reuse(done, run_dir, base) == 0.9
    assert read_json(run_dir / "summary.json")["reused_from"] == str(done)
    # a sweep re-run in the same folder (fixed hydra.sweep.dir): the run's own summary.json says what it was
    sweep.record_overrides(done, base)
    assert sweep.find_finished(tmp_path / "elsewhere", earlier, done, base) == done
    failed = make_run(current, 1, base, None)
    sweep.record_failure(failed, OmegaConf.create({"name": "q"}), base, "boom")
    (failed / "checkpoints").mkdir()
    assert sweep.find_finished(tmp_path / "elsewhere", current, failed, base) is None
    sweep.set_aside_earlier_attempt(failed)  # so that the run starts again in its folder
    assert not (failed / "summary.json").exists() and not (failed / "checkpoints").exists()
    assert read_json(failed / "earlier_attempt_1" / "summary.json")["error"] == "boom"


def test_the_sweep_folder_name_is_the_same_in_every_process_of_a_sweep(monkeypatch):
    # hydra/launcher=joblib composes each run's config in a worker process, from a copy of the sweep's
    # resolver cache: ${pid:} must come from that cache, or each worker would make a sweep folder of its own.
    main = OmegaConf.create({"dir": "${pid:}"})
    assert main.dir == str(os.getpid())
    worker = OmegaConf.create({"dir": "${pid:}"})
    OmegaConf.copy_cache(from_config=main, to_config=worker)
    monkeypatch.setattr(os, "getpid", lambda: -1)
    assert worker.dir == main.dir


@pytest.mark.slow
def test_joblib_runs_two_at_once_in_one_sweep_folder_with_a_share_of_the_cores(tmp_path: Path):
    env = {k: "" for k in ("OMP_NUM_THREADS",)}  # unset: each run gets cores / 2 threads
    result = ok(run_cli("sft-train", "-m", *TINY, "optimizer.lr=0.1,0.01", "hydra/launcher=joblib",
                        "hydra.launcher.n_jobs=2", "sweep.root=sweeps", cwd=tmp_path, env=env))
    (sweep_dir,) = (tmp_path / "sweeps").glob("*/*")  # both worker processes wrote into the one sweep folder
    assert len(read_csv(sweep_dir / "summary.csv")) == 2 and "sweep ranked by" in result.output
    threads = max(1, os.cpu_count() // 2)
    for run in ("0", "1"):
        assert f"2 runs at once: {threads} CPU threads each" in (sweep_dir / run / "train.log").read_text()


def test_joblib_runs_on_several_gpus_each_take_one_that_no_other_run_holds(tmp_path: Path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)

    def run(num: int):
        cfg = OmegaConf.create({"trainer": {"device": "auto", "devices": 1}})
        hydra_cfg = OmegaConf.create({"launcher": {"_target_": "hydra_plugins.hydra_joblib_launcher.JoblibLauncher",
                                                   "n_jobs": 2}, "sweep": {"dir": str(tmp_path)}, "job": {"num": num}})
        return cfg, sweep.machine_share(cfg, hydra_cfg)

    (first, first_share), (second, second_share) = run(0), run(1)
    with first_share, second_share:
        assert (first.trainer.device, second.trainer.device) == ("cuda:0", "cuda:1")
        extra, extra_share = run(5)
        with extra_share:  # more runs at once than GPUs: shared by run number
            assert extra.trainer.device == "cuda:1"
    later, later_share = run(3)
    with later_share:  # both free again: the first one, whatever the run number
        assert later.trainer.device == "cuda:0"


def test_a_chat_sweep_ranks_and_shows_the_metrics_its_task_reports(tmp_path: Path):
    # a causal LM's summary holds test loss and perplexity: those are the columns, not empty accuracy ones
    for num, (lr, loss) in enumerate([("1e-4", 1.2), ("1e-3", 0.9)]):
        make_run(tmp_path, num, ["+experiment=chat_sft", f"optimizer.lr={lr}"],
                 {"status": "completed", "monitor": "val/loss", "mode": "min", "best_value": loss, "epochs": 1,
                  "wall_time_s": 1.0, "test": {"loss": loss + 0.1, "perplexity": 2.0 + loss, "token_accuracy": 0.5,
                                               "samples": 40}})
    sweep.SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    rows = read_csv(tmp_path / "summary.csv")
    assert [r["overrides"] for r in rows] == ["optimizer.lr=1e-3", "optimizer.lr=1e-4"]  # lower loss first
    assert {"test_loss", "test_perplexity", "test_token_accuracy"} <= set(rows[0])
    assert not any(c.startswith("test_") and c not in ("test_loss", "test_perplexity", "test_token_accuracy")
                   for c in rows[0])  # no test_accuracy, no test_macro_f1, no test_samples
    assert float(rows[0]["test_perplexity"]) == pytest.approx(2.9)
