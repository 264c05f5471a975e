"""After `sft-train -m ...`: rank every run of the sweep by its monitored metric (summary.csv, summary.md)."""

import csv
import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sft_cli import console

COLUMNS = ["rank", "run", "overrides", "monitor", "best_value", "test_accuracy", "test_macro_f1", "epochs",
           "wall_time_s", "status"]


def collect(sweep_dir: Path) -> list[dict]:
    """One row per run folder under `sweep_dir`, best first; runs without summary.json rank last as failed."""
    runs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: (len(p.name), p.name))
    overrides = {run: list(OmegaConf.load(run / ".hydra" / "overrides.yaml")) for run in runs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if runs else set()
    rows = []
    for run in runs:
        row = dict.fromkeys(COLUMNS, "")
        row.update(run=run.name, status="failed (no summary.json)",
                   overrides=" ".join(o for o in overrides[run] if o not in shared))  # what sets it apart
        if (run / "summary.json").is_file():
            s = json.loads((run / "summary.json").read_text())
            test = s.get("test") or {}
            row.update(monitor=s["monitor"], best_value=s["best_value"], epochs=s["epochs"], status=s["status"],
                       wall_time_s=s["wall_time_s"], mode=s["mode"], test_accuracy=test.get("accuracy", ""),
                       test_macro_f1=test.get("macro_f1", ""))
        rows.append(row)
    done = [r for r in rows if isinstance(r["best_value"], float)]
    done.sort(key=lambda r: -r["best_value"] if r["mode"] == "max" else r["best_value"])
    ranked = done + [r for r in rows if r not in done]
    for i, row in enumerate(ranked, 1):
        row["rank"] = i if row in done else "-"
    return ranked


def write(rows: list[dict], sweep_dir: Path) -> None:
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS) + " |"
              for r in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")


class SweepSummary(Callback):
    """Hydra callback (configs/train.yaml: hydra.callbacks) that runs when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        write(rows, sweep_dir)
        console.print_ranking(rows, [c for c in COLUMNS if c != "monitor"],
                              f"sweep ranked by {rows[0]['monitor'] if rows else ''} ({sweep_dir}/summary.md)")

