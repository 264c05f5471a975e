"""Tagged sentences (CoNLL or JSONL files) as train/val/test splits of sub-word token windows. The builder
`conll_files` is the `_target_` of configs/dataset/conll_files.yaml.

Alignment: a word's first sub-token carries its tag, the others -100 (ignored by the loss), unless
label_all_tokens. Truncation never loses a word: a sentence longer than max_length tokens is split into
windows of whole words, each a training example of its own; metrics put a sentence's windows back together
before scoring, so entities and words are counted once. (A single word longer than a window keeps its first
max_length sub-tokens: its tag is still learned and scored.)
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from sft_cli.errors import SFTError
from sft_cli.task import Splits
from sft_cli.tasks.files import (
    SKIP_HINT,
    existing_file,
    read_jsonl,
    read_rows,
    stratified_split,
    text_lines,
)
from sft_cli.tasks.token_classification.tags import SHOWN, bad_tag, evidence
from sft_cli.tasks.tokens import TokenCache, fingerprint, load_tokenizer

log = logging.getLogger(__name__)

FEATURES = ("input_ids", "attention_mask", "token_type_ids")
FORMATS = ("auto", "conll", "jsonl")


@dataclass
class Sentence:
    line: int               # where it starts in its file
    words: list[str]
    tags: list[str]
    at: list[str]           # each word's path:line (JSONL: the record's line and the word's position)


@dataclass
class TaggedSplits(Splits):
    """Splits of token windows, plus the tag scheme of the files and the longest window in tokens."""

    scheme: str = "IOB2"
    longest: int = 0


class TaggedWindows(Dataset):
    """Examples as (features: {name: token ids}, labels, first, sentence, window): `first` marks each word's
    first sub-token, where its tag is scored; `sentence` and `window` say where the example came from."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["sentence"])

    def __getitem__(self, i: int):
        c = self.columns
        return ({name: c[name][i] for name in FEATURES if name in c}, c["labels"][i], c["first"][i],
                c["sentence"][i], c["window"][i])


