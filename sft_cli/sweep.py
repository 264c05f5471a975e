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
import statistics
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sft_cli import config, console
from sft_cli.errors import SFTError

log = logging.getLogger("sft_cli.sweep")

COLUMNS = ["rank", "run", "overrides", "monitor", "best_value", "test_accuracy", "test_macro_f1", "epochs",
           "wall_time_s", "status", "error"]
SEED_COLUMNS = ["rank", "overrides", "runs", "seeds", "best_value_mean", "best_value_std", "test_accuracy_mean",
                "test_accuracy_std", "failed"]
FINISHED = ("completed", "early_stopped")


def collect(sweep_dir: Path) -> list[dict]:
    """One row per run folder under `sweep_dir`, best first; runs without summary.json rank last as failed."""
    runs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: (len(p.name), p.name))
    overrides = {run: list(OmegaConf.load(run / ".hydra" / "overrides.yaml")) for run in runs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if runs else set()
    rows = []
    for run in runs:
        row = dict.fromkeys(COLUMNS, "")
        distinct = [o for o in overrides[run] if o not in shared]  # what sets it apart
        row.update(run=run.name, overrides=" ".join(distinct), distinct=distinct, mode=None, status="failed",
                   error="no summary.json: the run was killed, or is still running")
        s = read_summary(run)
        if s is not None:
            test = s.get("test") or {}
            best = s.get("best_value")
            row.update(monitor=s.get("monitor", ""), best_value="" if best is None else best, mode=s.get("mode"),
                       epochs=s.get("epochs", ""), wall_time_s=s.get("wall_time_s", ""), error=s.get("error", ""),
                       status=s.get("status", "") + (" (reused)" if s.get("reused_from") else ""),
                       test_accuracy=test.get("accuracy", ""), test_macro_f1=test.get("macro_f1", ""))
        rows.append(row)
    return _ranked(rows, "best_value")


def by_seed(rows: list[dict]) -> list[dict]:
    """Runs whose overrides differ only in `seed` are one configuration: the mean and the sample standard
    deviation (n - 1) of best_value and test accuracy over its finished runs, best mean first."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        key = " ".join(o for o in row["distinct"] if _key(o) != "seed")
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        done = [r for r in members if isinstance(r["best_value"], float)]
        group = {"overrides": key, "runs": len(done), "failed": len(members) - len(done),
                 "mode": next((r["mode"] for r in done), None),
                 "seeds": " ".join(o.split("=", 1)[1] for r in sorted(done, key=lambda r: (len(r["run"]), r["run"]))
                                   for o in r["distinct"] if _key(o) == "seed")}
        for column in ("best_value", "test_accuracy"):
            values = [r[column] for r in done if isinstance(r[column], float)]
            group[f"{column}_mean"] = statistics.mean(values) if values else ""
            group[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else ""
        out.append(group)
    return _ranked(out, "best_value_mean")


def _ranked(rows: list[dict], column: str) -> list[dict]:
    done = [r for r in rows if isinstance(r[column], float)]
    done.sort(key=lambda r: -r[column] if r["mode"] == "max" else r[column])
    ranked = done + [r for r in rows if r not in done]
    for i, row in enumerate(ranked, 1):
        row["rank"] = i if row in done else "-"
    return ranked


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def write(rows: list[dict], sweep_dir: Path, name: str = "summary", columns: list[str] = COLUMNS) -> None:
    """<name>.csv and <name>.md, each written whole and then renamed into place (runs of a joblib sweep end at
    the same time)."""
    table = io.StringIO()
    writer = csv.DictWriter(table, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |"
              for r in rows]
    for path, text in ((sweep_dir / f"{name}.csv", table.getvalue()),
                       (sweep_dir / f"{name}.md", "\n".join(lines) + "\n")):
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(text)
        os.replace(temporary, path)


class SweepSummary(Callback):
    """Hydra callback (configs/train.yaml: hydra.callbacks) that runs when a multirun ends."""

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        # The files also follow each run, so that they exist when a sweep stops early: hydra-optuna-sweeper 1.3
        # raises "No trials are completed yet" after the last trial when every trial failed.
        if config.hydra.mode == RunMode.MULTIRUN:
            with contextlib.suppress(Exception):  # best effort: on_multirun_end writes the final files
                write(collect(Path(config.hydra.sweep.dir)), Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        write(rows, sweep_dir)
        monitor = next((r["monitor"] for r in rows if r["monitor"]), "")
        console.print_ranking(rows, [c for c in COLUMNS if c not in ("monitor", "error")],
                              f"sweep ranked by {monitor} ({sweep_dir}/summary.md)")
        groups = by_seed(rows)
        if len(groups) < len(rows):  # some runs differ only in their seed
            write(groups, sweep_dir, "summary_seeds", SEED_COLUMNS)
            console.print_ranking(groups, SEED_COLUMNS, f"mean and std over seeds of {monitor} "
                                                        f"({sweep_dir}/summary_seeds.md)")
        try:
            from sft_cli import report  # matplotlib, only at the end

            console.print_lines([f"sweep report: {report.sweep_report(sweep_dir)}"])
        except Exception as e:  # the ranking files are written; the page is a bonus
            log.warning(f"could not draw the sweep report ({type(e).__name__}: {e}); sft-report {sweep_dir} retries")
        failed = [r for r in rows if r["status"] == "failed"]
        if failed:
            console.print_lines([f"{len(failed)} of {len(rows)} runs failed:"]
                                + [f"  run {r['run']} ({r['overrides']}): {r['error']}" for r in failed])


def read_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


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
    summary = read_summary(run_dir)
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary | {"overrides": overrides}, indent=2))


def _identity(overrides: list[str]) -> list[str]:
    # What makes two runs the same run: the overrides, in any order, less the sweep.* keys
    return sorted(o for o in overrides if not _key(o).startswith("sweep."))


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
        summary = read_summary(run)
        if summary is None or summary.get("status") not in FINISHED:
            continue
        theirs = summary.get("overrides")
        if theirs is None and run != run_dir:  # made before overrides were recorded in summary.json
            theirs = list(OmegaConf.load(run / ".hydra" / "overrides.yaml"))
        if theirs is not None and _identity(theirs) == want:
            found.append(run)
    return max(found, key=lambda run: (run / "summary.json").stat().st_mtime, default=None)


def reuse(found: Path, run_dir: Path, overrides: list[str]) -> float:
    """Record the finished run `found` as this run (sweep.skip_finished=true): summary.json with its results
    and a pointer to it, where checkpoints/ and metrics still live. Returns its best monitored value."""
    summary = read_summary(found)
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
    config.check(cfg)
    if "task" in cfg:  # the task class says which metrics trainer.monitor may name (imports torch: -m only)
        from hydra.utils import get_class

        config.check_monitor(cfg, get_class(cfg.task._target_).metrics)
    given = config.arg(overrides, "hydra.sweep.dir")  # the default folder is new by construction
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
    import fcntl

    locks.mkdir(parents=True, exist_ok=True)
    for i in range(gpus):
        lock = open(locks / str(i), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        return i, lock
    return job_num % gpus, None
