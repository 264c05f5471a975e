"""PNG plots of a run, an sft-eval folder and a sweep, drawn from the files they leave (metrics.jsonl,
summary.json, test.json or eval.json, each run's overrides) into <folder>/plots/. Drawn at the end of every run
and by sft-report; a killed run's partial files draw what there is, and missing data never raises."""

import io
import logging
import math
import re
from pathlib import Path

# Figure directly, not pyplot: no global figure registry to leak into, no GUI backend to pick; savefig
# renders a PNG with Agg by itself.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sft_cli import disk
from sft_cli.errors import SFTError
from sft_cli.results.folders import read_json, read_jsonl, sweep_runs

log = logging.getLogger("sft_cli.plots")

DPI = 100  # keeps each PNG at ~20-60 KB, small enough to embed in report.html
# Keys of a metrics.jsonl record that are bookkeeping, not a metric of the task
BOOKKEEPING = {"epoch", "step", "split", "samples", "tokens", "learned_tokens", "lr", "elapsed"}
LABELLED_CLASSES = 30  # above this, class names on the axes overlap: indices only
ANNOTATED_CLASSES = 12  # up to this, the confusion matrix prints each cell's value


def draw_run(run_dir: Path) -> list[Path]:
    """Plots of a run folder into run_dir/plots/: a curve per metric (train and val against step, the test value
    at the last step), the learning rate, and for a classifier the confusion matrix and per-class F1."""
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    details = read_json(run_dir / "test.json") or {}
    test = {**((read_json(run_dir / "summary.json") or {}).get("test") or {}), **details}
    series = {split: _by_step(records, split) for split in ("train", "val")}
    last = max((step for steps in series.values() for step in steps), default=None)
    plots = []
    for name in metric_names(records):
        plots += _save(_curves, run_dir / "plots" / f"{_slug(name)}.png", name, series, test.get(name), last)
    plots += _save(_lr, run_dir / "plots" / "lr.png", series)
    return plots + _classes(details, run_dir / "plots")


def draw_eval(out_dir: Path) -> list[Path]:
    """Plots of an sft-eval folder into out_dir/plots/: for a classifier, its confusion matrix and per-class F1."""
    out_dir = Path(out_dir)
    return _classes(read_json(out_dir / "eval.json") or {}, out_dir / "plots")


def draw_sweep(sweep_dir: Path) -> list[Path]:
    """Plots of a sweep folder into sweep_dir/plots/: the monitored value of each finished run against each
    swept key, and the validation curves of the best (up to 5) runs overlaid."""
    sweep_dir = Path(sweep_dir)
    runs = sweep_runs(sweep_dir)
    finished = [r for r in runs if r["finished"] and _number(r["best_value"])]  # best first
    plots = []
    for key in swept_keys(runs):
        plots += _save(_against, sweep_dir / "plots" / f"sweep_{_slug(key)}.png", key, finished)
    return plots + _save(_overlaid, sweep_dir / "plots" / "sweep_val_curves.png", finished[:5])


# --- reading what is there ---

def metric_names(records: list[dict]) -> list[str]:
    """The task's metrics, as the records name them (validation records first: they hold nothing else)."""
    chosen = [r for r in records if r.get("split") == "val"] or records
    names = []
    for record in chosen:
        names += [k for k, v in record.items() if k not in BOOKKEEPING and not k.endswith("_per_s")
                  and _number(v) and k not in names]
    return names


def swept_keys(runs: list[dict]) -> list[str]:
    """The keys that take more than one value (a key that some runs lack, as a hand-made run may, is not one)."""
    values: dict[str, list] = {}
    for run in runs:
        for key, value in overrides_dict(run["all_overrides"]).items():
            values.setdefault(key, []).append(value)
    return [k for k, v in values.items() if len(set(v)) > 1]


def overrides_dict(overrides: list[str]) -> dict[str, str]:
    return {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}


def _by_step(records: list[dict], split: str) -> dict:
    # A resumed run logs some steps again: the later record of a step wins
    steps = {r["step"]: r for r in records if r.get("split") == split and _number(r.get("step"))}
    return dict(sorted(steps.items()))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "value"


# --- drawing ---

def _save(draw, path: Path, *args) -> list[Path]:
    """[path] after draw(*args) returned a figure and it was saved there; [] when there was nothing to draw.
    Data of an unexpected shape (a hand-edited or half-written file) skips this one plot with a warning."""
    try:
        fig = draw(*args)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        log.warning(f"{path.name} not drawn: {type(e).__name__}: {e}")
        return []
    if fig is None:
        return []
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=DPI)
    try:  # whole or not at all: a full disk leaves the previous plot, not half a PNG
        path.parent.mkdir(parents=True, exist_ok=True)
        disk.write_atomic(path, png.getvalue())
    except OSError as e:
        raise SFTError(f"the plot {disk.write_failed(path, e)}") from e
    return [path]