class TagCollate:
    """A DataLoader collate_fn: pads a batch to its longest example with the tokenizer's pad() and the labels
    (-100) and first-token marks on the same side, giving (inputs, {labels, first, sentence, window})."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: list[tuple]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        features, labels, first, sentence, window = zip(*batch)
        padded = self.tokenizer.pad(list(features), padding="longest", return_tensors="pt")
        inputs = {name: ids.long() for name, ids in padded.items()}
        width, left = inputs["input_ids"].shape[1], self.tokenizer.padding_side == "left"

        def pad(rows, value):
            return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r))
                                 for r in rows], dtype=torch.long)

        return inputs, {"labels": pad(labels, -100), "first": pad(first, 0).bool(),
                        "sentence": torch.tensor(sentence), "window": torch.tensor(window)}


def tagging_tokenizer(name_or_path: str):
    """The model's fast tokenizer, made to add a space before every word when it is byte-level BPE (RoBERTa,
    GPT-2 style), as such a model saw the words inside a sentence; words come pre-split, so without the space
    each word would be tokenized as if it started a text."""
    tok = load_tokenizer(name_or_path)
    if not tok.is_fast:
        raise SFTError(f"model.name_or_path={name_or_path}: its tokenizer ({type(tok).__name__}) is not a fast "
                       "(Rust) tokenizer, which word alignment needs (word_ids()). Use a model with a "
                       "tokenizer.json, or save it with a fast tokenizer.")
    pre = repr(tok.backend_tokenizer.pre_tokenizer)
    if "ByteLevel" in pre and "add_prefix_space=False" in pre:
        tok = load_tokenizer(name_or_path, add_prefix_space=True)
    return tok


def conll_files(train_file: str, tokenizer: str, val_file: str | None = None, test_file: str | None = None,
                format: str = "auto", tokens_field: str = "tokens", tags_field: str = "tags", max_length: int = 256,
                label_all_tokens: bool = False, val_size: float = 0.1, split_seed: int = 0,
                skip_bad_rows: bool = False, cache_dir: str | None = None, group_by_length: bool = False
                ) -> TaggedSplits:
    """Your tagged sentences: CoNLL (a token a line, its tag in the last column, a blank line between
    sentences, -DOCSTART- lines ignored) or JSONL ({"tokens": [...], "tags": [...]}). The tag list (sorted) and
    the scheme (IOB1, IOB2/BIO or BIOES) come from `train_file`; validation is `val_file` or `val_size`
    sentences carved from train. Sentences longer than max_length tokens are split into windows of whole
    words (no word is lost); tokenization is cached."""
    if format not in FORMATS:
        raise SFTError(f"dataset.format={format!r} is not one of: {', '.join(FORMATS)}")
    fields = (tokens_field, tags_field)
    skipped: dict[str, int] = {}
    train_path, train_rows = read_sentences(train_file, "dataset.train_file", format, fields, skip_bad_rows,
                                            skipped=skipped)
    tags = sorted({t for s in train_rows for t in s.tags})
    scheme, train_rows = _scheme(train_path, train_rows, None, skip_bad_rows, skipped, "dataset.train_file")
    others = {}
    for key, file in (("val_file", val_file), ("test_file", test_file)):
        if file:  # every file is checked before the (slower) tokenizer load and tokenization
            path, rows = read_sentences(file, f"dataset.{key}", format, fields, skip_bad_rows, set(tags), skipped)
            others[key] = (path, _scheme(path, rows, scheme, skip_bad_rows, skipped, f"dataset.{key}")[1])
    tok = tagging_tokenizer(tokenizer)
    if max_length > tok.model_max_length:
        log.info(f"dataset.max_length={max_length} is above the tokenizer's {tok.model_max_length}: windows of "
                 f"{tok.model_max_length} tokens")
        max_length = tok.model_max_length
    how = Encoding(tok, {t: i for i, t in enumerate(tags)}, max_length, label_all_tokens, TokenCache(cache_dir))
    if "val_file" in others:
        train, val = how.encode(train_path, train_rows), how.encode(*others["val_file"])
    else:
        keep, held_out = stratified_split([0] * len(train_rows), val_size, split_seed)  # one class: a random slice
        train = how.encode(train_path, [train_rows[i] for i in keep])
        val = how.encode(train_path, [train_rows[i] for i in held_out])
    same = "test_file" in others and "val_file" in others and \
        others["val_file"][0].resolve() == others["test_file"][0].resolve()
    test = val if same else how.encode(*others["test_file"]) if "test_file" in others else None
    longest = max(len(ids) for split in (train, val, test) if split is not None
                  for ids in split.columns["input_ids"])
    lengths = [len(ids) for ids in train.columns["input_ids"]] if group_by_length else None
    return TaggedSplits(train, val, test, tags, None, TagCollate(tok), lengths, skipped, scheme=scheme,
                        longest=longest)


# ---- reading and checking sentences ----------------------------------------------------------------------


def read_sentences(file: str, key: str, format: str, fields: tuple[str, str], skip: bool,
                   known: set[str] | None = None, skipped: dict[str, int] | None = None) -> tuple[Path, list[Sentence]]:
    """(path, sentences) of dataset.<key>; a bad line or record stops the run with its path:line, or with
    `skip` its sentence is skipped and counted (in skipped[key]). `known`: the training file's tags (val/test)."""
    path = existing_file(file, key)
    fmt = format if format != "auto" else "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "conll"
    records = _conll(path) if fmt == "conll" else _jsonl(path, fields)
    rows, bad = read_rows(file, key, _checked(records, known), lambda where, s: (None, s), skip, what="sentence")
    if bad and skipped is not None:
        skipped[key] = bad
    if not rows:
        why = f"all {bad} sentences are bad (skipped)" if bad else "it is empty"
        layout = (f'one JSON object a line, {{"{fields[0]}": [...], "{fields[1]}": [...]}}' if fmt == "jsonl"
                  else "a token and its tag a line, a blank line between sentences")
        raise SFTError(f"{key}={file} holds no sentences: {why}. Give a {fmt.upper()} file: {layout}.")
    return path, rows


