"""Text files -> tokenized splits: formats, labels, pairs, validation, dynamic padding, bad rows, the cache."""

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
import transformers
from torch.utils.data import DataLoader

from sft_cli.errors import SFTError
from sft_cli.tasks.classification.texts import text_files

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "a", "movie", "film", "book", "it", "was", "is",
         "very", "really", "and", "not", "i", "liked", "hated", "plot", "story", "cast", "ending", ",", "."]
REAL_TRAIN = Path("/work/shared/data/amazon-reviews/books/train.tsv")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """A WordPiece tokenizer of the toy words, saved with save_pretrained as a stand-in for a hub model."""
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the file as `vocab=` and silently ignores `vocab_file=` (leaving 5 tokens)
    tok = transformers.BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    assert len(tok) == len(vocab)
    tok.save_pretrained(folder / "saved")
    return str(folder / "saved")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test tokenizes into its own cache, never into ~/.cache."""
    monkeypatch.setenv("SFT_CLI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def tsv(path: Path, rows: list[tuple], header: str | None = "text\tlabel") -> str:
    lines = ([header] if header else []) + ["\t".join(map(str, row)) for row in rows]
    return write(path, "\n".join(lines) + "\n")


def labels(dataset) -> list[int]:
    return [dataset[i][1] for i in range(len(dataset))]


def test_string_labels_are_sorted_class_names_and_items_hold_unpadded_token_lists(tmp_path, tokenizer):
    rows = [("good movie", "pos"), ("bad film", "neg"), ("the plot was fine", "pos"), ("awful", "neg")] * 3
    splits = text_files(tsv(tmp_path / "train.tsv", rows), tokenizer, val_file=tsv(tmp_path / "val.tsv", rows[:4]))
    assert splits.classes == ["neg", "pos"]
    assert labels(splits.train) == [1, 0, 1, 0] * 3 == splits.train_targets
    features, label = splits.train[2]
    assert set(features) == {"input_ids", "attention_mask", "token_type_ids"} and label == 1
    assert len(features["input_ids"]) == 6 and 1 not in features["input_ids"]  # [CLS] 4 words [SEP], no [UNK]


def test_integer_labels_sort_numerically_whatever_their_spelling(tmp_path, tokenizer):
    rows = [("good", 10), ("bad", 2), ("fine", "01"), ("poor", 1.0), ("awful", "10")] * 2
    train = write(tmp_path / "train.jsonl", "".join(json.dumps({"review": t, "stars": y}) + "\n" for t, y in rows))
    splits = text_files(train, tokenizer, val_file=train, text_field="review", label_field="stars")
    assert splits.classes == ["1", "2", "10"]  # numeric, not string order ("1", "10", "2")
    assert labels(splits.val) == [2, 1, 0, 0, 2] * 2


def test_a_headerless_tsv_is_read_as_text_then_label(tmp_path, tokenizer):
    train = tsv(tmp_path / "train.tsv", [("good movie", 1), ("bad movie", 0)] * 5, header=None)
    splits = text_files(train, tokenizer, val_size=2)
    assert splits.classes == ["0", "1"] and len(splits.train) + len(splits.val) == 10


def test_a_text_pair_is_encoded_as_one_pair(tmp_path, tokenizer):
    rows = ["premise,hypothesis,label"] + ["the movie was good,it was fine,yes", "the book,was awful,no"] * 3
    train = write(tmp_path / "train.csv", "\n".join(rows) + "\n")
    splits = text_files(train, tokenizer, text_field="premise", text_pair_field="hypothesis", val_size=2)
    features, _ = splits.train[0]
    assert features["input_ids"].count(3) == 2  # [CLS] a [SEP] b [SEP]
    assert 1 in features["token_type_ids"] and features["token_type_ids"][0] == 0


def test_the_carved_validation_split_is_stratified(tmp_path, tokenizer):
    rows = [("good", "pos")] * 20 + [("bad", "neg")] * 10
    splits = text_files(tsv(tmp_path / "train.tsv", rows), tokenizer, val_size=0.2, split_seed=3)
    assert sorted(labels(splits.val)) == [0, 0, 1, 1, 1, 1]
    assert sorted(splits.train_targets) == [0] * 8 + [1] * 16 and splits.test is None


def test_val_and_test_files_are_used_when_given(tmp_path, tokenizer):
    train = tsv(tmp_path / "train.tsv", [("good", "pos"), ("bad", "neg")] * 4)
    val = tsv(tmp_path / "val.tsv", [("fine", "pos")] * 3)
    test = write(tmp_path / "test.jsonl", '{"text": "poor", "label": "neg"}\n' * 5)
    splits = text_files(train, tokenizer, val_file=val, test_file=test)
    assert (len(splits.train), labels(splits.val), labels(splits.test)) == (8, [1] * 3, [0] * 5)


def test_collate_pads_each_batch_to_its_longest_text(tmp_path, tokenizer):
    rows = [("good", "pos"), ("a very very bad film", "neg"), ("fine", "pos"), ("bad it was", "neg")]
    splits = text_files(tsv(tmp_path / "train.tsv", rows), tokenizer, val_file=tsv(tmp_path / "v.tsv", rows))
    collate = pickle.loads(pickle.dumps(splits.collate))  # DataLoader workers get a pickled copy
    batches = list(DataLoader(splits.val, batch_size=2, collate_fn=collate))
    (first, first_labels), (second, _) = batches
    assert first["input_ids"].shape == (2, 7) and second["input_ids"].shape == (2, 5)  # [CLS] words [SEP]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]
    assert first["input_ids"][0, 3:].tolist() == [0] * 4  # [PAD]
    assert first_labels.tolist() == [1, 0] and first["token_type_ids"].dtype == first_labels.dtype


# (file name, content, config overrides, line of the bad row, words the message must hold)
MULTILINE = 'text\tlabel\n"good\nmovie"\tpos\nbad\tneg\n'
BAD_ROWS = {
    "empty text after a quoted newline": ("train.tsv", MULTILINE + "\tpos\n", {}, 5, ["no text"]),
    "no label": ("train.tsv", MULTILINE + "fine\n", {}, 5, ["no label"]),
    "blank label": ("train.csv", "text,label\ngood,pos\nbad,neg\nfine, \n", {}, 4, ["no label"]),
    "malformed JSON": ("train.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": 0\n', {}, 2,
                       ["not valid JSON"]),
    "missing JSON field": ("train.jsonl", '{"text": "good", "label": 1}\n{"review": "bad", "label": 0}\n', {}, 2,
                           ["no text", "'review'", "dataset.text_field"]),
    "extra column": ("train.tsv", MULTILINE + "fine\tpos\t3\n", {}, 5, ["3 columns", "double quotes"]),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_bad_row_names_the_file_and_line_and_the_fix(tmp_path, tokenizer, case):
    name, content, overrides, line, words = BAD_ROWS[case]
    with pytest.raises(SFTError) as error:
        text_files(write(tmp_path / name, content), tokenizer, **overrides)
    for word in [f"{name}:{line}:", "dataset.skip_bad_rows=true", *words]:
        assert word in str(error.value)


def test_skip_bad_rows_skips_counts_and_warns_once_per_file(tmp_path, tokenizer, caplog):
    train = write(tmp_path / "train.tsv", MULTILINE + "\tpos\nfine\npoor\tneg\n" + "great\tpos\n" * 3)
    val = tsv(tmp_path / "val.tsv", [("good", "pos"), ("bad", "meh"), ("fine", "")])
    with caplog.at_level(logging.WARNING, logger="sft_cli.tasks.classification.texts"):
        splits = text_files(train, tokenizer, val_file=val, skip_bad_rows=True)
    assert len(splits.train) == 6 and labels(splits.val) == [1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "train.tsv: skipped 2 bad row(s)" in warnings[0] and "train.tsv:5, has no text" in warnings[0]
    assert "val.tsv: skipped 2 bad row(s)" in warnings[1] and "val.tsv:3, has the label" in warnings[1]
    assert splits.skipped == {"dataset.train_file": 2, "dataset.val_file": 2}  # sft-train puts it in summary.json


def test_an_unknown_label_in_a_val_file_names_the_file_line_and_classes(tmp_path, tokenizer):
    train = tsv(tmp_path / "train.tsv", [("good", "pos"), ("bad", "neg")] * 3)
    val = tsv(tmp_path / "val.tsv", [("good", "pos"), ("meh", "neutral")])
    with pytest.raises(SFTError, match=r"val\.tsv:3: .*'neutral'.*training file's classes: neg, pos"):
        text_files(train, tokenizer, val_file=val)


def test_a_csv_named_tsv_gets_the_delimiter_hint(tmp_path, tokenizer):
    train = write(tmp_path / "train.tsv", "text,label\ngood,pos\nbad,neg\n")
    with pytest.raises(SFTError, match=r"train\.tsv:1: .*'text,label'.*wrong delimiter\? \.tsv files are read as "
                                       r"tab-separated.*dataset\.text_field"):
        text_files(train, tokenizer)


def test_a_header_without_the_text_field_lists_its_columns(tmp_path, tokenizer):
    train = tsv(tmp_path / "train.tsv", [("good", 1), ("bad", 0)], header="sentence\tlabel")
    with pytest.raises(SFTError, match=r"'sentence', 'label'.*dataset\.text_field"):
        text_files(train, tokenizer)


@pytest.mark.parametrize("content", ["", "\n\n", "text\tlabel\n"])
def test_a_file_without_examples_errors(tmp_path, tokenizer, content):
    with pytest.raises(SFTError, match=r"dataset\.train_file=.*train\.tsv holds no examples"):
        text_files(write(tmp_path / "train.tsv", content), tokenizer, skip_bad_rows=True)


def test_a_missing_file_names_its_config_key(tmp_path, tokenizer):
    train = tsv(tmp_path / "train.tsv", [("good", "pos"), ("bad", "neg")])
    with pytest.raises(SFTError, match=r"dataset\.test_file=.*nope\.csv: no such file"):
        text_files(train, tokenizer, test_file=str(tmp_path / "nope.csv"))


def test_a_tokenizer_that_cannot_load_names_model_name_or_path(tmp_path):
    train = tsv(tmp_path / "train.tsv", [("good", "pos"), ("bad", "neg")])
    with pytest.raises(SFTError, match=r"model\.name_or_path=.*save_pretrained.*network access"):
        text_files(train, str(tmp_path / "no-such-model"))


def test_tokenization_is_cached_per_file_version_and_max_length(tmp_path, tokenizer, cache, monkeypatch):
    calls = []
    call = transformers.PreTrainedTokenizerBase.__call__
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "__call__",
                        lambda self, *a, **k: calls.append(len(a[0])) or call(self, *a, **k))
    train = tsv(tmp_path / "train.tsv", [("good movie", "pos"), ("bad film", "neg")] * 5)
    first = text_files(train, tokenizer, val_size=2)
    second = text_files(train, tokenizer, val_size=2)
    assert calls == [10] and len(list(cache.glob("*.pt"))) == 1
    assert [second.train[i] for i in range(len(second.train))] == [first.train[i] for i in range(len(first.train))]
    text_files(train, tokenizer, val_size=2, max_length=3)
    os.utime(train, ns=(0, 0))  # an edited file is tokenized again
    text_files(train, tokenizer, val_size=2)
    assert calls == [10, 10, 10]
    for entry in cache.glob("*.pt"):
        entry.write_bytes(b"not a torch file")  # a corrupt entry (a full disk, a killed copy) is rebuilt
    rebuilt = text_files(train, tokenizer, val_size=2)
    assert calls == [10, 10, 10, 10]
    assert [rebuilt.train[i] for i in range(len(rebuilt.train))] == [first.train[i] for i in range(len(first.train))]


@pytest.mark.skipif(not REAL_TRAIN.is_file(), reason="needs /work/shared/data/amazon-reviews")
def test_the_real_amazon_reviews_file_parses(tokenizer):
    splits = text_files(str(REAL_TRAIN), tokenizer, text_field="sentence", val_size=0.1)
    assert len(splits.train) + len(splits.val) == 1700
    assert splits.classes == ["0", "1"] and set(splits.train_targets) == {0, 1}


def test_length_grouped_batches_cover_every_example_once_and_pad_less():
    from sft_cli.training.loading import LengthGroupedBatches

    torch.manual_seed(0)
    lengths = torch.randint(3, 100, (1000,)).tolist()
    sampler = LengthGroupedBatches(lengths, batch_size=16, window=10)
    batches = list(sampler)
    assert len(batches) == len(sampler) and sorted(i for b in batches for i in b) == list(range(1000))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = torch.randperm(1000).tolist()
    random_batches = [shuffled[i:i + 16] for i in range(0, 1000, 16)]
    assert padding(batches) < padding(random_batches) / 4
    assert list(sampler) != batches  # reshuffled every epoch
