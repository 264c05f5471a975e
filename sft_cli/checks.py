"""Cross-key checks of a composed config: every problem at once, before data or weights load (and before torch
is imported: these answer in about a second)."""

import dataclasses
import difflib
import importlib.util
import os
import re
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sft_cli.config import (
    MODES,
    PRECISIONS,
    TrainerSchema,
    _direction_is_known,
    find_config_dir,
    mode_of,
)
from sft_cli.errors import SFTError, not_one_of
from sft_cli.extras import install_command


def require(cfg: DictConfig) -> None:
    """Raise an SFTError naming every mandatory key (`???` in the YAML) that has no value yet."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SFTError("missing required values: " + ", ".join(missing) + ". Set them on the command line, e.g. "
                       + " ".join(f"{key}=..." for key in missing))


def check(cfg: DictConfig) -> None:
    """Raise one SFTError listing every problem in cfg that can be seen before data or weights load (and
    before torch is imported: these answer in about a second)."""
    require(cfg)
    problems = unread_key_problems(cfg)
    if problems:  # a misspelt key explains what else looks wrong: say it alone
        raise SFTError("invalid config:\n  - " + "\n  - ".join(problems))
    problems = _trainer_problems(cfg.trainer) + _run_problems(cfg)
    from sft_cli.results import (
        loggers,  # torch-free: finds the trackers' packages without importing them
    )

    problems += loggers.check(cfg.get("logger")) + _adapter_problems(cfg)
    if problems:
        raise SFTError("invalid config:\n  - " + "\n  - ".join(problems))


def check_monitor(cfg: DictConfig, metrics: Iterable[str], off: dict[str, str] | None = None) -> None:
    """Raise an SFTError unless trainer.monitor names one of the validation metrics the task reports; `off`:
    metrics the task could report but its config turns off, each with what turns it on (Task.metrics_off)."""
    allowed = [f"val/{m}" for m in sorted(metrics)]
    monitor = cfg.trainer.monitor
    if monitor not in allowed:
        name = str(monitor).removeprefix("val/")
        if off and name in off and monitor.startswith("val/"):
            raise SFTError(f"trainer.monitor={monitor} is not reported by this run: {off[name]}")
        raise SFTError(not_one_of("trainer.monitor", monitor, allowed))


def unread_key_problems(cfg: DictConfig) -> list[str]:
    """A key that nothing reads, each with the known key it resembles. Hydra's `+` adds any key, and its own
    hint for a misspelt one is to add it with `+` (+optimiser=adamw, +trainer.max_step=5): such a key would
    be ignored while the run trains with the default. Groups built from a `_target_` (optimizer, model, ...)
    are checked when they are built: their keys are the constructor's arguments."""
    top, nested = _known_keys()
    problems = [_unknown(key, cfg[key], "", top) for key in cfg if key not in top]
    for group, known in nested.items():
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            problems += [_unknown(key, node[key], group + ".", known) for key in node if key not in known]
    return problems


def _unknown(key: str, value, prefix: str, known: Iterable[str]) -> str:
    near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    value = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
    hint = f" Did you mean {prefix}{near[0]}={value}?" if near else ""
    where = f"{prefix.rstrip('.')} has no key {key!r}" if prefix else f"{key!r} is neither a key nor a config group"
    listed = (f"Known: {', '.join(prefix + k for k in sorted(known))}" if len(known) <= 8 else
              f"sft-train --cfg job lists every key{' of ' + prefix.rstrip('.') if prefix else ''}")
    return f"+{prefix}{key}={value}: {where}, so nothing would read it.{hint} {listed}"