def _conll(path: Path):
    """(where, Sentence or problem) per sentence of a CoNLL file: a token a line with its tag in the last column
    (tab- or space-separated; other columns are ignored), sentences separated by lines that are empty or hold
    only whitespace (WNUT-17's train file separates them with a lone tab), -DOCSTART- lines ignored. A bad line
    makes its sentence a problem, named by that line."""
    sentence, problem = Sentence(0, [], [], []), None
    for line, text, not_utf8 in text_lines(path):
        columns = None if text is None else text.split("\t") if "\t" in text else text.split()
        columns = None if columns is None else [c.strip() for c in columns if c.strip()]
        if columns == []:  # a blank line ends the sentence
            if sentence.words or problem:
                yield (f"{path}:{problem[0]}", problem[1]) if problem else (f"{path}:{sentence.line}", sentence)
            sentence, problem = Sentence(0, [], [], []), None
        elif columns and columns[0] == "-DOCSTART-" or problem:
            continue  # a document marker, or the rest of a bad sentence
        elif columns is None:
            problem = (line, not_utf8)
        elif len(columns) < 2:
            problem = (line, (f"has a line with one column ({columns[0][:40]!r}) where a token and its tag are "
                              "expected, separated by a tab or spaces"))
        else:
            sentence.line = sentence.line or line
            sentence.words.append(columns[0])
            sentence.tags.append(columns[-1])
            sentence.at.append(f"{path}:{line}")
    if sentence.words or problem:
        yield (f"{path}:{problem[0]}", problem[1]) if problem else (f"{path}:{sentence.line}", sentence)


def _jsonl(path: Path, fields: tuple[str, str]):
    """(where, Sentence or problem) per record of a JSONL file."""
    tokens_field, tags_field = fields
    for line, record in read_jsonl(path):
        where = f"{path}:{line}"
        if isinstance(record, str):
            yield where, record
            continue
        words, tags = record.get(tokens_field), record.get(tags_field)
        for field, value, key in ((tokens_field, words, "tokens_field"), (tags_field, tags, "tags_field")):
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                found = f"its fields are {list(record)}" if field not in record else f"it holds {str(value)[:60]}"
                yield where, (f"has no list of non-empty strings under '{field}' ({found}; set dataset.{key} "
                              "to the field holding it)")
                break
        else:
            if len(words) != len(tags):
                yield where, f"has {len(words)} tokens but {len(tags)} tags"
            elif not words:
                yield where, "has no tokens"
            else:
                yield where, Sentence(line, words, [t.strip() for t in tags],
                                      [f"{where} (word {i + 1})" for i in range(len(words))])


def _checked(records, known: set[str] | None):
    """The records with their tags checked: each a tag of a known scheme, and one the training file has."""
    for where, sentence in records:
        if isinstance(sentence, str):
            yield where, sentence
            continue
        for tag, at in zip(sentence.tags, sentence.at):
            problem = bad_tag(tag)
            if problem is None and known is not None and tag not in known:
                shown = ", ".join(sorted(known)[:20]) + (", ..." if len(known) > 20 else "")
                problem = f"has the tag {tag!r}, which the training file never has (its tags: {shown})"
            if problem:
                yield at, problem
                break
        else:
            yield where, sentence


def _scheme(path: Path, rows: list[Sentence], expected: str | None, skip: bool, skipped: dict[str, int],
            key: str) -> tuple[str, list[Sentence]]:
    """(scheme, sentences) of one file: the tag scheme its sentences write (IOB2 when they say nothing, e.g.
    only O tags). Sentences that write two schemes, or another than `expected` (the training file's), stop the
    run with their path:line, or with `skip` are skipped and counted (the scheme most sentences write wins)."""
    found = [evidence(s.tags) for s in rows]
    counts = {name: sum(name in f for f in found) for name in ("IOB1", "IOB2", "BIOES")}
    scheme = expected or max(counts, key=lambda n: (counts[n], n == "IOB2"))
    first = {name: next((s.at[f[name]], s.tags[f[name]]) for s, f in zip(rows, found) if name in f)
             for name, n in counts.items() if n}
    others = [name for name in first if name != scheme]
    if not others:
        return scheme, rows
    if not skip:
        other = others[0]
        said = f"the training file's tags are {SHOWN[expected]}" if expected else \
            f"{first[scheme][0]}: {first[scheme][1]!r} is {SHOWN[scheme]}" if scheme in first else ""
        raise SFTError(f"{first[other][0]}: the tag {first[other][1]!r} is {SHOWN[other]}, but {said}. One tag "
                       f"scheme per dataset: convert the file, or skip the sentences in another scheme. {SKIP_HINT}")
    kept = [s for s, f in zip(rows, found) if set(f) <= {scheme}]
    skipped[key] = skipped.get(key, 0) + len(rows) - len(kept)
    log.warning(f"{path}: skipped {len(rows) - len(kept)} sentence(s) not in the tag scheme {scheme} "
                f"(dataset.skip_bad_rows=true); the first, {first[others[0]][0]}")
    return scheme, kept


