"""Instruction / chat fine-tuning as a user runs it: a tiny Llama (saved with save_pretrained, with a ChatML
template) learns a synthetic mapping from a messages JSONL; then sft-eval on a held-out file, sft-predict
(one prompt, and a file of prompts), sft-export for plain transformers, and mid-epoch resume."""

import html
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_kill_and_resume_is_bitwise, ok, read_json, run_cli
from fixtures import CODES, chat_rows, write_tiny_bert, write_tiny_llama
from inprocess import train_offline
from sft_cli.tasks.causal_lm import answers
from test_cli_errors import refused


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_args(cwd: Path) -> list[str]:
    return ["+experiment=chat_sft", "dataset.train_file=chats.jsonl", f"model.name_or_path={cwd / 'tiny-llama'}",
            "optimizer.lr=3e-3", "trainer.batch_size=16", "trainer.progress_bar=false", "report=false"]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("chat")
    write_tiny_llama(cwd / "tiny-llama")
    write_jsonl(cwd / "chats.jsonl", chat_rows(300, seed=1))
    write_jsonl(cwd / "held_out.jsonl", chat_rows(40, seed=7))
    train_offline([*chat_args(cwd), "trainer.max_epochs=4"], "run", cwd=cwd)
    return cwd


def test_a_tiny_llama_learns_the_responses_and_the_run_shows_its_answers(chat_run: Path):
    run = chat_run / "run"
    summary = read_json(run / "summary.json")
    assert summary["monitor"] == "val/loss" and summary["mode"] == "min"  # the mode follows the metric
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "val"]
    assert (val[0]["epoch"], val[0]["step"]) == (0, 0)  # the untrained model, scored first: the baseline
    assert summary["val_before_training"]["loss"] == pytest.approx(val[0]["loss"])
    assert val[-1]["loss"] < val[1]["loss"] < val[0]["loss"] and val[-1]["token_accuracy"] > 0.9
    assert abs(val[-1]["perplexity"] - torch.tensor(val[-1]["loss"]).exp().item()) < 1e-4
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    before = [s for s in samples if s["epoch"] == 0]
    after = [s for s in samples if s["epoch"] == 4]
    assert len(before) == len(after) == 4  # before training, and at the last validation
    assert sum(s["response"] == s["reference"] for s in before) == 0  # random weights know nothing
    assert sum(s["response"] == s["reference"] for s in after) >= 3
    meta = read_json(run / "checkpoints" / "best" / "meta.json")
    assert meta["prompt_format"]["format"] == "messages" and "im_start" in meta["prompt_format"]["chat_template"]


def test_the_report_shows_the_resolved_config_and_the_loss_before_training(chat_run: Path, tmp_path: Path):
    from sft_cli.results.report import run_report

    run = shutil.copytree(chat_run / "run", tmp_path / "run", symlinks=True)
    page = run_report(run).read_text()
    configuration = page[page.index("Configuration"):page.index("Summary")]
    assert "${" not in configuration and str(chat_run / "chats.jsonl") in configuration  # files as resolved
    assert "32 (32)" not in configuration and "auto (cpu)" in configuration  # device auto: what it ran on
    assert "<th>adapter</th><td>none" in configuration and "<th>loggers</th><td>csv" in configuration
    assert "before training)" in page and "val loss before training" in page
    answers = page[page.index("Sampled answers"):]
    question = json.loads((run / "samples.jsonl").read_text().splitlines()[0])["question"]
    assert f"<td><pre>{html.escape(question)}</pre><details><summary>full prompt</summary><pre>&lt;|im_start|&gt;" in answers


