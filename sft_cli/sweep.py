"""After `sft-train -m ...`: rank every run of the sweep by its monitored metric (summary.csv, summary.md), and
average the runs that differ only in `seed` (summary_seeds.csv, summary_seeds.md). Also what a sweep needs
before its first run (check_config) and each run needs: its share of the machine, its failure record, and the
finished twin from an earlier sweep that sweep.skip_finished=true reuses."""

import contextlib
import csv
import io
import json
import logging
import os
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sft_cli import checks, config, disk
from sft_cli.errors import SFTError
from sft_cli.results import console, folders
from sft_cli.results.folders import FINISHED, override_key, read_json

log = logging.getLogger("sft_cli.sweep")


def write(rows: list[dict], sweep_dir: Path, columns: list[str], name: str = "summary") -> None:
    """<name>.csv and <name>.md, each written whole and then renamed into place (runs of a joblib sweep end at
    the same time)."""
    table = io.StringIO()
    writer = csv.DictWriter(table, columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    cell = lambda value: f"{value:.4f}" if isinstance(value, float) else str(value)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    for path, text in ((sweep_dir / f"{name}.csv", table.getvalue()),
                       (sweep_dir / f"{name}.md", "\n".join(lines) + "\n")):
        disk.write_atomic(path, text)


class SweepSummary(Callback):
    """Hydra callback (configs/train.yaml: hydra.callbacks) that runs when a multirun ends."""

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        # The files also follow each run, so that they exist when a sweep stops early: hydra-optuna-sweeper 1.3
        # raises "No trials are completed yet" after the last trial when every trial failed.
        if config.hydra.mode == RunMode.MULTIRUN:
            with contextlib.suppress(Exception):  # best effort: on_multirun_end writes the final files
                rows = folders.sweep_runs(Path(config.hydra.sweep.dir))
                write(rows, Path(config.hydra.sweep.dir), folders.columns(rows))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = folders.sweep_runs(sweep_dir)
        write(rows, sweep_dir, folders.columns(rows))
        monitor = next((r["monitor"] for r in rows if r["monitor"]), "")
        console.print_ranking(rows, [c for c in folders.columns(rows) if c not in ("monitor", "error")],
                              f"sweep ranked by {monitor} ({sweep_dir}/summary.md)")
        groups = folders.by_seed(rows)
        if len(groups) < len(rows):  # some runs differ only in their seed
            write(groups, sweep_dir, folders.seed_columns(groups), "summary_seeds")
            console.print_ranking(groups, folders.seed_columns(groups), f"mean and std over seeds of {monitor} "
                                                        f"({sweep_dir}/summary_seeds.md)")
        try:
            from sft_cli.results import report  # matplotlib, only at the end

            console.print_lines([f"sweep report: {report.sweep_report(sweep_dir)}"])
        except Exception as e:  # the ranking files are written; the page is a bonus
            log.warning(f"could not draw the sweep report ({type(e).__name__}: {e}); sft-report {sweep_dir} retries")
        failed = [r for r in rows if r["status"] == "failed"]
        if failed:
            console.print_lines([f"{len(failed)} of {len(rows)} runs failed:"]
                                + [f"  run {r['run']} ({r['overrides']}): {r['error']}" for r in failed])


def record_failure(run_dir: Path, cfg: DictConfig, overrides: list[str], reason: str) -> None:
    """summary.json of a run of a sweep that raised: status failed and the reason, for the sweep's summary."""
    monitor = OmegaConf.select(cfg, "trainer.monitor")
    summary = {"name": cfg.get("name"), "status": "failed", "error": reason,
               "monitor": monitor, "mode": config.mode_of(cfg.trainer) if monitor else None,
               "best_value": None, "overrides": overrides, "run_dir": str(run_dir.absolute())}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def record_overrides(run_dir: Path, overrides: list[str]) -> None:
    """Add the run's overrides to its summary.json, so sweep.skip_finished knows the run even after a sweep
    re-run in the same folder has replaced its .hydra/."""
    summary = read_json(run_dir / "summary.json")
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary | {"overrides": overrides}, indent=2))


def _identity(overrides: list[str]) -> list[str]:
    # What makes two runs the same run: the overrides, in any order, less the sweep.* keys
    return sorted(o for o in overrides if not override_key(o).startswith("sweep."))


def find_finished(root: Path, sweep_dir: Path, run_dir: Path, overrides: list[str]) -> Path | None:
    """The newest finished run with these overrides: in an earlier sweep under `root` (sweep.root), or in
    `run_dir` itself when this sweep re-uses an earlier sweep's folder (a fixed hydra.sweep.dir)."""
    sweep_dir, run_dir, want = sweep_dir.resolve(), run_dir.resolve(), _identity(overrides)
    candidates = [run_dir]
    for parent, dirs, _ in os.walk(root):
        if ".hydra" in dirs:  # a run folder: nothing to find further down
            dirs.clear()
            if not Path(parent).resolve().is_relative_to(sweep_dir):  # this sweep's folders were just (re)made
                candidates.append(Path(parent))
    found = []
    for run in candidates:
        summary = read_json(run / "summary.json")
        if summary is None or summary.get("status") not in FINISHED:
            continue
        theirs = summary.get("overrides")
        if theirs is None and run != run_dir:  # made before overrides were recorded in summary.json
            theirs = folders.read_overrides(run)
        if theirs is not None and _identity(theirs) == want:
            found.append(run)
    return max(found, key=lambda run: (run / "summary.json").stat().st_mtime, default=None)


