"""Labelled text files (TSV/TXT, CSV, JSONL) as train/val/test splits, tokenized once and padded per batch.
The builder `text_files` is the `_target_` of configs/dataset/text_files.yaml."""

import csv
import logging
import re
from pathlib import Path

import torch
from torch.utils.data import Dataset

from sft_cli.errors import SFTError, unreadable
from sft_cli.extras import install_command
from sft_cli.task import Splits
from sft_cli.tasks.files import existing_file, read_jsonl, read_rows, stratified_split
from sft_cli.tasks.tokens import TokenCache, fingerprint, load_tokenizer

log = logging.getLogger(__name__)

DELIMITERS = {".tsv": "\t", ".txt": "\t", ".csv": ","}
DELIMITER_NAMES = {"\t": "tab", ",": "comma"}
FEATURES = ("input_ids", "attention_mask", "token_type_ids")
INT = re.compile(r"[+-]?[0-9]+")


class TokenizedTexts(Dataset):
    """Examples as (features: {name: token ids}, label index); `PadCollate` pads a batch of them."""

    def __init__(self, features: dict[str, list[list[int]]], labels: list[int]):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[str, list[int]], int]:
        return {name: ids[i] for name, ids in self.features.items()}, self.labels[i]

    def subset(self, indices: list[int]) -> "TokenizedTexts":
        return TokenizedTexts({name: [ids[i] for i in indices] for name, ids in self.features.items()},
                              [self.labels[i] for i in indices])


