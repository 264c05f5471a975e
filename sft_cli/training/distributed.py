"""Data-parallel training on torch.distributed: torchrun starts the processes; DDP syncs the gradients, or
FSDP2 (trainer.strategy=fsdp) shards the parameters, gradients and optimizer state over the processes.

One process per device. Under torchrun (WORLD_SIZE set) every process runs the same recipe; rank 0 alone
writes the run folder (metrics, checkpoints, summary) and shows progress. `trainer.devices=N` without
torchrun re-launches the same command under torchrun (`launch`). Every helper here is a no-op in a single
process, so the recipe reads the same either way.
"""

import contextlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from sft_cli.errors import SFTError
from sft_cli.training import runtime

log = logging.getLogger("sft_cli.distributed")


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"  # trainer.strategy: ddp, or fsdp (sharded parameters and checkpoints)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Checkpoints are written as shards (torch.distributed.checkpoint), in any number of processes; the
        model is sharded (FSDP2) once there are several."""
        return self.strategy == "fsdp"


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str, strategy: str = "ddp") -> tuple[Context, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA) and pick this rank's device."""
    device = runtime.pick_device(device_name)
    if not under_torchrun():
        return Context(strategy=strategy), device
    _die_with_torchrun()
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SFTError(f"torchrun started {local_rank + 1}+ processes on this node but only "
                           f"{torch.cuda.device_count()} GPU(s) are visible: lower --nproc_per_node.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise SFTError(f"trainer.device={device_name} ({device.type}) cannot run DDP: use cuda or cpu.")
    return Context(rank, world, strategy), device


def _die_with_torchrun() -> None:
    """torchrun starts each process in a session of its own, so a SIGKILL of sft-train and its process group
    (or of torchrun) would leave them training, still writing into the run folder. On Linux the kernel kills
    this process when its parent, torchrun, goes."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # torchrun went before the request was made
        os._exit(1)


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(task_overrides: list[str], run_dir: Path, devices: int, device_name: str, strategy: str = "ddp") -> float:
    """`trainer.devices=N` in a plain sft-train: run this job again under torchrun with N processes, in
    the same run folder, and return its best monitored value (from summary.json)."""
    device = runtime.pick_device(device_name)
    if device.type == "cuda" and torch.cuda.device_count() < devices:
        raise SFTError(f"trainer.devices={devices} but only {torch.cuda.device_count()} GPU(s) are visible: "
                       f"lower trainer.devices (or check CUDA_VISIBLE_DEVICES).")
    if device.type != "cuda" and device_name == "auto":
        if device.type != "cpu":
            raise SFTError(f"trainer.devices={devices} needs CUDA GPUs or CPU processes; trainer.device=auto picked "
                           f"{device.type}, which cannot run {devices} processes: set trainer.device=cpu.")
        log.warning(f"trainer.devices={devices}: no CUDA GPU is visible, so {devices} CPU processes (gloo) train; "
                    "trainer.device=cuda insists on GPUs")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
               "-m", "sft_cli.cli", *task_overrides, f"hydra.run.dir={run_dir}"]
    log.info(f"launching {strategy.upper()} on {devices} processes: torchrun --standalone --nproc_per_node={devices} "
             f"-m sft_cli.cli {' '.join(task_overrides)}")
    code = subprocess.call(command)
    summary = run_dir / "summary.json"
    if code != 0 or not summary.is_file():
        raise SFTError(f"the {devices} {strategy.upper()} processes failed (exit code {code}); their messages are "
                       f"above and in {run_dir}/train.log.")
    return float(json.loads(summary.read_text())["best_value"])


def broadcast_object(obj, ctx: Context):
    """Rank 0's `obj` on every rank (e.g. the run folder, which only rank 0's Hydra created)."""
    if not ctx.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_module(model: nn.Module, ctx: Context) -> None:
    """Rank 0's parameters and buffers on every rank (after rank 0 alone loaded a checkpoint)."""
    if ctx.enabled:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def all_reduce_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Sums over all ranks, as new tensors (the inputs are left as they are); copies in one process."""
    out = [t.clone() for t in tensors]
    if dist.is_available() and dist.is_initialized():
        for t in out:
            dist.all_reduce(t)
    return out


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in one process. For what a metric
    window gathers once per read (sequences that sums cannot hold)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_lockstep = False  # inside generating(): every process answers every prompt (FSDP)


def shard_and_gather(items: list, work) -> list:
    """work(items[rank::world]) on each process (a list, one result per item), gathered once into the order of
    `items` on every process: each item is worked on exactly once overall. work(items) in one process, and on
    every process inside generating() of a sharded model."""
    if _lockstep or not (dist.is_available() and dist.is_initialized()):
        return work(items)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = [None] * len(items)
    for r, done in enumerate(all_gather_objects(work(items[rank::world]))):
        out[r::world] = done
    return out


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def generating(model: nn.Module):
    """Around generation, which calls the transformers model inside the wrapper, past the wrapper's forward.
    A sharded model has its root parameters (embeddings, final norm, lm_head) gathered, each decoder layer
    gathers its own, and every process generates every answer in step with the others (synced_gpus: each
    forward pass is a collective). A no-op otherwise."""
    global _lockstep
    if not is_sharded(model):
        yield
        return
    model.unshard()
    _lockstep = True
    try:
        yield
    finally:
        _lockstep = False
        model.reshard()


def inference(model: nn.Module):
    """torch.inference_mode(), or no_grad() for a sharded model: FSDP reuses the buffers it gathers parameters
    into, and a buffer made in inference mode cannot be written outside it (by the next training step)."""
    return torch.no_grad() if is_sharded(model) else torch.inference_mode()


def in_lockstep() -> bool:
    """Whether generation must run in step on every process (transformers' synced_gpus)."""
    return _lockstep


def wrap(model: nn.Module, device: torch.device, ctx: Context, precision: str = "32",
         cpu_offload: bool = False) -> nn.Module:
    """The module to train: `model` itself in one process; with several, a DDP wrapper over its trainable
    parameters (call again whenever requires_grad changes: DDP fixes its buckets when built), or under
    trainer.strategy=fsdp the model itself, sharded in place by FSDP2 (once, before its optimizer exists)."""
    if not ctx.enabled:
        return model
    if ctx.sharded:
        return model if is_sharded(model) else _shard(model, device, precision, cpu_offload)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _shard(model: nn.Module, device: torch.device, precision: str, cpu_offload: bool) -> nn.Module:
    """FSDP2: each transformer layer (what transformers' _no_split_modules names: LlamaDecoderLayer, ...) and
    then the root (embeddings, final norm, lm_head, a classifier's head) become units whose parameters live
    sharded over the processes and are gathered for their forward and backward passes only."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options = {}
    if runtime.effective_precision(device, precision) == "bf16-mixed":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    layers = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    units = [m for m in model.modules() if type(m).__name__ in layers]
    for unit in units:
        fully_shard(unit, **options)
    fully_shard(model, **options)
    # Initialise the root's state now: generation (before any training forward) calls the layers directly
    model._get_fsdp_state()._lazy_init()
    log.info(f"FSDP: {len(units)} layers and the root sharded over {dist.get_world_size()} processes")
    if not units:
        log.warning("FSDP: the model names no transformer layers (_no_split_modules), so it is one unit whose "
                    "parameters are all gathered at once: little memory is saved. trainer.strategy=ddp is faster.")
    return model


def gradient_sync(trained: nn.Module, ctx: Context, sync: bool):
    """The context of a micro-batch's forward and backward: gradients are synchronised across processes only on
    the micro-batch that steps (DDP's no_sync(), FSDP's reduce-scatter held back), once per optimizer step."""
    if not ctx.enabled:
        return contextlib.nullcontext()
    if is_sharded(trained):
        trained.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else trained.no_sync()


def passes_behind(passes: int, model: nn.Module) -> int:
    """Under FSDP each forward pass is a collective, so every process must run as many: how many more passes
    this process (which has `passes` to make) must make to match the busiest one. Call it before any of them
    (it is a collective too). 0 otherwise."""
    if not is_sharded(model):
        return 0
    most = torch.tensor(passes)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most) - passes


class EvalShard(Sampler):
    """Indices rank, rank + world, ...: every example is evaluated exactly once overall (no padding, unlike
    DistributedSampler, which repeats examples so that every rank gets the same count)."""

    def __init__(self, size: int, ctx: Context):
        self.indices = range(ctx.rank, size, ctx.world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