def reuse(found: Path, run_dir: Path, overrides: list[str]) -> float:
    """Record the finished run `found` as this run (sweep.skip_finished=true): summary.json with its results
    and a pointer to it, where checkpoints/ and metrics still live. Returns its best monitored value."""
    summary = read_json(found / "summary.json")
    if found.resolve() != run_dir.resolve():
        summary |= {"reused_from": summary.get("reused_from") or str(found.absolute()), "overrides": overrides}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(f"skipped: {summary.get('reused_from') or found} already finished this run "
             f"({summary['monitor']}={summary['best_value']:.4f}); sweep.skip_finished=true reuses it")
    return float(summary["best_value"])


def set_aside_earlier_attempt(run_dir: Path) -> None:
    """A run that an earlier sweep left in this very folder (a fixed hydra.sweep.dir) and that is not reused
    (it failed, or had other overrides) moves into earlier_attempt_<k>/, so that this run starts clean."""
    names = [n for n in ("summary.json", "metrics.jsonl", "metrics.csv", "checkpoints") if (run_dir / n).exists()]
    if names:
        attempt = run_dir / f"earlier_attempt_{1 + len(list(run_dir.glob('earlier_attempt_*')))}"
        attempt.mkdir()
        for name in names:
            (run_dir / name).rename(attempt / name)



def check_config(overrides: list[str]) -> None:
    """Before a sweep's first run. Under -m every run composes its own config, and a run's error is recorded
    as a failed run, not raised: a mistake that all runs share (trainer.monitor=val/acc) would fail them one
    by one. So the config is composed here once from the command line's `overrides`, the swept ones left out,
    and checked: an SFTError stops the sweep before its first run."""
    cfg, swept = _compose_unswept(overrides)
    if cfg is None:
        return  # a syntax or composition error: Hydra reports it next, also before any run
    for key in swept & OmegaConf.missing_keys(cfg):
        OmegaConf.update(cfg, key, "<swept>")  # a required value given only as swept values is not missing
    checks.check(cfg)
    if "task" in cfg and "task" not in swept:  # (a swept task group: each run checks its own)
        # the task, built as its runs build it, says which metrics trainer.monitor may name: its config's own
        # (a custom answer metric, those a setting turns off) as well as its class's (imports torch: -m only)
        task = config.build(cfg.task)
        metrics = set(task.metrics)
        if any(key.startswith("task.") for key in swept):  # a swept value may turn on a metric the others lack
            metrics |= set(type(task).metrics)
        checks.check_monitor(cfg, metrics, getattr(task, "metrics_off", None))
    given = config.arg(overrides, "hydra.sweep.dir")  # the default folder is new by construction
    run = [n for n in ("summary.json", "metrics.jsonl", "checkpoints") if given and (Path(given) / n).exists()]
    if run:
        raise SFTError(f"hydra.sweep.dir={given} is the folder of a run ({', '.join(run)}), not of a sweep; it is left "
                       "untouched. Choose a new folder for the sweep, or leave hydra.sweep.dir at its default.")
    if given and not cfg.sweep.skip_finished and any(Path(given).glob("*/summary.json")):
        raise SFTError(f"hydra.sweep.dir={given} already holds the runs of an earlier sweep; they are left "
                       "untouched. Choose a new folder, or add sweep.skip_finished=true to reuse its finished "
                       "runs and run the others again.")


def _compose_unswept(overrides: list[str]) -> tuple[DictConfig | None, set[str]]:
    """train.yaml composed with the overrides that are not swept, and the keys that are (None on an error)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        with initialize_config_dir(config.find_config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=[o.input_line for o in parsed if not o.is_sweep_override()])
    except Exception:
        return None, set()
    return cfg, {o.key_or_group for o in parsed if o.is_sweep_override()}


@contextlib.contextmanager
def machine_share(cfg: DictConfig, hydra_cfg: DictConfig):
    """hydra/launcher=joblib runs several runs at once on this machine. Each gets cores / runs torch threads
    (OMP_NUM_THREADS, when you set it) and, with several GPUs, a GPU of its own: the first one that no other
    run of the sweep holds (a lock file in the sweep folder)."""
    at_once = config.jobs_at_once(hydra_cfg.launcher)
    if "joblib" not in hydra_cfg.launcher._target_ or at_once == 1:
        yield
        return
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // at_once)))
    gpus = torch.cuda.device_count()
    if gpus < 2 or cfg.trainer.devices > 1 or cfg.trainer.device not in ("auto", "cuda"):
        log.info(f"{at_once} runs at once: {torch.get_num_threads()} CPU threads each")
        yield
        return
    gpu, held = _free_gpu(Path(hydra_cfg.sweep.dir) / ".gpu_locks", gpus, hydra_cfg.job.num)
    cfg.trainer.device = f"cuda:{gpu}"
    log.info(f"{at_once} runs at once: this one on cuda:{gpu} with {torch.get_num_threads()} CPU threads")
    try:
        yield
    finally:
        if held is not None:
            held.close()  # releases the lock


def _free_gpu(locks: Path, gpus: int, job_num: int):
    """(the first GPU whose lock file no other run holds, its open lock file); with every GPU taken (more
    runs at once than GPUs) the GPUs are shared by run number, and no lock is held."""
    locks.mkdir(parents=True, exist_ok=True)
    for i in range(gpus):
        if (held := disk.lock(locks / str(i), wait=False)) is not None:
            return i, held
    return job_num % gpus, None