@cache
def _known_keys() -> tuple[frozenset, dict[str, frozenset]]:
    """(top-level keys, {group: its keys}) of the shipped configs: train.yaml's keys and groups, the keys the
    global overlays (experiments, searches, launchers) set, the trainer schema's fields."""
    root = Path(find_config_dir())
    primary = OmegaConf.load(root / "train.yaml")
    groups = {next(iter(d)) if isinstance(d, dict) else d for d in OmegaConf.to_container(primary.defaults)}
    top = set(primary) - {"defaults"} | groups | {"hydra"}
    for path in root.glob("*/*.yaml"):
        if path.read_text().startswith("# @package _global_"):
            top |= set(OmegaConf.load(path)) - {"defaults"}
    nested = {"trainer": frozenset(f.name for f in dataclasses.fields(TrainerSchema)),
              "param_groups": frozenset(primary.param_groups), "sweep": frozenset(primary.sweep)}
    return frozenset(top - {"_self_"}), nested


STRATEGIES = ("ddp", "fsdp")


def _trainer_problems(t: DictConfig) -> list[str]:
    problems = []
    if t.precision not in PRECISIONS:
        problems.append(not_one_of("trainer.precision", t.precision, PRECISIONS))
    if not re.fullmatch(r"val/[\w.-]+", t.monitor):
        problems.append(f"trainer.monitor={t.monitor!r} must name a validation metric: val/<name>, e.g. "
                        "trainer.monitor=val/accuracy")
    implied = mode_of(OmegaConf.create({"monitor": t.monitor}))
    if t.mode is not None and t.mode not in MODES:
        problems.append(not_one_of("trainer.mode", t.mode, MODES + ("null",)))
    elif t.mode is not None and t.mode != implied and _direction_is_known(t.monitor):
        problems.append(f"trainer.mode={t.mode} would keep the worst {t.monitor} as best: set trainer.mode="
                        f"{implied}, or leave it null (it follows trainer.monitor)")
    problems += _device_problems(t)
    for key in ("max_epochs", "devices", "batch_size", "accumulate_grad_batches", "val_every_n_epochs",
                "log_every_n_steps"):
        if t[key] < 1:
            problems.append(f"trainer.{key}={t[key]} must be at least 1")
    for key in ("max_steps", "eval_batch_size", "early_stopping_patience", "checkpoint_every_n_steps"):
        if t[key] is not None and t[key] < 1:
            problems.append(f"trainer.{key}={t[key]} must be at least 1, or null")
    if t.devices > 1 and t.batch_size % t.devices:
        problems.append(f"trainer.batch_size={t.batch_size} is the global batch and must divide evenly over "
                        f"trainer.devices={t.devices}: use a multiple of {t.devices}")
    if t.num_workers < 0:
        problems.append(f"trainer.num_workers={t.num_workers} must be 0 or more")
    return problems + _strategy_problems(t)


def _strategy_problems(t: DictConfig) -> list[str]:
    if t.strategy not in STRATEGIES:
        return [not_one_of("trainer.strategy", t.strategy, STRATEGIES)]
    problems = []
    if t.strategy == "fsdp" and t.precision == "16-mixed":
        problems.append("trainer.precision=16-mixed needs a gradient scaler that FSDP's shards do not have here: "
                        "use trainer.precision=bf16-mixed (or 32) with trainer.strategy=fsdp")
    if t.strategy == "fsdp" and t.sync_batchnorm:
        problems.append("trainer.sync_batchnorm=true is for trainer.strategy=ddp: set trainer.sync_batchnorm=false")
    if t.cpu_offload and t.strategy != "fsdp":
        problems.append("trainer.cpu_offload=true offloads FSDP's shards: add trainer.strategy=fsdp, or drop it")
    return problems


def _device_problems(t: DictConfig) -> list[str]:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device):
        return [not_one_of("trainer.device", t.device, ("auto", "cpu", "cuda", "cuda:N", "mps"))]
    absent = no_cuda_reason() if t.device.startswith("cuda") else None
    if absent:
        return [f"trainer.device={t.device} but no CUDA GPU is visible ({absent}): use trainer.device=cpu or "
                "trainer.device=auto"]
    return []


