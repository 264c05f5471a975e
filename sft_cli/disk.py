"""Writing files that other processes read: whole or not at all, and under a lock where two processes may race."""

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from sft_cli.errors import SFTError


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `path` whole or not at all: into a temporary file beside it, renamed over it when complete. A reader
    (a browser on report.html, another process) never sees half a file, and a failure (a full disk) leaves the
    old file as it was and no temporary file behind."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            temporary.write_bytes(data)
        else:
            temporary.write_text(data, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the disk that failed the write may fail this too
            temporary.unlink(missing_ok=True)
        raise


def cannot_write(path: Path) -> str | None:
    """Why no file can be written at `path` (its folder is a file, or cannot be made or written to), else None.
    Checked before a command does its work, by making and removing a temporary folder where the first missing
    folder of the path would go (a permission check alone says nothing under /proc or on a read-only disk)."""
    existing = Path(path).absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        return f"nothing can be created in {existing}: {e.strerror or e}"
    return None


def write_output(key: str, path: Path, text: str) -> None:
    """A command's output file (`key`=path, e.g. output=answers.jsonl) written whole, its folders made; an OSError
    is an SFTError that names it and what to do (a full disk: free space), and leaves no partial file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
    except OSError as e:
        raise SFTError(f"{key}={write_failed(path, e)}") from e


def write_failed(path: Path, error: Exception) -> str:
    """`<path> could not be written (<why>): <what to do>`, for an OSError (or safetensors' error, which
    carries the OS error in its text): a full disk says to free space on it, anything else to choose a folder
    that can be written."""
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "space" in str(error).lower()
    fix = "free some space on that disk" if full else "make that folder writable or choose another"
    why = getattr(error, "strerror", None) or str(error)[:300]
    return f"{path} could not be written ({why}): {fix}, then run again."


def lock(path: Path, wait: bool = True):
    """`path` opened for appending and exclusively locked until the file is closed; None when `wait` is False
    and another process holds the lock. Where there is no fcntl (Windows) the file is returned unlocked."""
    file = open(path, "a+")  # not "w": that would erase what the holder wrote (its pid)
    try:
        import fcntl
    except ImportError:
        return file
    try:
        fcntl.flock(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        file.close()
        return None
    return file
