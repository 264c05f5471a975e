"""report.html and plots/ of a run, a sweep and a causal-LM run, as a user opens them: one self-contained page
(every plot embedded, no script, nothing fetched) with the command line, the results and the plots; and
`sft-report <folder>` re-drawing them (run as `python -m sft_cli.results.report` until the console script exists)."""

import csv
import errno
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sft_cli import sweep
from sft_cli.results import folders
from sft_cli.results.report import run_report, sweep_report

from conftest import ok, read_json, run_cli

PNG = b"\x89PNG\r\n\x1a\n"
CLASSIFIER_PLOTS = {"loss.png", "accuracy.png", "macro_f1.png", "lr.png", "confusion.png", "per_class_f1.png"}
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "wbr"}


class Page(HTMLParser):
    """The tags of a page, and whether every opened tag is closed in order."""

    def __init__(self, text: str):
        super().__init__()
        self.open, self.mismatched, self.sources = [], [], []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.sources += [v for k, v in attrs if k in ("src", "href")]
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.mismatched.append(tag)


def check_page(path: Path) -> str:
    text = path.read_text()
    page = Page(text)
    assert not page.mismatched and not page.open, (page.mismatched, page.open)
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text.lower()
    assert all(s.startswith("data:image/png;base64,") or not s.startswith(("http", "//", "/")) for s in page.sources)
    return text


def pngs(folder: Path) -> set[str]:
    found = {p.name for p in (folder / "plots").glob("*.png")}
    assert all((folder / "plots" / name).read_bytes()[:8] == PNG for name in found)
    return found


