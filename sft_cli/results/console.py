"""Everything drawn on the terminal with rich: config tree, parameter table, progress bar, summaries."""

import time
from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.tree import Tree

console = Console()


def print_config(cfg: DictConfig) -> None:
    """The resolved config as a tree, one branch per group (the on-disk copy is .hydra/config.yaml)."""
    tree = Tree("[bold]config", guide_style="dim")
    for key, value in cfg.items():
        if isinstance(value, DictConfig):
            tree.add(f"[bold cyan]{key}").add(OmegaConf.to_yaml(value, resolve=True).rstrip())
        else:
            tree.add(f"[bold cyan]{key}[/]: {value}")
    console.print(tree)


def print_stages(rows: list[tuple[str, int, int]], title: str = "parameters by stage") -> None:
    console.print(_stage_table(rows, title))


def report_stages(rows: list[tuple[str, int, int]], path: Path, on_screen: bool = False) -> None:
    """The parameter table per stage into `path` (plain text); on screen too, or else one line."""
    with path.open("w") as f:
        Console(file=f, width=100, color_system=None).print(_stage_table(rows, "parameters by stage"))
    if on_screen:
        print_stages(rows)
        return
    trainable, total = sum(r[1] for r in rows), sum(r[2] for r in rows)
    shown = [r for r in rows if r[2]]
    console.print(f"parameters: {trainable:,} of {total:,} train ({trainable / max(total, 1):.1%}), in "
                  f"{sum(1 for r in shown if r[1])} of {len(shown)} stages; per stage: {path} "
                  "(verbose=true prints it here)", markup=False, highlight=False, soft_wrap=True)


def _stage_table(rows: list[tuple[str, int, int]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("stage", "trainable", "total"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, trainable, total in rows:
        if total:  # a stage whose weights are another's (a tied lm_head) owns none: 0 / 0 looked like a bug
            table.add_row(name, f"{trainable:,}", f"{total:,}", style=None if trainable else "dim")
    table.add_row("[bold]all", f"[bold]{sum(r[1] for r in rows):,}", f"[bold]{sum(r[2] for r in rows):,}")
    return table


def draws_bars() -> bool:
    """Whether the console is an interactive terminal (a progress bar can be drawn)."""
    return console.is_terminal


def progress_bar(enabled: bool):
    """A rich progress bar on interactive terminals; None (and nothing drawn) elsewhere, e.g. in logs."""
    if not (enabled and console.is_terminal):
        return nullcontext(None)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, transient=True)


class StepLines:
    """Progress as log lines, where no bar can be drawn: `step 40/500  loss 0.4321  lr 1.00e-03  35.2
    samples/s  ETA 3m12s`, the time left at the pace since the previous line (the first: since the start)."""

    def __init__(self, total_steps: float, step: int):
        self.total, self.mark = total_steps, (time.perf_counter(), step)

    def line(self, record: dict) -> str:
        now, step = time.perf_counter(), record["step"]
        seconds_per_step = (now - self.mark[0]) / max(step - self.mark[1], 1)
        self.mark = (now, step)
        left = "" if self.total == float("inf") else f"  ETA {_duration(seconds_per_step * (self.total - step))}"
        total = "" if self.total == float("inf") else f"/{self.total}"
        return (f"step {step}{total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"{rate(record['samples_per_s'])} samples/s{left}")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def rate(value: float) -> str:
    """Samples/s with the digits that matter: 0.31, 4.2, 35, 1200."""
    return f"{value:.2f}" if value < 1 else f"{value:.1f}" if value < 10 else f"{value:.0f}"


def print_key_values(title: str, values: dict) -> None:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in values.items():
        if key.endswith("_bytes") and isinstance(value, (int, list)):  # peak_memory_bytes: 1.23 GiB
            sizes = value if isinstance(value, list) else [value]  # per process: 1.23 / 1.20 GiB
            key, value = key.removesuffix("_bytes"), " / ".join(f"{v / 2**30:.2f}" for v in sizes) + " GiB"
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def print_class_report(classes: list[str], report: dict) -> None:
    """Per-class precision/recall/F1 and the confusion matrix, as sft-eval shows them."""
    table = Table(title="per class", title_justify="left")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for i, name in enumerate(classes):
        table.add_row(name, f"{report['precision'][i]:.3f}", f"{report['recall'][i]:.3f}", f"{report['f1'][i]:.3f}",
                      str(report["support"][i]))
    console.print(table)
    if len(classes) <= 20:
        matrix = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
        matrix.add_column("")
        for i in range(len(classes)):
            matrix.add_column(str(i), justify="right")
        for i, row in enumerate(report["confusion"]):
            matrix.add_row(f"{i} {classes[i]}", *(f"[bold]{v}" if j == i else str(v) for j, v in enumerate(row)))
        console.print(matrix)


def print_rows(title: str, rows: dict[str, dict]) -> None:
    """A table of named rows of scores, e.g. {"PER": {"precision": .9, "recall": .8, "f1": .85, "support": 40}}."""
    table = Table(title=title, title_justify="left")
    columns = list(next(iter(rows.values()), {}))
    for column in ["", *columns]:
        table.add_column(column, justify="left" if not column else "right")
    for name, row in rows.items():
        table.add_row(name, *(f"{v:.3f}" if isinstance(v, float) else str(v) for v in (row.get(c) for c in columns)))
    console.print(table)


def print_ranking(rows: list[dict], columns: list[str], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        values = [row.get(c, "") for c in columns]
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in values))
    console.print(table)


def print_lines(lines: list[str]) -> None:
    """Plain text: error messages may hold [brackets] that rich would read as markup."""
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
