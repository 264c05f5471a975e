"""Checkpoints as folders of plain files, swapped in atomically.

    checkpoints/step-00000420/   model.safetensors  weights only: safetensors.torch.load_file() reads them
                                 state.pt           optimizer, scheduler, scaler, RNG, epoch, step, best metric
                                 config.yaml        the resolved config of the run
                                 meta.json          class names, epoch, step, validation metrics
    checkpoints/last -> step-00000420       (symlinks, replaced with os.replace: always complete)
    checkpoints/best -> step-00000300

A folder is written under a temporary name and renamed when complete; `last`/`best` are re-pointed with an
atomic rename, and only then are step folders that nothing points to removed. Killing the process at any
moment leaves `last` and `best` pointing at complete checkpoints. Nothing is ever unpickled on load:
state.pt is read with torch.load(weights_only=True).
"""

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sft_cli.errors import SFTError

MODEL_FILE, STATE_FILE, CONFIG_FILE, META_FILE = "model.safetensors", "state.pt", "config.yaml", "meta.json"
TAGS = ("last", "best")


def save(folder: Path, tags: list[str], model: nn.Module, state: dict, config: DictConfig, meta: dict) -> Path:
    """Write the checkpoint for state["step"] (once) and point each tag in `tags` at it."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:08d}"
    final = folder / name
    if not final.exists():
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, tmp / MODEL_FILE, metadata={"format": "pt", "classes": json.dumps(meta["classes"])})
        torch.save(state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(config, resolve=True))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if hasattr(model, "save_extras"):  # a transformers model: its config and tokenizer (hf/)
            model.save_extras(tmp)
        os.replace(tmp, final)
    for tag in tags:
        link = folder / f".{tag}.tmp-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(name, target_is_directory=True)
        os.replace(link, folder / tag)
    _remove_unreferenced(folder)
    return final


def _remove_unreferenced(folder: Path) -> None:
    kept = {os.readlink(folder / tag) for tag in TAGS if (folder / tag).is_symlink()}
    for path in [*folder.glob("step-*"), *folder.glob(".step-*.tmp-*")]:  # the latter: left by a failed save
        if path.name not in kept:
            shutil.rmtree(path, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from what a user may give: a run folder, its checkpoints/ folder, a checkpoint
    folder (or last/best link), or a file inside one."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SFTError(f"checkpoint {str(path)!r} does not exist. Give a run folder (outputs/<name>/<date>/<time>) "
                       "or a checkpoint (outputs/<name>/<date>/<time>/checkpoints/best).")
    for candidate in (p.parent if p.is_file() else p, p / "last", p / "checkpoints" / "last"):
        if (candidate / MODEL_FILE).exists() or (candidate / STATE_FILE).exists():
            return candidate
    raise SFTError(f"{path} holds no checkpoint (no {MODEL_FILE}): give a run folder or one of its "
                   "checkpoints/last, checkpoints/best")


def _read(ckpt: Path, filename: str, reader):
    path = ckpt / filename
    if not path.is_file():
        raise SFTError(f"checkpoint {ckpt} is incomplete: {filename} is missing. Use another checkpoint "
                       "(checkpoints/best or checkpoints/last of the run).")
    try:
        return reader(path)
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError, KeyError, TypeError,
            json.JSONDecodeError, pickle.UnpicklingError) as e:  # weights_only=True refuses pickled objects
        raise SFTError(f"checkpoint file {path} is corrupt or not an sft-cli checkpoint "
                       f"({type(e).__name__}: {e}). Use another checkpoint of the run.") from e


def load_config(ckpt: Path) -> DictConfig:
    return _read(ckpt, CONFIG_FILE, lambda p: OmegaConf.load(p))


def load_meta(ckpt: Path) -> dict:
    return _read(ckpt, META_FILE, lambda p: json.loads(p.read_text()))


def load_state(ckpt: Path) -> dict:
    return _read(ckpt, STATE_FILE, lambda p: torch.load(p, map_location="cpu", weights_only=True))


def load_weights(ckpt: Path, model: nn.Module) -> None:
    """Load model.safetensors into `model`; a different architecture is an error naming the keys."""
    weights = _read(ckpt, MODEL_FILE, lambda p: load_file(p))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise SFTError(f"the weights in {ckpt / MODEL_FILE} do not fit the configured model "
                       f"{type(model).__name__} (a different model.name, small_input_stem or class count?):\n"
                       f"{str(e)[:800]}") from e


def copy_history(ckpt: Path, run_dir: Path, epoch: int, step: int) -> None:
    """Start a resumed run's folder with the source run's history up to the checkpoint: its checkpoint
    (as last, and the source's best as best) and its metrics records. The source is only read."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    source_best = ckpt.resolve().parent / "best"
    for tag, src in (("last", ckpt.resolve()), ("best", source_best.resolve() if source_best.exists() else None)):
        src = src or ckpt.resolve()
        if not (folder / src.name).exists():
            shutil.copytree(src, folder / src.name)
        (folder / tag).symlink_to(src.name, target_is_directory=True)
    source_run = ckpt.resolve().parent.parent
    if (source_run / "metrics.jsonl").is_file():
        kept = [line for line in (source_run / "metrics.jsonl").read_text().splitlines()
                if line and json.loads(line)["step"] <= step]
        (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    if (source_run / "metrics.csv").is_file():
        header, *rows = (source_run / "metrics.csv").read_text().splitlines()
        kept = [row for row in rows if int(row.split(",")[0]) <= epoch]
        (run_dir / "metrics.csv").write_text("\n".join([header, *kept]) + "\n")


def load_model(cfg: DictConfig, ckpt: Path, device: torch.device) -> tuple[nn.Module, list[str]]:
    """The checkpoint's model, in eval mode on `device`, and its class names; built from `cfg` (the
    checkpoint's config, possibly overridden) without fetching any pretrained weights. For a transformers
    model, cfg.model.name_or_path and cfg.dataset.tokenizer are pointed at the checkpoint's own hf/ copy."""
    from sft_cli.config import build

    classes = load_meta(ckpt)["classes"]
    if (ckpt / "hf").is_dir():
        cfg.model.name_or_path = str(ckpt / "hf")
        if "tokenizer" in cfg.dataset:
            cfg.dataset.tokenizer = str(ckpt / "hf")
    model = build(cfg.model, classes=classes, weights=None)
    load_weights(ckpt, model)
    return model.to(device).eval(), classes
