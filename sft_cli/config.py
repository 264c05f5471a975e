"""Where the configs live, the typed trainer schema, and check(cfg): every cross-key problem at once."""

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sft_cli.errors import SFTError, not_one_of

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
MONITORS = ("val/accuracy", "val/macro_f1", "val/loss")
MODES = ("max", "min")


def find_config_dir() -> str:
    """The packaged configs of an installed wheel, else the checkout's configs/ folder."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise SFTError(f"sft-cli's configs are missing: looked in {here / 'configs'} and {here.parent / 'configs'}. "
                   "Reinstall the package (pip install sft-cli).")


@dataclass
class TrainerSchema:
    """Types for configs/trainer/: a wrong type is a keyed error before anything runs."""

    device: str = "auto"
    devices: int = 1
    sync_batchnorm: bool = False
    max_epochs: int = 10
    max_steps: Optional[int] = None
    batch_size: int = 128
    eval_batch_size: Optional[int] = None
    num_workers: int = 2
    precision: str = "auto"
    accumulate_grad_batches: int = 1
    gradient_clip_norm: Optional[float] = None
    val_every_n_epochs: int = 1
    log_every_n_steps: int = 50
    monitor: str = "val/accuracy"
    mode: str = "max"
    early_stopping_patience: Optional[int] = None
    deterministic: bool = False
    channels_last: Optional[bool] = None
    compile: bool = False
    persistent_workers: bool = False
    progress_bar: bool = True


ConfigStore.instance().store(group="trainer", name="schema", node=TrainerSchema)
# Run folders are named <time>_<pid> so two runs started in the same second never share one. Cached like
# ${now:}, so that the runs of a sweep in other processes (hydra/launcher=joblib) share the sweep's folder.
OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), replace=True, use_cache=True)


def optuna_direction(mode: str) -> str:
    """hparams_search/*.yaml: `${optuna_direction:${trainer.mode}}`, so the search optimises the way
    checkpoints/best is chosen."""
    if mode not in MODES:
        raise SFTError(not_one_of("trainer.mode", mode, MODES))
    return "maximize" if mode == "max" else "minimize"


def jobs_at_once(launcher: DictConfig) -> int:
    """How many jobs Hydra's launcher runs at the same time: joblib's n_jobs (-1 is one per core, -2 all
    but one, as joblib counts), SLURM's array_parallelism, else 1."""
    target = launcher.get("_target_", "")
    if "joblib" in target:
        n = launcher.n_jobs
        return max(1, n if n > 0 else (os.cpu_count() or 1) + 1 + n)
    if "submitit" in target:
        return launcher.get("array_parallelism", 1)
    return 1


OmegaConf.register_new_resolver("optuna_direction", optuna_direction, replace=True)
OmegaConf.register_new_resolver("trials_at_once", jobs_at_once, replace=True)


def require(cfg: DictConfig) -> None:
    """Raise an SFTError naming every mandatory key (`???` in the YAML) that has no value yet."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SFTError("missing required values: " + ", ".join(missing) + ". Set them on the command line, e.g. "
                       + " ".join(f"{key}=..." for key in missing))


def check(cfg: DictConfig) -> None:
    """Raise one SFTError listing every problem in cfg that can be seen before data or weights load."""
    require(cfg)
    t = cfg.trainer
    problems = []
    if t.precision not in PRECISIONS:
        problems.append(not_one_of("trainer.precision", t.precision, PRECISIONS))
    if t.monitor not in MONITORS:
        problems.append(not_one_of("trainer.monitor", t.monitor, MONITORS))
    if t.mode not in MODES:
        problems.append(not_one_of("trainer.mode", t.mode, MODES))
    elif t.monitor in MONITORS and t.mode != ("min" if t.monitor == "val/loss" else "max"):
        problems.append(f"trainer.mode={t.mode} would keep the worst {t.monitor} as best: set trainer.mode="
                        f"{'min' if t.monitor == 'val/loss' else 'max'}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device):
        problems.append(not_one_of("trainer.device", t.device, ("auto", "cpu", "cuda", "cuda:N", "mps")))
    for key in ("max_epochs", "devices", "batch_size", "accumulate_grad_batches", "val_every_n_epochs",
                "log_every_n_steps"):
        if t[key] < 1:
            problems.append(f"trainer.{key}={t[key]} must be at least 1")
    for key in ("max_steps", "eval_batch_size", "early_stopping_patience"):
        if t[key] is not None and t[key] < 1:
            problems.append(f"trainer.{key}={t[key]} must be at least 1, or null")
    if t.devices > 1 and t.batch_size % t.devices:
        problems.append(f"trainer.batch_size={t.batch_size} is the global batch and must divide evenly over "
                        f"trainer.devices={t.devices}: use a multiple of {t.devices}")
    if t.num_workers < 0:
        problems.append(f"trainer.num_workers={t.num_workers} must be 0 or more")
    if not isinstance(cfg.seed, int):
        problems.append(f"seed={cfg.seed!r} must be an integer")
    if cfg.resume is not None and not Path(cfg.resume).exists():
        problems.append(f"resume={cfg.resume!r} does not exist: give a run directory or a checkpoint "
                        "(outputs/<name>/<date>/<time>/checkpoints/last)")
    size = cfg.dataset.get("transforms", {}).get("image_size")
    if str(cfg.model.get("name", "")).startswith("vit_") and size != 224:
        problems.append(f"model.name={cfg.model.name} takes 224x224 inputs only, but "
                        f"dataset.transforms.image_size={size}: set dataset.transforms.image_size=224")
    if problems:
        raise SFTError("invalid config:\n  - " + "\n  - ".join(problems))


def build(node: DictConfig, *args, **kwargs):
    """hydra.utils.instantiate(node, ...), re-raising our own SFTError as is rather than wrapped in Hydra's
    InstantiationException (whose text would bury the fix under 'Error in call to target ...')."""
    try:
        return instantiate(node, *args, _convert_="all", **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, SFTError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from e
        raise SFTError(f"could not build <{node.get('_target_')}>: {e}") from e


def differences(old: DictConfig, new: DictConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: old -> new` for every leaf that differs between two configs (for resume's report)."""
    def leaves(node, prefix=""):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                out |= leaves(value, f"{prefix}{key}.")
            return out
        return {prefix[:-1]: node}

    a = leaves(OmegaConf.to_container(old, resolve=True))
    b = leaves(OmegaConf.to_container(new, resolve=True))
    return [f"{key}: {a.get(key, '<absent>')!r} in the checkpoint, {b.get(key, '<absent>')!r} now"
            for key in sorted(a.keys() | b.keys())
            if a.get(key) != b.get(key) and key.split(".")[0] not in ignore]