def copy_run(source: Path, target: Path) -> Path:
    """A run folder without its checkpoints (45 MB that no report reads) and without earlier plots."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "plots", "report.html"))
    return target


@pytest.fixture(scope="module")
def run(quick_run: Path, tmp_path_factory) -> Path:
    """The shared real quickstart run (conftest's quick_run), copied so that the tests here may change it."""
    return copy_run(quick_run, tmp_path_factory.mktemp("report") / "run")


def test_a_run_report_embeds_every_plot_with_the_command_and_the_results(run: Path):
    html = check_page(run_report(run))
    assert pngs(run) == CLASSIFIER_PLOTS
    assert all(10_000 < (run / "plots" / name).stat().st_size < 120_000 for name in CLASSIFIER_PLOTS)
    assert html.count("data:image/png;base64,") == len(CLASSIFIER_PLOTS)
    summary = read_json(run / "summary.json")
    assert f"{summary['best_value']:.4f}" in html and f"{summary['test']['accuracy']:.4f}" in html
    assert "sft-train +experiment=quickstart dataset.transforms.image_size=16" in html
    assert "torchvision_classifier name=resnet18" in html and "SGD lr=0.01" in html  # the config's choices
    assert "<th>precision</th>" in html and html.count("<tr>") > 10  # the per-class table, a row per digit


def test_sft_report_redraws_a_run_and_refuses_a_folder_that_is_no_run(run: Path, tmp_path: Path):
    shutil.rmtree(run / "plots", ignore_errors=True)
    (run / "report.html").unlink(missing_ok=True)
    done = ok(run_cli("python", "-m", "sft_cli.results.report", str(run), cwd=tmp_path))
    assert done.stdout.strip() == str(run / "report.html") and pngs(run) == CLASSIFIER_PLOTS
    check_page(run / "report.html")
    (tmp_path / "empty").mkdir()
    refused = run_cli("python", "-m", "sft_cli.results.report", "empty", cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.output
    assert refused.stdout == "" and len(refused.stderr.strip().splitlines()) == 1
    assert "empty is not a run folder" in refused.stderr


def test_a_killed_run_draws_what_there_is(run: Path, tmp_path: Path):
    killed = copy_run(run, tmp_path / "killed")
    (killed / "summary.json").unlink()
    (killed / "test.json").unlink()
    text = (killed / "metrics.jsonl").read_text()
    (killed / "metrics.jsonl").write_text(text[:len(text) // 2])  # cut mid-line, as a kill leaves it
    html = check_page(run_report(killed))
    assert pngs(killed) == {"loss.png", "accuracy.png", "macro_f1.png", "lr.png"}
    assert "no summary.json" in html


def test_sft_report_on_a_killed_run_says_which_line_it_skipped(run: Path, tmp_path: Path):
    killed = copy_run(run, tmp_path / "killed")
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(lines[:-1] + [lines[-1][:20]]))  # the last line cut by a kill
    done = ok(run_cli("python", "-m", "sft_cli.results.report", str(killed), cwd=tmp_path))
    assert done.stdout.strip() == str(killed / "report.html")
    assert done.stderr.count("skipped") == 1, done.stderr  # said once, though the plots and the page read it
    assert f"metrics.jsonl: skipped line {len(lines)} (the last, cut short: a killed run?), not a whole JSON " \
           f"record; what is drawn comes from the other {len(lines) - 1} line(s)" in done.stderr


def test_a_full_disk_while_drawing_says_so_and_where(run: Path, tmp_path: Path, monkeypatch, capsys):
    from sft_cli.results import report

    full = copy_run(run, tmp_path / "full")

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", no_space)
    monkeypatch.setattr(Path, "write_text", no_space)
    assert report.main([str(full)]) == 1
    message = capsys.readouterr().err
    assert f"sft-report: the plot {full / 'plots'}" in message and "could not be written (No space left on " \
           "device): free some space on that disk, then run again." in message, message


def test_a_sweep_report_ranks_the_runs_links_them_and_says_why_one_failed(run: Path, tmp_path: Path):
    folder = tmp_path / "sweep"
    for i, (lr, best) in enumerate([("0.1", 0.91), ("0.001", 0.52)]):
        copy_run(run, folder / str(i))
        overrides = (folder / str(i) / ".hydra" / "overrides.yaml")
        overrides.write_text(overrides.read_text() + f"- optimizer.lr={lr}\n")
        summary = read_json(folder / str(i) / "summary.json") | {"best_value": best}
        (folder / str(i) / "summary.json").write_text(json.dumps(summary))
    (folder / "2" / ".hydra").mkdir(parents=True)
    (folder / "2" / ".hydra" / "overrides.yaml").write_text("- +experiment=quickstart\n- optimizer.lr=10.0\n")
    (folder / "2" / "summary.json").write_text(json.dumps({"status": "failed", "error": "diverged",
                                                           "monitor": "val/accuracy", "best_value": None}))
    rows = folders.sweep_runs(folder)
    sweep.write(rows, folder, folders.columns(rows))

    html = check_page(sweep_report(folder))
    assert pngs(folder) == {"sweep_optimizer_lr.png", "sweep_val_curves.png"}
    assert html.count("data:image/png;base64,") == 2
    assert "diverged" in html and 'href="0/report.html"' in html and 'href="2/report.html"' in html
    assert (folder / "0" / "report.html").is_file()  # a run without a report got one, so the link works
    ranked = [row["run"] for row in csv.DictReader((folder / "summary.csv").read_text().splitlines())]
    assert html.index('href="0/report.html"') < html.index('href="1/report.html"') and ranked[0] == "0"


def test_a_causal_lm_report_shows_perplexity_and_the_answers_before_and_after(tmp_path: Path):
    run = tmp_path / "chat"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- +experiment=chat_sft\n- dataset.train_file=chats.jsonl\n")
    records = [{"epoch": e, "step": 10 * e, "split": split, "loss": 3.0 / e + d, "perplexity": 20.0 / e,
                "token_accuracy": 0.3 * e, "samples": 64, "samples_per_s": 50.0, "tokens": 900, "tokens_per_s": 1e3,
                "lr": 1e-3 / e, "elapsed": e} for e in (1, 2, 3) for split, d in (("train", 0.1), ("val", 0.0))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prompt = "<|im_start|>user\ncolour of apple<|im_end|>\n<|im_start|>assistant\n"
    samples = [{"epoch": e, "step": 10 * e, "prompt": prompt, "reference": "red", "response": answer}
               for e, answer in ((0, "grass grass <b>"), (3, "red"))]
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (run / "summary.json").write_text(json.dumps({"name": "chat_sft", "status": "completed", "monitor": "val/loss",
                                                  "mode": "min", "best_value": 1.0, "best_epoch": 3, "test": None}))

    html = check_page(run_report(run))
    assert pngs(run) == {"loss.png", "perplexity.png", "token_accuracy.png", "lr.png"}
    assert "before training" in html and "after (epoch 3)" in html
    assert "grass grass &lt;b&gt;" in html and "&lt;|im_start|&gt;user" in html  # escaped, never markup