def no_cuda_reason() -> str | None:
    """Why no CUDA GPU can be visible, when that is certain without importing torch (a second saved on every
    config mistake); None when unsure, and runtime.pick_device asks torch later."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    if sys.platform == "darwin":
        return "macOS has no CUDA"
    # WSL (/dev/dxg) and ROCm builds of torch (/dev/kfd: torch.cuda on AMD GPUs) have GPUs that the NVIDIA
    # driver does not list, so only a plain Linux without the NVIDIA driver's GPU list is certain.
    if not sys.platform.startswith("linux") or any(Path(p).exists() for p in ("/dev/dxg", "/dev/kfd")):
        return None
    if any(Path("/dev").glob("nvidia[0-9]*")):  # a device node: a GPU may be there (some containers hide /proc)
        return None
    try:
        listed = any(Path("/proc/driver/nvidia/gpus").iterdir())
    except FileNotFoundError:
        listed = False
    except OSError:
        return None
    return None if listed else "there is no NVIDIA GPU device (/dev/nvidia0, ...) and the driver lists none"


def _adapter_problems(cfg: DictConfig) -> list[str]:
    adapter = cfg.get("adapter")
    if not adapter:
        return []
    problems = []
    if importlib.util.find_spec("peft") is None:
        problems.append("adapter=lora needs Hugging Face peft, which is not installed: "
                        f"{install_command('peft')} "
                        "(or train without adapters: adapter=none)")
    if cfg.model.get("weights", "pretrained") is None:
        problems.append("adapter=lora with model.weights=null: an adapter on a randomly initialised base cannot be "
                        "loaded again (the base is not saved). Start from pretrained weights, or use adapter=none.")
    return problems


def _run_problems(cfg: DictConfig) -> list[str]:
    problems = []
    if not isinstance(cfg.seed, int):
        problems.append(f"seed={cfg.seed!r} must be an integer")
    lr = cfg.optimizer.get("lr", 1)
    if not _is_number(lr) or lr <= 0:
        problems.append(f"optimizer.lr={lr!r} must be a positive number, e.g. optimizer.lr=1e-3")
    for key in ("val_size", "test_size"):
        size = cfg.dataset.get(key)
        if size is not None and not _is_size(size):
            problems.append(f"dataset.{key}={size!r} must be a fraction in (0, 1) or a count of examples, e.g. "
                            f"dataset.{key}=0.1")
    if "hub" in cfg.dataset and all(cfg.dataset.get(k) is None for k in ("train_file", "train_files", "hub")):
        # dataset=chat_files: any one of three keys names the training data (chats.chat_files says the same)
        problems.append("no training data: set dataset.train_file=... (a .jsonl or .json file), dataset.train_files="
                        "[a.jsonl,b.jsonl] (several, mixed by dataset.mix) or dataset.hub=... (a Hugging Face "
                        "dataset name, or a folder saved with save_to_disk)")
    if cfg.resume is not None:
        problems += _resume_problems(cfg.resume)
    size = cfg.dataset.get("transforms", {}).get("image_size")
    if str(cfg.model.get("name", "")).startswith("vit_") and size != 224:
        problems.append(f"model.name={cfg.model.name} takes 224x224 inputs only, but "
                        f"dataset.transforms.image_size={size}: set dataset.transforms.image_size=224")
    return problems


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_size(value) -> bool:
    """A fraction in (0, 1), or a whole count of examples (5000 or 5000.0)."""
    return _is_number(value) and (0 < value < 1 or (value >= 1 and float(value).is_integer()))


def _resume_problems(resume: str) -> list[str]:
    from sft_cli.training import (
        checkpoint,  # resolve() and load_config() only read files (checkpoint.py imports no torch for them)
    )

    try:
        checkpoint.load_config(checkpoint.resolve(resume))  # its config's _target_s are checked there
    except SFTError as e:
        return [f"resume={resume!r}: {e}"]
    return []