def test_eval_on_a_held_out_file_reports_loss_perplexity_and_token_accuracy(chat_run: Path):
    ok(run_cli("sft-eval", "checkpoint=run/checkpoints/best", "dataset.test_file=held_out.jsonl",
               "hydra.run.dir=ev", cwd=chat_run))
    report = read_json(chat_run / "ev" / "eval.json")
    assert report["samples"] == 40 and report["token_accuracy"] > 0.9 and report["loss"] < 1.5
    # and the generated answers, judged: the first task.generate_samples (16) test prompts, each in answers.jsonl
    answers = [json.loads(line) for line in (chat_run / "ev" / "answers.jsonl").read_text().splitlines()]
    held_out = chat_rows(40, seed=7)[:16]
    assert [a["prompt"] for a in answers] == [r["messages"][-2]["content"] for r in held_out]
    assert [a["reference"] for a in answers] == [r["messages"][-1]["content"] for r in held_out]
    assert set(answers[0]) == {"prompt", "reference", "answer", "exact_match", "contains", "json_valid", "ends_turn"}
    assert report["exact_match"] == sum(a["exact_match"] for a in answers) / 16 >= 0.5
    assert report["ends_turn"] == 1.0 and report["json_valid"] == 0.0 and "answers" not in report
    assert all(a["exact_match"] == (a["answer"] == a["reference"]) for a in answers)  # lower-case colours
    page = (chat_run / "ev" / "report.html").read_text()  # the wrong ones, as a table in the report
    wrong = [a for a in answers if not a["exact_match"]]
    assert f"Wrong answers: {len(wrong)} of 16 not an exact match" in page
    assert all(f"<pre>{html.escape(a['prompt'])}</pre>" in page for a in wrong)


def shorter_than(prompt: str, answer: str, reference: str, words: int = 2) -> bool:
    """A user's own answer metric (task.answer_metrics.short): the answer has fewer than `words` words."""
    return len(answer.split()) < words


