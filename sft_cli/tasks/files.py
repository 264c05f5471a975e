"""What every task's data readers share: finding a file, reading JSONL, one rule for bad rows (path:line in
the message, or skipped and counted under dataset.skip_bad_rows), and a stratified validation split."""

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from hydra.utils import to_absolute_path

from sft_cli.errors import SFTError, unreadable

log = logging.getLogger(__name__)

SKIP_HINT = "Fix the row, or skip such rows with dataset.skip_bad_rows=true."


def existing_file(file: str, key: str) -> Path:
    """The path of dataset.<key>, relative to the folder the user runs from; an error if there is no such file."""
    path = Path(to_absolute_path(file))
    if not path.is_file():
        raise SFTError(f"{key}={file}: no such file ({path}). Give the path of an existing file, relative to "
                       "the folder you run from or absolute.")
    return path


def text_lines(path: Path):
    """(line, text, None) per line of a UTF-8 text file (a byte-order mark is dropped), or (line, None, problem)
    for a line that is not UTF-8, so that its message names it as path:line (and skip_bad_rows can skip it)."""
    with path.open("rb") as f:
        for line, raw in enumerate(f, 1):
            try:
                yield line, raw.decode("utf-8-sig" if line == 1 else "utf-8"), None
            except UnicodeDecodeError as e:
                yield line, None, (f"is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line): "
                                   "save the file as UTF-8")


def read_jsonl(path: Path):
    """(line, object) per non-blank line of a JSONL file; a str record says why the line is bad."""
    for line, text, problem in text_lines(path):
        if problem or not text.strip():
            if problem:
                yield line, problem
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            yield line, f"is not valid JSON ({e.msg} at column {e.colno})"
            continue
        yield line, record if isinstance(record, dict) else f"is a JSON {type(record).__name__}, not an object"


def read_rows(file: str, key: str, records: Iterable[tuple[str, object]], parse: Callable, skip: bool,
              what: str = "row") -> tuple[list, int]:
    """(rows, skipped) of dataset.<key>=file. `records` yields (location, record), a str record saying why it
    is bad; parse(location, record) gives (problem, row). A problem stops the run with its path:line, or with
    `skip` is counted and the first one logged."""
    path = Path(to_absolute_path(file))
    rows, bad = [], []
    try:
        for where, record in records:
            problem, row = (record, None) if isinstance(record, str) else parse(where, record)
            if problem and not skip:
                raise SFTError(f"{where}: the {what} {problem}. {SKIP_HINT}")
            if problem:
                bad.append((where, problem))
            else:
                rows.append(row)
    except UnicodeDecodeError as e:
        raise SFTError(f"{key}={file} is not UTF-8 text ({e}). Save it as UTF-8.") from e
    except PermissionError as e:  # raised by the first read of `records`, which opens the file
        raise SFTError(f"{key}={file}: {unreadable(path, e)}") from e
    if bad:
        log.warning(f"{file}: skipped {len(bad)} bad {what}(s) (dataset.skip_bad_rows=true); the first, "
                    f"{bad[0][0]}, {bad[0][1]}")
    return rows, len(bad)


def stratified_split(targets: list[int], size: float | int, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (keep, held_out), holding out `size` (a fraction or a count) of each class. A count
    is taken as the fraction count/n of every class; one that leaves fewer to train on than to validate is
    refused (a count written for a larger dataset, e.g. val_size: 5000 on a subset)."""
    n = len(targets)
    if not isinstance(size, (int, float)) or isinstance(size, bool):
        raise SFTError(f"dataset.val_size={size!r} must be a fraction in (0, 1) or a count of examples")
    count = not (isinstance(size, float) and size < 1)
    fraction = size / n if count else size
    if not 0 < fraction < 1:
        raise SFTError(f"dataset.val_size={size} must be a fraction in (0, 1) or a count below {n}")
    generator = torch.Generator().manual_seed(seed)
    keep, held_out = [], []
    for c in sorted(set(targets)):
        members = [i for i, t in enumerate(targets) if t == c]
        members = [members[j] for j in torch.randperm(len(members), generator=generator)]
        k = min(round(len(members) * fraction), len(members) - 1)  # never take a class out of training
        held_out += members[:k]
        keep += members[k:]
    if not held_out:
        raise SFTError(f"dataset.val_size={size} holds out no example of {n} ({len(set(targets))} classes): "
                       "raise it, e.g. dataset.val_size=0.2")
    if count:
        _check_count(size, len(held_out), len(keep))
    return sorted(keep), sorted(held_out)


def _check_count(size: int | float, held_out: int, keep: int) -> None:
    """A val_size count that validates on more than it trains is an error; more than a quarter, a warning."""
    sizes = (f"dataset.val_size={size} is a count: it holds out {held_out} of the {held_out + keep} examples for "
             f"validation and leaves {keep} to train on")
    if held_out > keep:
        raise SFTError(f"{sizes}. Use a fraction, e.g. dataset.val_size=0.1, which scales with the data.")
    if held_out > (held_out + keep) / 4:
        log.warning(f"{sizes} ({held_out / (held_out + keep):.0%}); a fraction, e.g. dataset.val_size=0.1, "
                    "scales with the data.")
