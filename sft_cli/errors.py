"""The one exception users see: Hydra prints its message alone and exits 1 (no traceback)."""

from collections.abc import Iterable

from hydra.errors import CompactHydraException


class SFTError(CompactHydraException):
    """A problem the user can fix: the message names the key or path and says how.

    Set HYDRA_FULL_ERROR=1 to see the traceback anyway.
    """


def not_one_of(key: str, value: object, allowed: Iterable[object]) -> str:
    """Text for a bad choice: `key='value' is not one of: a, b, c`."""
    return f"{key}={value!r} is not one of: {', '.join(str(a) for a in allowed)}"
