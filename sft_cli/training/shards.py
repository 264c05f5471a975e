"""Sharded checkpoints (trainer.strategy=fsdp), written and read with torch.distributed.checkpoint (DCP).

    checkpoints/step-00000420/   shards/      DCP: every process writes the shard of the weights and of the
                                              optimizer state it holds (__0_0.distcp, __1_0.distcp, .metadata)
                                 state.pt     scheduler, scaler, RNG, epoch, step, best metric (no optimizer)
                                 config.yaml, meta.json, hf/   as in every checkpoint (checkpoint.py)

The folder is swapped in as checkpoint.py swaps every checkpoint: all processes write into one temporary
folder, and once every shard is on disk rank 0 renames it and re-points `last`/`best`, so a kill at any
moment leaves them pointing at complete checkpoints. DCP records each tensor's global shape, so shards load
into any number of processes (resume on 4 what 2 wrote), and into one process without a process group:
sft-eval, sft-predict and sft-export read a sharded checkpoint as they read any other.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn

from sft_cli.errors import SFTError

SHARDS = "shards"


def has_shards(ckpt: Path) -> bool:
    return (Path(ckpt) / SHARDS).is_dir()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


def rank0_value(value):
    """Rank 0's `value` on every process (what rank 0 sees on disk decides for all)."""
    if not _distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if _distributed():
        dist.barrier()


def weights(model: nn.Module) -> dict:
    """The tensors a checkpoint holds (an adapter's alone, under adapter=lora), as the model holds them: DTensor
    shards under FSDP (each process writes its own), whole tensors in one process."""
    from sft_cli.models import adapters

    return adapters.adapter_weights(model) if model.sft.adapter is not None else model.state_dict()


def write(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: rank 0 makes the empty folder `tmp`, every process writes its shards of the weights and the
    optimizer state into tmp/shards, and returns once all of them have (so rank 0 may swap the folder in)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state = {"model": weights(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():  # one process: DCP's "assuming the intent is to save in a single process"
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.save(state, checkpoint_id=tmp / SHARDS)
    barrier()


def temporary_name(name: str) -> str:
    """The temporary folder every process writes `name` into: named by rank 0's pid, as checkpoint.py names
    its own (so that clear_stale knows whose it is)."""
    return rank0_value(f".{name}.tmp-{os.getpid()}")


def load_weights(ckpt: Path, model: nn.Module) -> dict:
    """The checkpoint's weights loaded into the tensors the model holds (collective under FSDP: each process
    reads what its shards need, from however many processes wrote them); returned as the dict to load."""
    target = weights(model)
    try:
        _load({"model": target}, ckpt)
    except (Exception, CheckpointException) as e:  # DCP wraps every failure in its own type (no Exception)
        _refuse_damaged(ckpt, e)
        raise SFTError(f"the sharded weights in {Path(ckpt) / SHARDS} do not fit the configured model (a different "
                       f"model, adapter or class count?), or a shard is missing: {_reason(e)}. Use the config the "
                       "checkpoint was trained with (its config.yaml), or another checkpoint.") from None
    return target


def load_optimizer(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The checkpoint's optimizer state into `optimizer` (its param groups too: lr, weight decay), resharded to
    this run's processes."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)
    try:
        _load({"optimizer": state}, ckpt)
    except (Exception, CheckpointException) as e:
        _refuse_damaged(ckpt, e)
        raise SFTError(f"the optimizer state in {Path(ckpt) / SHARDS} does not fit the configured optimizer "
                       f"{type(optimizer).__name__} ({_reason(e)}): resume with the optimizer the run was started "
                       "with.") from None
    set_optimizer_state_dict(model, optimizer, state)


def _cause(e: BaseException) -> BaseException:
    """The failure inside DCP's CheckpointException (one per rank; the first), or `e` itself."""
    failures = getattr(e, "failures", None)
    return next(iter(failures.values()))[0] if failures else e


def _reason(e: BaseException) -> str:
    cause = _cause(e)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0][:400]}" if text else type(cause).__name__


def _refuse_damaged(ckpt: Path, e: BaseException) -> None:
    """A shard or the .metadata lost or cut short (a copy that did not finish): say so, not that the model differs."""
    cause = _cause(e)
    if isinstance(cause, OSError) or "metadata" in str(cause):
        raise SFTError(f"checkpoint {ckpt} is incomplete or corrupt: {_reason(cause)}. Use another checkpoint "
                       "(checkpoints/best or checkpoints/last of the run, or an earlier step-N).") from None


def _fallback_unlogged(record: logging.LogRecord) -> bool:
    # DCP logs on the root logger, with a traceback, that it could not read .metadata before it fails: the error
    # raised then (see _refuse_damaged) says so once
    return "metadata is not found" not in record.getMessage()


def _load(state: dict, ckpt: Path) -> None:
    logging.getLogger().addFilter(_fallback_unlogged)
    try:
        with warnings.catch_warnings():  # one process: DCP's "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message=".*single process")
            dcp.load(state, checkpoint_id=Path(ckpt) / SHARDS)
    finally:
        logging.getLogger().removeFilter(_fallback_unlogged)