# ---- tokenizing ----------------------------------------------------------------------------------------------


class Encoding:
    """How sentences become token windows: the tokenizer, tag ids, window size, alignment and cache."""

    def __init__(self, tok, index: dict[str, int], max_length: int, label_all_tokens: bool, cache: TokenCache):
        self.tok, self.index, self.max_length, self.label_all, self.cache = tok, index, max_length, label_all_tokens, cache
        self.budget = max_length - tok.num_special_tokens_to_add()
        if self.budget < 1:
            raise SFTError(f"dataset.max_length={max_length} leaves no room for words beside the tokenizer's "
                           f"{tok.num_special_tokens_to_add()} special tokens: raise it, e.g. dataset.max_length=128")
        # label_all_tokens: a word's later sub-tokens continue its entity (B-X -> I-X, as Hugging Face's run_ner)
        self.inside = {i: index.get("I-" + t[2:], i) if t.startswith("B-") else i for t, i in index.items()}

    def encode(self, path: Path, rows: list[Sentence]) -> TaggedWindows:
        stat = path.stat()
        file = self.cache.file("tags", [fingerprint(self.tok), str(path), stat.st_size, stat.st_mtime_ns,
                                        self.max_length, self.label_all, list(self.index), [r.line for r in rows]])
        if (columns := self.cache.load(file)) is not None:
            log.info(f"{path}: {len(rows)} sentences, tokenized earlier ({file})")
            return TaggedWindows(columns)
        columns = self.windows(rows)
        split = len(columns["sentence"]) - len(rows)
        log.info(f"{path}: {len(rows)} sentences tokenized" +
                 (f"; {split} longer than {self.max_length} tokens add windows of whole words" if split else ""))
        self.cache.save(file, columns, path)
        return TaggedWindows(columns)

    def windows(self, rows: list[Sentence]) -> dict[str, list]:
        """Every sentence as one or more windows of whole words that fit max_length with the special tokens."""
        unk = self.tok.unk_token or "?"
        words = [list(r.words) for r in rows]
        pieces = self.tok(words, is_split_into_words=True, add_special_tokens=False)
        pieces = [pieces.word_ids(i) for i in range(len(rows))]
        for s, ids in enumerate(pieces):  # a word the tokenizer drops (a lone control character) would lose its tag
            empty = set(range(len(words[s]))) - set(ids)
            if empty:
                words[s] = [unk if i in empty else w for i, w in enumerate(words[s])]
                pieces[s] = self.tok(words[s], is_split_into_words=True, add_special_tokens=False).word_ids()
        spans = []  # (sentence, window, first word, end word)
        for s, ids in enumerate(pieces):
            counts = [0] * len(words[s])
            for w in ids:
                counts[w] += 1
            start, used, window = 0, 0, 0
            for w, n in enumerate(counts):
                if used + n > self.budget and w > start:
                    spans.append((s, window, start, w))
                    start, used, window = w, 0, window + 1
                used += n
            spans.append((s, window, start, len(counts)))
        encoded = self.tok([words[s][a:b] for s, _, a, b in spans], is_split_into_words=True, truncation=True,
                           max_length=self.max_length)
        columns = {name: encoded[name] for name in FEATURES if name in encoded}
        columns |= {"labels": [], "first": [], "sentence": [s for s, *_ in spans], "window": [k for _, k, *_ in spans]}
        for i, (s, _, a, _) in enumerate(spans):
            labels, first, previous = [], [], None
            for w in encoded.word_ids(i):
                is_first = w is not None and w != previous
                tag = self.index[rows[s].tags[a + w]] if w is not None else -100
                labels.append(tag if is_first else self.inside[tag] if w is not None and self.label_all else -100)
                first.append(int(is_first))
                previous = w
            columns["labels"].append(labels)
            columns["first"].append(first)
        return columns