class PadCollate:
    """A DataLoader collate_fn: pads a batch to its longest example (never to max_length) with the
    tokenizer's pad(), giving (dict of LongTensors, LongTensor labels). A class, so workers can pickle it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: list[tuple[dict, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        features, labels = zip(*batch)
        padded = self.tokenizer.pad(list(features), padding="longest", return_tensors="pt")
        return {name: ids.long() for name, ids in padded.items()}, torch.tensor(labels, dtype=torch.long)


def text_files(train_file: str, tokenizer: str, val_file: str | None = None, test_file: str | None = None,
               text_field: str = "text", text_pair_field: str | None = None, label_field: str = "label",
               max_length: int = 128, val_size: float | int = 0.1, split_seed: int = 0,
               skip_bad_rows: bool = False, cache_dir: str | None = None, group_by_length: bool = False) -> Splits:
    """Your labelled text files: the class list comes from `train_file`; validation is `val_file` or a
    stratified `val_size` carved from train; every text is tokenized once (cached), truncated, unpadded."""
    fields = (text_field, text_pair_field, label_field)
    skipped: dict[str, int] = {}
    train_path, train_rows = _read(train_file, "dataset.train_file", fields, skip_bad_rows, skipped)
    classes = _classes([label for *_, label in train_rows], train_path)
    index = {name: i for i, name in enumerate(classes)}
    # every file is checked before the (slower) tokenizer load and tokenization
    others = {key: _read(file, f"dataset.{key}", fields, skip_bad_rows, skipped, index)
              for key, file in (("val_file", val_file), ("test_file", test_file)) if file}
    tok = load_tokenizer(tokenizer)
    cache = TokenCache(cache_dir)

    def tokenized(path: Path, rows: list[tuple]) -> TokenizedTexts:
        return TokenizedTexts(_encode(tok, path, rows, fields, max_length, cache), [index[r[-1]] for r in rows])

    train = tokenized(train_path, train_rows)
    if "val_file" in others:
        val = tokenized(*others["val_file"])
    else:
        keep, held_out = stratified_split(train.labels, val_size, split_seed)
        train, val = train.subset(keep), train.subset(held_out)
    same = "test_file" in others and "val_file" in others and \
        others["val_file"][0].resolve() == others["test_file"][0].resolve()
    test = val if same else tokenized(*others["test_file"]) if "test_file" in others else None  # same: one pass
    lengths = [len(ids) for ids in train.features["input_ids"]] if group_by_length else None
    return Splits(train, val, test, classes, list(train.labels), PadCollate(tok), lengths, skipped)


def _read(file: str, key: str, fields: tuple, skip: bool, skipped: dict[str, int],
          known: dict[str, int] | None = None) -> tuple[Path, list]:
    """(path, rows) with rows (line, text, pair, label name); bad rows raise, or are skipped and counted in
    skipped[key]."""
    path = existing_file(file, key)
    suffix = path.suffix.lower()
    if suffix not in (*DELIMITERS, ".jsonl"):
        raise SFTError(f"{key}={file}: unknown format '{suffix}'. Use .tsv or .txt (tab-separated), .csv or .jsonl.")
    records = read_jsonl(path) if suffix == ".jsonl" else _table(path, DELIMITERS[suffix], fields)

    def parse(where: str, record: dict):
        problem, row = _row(record, fields, known)
        return problem, row and (int(where.rpartition(":")[2]), *row)

    rows, bad = read_rows(file, key, ((f"{path}:{line}", record) for line, record in records), parse, skip)
    if bad:
        skipped[key] = bad
    if not rows:
        why = f"all {bad} rows are bad (skipped)" if bad else "it is empty or only a header"
        raise SFTError(f"{key}={file} holds no examples: {why}. Give a file with one text and label per row.")
    return path, rows


def _table(path: Path, delimiter: str, fields: tuple):
    """(line where the row starts, {column: value}) per row of a TSV/CSV file; a str record says why it is bad.
    Quoted fields may hold newlines and delimiters, so rows are counted by csv, not by lines."""
    name = DELIMITER_NAMES[delimiter]
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, quotechar='"')
        columns, start = None, 1
        try:
            for row in reader:
                line, start = start, reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                if columns is None:
                    columns, is_header = _columns(path, line, row, fields, name)
                    if is_header:
                        continue
                if len(row) > len(columns):
                    yield line, (f"has {len(row)} columns where {len(columns)} are expected ({', '.join(columns)}): "
                                 f"a field holding a {name} must be in double quotes")
                elif len(row) < len(columns) and reader.line_num > line:
                    yield line, (f"spans lines {line}-{reader.line_num} but has only {len(row)} column(s) "
                                 "(an unclosed double quote)")
                else:
                    yield line, dict(zip(columns, row + [""] * (len(columns) - len(row))))
        except csv.Error as e:
            raise SFTError(f"{path}:{start}: unreadable row ({e}): an unclosed double quote? Quote a field "
                           'as "..." and double the quotes inside it ("").') from e


def _columns(path: Path, line: int, row: list[str], fields: tuple, delimiter: str) -> tuple[list[str], bool]:
    """The column names and whether `row` is a header that names them; without one, columns are positional."""
    wanted = [field for field in fields if field]
    names = [cell.strip() for cell in row]
    if all(field in names for field in wanted):
        return names, True
    if len(row) >= len(wanted) and not set(wanted) & set(names):
        return wanted, False
    found = ", ".join(repr(n if len(n) <= 30 else n[:27] + "...") for n in names)
    raise SFTError(f"{path}:{line}: the first row has the column(s) {found}; expected a header naming "
                   f"{', '.join(map(repr, wanted))} or {len(wanted)} unnamed columns ({', '.join(wanted)}). "
                   f"A wrong delimiter? {path.suffix} files are read as {delimiter}-separated. Else set "
                   "dataset.text_field and dataset.label_field (and dataset.text_pair_field) to the header's names.")


def read_inputs(path: Path, text_field: str, text_pair_field: str | None) -> list[tuple[str, str | None]]:
    """(text, pair) per row of an unlabelled .csv/.tsv/.jsonl file, read as training reads files (for
    sft-predict); a bad row is an error naming the file and line."""
    suffix = path.suffix.lower()
    fields = (text_field, text_pair_field)
    records = read_jsonl(path) if suffix == ".jsonl" else _table(path, DELIMITERS[suffix], fields)
    out = []
    try:
        for line, record in records:
            texts = [None if isinstance(record, str) else _text(record.get(f)) for f in fields if f]
            if isinstance(record, str) or not all(texts):
                why = record if isinstance(record, str) else f"has no {' or '.join(f for f in fields if f)}"
                raise SFTError(f"{path}:{line}: the row {why}. Set dataset.text_field (and text_pair_field) to "
                               "its field names.")
            out.append((texts[0], texts[1] if text_pair_field else None))
    except PermissionError as e:
        raise SFTError(unreadable(path, e)) from e
    return out


def _row(record: dict, fields: tuple, known: dict[str, int] | None) -> tuple[str | None, tuple | None]:
    """(problem, None) for a bad record, else (None, (text, pair, label name))."""
    text_field, pair_field, label_field = fields
    text, pair, label = _text(record.get(text_field)), _text(record.get(pair_field)), _label(record.get(label_field))
    if not text:
        return _missing(record, text_field, "text", "dataset.text_field"), None
    if pair_field and not pair:
        return _missing(record, pair_field, "second text", "dataset.text_pair_field"), None
    if label is None:
        return _missing(record, label_field, "label", "dataset.label_field"), None
    if known is not None and label not in known:
        shown = ", ".join(list(known)[:20]) + (", ..." if len(known) > 20 else "")
        return f"has the label {label!r}, which is not one of the training file's classes: {shown}", None
    return None, (text, pair if pair_field else None, label)


def _missing(record: dict, field: str, what: str, key: str) -> str:
    if field in record:
        return f"has no {what} ('{field}' is empty)"
    return f"has no {what}: no '{field}' among its fields {list(record)} (set {key} to the one holding it)"


def _text(value) -> str:
    return "" if value is None or not str(value).strip() else str(value)


def _label(value) -> str | None:
    """A label as its class name: 1, 1.0, "1" and " 01" all name class "1"; None or blank is no label."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    name = "" if value is None else str(value).strip()
    return None if not name else str(int(name)) if INT.fullmatch(name) else name


