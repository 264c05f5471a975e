"""Device, seeding, mixed precision and RNG state: the few runtime facts the recipe needs."""

import contextlib
import os
import random

import torch

from sft_cli.errors import SFTError

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def pick_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SFTError(f"trainer.device={name} but no CUDA GPU is visible (torch.cuda.is_available() is False, "
                           f"torch {torch.__version__}). Use trainer.device=cpu or trainer.device=auto.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SFTError(f"trainer.device={name} but only {torch.cuda.device_count()} GPU(s) are visible "
                           f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SFTError(f"trainer.device={name} but MPS is not available here. Use trainer.device=auto.")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def effective_precision(device: torch.device, precision: str) -> str:
    """trainer.precision as it runs: `auto` is bf16-mixed on GPUs that run bf16 natively (Ampere and newer: no
    gradient scaler needed) and 32 elsewhere: on most CPUs, and on older GPUs, lower precision is slower or
    needs loss scaling."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "32"


def autocast(device: torch.device, precision: str):
    """The forward-pass context for trainer.precision (a no-op for 32; `auto`: effective_precision)."""
    precision = effective_precision(device, precision)
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if len(state.get("cuda", [])) == torch.cuda.device_count() > 0:  # else saved on another GPU count: fresh
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory(device: torch.device) -> int:
    """Bytes: the most CUDA memory allocated on `device`, else this process's peak resident memory (Linux's
    VmHWM; ru_maxrss elsewhere). DataLoader workers are other processes and are not counted."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status").read().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