def test_the_generated_answers_are_val_metrics_rising_from_epoch_0(chat_run: Path):
    rows = [json.loads(line) for line in (chat_run / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["epoch"] for r in val] == [0, 1, 2, 3, 4]
    assert val[0]["exact_match"] == val[0]["ends_turn"] == 0.0  # random weights: no answer, never an end of turn
    assert val[-1]["exact_match"] >= 0.5 and val[-1]["contains"] >= val[-1]["exact_match"] and val[-1]["ends_turn"] == 1
    assert all("exact_match" not in r for r in rows if r["split"] == "train")  # judged on validation only
    header = (chat_run / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_exact_match", "val_contains", "val_json_valid", "val_ends_turn"} <= set(header)
    assert "train_loss" in header and not any(c.startswith("train_") and c[6:] in answers.BUILT_IN for c in header)


def test_monitor_val_exact_match_picks_the_best_checkpoint_judged_every_second_validation(tmp_path: Path, caplog,
                                                                                          monkeypatch):
    write_tiny_llama(tmp_path / "tiny-llama")
    write_jsonl(tmp_path / "chats.jsonl", chat_rows(300, seed=1))
    args = [*chat_args(tmp_path), "trainer.monitor=val/exact_match", "task.generate_every_n_validations=2",
            "task.generate_samples=10", "task.samples=2", "+task.answer_metrics.short._target_=test_cli_chat.shorter_than"]
    with caplog.at_level("INFO"):
        best = train_offline([*args, "trainer.max_epochs=4"], "run", cwd=tmp_path)
    assert caplog.text.count("val: 10 answers generated in") == 3  # the cost, in the log at each judged validation
    # samples.jsonl reuses a judged validation's answers: its 2 prompts are generated apart only at epochs 1, 3
    assert caplog.text.count("answering 2 validation prompts") == 2
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["epoch"] for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    val = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "val"]
    judged = {r["epoch"]: r["exact_match"] for r in val if "exact_match" in r}
    assert list(judged) == [0, 2, 4] and all("loss" in r for r in val)  # epochs 1 and 3: the loss alone
    assert all(r["short"] == 1.0 for r in val if r["epoch"] == 4)  # a colour: one word
    summary = read_json(tmp_path / "run" / "summary.json")
    assert best == summary["best_value"] == max(judged.values()) > 0
    assert summary["best_epoch"] == max(judged, key=judged.get)
    meta = read_json(tmp_path / "run" / "checkpoints" / "best" / "meta.json")
    assert meta["epoch"] == summary["best_epoch"] and meta["best"] == best and meta["monitor"] == "val/exact_match"
    # resume keeps the best value: a finished run resumed has nothing left to train and reports the same best
    monkeypatch.setenv("SFT_CLI_ALLOW_TARGETS", "test_cli_chat.shorter_than")  # the checkpoint names the metric
    again = train_offline([*args, "trainer.max_epochs=4", "resume=run/checkpoints/last"], "again", cwd=tmp_path)
    assert again == best and read_json(tmp_path / "again" / "summary.json")["best_epoch"] == summary["best_epoch"]


def test_predict_answers_one_prompt_and_a_file_the_same_way(chat_run: Path):
    things = list(CODES)
    (chat_run / "prompts.txt").write_text("".join(f"colour of {t}\n" for t in things))
    ok(run_cli("sft-predict", "checkpoint=run", "input=prompts.txt", "output=answers.jsonl", "batch_size=4",
               cwd=chat_run))
    rows = [json.loads(line) for line in (chat_run / "answers.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"colour of {t}" for t in things]
    assert sum(r["response"] == CODES[t] for r, t in zip(rows, things)) >= 7
    one = ok(run_cli("sft-predict", "checkpoint=run", f"prompt=colour of {things[1]}", "output=one.jsonl",
                     cwd=chat_run))
    assert json.loads((chat_run / "one.jsonl").read_text())["response"] == rows[1]["response"], one.output
    refused = run_cli("sft-predict", "checkpoint=run", "input=prompts.txt", "output=answers.jsonl", cwd=chat_run)
    assert refused.returncode == 1 and "overwrite=true" in refused.output


@pytest.mark.parametrize("option, expected", [
    ("max_new_tokens=abc", ["'abc'", "could not be converted to Integer", "full_key: max_new_tokens"]),
    ("temperature=hot", ["'hot'", "could not be converted to Float", "full_key: temperature"]),
    ("top_p=most", ["'most'", "could not be converted to Float", "full_key: top_p"]),
    ("output=/proc/no/such/answers.jsonl",
     ["output=/proc/no/such/answers.jsonl cannot be written", "choose a path in a folder you can write to"]),
])
def test_predict_option_mistakes_are_one_message_naming_the_key(chat_run: Path, option, expected):
    refused(run_cli("sft-predict", "checkpoint=run", "prompt=colour of sky", option, cwd=chat_run), *expected)


def test_export_loads_and_generates_in_plain_transformers(chat_run: Path):
    ok(run_cli("sft-export", "checkpoint=run/checkpoints/best", "output=exported", cwd=chat_run))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(chat_run / "exported")
    tokenizer = AutoTokenizer.from_pretrained(chat_run / "exported")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "colour of sky"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    answer = tokenizer.decode(out[0][prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() in CODES.values()  # a colour, and the end of turn stopped it
    trained = load_file(chat_run / "run" / "checkpoints" / "best" / "model.safetensors")
    exported = model.state_dict()
    assert all(torch.equal(exported[k.removeprefix("model.")], v) for k, v in trained.items())


def test_a_kill_within_an_epoch_resumes_chat_training_bitwise(tmp_path: Path):
    write_tiny_llama(tmp_path / "tiny-llama")
    write_jsonl(tmp_path / "chats.jsonl", chat_rows(200, seed=2))
    args = [*chat_args(tmp_path), "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=2"]
    assert_kill_and_resume_is_bitwise(args, tmp_path)


def test_chat_mistakes_name_the_key(tmp_path: Path):
    write_tiny_llama(tmp_path / "tiny-llama")
    result = run_cli("sft-train", "+experiment=chat_sft", f"model.name_or_path={tmp_path / 'tiny-llama'}",
                     cwd=tmp_path)
    assert result.returncode == 1 and "dataset.train_file" in result.output and "Traceback" not in result.output
    result = run_cli("sft-train", "+experiment=quickstart", "task=causal_lm", "trainer.monitor=val/loss",
                     cwd=tmp_path)
    assert result.returncode == 1 and "dataset=chat_files" in result.output and "Traceback" not in result.output
    write_tiny_bert(tmp_path / "tiny-bert")  # a BERT folder is not blamed for lacking an EOS token
    write_jsonl(tmp_path / "chats.jsonl", chat_rows(20))
    refused(run_cli("sft-train", "+experiment=chat_sft", "dataset.train_file=chats.jsonl",
                    f"model.name_or_path={tmp_path / 'tiny-bert'}", cwd=tmp_path),
            f"model.name_or_path={tmp_path / 'tiny-bert'} holds a bert model (BertModel), which is not a causal "
            "language model", "+experiment=text_classification")
