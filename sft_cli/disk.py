"""Writing files that other processes read: whole or not at all, and under a lock where two processes may race."""

import contextlib
import os
from pathlib import Path


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
