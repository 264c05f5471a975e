"""The one exception users see: Hydra prints its message alone and exits 1 (no traceback)."""

import re
from collections.abc import Iterable
from os import PathLike

from hydra.errors import CompactHydraException

# torch re-raises an exception from a DataLoader worker as exc_type("Caught SFTError in DataLoader worker
# process 0.\nOriginal Traceback (most recent call last):\n ... sft_cli.errors.SFTError: <message>")
_WORKER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")
_LAST_LINE = re.compile(r"^(?:[\w.]+\.)?SFTError: ", re.MULTILINE)


class SFTError(CompactHydraException):
    """A problem the user can fix: the message names the key or path and says how.

    Set HYDRA_FULL_ERROR=1 to see the traceback anyway.
    """

    def __init__(self, message: str = "", *args):
        if isinstance(message, str) and _WORKER.match(message):  # keep the worker's message, not its traceback
            starts = [m.end() for m in _LAST_LINE.finditer(message)]
            message = message[starts[-1]:].rstrip() if starts else message
        super().__init__(message, *args)


def not_one_of(key: str, value: object, allowed: Iterable[object]) -> str:
    """Text for a bad choice: `key='value' is not one of: a, b, c`."""
    return f"{key}={value!r} is not one of: {', '.join(str(a) for a in allowed)}"


def unreadable(path: str | PathLike, error: OSError) -> str:
    """Text for a file or folder that cannot be read: `<path> is not readable (Permission denied): ...`."""
    return (f"{path} is not readable ({error.strerror or error}): check its permissions, and those of the "
            "folders above it.")
