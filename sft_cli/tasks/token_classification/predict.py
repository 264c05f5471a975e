"""sft-predict for a token classifier: each word's tag and the entity spans, with word and character offsets."""

import json
import logging
import re
from pathlib import Path

import torch
from omegaconf import DictConfig

from sft_cli import disk
from sft_cli.errors import SFTError
from sft_cli.results import console
from sft_cli.tasks.files import read_jsonl
from sft_cli.tasks.token_classification.conll import (
    Encoding,
    Sentence,
    TagCollate,
    TaggedWindows,
)
from sft_cli.tasks.token_classification.tags import spans
from sft_cli.tasks.tokens import TokenCache
from sft_cli.training import checkpoint, restore, runtime
from sft_cli.training.loading import to_device

log = logging.getLogger("sft_cli.predict")
WORD = re.compile(r"\S+")


def predict(cfg: DictConfig, out_dir: Path) -> list[dict]:
    """{text, words, tags, entities} for cfg.text or every sentence of cfg.input (.txt: a sentence a line, split
    at whitespace; .jsonl: dataset.tokens_field), windowed as training windowed them; written to cfg.output
    (.jsonl) or printed. An entity: {text, type, start_word, end_word, start, end} (ends exclusive, character
    offsets into `text`; for JSONL input `text` is the words joined by single spaces)."""
    if (cfg.text is None) == (cfg.input is None):
        raise SFTError("give exactly one of text=\"...\" or input=<.txt or .jsonl file>")
    if cfg.output is not None:
        path = Path(cfg.output)
        if path.suffix != ".jsonl":
            raise SFTError(f"output={cfg.output} must end in .jsonl (or leave it out to print a table)")
        if path.exists() and not cfg.get("overwrite", False):
            raise SFTError(f"output={cfg.output} already exists and is left untouched: choose a new file name, or "
                           "add overwrite=true to replace it")
        if why := disk.cannot_write(path):
            raise SFTError(f"output={cfg.output} cannot be written ({why}): choose a path in a folder you can write "
                           "to")
    if cfg.batch_size < 1:
        raise SFTError(f"batch_size={cfg.batch_size} must be at least 1 (sentence windows per forward pass)")
    texts = [str(cfg.text)] if cfg.text is not None else _inputs(Path(cfg.input), cfg.dataset.tokens_field)
    ckpt = checkpoint.resolve(cfg.checkpoint)
    device = runtime.pick_device(cfg.trainer.device)
    task, model = restore.load_model(cfg, ckpt, device)
    tags, scheme = task.info()["tags"], task.info()["scheme"]
    words = [[(m.group(), m.start(), m.end()) for m in WORD.finditer(text)] for text in texts]
    kept = [i for i, w in enumerate(words) if w]  # a blank text has no word to tag
    how = Encoding(model.tokenizer, {t: i for i, t in enumerate(tags)}, cfg.dataset.max_length, False, TokenCache())
    windows = TaggedWindows(how.windows([Sentence(0, [w for w, *_ in words[i]], [tags[0]] * len(words[i]), [])
                                         for i in kept]))
    collate, predicted = TagCollate(model.tokenizer), {}
    with torch.inference_mode(), runtime.autocast(device, cfg.trainer.precision):
        for start in range(0, len(windows), cfg.batch_size):
            inputs, target = collate([windows[i] for i in range(start, min(start + cfg.batch_size, len(windows)))])
            ids = model(to_device(inputs, device)).argmax(-1).cpu()
            for row, first, s, w in zip(ids, target["first"], target["sentence"].tolist(), target["window"].tolist()):
                predicted[(kept[s], w)] = row[first].tolist()
    rows = []
    for i, text in enumerate(texts):
        word_tags = [tags[t] for w in range(len(words[i])) for t in predicted.get((i, w), [])]
        found = [{"text": text[words[i][a][1]:words[i][b - 1][2]], "type": kind, "start_word": a, "end_word": b,
                  "start": words[i][a][1], "end": words[i][b - 1][2]} for kind, a, b in spans(word_tags, scheme)]
        rows.append({"text": text, "words": [w for w, *_ in words[i]], "tags": word_tags, "entities": found})
    _write(rows, cfg.output)
    return rows


def _inputs(path: Path, tokens_field: str) -> list[str]:
    """The sentences of a .txt (a sentence a line) or .jsonl file (a list of words under tokens_field, joined
    by single spaces)."""
    if not path.is_file():
        raise SFTError(f"input={path} is not a file: give a .txt (a sentence a line) or .jsonl file ({tokens_field})")
    if path.suffix.lower() != ".jsonl":
        return [line for line in path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]
    texts = []
    for line, record in read_jsonl(path):
        words = None if isinstance(record, str) else record.get(tokens_field)
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            why = record if isinstance(record, str) else f"has no list of words under '{tokens_field}'"
            raise SFTError(f"{path}:{line}: the record {why}. Set dataset.tokens_field to the field holding them.")
        texts.append(" ".join(w.strip() for w in words))
    return texts


def _write(rows: list[dict], output: str | None) -> None:
    if output is None:
        console.print_ranking([{"text": r["text"], "entities": "; ".join(f"{e['text']} ({e['type']})"
                                                                        for e in r["entities"]) or "-"}
                               for r in rows], ["text", "entities"], "entities")
        return
    disk.write_output("output", Path(output), "".join(json.dumps(r) + "\n" for r in rows))
    log.info(f"wrote {len(rows)} tagged sentences to {output}")
