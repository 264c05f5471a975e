"""What every task's data readers share."""

import logging

import torch

from sft_cli.errors import SFTError

log = logging.getLogger(__name__)


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