def _figure(width: float = 6.0, height: float = 3.6) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _curves(name: str, series: dict, test_value, last_step) -> Figure | None:
    fig = _figure()
    ax = fig.add_subplot()
    styles = {"train": {"lw": 1.2, "alpha": 0.7}, "val": {"lw": 1.6, "marker": "o", "ms": 3}}
    for split, records in series.items():
        points = [(step, r[name]) for step, r in records.items() if _number(r.get(name))]
        if points:
            ax.plot(*zip(*points), label=split, **styles[split])
    if not ax.lines:
        return None
    if _number(test_value) and last_step is not None:
        ax.plot([last_step], [test_value], "*", ms=13, color="C3", label=f"test {test_value:.4g}")
    values = [y for line in ax.lines for y in line.get_ydata()]
    # A loss falls by orders of magnitude (15 after a bad first epoch, 0.3 later): linear would flatten the end
    if (name.endswith("loss") or name == "perplexity") and min(values) > 0 and max(values) > 30 * min(values):
        ax.set_yscale("log")
    ax.set(title=name, xlabel="step", ylabel=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _lr(series: dict) -> Figure | None:
    records = series["train"] or series["val"]
    points = [(step, r["lr"]) for step, r in records.items() if _number(r.get("lr"))]
    if not points:
        return None
    fig = _figure(6.0, 3.0)
    ax = fig.add_subplot()
    ax.plot(*zip(*points), lw=1.5)
    ax.set(title="learning rate", xlabel="step", ylabel="lr")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    return fig


def _classes(details: dict, plots: Path) -> list[Path]:
    confusion, f1 = details.get("confusion"), details.get("f1")
    n = len(confusion) if isinstance(confusion, list) else len(f1) if isinstance(f1, list) else 0
    names = details.get("classes")
    names = [str(c) for c in names] if isinstance(names, list) and len(names) == n else [str(i) for i in range(n)]
    out = _save(_confusion, plots / "confusion.png", confusion, names) if confusion else []
    split = str(details.get("split", "test"))  # eval.json says which split sft-eval scored
    return out + (_save(_f1_bars, plots / "per_class_f1.png", f1, names, details.get("macro_f1"), split)
                  if isinstance(f1, list) and f1 else [])  # a list per class; a scalar f1 is a task's overall score


def _confusion(confusion: list[list], names: list[str]) -> Figure:
    n = len(confusion)
    rows = [[float(v) for v in row] for row in confusion]
    normalised = [[v / sum(row) if sum(row) else 0.0 for v in row] for row in rows]
    side = 4.8 if n <= ANNOTATED_CLASSES else 5.5
    fig = _figure(2 * side + 0.8, side)
    for ax, matrix, title, text in zip(fig.subplots(1, 2), (rows, normalised),
                                       ("counts", "row-normalised (recall)"), ("{:.0f}", "{:.2f}")):
        image = ax.imshow(matrix, cmap="Blues", vmin=0, interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set(title=title, xlabel="predicted", ylabel="true")
        _class_ticks(ax, names, both=True)
        if n <= ANNOTATED_CLASSES:
            top = max(max(row) for row in matrix) or 1
            for i, row in enumerate(matrix):
                for j, v in enumerate(row):
                    if v == 0:
                        continue  # a grid of zeros hides the few cells that matter
                    ax.text(j, i, text.format(v), ha="center", va="center", fontsize=8,
                            color="white" if v > top / 2 else "black")
    return fig


def _f1_bars(f1: list, names: list[str], macro, split: str) -> Figure:
    fig = _figure(min(12.0, max(6.0, 0.25 * len(f1))), 3.6)
    ax = fig.add_subplot()
    ax.bar(range(len(f1)), [v if _number(v) else 0.0 for v in f1], color="C0")
    if _number(macro):
        ax.axhline(macro, color="C3", ls="--", lw=1, label=f"macro F1 {macro:.4f}")
        ax.legend(loc="lower right")
    ax.set(title=f"F1 per class ({split})", ylabel="F1", ylim=(0, 1.05))
    _class_ticks(ax, names, both=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _class_ticks(ax, names: list[str], both: bool) -> None:
    if len(names) > LABELLED_CLASSES:
        ax.set_xlabel(f"{ax.get_xlabel() or 'class'} (index of {len(names)})")
        return
    rotation = 45 if max(map(len, names), default=0) > 2 else 0
    ax.set_xticks(range(len(names)), names, rotation=rotation, ha="right" if rotation else "center", fontsize=8)
    if both:
        ax.set_yticks(range(len(names)), names, fontsize=8)


def _against(key: str, finished: list[dict]) -> Figure | None:
    points = [(overrides_dict(r["all_overrides"]).get(key, "(default)"), r["best_value"]) for r in finished]
    if not points:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    try:
        xs = [float(x) for x, _ in points]
    except ValueError:  # a choice (freeze=none,head_only): one position per value, in order of appearance
        labels = list(dict.fromkeys(x for x, _ in points))
        xs = [labels.index(x) for x, _ in points]
        ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0)
    else:
        # lr=1e-4,1e-3,1e-2 are evenly spaced on a log axis and crammed into a corner on a linear one
        if min(xs) > 0 and max(xs) > 10 * min(xs):
            ax.set_xscale("log")
    ax.scatter(xs, [y for _, y in points], s=36, color="C0", zorder=3)
    monitor = finished[0]["monitor"] or "monitored value"
    ax.set(title=f"best {monitor} by {key}", xlabel=key, ylabel=monitor)
    ax.grid(alpha=0.3)
    return fig


def _overlaid(best: list[dict]) -> Figure | None:
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    distinct = _distinct([r["all_overrides"] for r in best])
    for run, label in zip(best, distinct):
        name = run["monitor"].split("/", 1)[-1]
        val = _by_step(read_jsonl(run["metrics"]), "val")
        points = [(step, r[name]) for step, r in val.items() if _number(r.get(name))]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, lw=1.4, label=f"{run['run']}: {label}"[:70])
    if not ax.lines:
        return None
    ax.set(title=f"{best[0]['monitor']} of the best {len(ax.lines)} runs", xlabel="step",
           ylabel=best[0]["monitor"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _distinct(overrides: list[list[str]]) -> list[str]:
    """Each run's overrides less those every run shares."""
    shared = set.intersection(*map(set, overrides)) if overrides else set()
    return [" ".join(o for o in run if o not in shared) for run in overrides]
