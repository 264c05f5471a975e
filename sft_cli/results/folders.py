"""The one reader of what runs and sweeps leave on disk: JSON files, metric records, a run's overrides, and a
sweep's runs ranked by their monitored metric. Plots, reports, the sweep callback and sweep.skip_finished all
read through it. Nothing here writes, and a file cut short by a kill is read as far as it is whole."""

import functools
import json
import logging
import statistics
from pathlib import Path

import yaml

log = logging.getLogger(__name__)
FINISHED = ("completed", "early_stopped")
# The ranking's columns; test_<metric> columns, one per metric the runs' task reports, follow best_value
COLUMNS = ["rank", "run", "overrides", "monitor", "best_value", "epochs", "wall_time_s", "status", "error"]
SEED_COLUMNS = ["rank", "overrides", "runs", "seeds", "best_value_mean", "best_value_std", "failed"]


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def png_size(data: bytes) -> tuple[int, int, int]:
    """(width, height, channels) from a PNG's header (its IHDR chunk comes first); zeros for another format."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return 0, 0, 0
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(data[25], 0)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), channels


def read_jsonl(path: Path) -> list[dict]:
    """The records of a .jsonl file; no file is no record, and a line that is no whole record (cut short by a
    kill) is skipped with a warning that says which."""
    try:
        lines = Path(path).read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []
    records, skipped = [], []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            skipped.append(number)
    if skipped:
        _warn_skipped(str(path), tuple(skipped), len(lines))
    return records


@functools.lru_cache(maxsize=None)  # once per file and cut: the plots and the page read the same file
def _warn_skipped(path: str, numbers: tuple[int, ...], total: int) -> None:
    which = f"line {numbers[0]}" if len(numbers) == 1 else f"lines {', '.join(map(str, numbers[:5]))}"
    cut = " (the last, cut short: a killed run?)" if numbers == (total,) else ""
    log.warning(f"{path}: skipped {which}{cut}, not a whole JSON record; what is drawn comes from the other "
                f"{total - len(numbers)} line(s)")


def read_overrides(folder: Path) -> list[str]:
    """The command line's overrides of a Hydra run (.hydra/overrides.yaml), [] when unreadable."""
    try:
        overrides = yaml.safe_load((Path(folder) / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def sweep_runs(sweep_dir: Path) -> list[dict]:
    """A row per run folder of a sweep (0, 1, ...), best monitored value first, runs that did not finish last
    (rank "-"): run, path, overrides (those that set it apart, as text), distinct and all_overrides (lists),
    status, finished, monitor, mode, best_value, epochs, wall_time_s, error, metrics (its metrics.jsonl) and test_<m> for
    each test metric its summary.json holds (the task's own: accuracy and macro_f1, loss and perplexity, ...)."""
    runs = sorted((p for p in Path(sweep_dir).iterdir() if (p / ".hydra").is_dir()), key=lambda p: (len(p.name), p.name))
    overrides = {run: read_overrides(run) for run in runs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if runs else set()
    rows = []
    for run in runs:
        distinct = [o for o in overrides[run] if o not in shared]
        row = dict.fromkeys(COLUMNS, "") | {
            "run": run.name, "path": run, "overrides": " ".join(distinct), "distinct": distinct,
            "all_overrides": overrides[run], "mode": None, "status": "failed", "finished": False,
            "metrics": run / "metrics.jsonl",
            "error": "no summary.json: the run was killed, or is still running"}
        s = read_json(run / "summary.json")
        if s is not None:
            best = s.get("best_value")
            row.update(monitor=s.get("monitor", ""), best_value="" if best is None else best, mode=s.get("mode"),
                       epochs=s.get("epochs", ""), wall_time_s=s.get("wall_time_s", ""), error=s.get("error", ""),
                       status=s.get("status", "") + (" (reused)" if s.get("reused_from") else ""),
                       finished=s.get("status") in FINISHED,
                       metrics=Path(s.get("reused_from") or run) / "metrics.jsonl")
            row.update({f"test_{k}": v for k, v in (s.get("test") or {}).items() if k != "samples"})
        rows.append(row)
    return _ranked(rows, "best_value")


def test_columns(rows: list[dict]) -> list[str]:
    """The test_<metric> columns the rows hold, in the order the first run that has them lists them."""
    return list(dict.fromkeys(k for row in rows for k in row if k.startswith("test_")))


def columns(rows: list[dict]) -> list[str]:
    """The ranking's columns for these rows: COLUMNS with the runs' test metrics after best_value."""
    at = COLUMNS.index("best_value") + 1
    return COLUMNS[:at] + test_columns(rows) + COLUMNS[at:]


def seed_columns(groups: list[dict]) -> list[str]:
    at = SEED_COLUMNS.index("best_value_std") + 1
    extra = list(dict.fromkeys(k for g in groups for k in g if k.startswith("test_")))
    return SEED_COLUMNS[:at] + extra + SEED_COLUMNS[at:]


def by_seed(rows: list[dict]) -> list[dict]:
    """Runs whose overrides differ only in `seed` are one configuration: the mean and the sample standard
    deviation (n - 1) of best_value and of each test metric over its finished runs, best mean first."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        key = " ".join(o for o in row["distinct"] if override_key(o) != "seed")
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        done = [r for r in members if isinstance(r["best_value"], float)]
        group = {"overrides": key, "runs": len(done), "failed": len(members) - len(done),
                 "mode": next((r["mode"] for r in done), None),
                 "seeds": " ".join(o.split("=", 1)[1] for r in sorted(done, key=lambda r: (len(r["run"]), r["run"]))
                                   for o in r["distinct"] if override_key(o) == "seed")}
        for column in ("best_value", *test_columns(members)):
            values = [r[column] for r in done if isinstance(r.get(column), float)]
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