def _classes(labels: list[str], path: Path) -> list[str]:
    """The sorted class names: numerically when every label is an integer, else as strings."""
    names = set(labels)
    if len(names) < 2:
        raise SFTError(f"{path} has a single label {next(iter(names))!r}: a classifier needs two or more. "
                       "Is dataset.label_field the column holding the labels?")
    return sorted(names, key=int) if all(INT.fullmatch(n) for n in names) else sorted(names)


def _encode(tok, path: Path, rows: list[tuple], fields: tuple, max_length: int, cache: TokenCache) -> dict:
    """{feature: token ids per row}, truncated to max_length and unpadded; cached per tokenizer, file version,
    max_length, fields and the rows kept."""
    stat = path.stat()
    file = cache.file("", [fingerprint(tok), str(path), stat.st_size, stat.st_mtime_ns, max_length, fields,
                           [row[0] for row in rows]])
    if (features := cache.load(file)) is not None:
        log.info(f"{path}: {len(rows)} examples, tokenized earlier ({file})")
        return features
    texts, pairs = [row[1] for row in rows], [row[2] for row in rows] if fields[1] else None
    encoded = tok(texts, pairs, truncation=True, max_length=max_length)
    features = {name: encoded[name] for name in FEATURES if name in encoded}
    log.info(f"{path}: {len(rows)} examples tokenized")
    cache.save(file, features, path)
    return features


def hub_dataset(path: str, tokenizer: str, name: str | None = None, train_split: str = "train",
                val_split: str | None = "validation", test_split: str | None = None, text_field: str = "sentence",
                text_pair_field: str | None = None, label_field: str = "label", max_length: int = 128,
                val_size: float | int = 0.1, split_seed: int = 0) -> Splits:
    """A labelled dataset from the Hugging Face hub via the optional `datasets` library
    (the hub extra); tokenized once here (`datasets` caches the download itself)."""
    try:
        import datasets
    except ImportError:
        raise SFTError(f"dataset {path}/{name} comes from the Hugging Face hub and needs the optional `datasets` "
                       f"library: {install_command('hub')}. Or use your own files: dataset=text_files "
                       "dataset.train_file=...") from None
    try:
        hub = datasets.load_dataset(path, name)
    except Exception as e:  # offline, unknown name, ...: `datasets` raises many types
        raise SFTError(f"could not load the hub dataset {path}/{name} ({type(e).__name__}: {str(e)[:300]}). It needs "
                       "network access once (then it is cached), or use local files with dataset=text_files.") from e
    feature = hub[train_split].features[label_field]
    if hasattr(feature, "names"):
        classes = list(feature.names)
    else:
        classes = _classes([str(v) for v in hub[train_split][label_field]], Path(f"{path}/{name}"))
    tok = load_tokenizer(tokenizer)

    def tokenized(split: str) -> TokenizedTexts:
        part = hub[split]
        encoded = tok(part[text_field], part[text_pair_field] if text_pair_field else None, truncation=True,
                      max_length=max_length)
        labels = [v if hasattr(feature, "names") else classes.index(str(v)) for v in part[label_field]]
        return TokenizedTexts({k: encoded[k] for k in FEATURES if k in encoded}, labels)

    train = tokenized(train_split)
    if val_split:
        val = tokenized(val_split)
    else:
        keep, held_out = stratified_split(train.labels, val_size, split_seed)
        train, val = train.subset(keep), train.subset(held_out)
    return Splits(train, val, tokenized(test_split) if test_split else None, classes, list(train.labels),
                  PadCollate(tok))
