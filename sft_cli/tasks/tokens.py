"""What every task that reads text shares: its tokenizer, and a cache of tokenized files so a second run (or a
sweep's next trial) skips tokenization."""

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import torch
from hydra.utils import to_absolute_path

from sft_cli.disk import write_atomic
from sft_cli.errors import SFTError
from sft_cli.models.hf import pad_with_eos

log = logging.getLogger(__name__)
DIGEST = "sha256"  # the key of an entry's checksum (_digest)


def load_tokenizer(name_or_path: str, **options):
    """The tokenizer of a local folder or a hub name, padding with its end-of-sequence token when it has no
    pad token (GPT-2 style and most causal LMs); `options` go to from_pretrained (add_prefix_space=True)."""
    from transformers import AutoTokenizer  # imported here: configs bind this module without loading transformers

    local = Path(to_absolute_path(name_or_path))
    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else name_or_path, **options)
    except (OSError, ValueError) as e:
        raise SFTError(f"model.name_or_path={name_or_path}: its tokenizer could not be loaded ({type(e).__name__}: "
                       f"{str(e)[:300]}). Give a local folder saved with save_pretrained(), or run once with "
                       "network access so the hub files are cached.") from e
    return pad_with_eos(tok)


def fingerprint(tok) -> str:
    """What the tokenizer does, not where it lives: the same tokenizer under checkpoints/best/hf and
    checkpoints/last/hf shares cached tokens, and a folder re-saved with another vocabulary does not."""
    backend = getattr(tok, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tok).__name__}{spec}{tok.model_max_length}".encode()).hexdigest()


class TokenCache:
    """Tokenized files, one .pt file per key: dataset.cache_dir, else $SFT_CLI_CACHE, else
    ~/.cache/sft-cli/tokenized. A key holds all that changes the tokens (the tokenizer's fingerprint, the
    file's path, size and mtime, the settings), so a stale entry is never read."""

    def __init__(self, cache_dir: str | None = None):
        folder = Path(cache_dir or os.environ.get("SFT_CLI_CACHE") or Path.home() / ".cache/sft-cli/tokenized")
        self.folder = Path(to_absolute_path(str(folder.expanduser())))

    def file(self, prefix: str, key: list) -> Path:
        return self.folder / f"{prefix}{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]}.pt"

    def load(self, file: Path) -> dict | None:
        """The saved entry, or None when there is none (then the caller tokenizes again and saves it). An entry
        that cannot be read whole (a file cut short or damaged on disk) is a warning, never an error: the caller
        tokenizes again and the new entry replaces it."""
        if not file.is_file():
            return None
        try:
            saved = torch.load(file, weights_only=True)
            digest = saved.pop(DIGEST, None)
            if digest != _digest(saved):
                raise ValueError("its contents do not match their checksum" if digest else "it has no checksum (an older sft-cli wrote it)")
            return {k: _unflatten(v) if isinstance(v, dict) and v.keys() == {"flat", "lengths"} else v
                    for k, v in saved.items()}
        except Exception as e:  # torch, its zip reader and pickle report a damaged file in many ways
            log.warning(f"the token cache entry {file} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
                        "tokenizing again, and the new entry replaces it")
            return None

    def save(self, file: Path, entry: dict, source: Path) -> None:
        """Write the entry whole or not at all; a cache that cannot be written is a warning, not an error.
        Lists of token-id lists are stored as one flat tensor and their lengths: unpickling millions of
        Python ints takes longer than tokenizing them again."""
        flat = {k: _flatten(v) if _is_sequences(v) else v for k, v in entry.items()}
        buffer = io.BytesIO()
        torch.save({**flat, DIGEST: _digest(flat)}, buffer)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(file, buffer.getvalue())  # a crash mid-write never leaves a truncated cache file
        except OSError as e:
            log.warning(f"could not cache the tokenized {source} in {self.folder} ({e}); set dataset.cache_dir or "
                        "SFT_CLI_CACHE to a writable folder")


def _digest(flat: dict) -> str:
    """A SHA-256 of an entry's contents (its tensors' bytes, its other values as JSON): a byte changed on disk
    inside a tensor is read without an error by torch.load, but not past this."""
    digest = hashlib.sha256()
    for key in sorted(flat):
        value = flat[key]
        digest.update(key.encode())
        if isinstance(value, dict) and value.keys() == {"flat", "lengths"}:
            for tensor in (value["flat"], value["lengths"]):
                digest.update(tensor.contiguous().numpy())
        else:
            digest.update(json.dumps(value, sort_keys=True).encode())
    return digest.hexdigest()


def _is_sequences(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(row, list) for row in value)


def _flatten(rows: list[list[int]]) -> dict:
    return {"flat": torch.tensor([i for row in rows for i in row], dtype=torch.int64),
            "lengths": torch.tensor([len(row) for row in rows], dtype=torch.int64)}


def _unflatten(saved: dict) -> list[list[int]]:
    return [part.tolist() for part in saved["flat"].split(saved["lengths"].tolist())]
