"""Checkpoints as folders of plain files, swapped in atomically.

    checkpoints/step-00000420/   model.safetensors  weights only: safetensors.torch.load_file() reads them
                                 state.pt           optimizer, scheduler, scaler, RNG, epoch, step, best metric
                                 config.yaml        the resolved config of the run
                                 meta.json          class names, epoch, step, validation metrics
    checkpoints/last -> step-00000420       (symlinks, replaced with os.replace: always complete)
    checkpoints/best -> step-00000300

Under trainer.strategy=fsdp a checkpoint holds shards/ (each process's shards of the weights and of the
optimizer state: shards.py) in place of model.safetensors and of state.pt's optimizer state.

A folder is written under a temporary name (.step-00000420.tmp-<pid>), every file and the folder are
fsync'ed, it is renamed, and the rename is fsync'ed; `last`/`best` are re-pointed the same way, and only then
are step folders that nothing points to removed. Killing the process, or the power, at any moment leaves
`last` and `best` pointing at complete checkpoints. Nothing is ever unpickled on load: state.pt is read with
torch.load(weights_only=True).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors import SafetensorError

from sft_cli.errors import SFTError, unreadable

# torch and safetensors.torch are imported inside the functions that need them: the CLI calls resolve() and
# load_config() for its config checks, which must answer in about a second, and importing torch takes longer.
if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)
MODEL_FILE, STATE_FILE, CONFIG_FILE, META_FILE = "model.safetensors", "state.pt", "config.yaml", "meta.json"
TAGS = ("last", "best")
CONFIG_KEYS = ("trainer", "model", "dataset")  # what every config.yaml that sft-train writes has
TEMPORARY = re.compile(r"\.(step-\d+|last|best)\.tmp-(\d+)")  # .step-00000420.tmp-<pid>, .last.tmp-<pid>


def save(folder: Path, tags: list[str], model: nn.Module, state: dict, config: DictConfig, meta: dict,
         optimizer=None) -> Path:
    """Write the checkpoint for state["step"] (once) and point each tag in `tags` at it. A write that fails
    (a full disk) is an SFTError saying where `last` still points; nothing half-written is left behind.
    Under trainer.strategy=fsdp every process calls this with its `optimizer`: each writes its shards of the
    weights and the optimizer state (shards.py), rank 0 the rest, and rank 0 alone swaps the folder in."""
    from sft_cli.training import shards

    name = f"step-{state['step']:08d}"
    sharded = optimizer is not None  # then every process takes part: the collectives below are theirs alone
    tmp = folder / (shards.temporary_name(name) if sharded else f".{name}.tmp-{os.getpid()}")
    main = shards.is_rank0() if sharded else True
    try:
        if main:
            _make_folder(folder)
        exists = (folder / name).exists()
        if not (shards.rank0_value(exists) if sharded else exists):
            if sharded:
                shards.write(tmp, model, optimizer)
            if main:
                _write(tmp, model, state, config, meta, sharded)
                os.replace(tmp, folder / name)
                _fsync(folder)  # a rename is durable only once the folder that holds it is synced
        for tag in tags if main else ():
            _point(folder, tag, name)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as a RuntimeError
        if main:
            _discard(folder, tmp)
        raise SFTError(_save_failed(folder, name, e)) from e
    except BaseException:  # Ctrl-C (or a SIGTERM turned into SystemExit) during the save
        if main:
            _discard(folder, tmp)
        raise
    if main:
        _remove_unreferenced(folder)
    if sharded:
        shards.barrier()  # no process runs on (and none is stopped) before rank 0 has swapped the folder in
    return folder / name


def _make_folder(folder: Path) -> None:
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        _fsync(folder.parent)


def _write(tmp: Path, model: nn.Module, state: dict, config: DictConfig, meta: dict, sharded: bool = False) -> None:
    """The checkpoint's files in `tmp`, all of them on disk (fsync'ed) when this returns. `sharded`: tmp holds
    the weights' shards already (shards.write), and they are not written again."""
    import torch

    adapted = model.sft.adapter is not None  # a LoRA adapter: its tensors and the new head, not the base
    if adapted:
        meta = {**meta, "adapter_base": model.sft.adapter.base_record}
    if not sharded:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_weights(tmp / MODEL_FILE, model, meta)
    torch.save(state, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(config, resolve=True))
    (tmp / META_FILE).write_text(json.dumps({**meta, "sharded": True} if sharded else meta, indent=2))
    if model.sft.save_extras:  # a transformers model: its config and tokenizer (hf/)
        model.sft.save_extras(tmp)
    # The writers close (flush) their files but do not sync them: without this, a power cut after the rename
    # below can leave a step folder, and `last` pointing at it, with empty or partial files.
    for root, _, files in os.walk(tmp, topdown=False):
        for file in files:
            _fsync(Path(root) / file)
        _fsync(Path(root))


def _write_weights(path: Path, model: nn.Module, meta: dict) -> None:
    from safetensors.torch import save_file

    from sft_cli.models import adapters

    adapted = model.sft.adapter is not None
    weights, seen = {}, set()
    for key, value in (adapters.adapter_weights(model) if adapted else model.state_dict()).items():
        value = value.detach().contiguous().cpu()
        if value.data_ptr() in seen:  # tied weights (a language model's embeddings and lm_head): safetensors
            value = value.clone()     # refuses tensors that share memory, so the second one is a copy
        seen.add(value.data_ptr())
        weights[key] = value
    save_file(weights, path, metadata={"format": "pt", "classes": json.dumps(meta.get("classes"))})


def _point(folder: Path, tag: str, name: str) -> None:
    """Re-point the symlink folder/tag at `name` atomically, and durably."""
    link = folder / f".{tag}.tmp-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(name, target_is_directory=True)
    os.replace(link, folder / tag)
    _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a read-only descriptor syncs a file's data, and is how folders open
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(folder: Path, tmp: Path) -> None:
    """Remove what a failed save of this process left: its temporary folder and links."""
    shutil.rmtree(tmp, ignore_errors=True)
    for tag in TAGS:
        try:
            (folder / f".{tag}.tmp-{os.getpid()}").unlink(missing_ok=True)
        except OSError:  # the disk or folder that failed the save may refuse this too: the error to report is the first
            pass


def _save_failed(folder: Path, name: str, e: Exception) -> str:
    last = folder / "last"
    previous = os.readlink(last) if last.is_symlink() and last.exists() else None
    where = (f"checkpoints/last still points at the previous complete checkpoint {folder / previous}" if previous
             else "there is no complete checkpoint of this run yet")
    then = f"continue the run with resume={folder.parent}" if previous else "start the run again"
    fix = (f"Make {folder} writable" if isinstance(e, PermissionError) else
           "Free space on that disk" if getattr(e, "errno", None) == errno.ENOSPC or "space" in str(e).lower() else
           "Fix the cause above (free space on that disk, or make the folder writable)")
    return (f"the checkpoint {name} could not be written to {folder} ({type(e).__name__}: {str(e)[:300]}); "
            f"{where}. {fix}, then {then}.")


def _remove_unreferenced(folder: Path) -> None:
    kept = {os.readlink(folder / tag) for tag in TAGS if (folder / tag).is_symlink()}
    for path in folder.glob("step-*"):
        if path.name not in kept:
            shutil.rmtree(path, ignore_errors=True)
    clear_stale(folder)


def clear_stale(folder: Path) -> int:
    """Remove the temporary folders and links (.step-*.tmp-<pid>, .last.tmp-<pid>, .best.tmp-<pid>) that
    saves killed midway left in `folder`, once the process that wrote them is gone, and log the space freed.
    Another live process's are kept: it may be writing them. A leftover with this process's own pid is
    removed, so call this while no save of this process is under way (it writes one save at a time).
    Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if (m := TEMPORARY.fullmatch(p.name)) and not _alive(int(m.group(2)))]
    if not stale:
        return 0
    freed = sum(_size(p) for p in stale)
    for path in stale:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    log.info(f"removed {len(stale)} temporary checkpoint file(s) left in {folder} by stopped runs, freeing "
             f"{freed / 2**20:.1f} MiB")
    return len(stale)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (not this one: its own leftovers are stale). A process in another pid
    namespace (container) sharing the folder cannot be seen; its temporary folders may be taken as stale."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    except (OverflowError, OSError):  # not a valid pid
        return False
    return True


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if not f.is_dir() or f.is_symlink())


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from what a user may give: a run folder, its checkpoints/ folder, a checkpoint
    folder (or last/best link), or a file inside one."""
    if not str(path).strip():  # `checkpoint=` with nothing after it: Path("") would be the current folder
        raise SFTError("checkpoint= is empty: give a run folder (outputs/<name>/<date>/<time>) or a checkpoint "
                       "(outputs/<name>/<date>/<time>/checkpoints/best).")
    p = Path(path).expanduser()
    try:
        return _resolve(p, path)
    except PermissionError as e:
        raise SFTError(f"checkpoint {unreadable(e.filename or p, e)}") from e


def _resolve(p: Path, given: str | Path) -> Path:
    if not p.exists() and not p.is_symlink():
        raise SFTError(f"checkpoint {str(given)!r} does not exist. Give a run folder (outputs/<name>/<date>/<time>) "
                       "or a checkpoint (outputs/<name>/<date>/<time>/checkpoints/best).")
    if p.exists():
        for candidate in (p.parent if p.is_file() else p, p / "last", p / "checkpoints" / "last"):
            if (candidate / MODEL_FILE).exists() or (candidate / STATE_FILE).exists():
                return candidate
    for folder in (p.parent if p.is_symlink() else None, p, p / "checkpoints"):
        if folder is not None and (broken := _dangling(folder)):
            raise SFTError(broken)
    # a run killed during its first save leaves only a temporary folder, which nothing else would ever remove
    partial = [f for f in (p, p / "checkpoints") if f.is_dir() and clear_stale(f)]
    raise SFTError(f"{given} holds no checkpoint (no {MODEL_FILE}): give a run folder or one of its "
                   "checkpoints/last, checkpoints/best"
                   + (f". Its run was stopped during its first save: the unfinished save in {partial[0]} was "
                      "removed" if partial else ""))


def _dangling(folder: Path) -> str | None:
    """What to say when folder/last or folder/best points at a step folder that is gone, else None."""
    missing = {tag: os.readlink(folder / tag) for tag in TAGS
               if (folder / tag).is_symlink() and not (folder / tag).exists()}
    if not missing:
        return None
    said = " and ".join(f"{tag} points at {target}" for tag, target in missing.items())
    intact = [folder / tag for tag in TAGS if tag not in missing and (folder / tag / STATE_FILE).exists()]
    if intact:
        return (f"{folder}: {said}, which is missing; {intact[0].name} is intact: resume={intact[0]} "
                f"(or checkpoint={intact[0]} for sft-eval and sft-predict).")
    return (f"{folder}: {said}, which {'are both' if len(missing) > 1 else 'is'} missing: no complete "
            "checkpoint of this run is left. Start the run again, or give another run's checkpoint.")


def _read(ckpt: Path, filename: str, reader):
    path = ckpt / filename
    try:
        if not path.is_file():
            raise SFTError(f"checkpoint {ckpt} is incomplete: {filename} is missing. Use another checkpoint "
                           "(checkpoints/best or checkpoints/last of the run).")
        path.open("rb").close()  # first, so that an unreadable file gets one message whichever reader it has
        return reader(path)
    except PermissionError as e:
        raise SFTError(f"checkpoint file {unreadable(path, e)}") from e
    except pickle.UnpicklingError as e:  # torch's text advises weights_only=False, which would run the payload
        raise SFTError(_pickled(path, e)) from None
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError, KeyError, TypeError,
            json.JSONDecodeError) as e:
        raise SFTError(f"checkpoint file {path} is corrupt or not an sft-cli checkpoint "
                       f"({type(e).__name__}: {e}). Use another checkpoint of the run.") from e


def _pickled(path: Path, e: pickle.UnpicklingError) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(e))  # the class torch's weights-only unpickler refused
    what = (f"it holds pickled Python objects ({found.group(1)}), which sft-cli never writes" if found else
            "it is not a weights-only torch file (pickle data that sft-cli never writes, or a corrupt file)")
    return (f"checkpoint file {path} is not a checkpoint sft-cli wrote: {what}. It must not be loaded: "
            "unpickling it could run code from the file. Use another checkpoint of the run.")


def _config(path: Path) -> DictConfig:
    """config.yaml, refused unless it is a mapping with the sections sft-train writes."""
    cfg, why = None, None
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        why = f"it is not valid YAML: {str(e).splitlines()[0]}"
    except OSError as e:  # how OmegaConf refuses a YAML scalar: "Invalid loaded object type: int"
        if not str(e).startswith("Invalid loaded object type"):
            raise
        why = f"it holds a YAML {str(e).rsplit(' ', 1)[-1]}, not a mapping"
    if isinstance(cfg, ListConfig):
        why = "it holds a YAML list, not a mapping"
    elif cfg is not None and (missing := [k for k in CONFIG_KEYS if k not in cfg]):
        why = f"it has no {', '.join(missing)} section"
    if why:
        raise SFTError(f"{path} is not an sft-cli checkpoint config ({why}). Use another checkpoint of the run "
                       "(its checkpoints/best or checkpoints/last).")
    return cfg


def load_config(ckpt: Path) -> DictConfig:
    """The checkpoint's config.yaml, its `_target_`s upgraded to where they live now (MOVED) and each checked
    against the allowlist (a checkpoint is data: loading one must never run code)."""
    cfg = upgrade_targets(_read(ckpt, CONFIG_FILE, _config))
    check_targets(cfg, ckpt / CONFIG_FILE)
    return cfg


ALLOW_ENV = "SFT_CLI_ALLOW_TARGETS"
# torch's optimizers and lr schedulers, by class name: what a config names as optimizer or scheduler
LIBRARY_TARGETS = re.compile(r"torch\.optim\.(lr_scheduler\.)?[A-Z][A-Za-z0-9_]*")


def check_targets(cfg: DictConfig, source: Path) -> None:
    """Refuse a config read from a file unless every `_target_` in it is one that sft-cli's shipped configs
    name, a torch optimizer or lr scheduler, or one the user allowed in $SFT_CLI_ALLOW_TARGETS (comma-separated
    names, or prefixes ending in `.*`). Instantiating any other callable named by a file someone sent you
    (torch.load of a pickle, subprocess.run) would run their code."""
    allowed = [a.strip() for a in os.environ.get(ALLOW_ENV, "").split(",") if a.strip()]

    def ok(target: str) -> bool:
        return target in _shipped_targets() or bool(LIBRARY_TARGETS.fullmatch(target)) or any(
            target == a or (a.endswith(".*") and target.startswith(a[:-1])) for a in allowed)

    for key, target in _targets(OmegaConf.to_container(cfg)):
        if not isinstance(target, str) or not ok(target):
            raise SFTError(f"{source}: {key}={target!r} is not a constructor sft-cli's own configs use, so loading "
                           "this checkpoint could run code it names. If you trust it (your own builder), allow it: "
                           f"{ALLOW_ENV}={target}")


def _targets(node, key: str = ""):
    """(dotted key, value) of every `_target_` in a plain config container."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from [(f"{key}{k}", v)] if k == "_target_" else _targets(v, f"{key}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{key}{i}.")


@functools.cache
def _shipped_targets() -> frozenset[str]:
    """Every `_target_` that a YAML under the shipped configs/ names."""
    from sft_cli.config import find_config_dir

    found = re.compile(r"^\s*_target_:\s*([\w.]+)", re.MULTILINE)
    return frozenset(t for f in Path(find_config_dir()).rglob("*.yaml") for t in found.findall(f.read_text()))


# Where the `_target_`s of configs written by sft-cli before the task folders (up to main 0ea1499) live now: a
# checkpoint holds its run's resolved config, with the paths of the version that wrote it. Add a line here
# whenever a module that a shipped config names moves (tests/test_layout.py imports every new path).
MOVED = {
    "sft_cli.adapters.LoRA": "sft_cli.models.adapters.LoRA",
    "sft_cli.causal_lm.CausalLMTask": "sft_cli.tasks.causal_lm.task.CausalLMTask",
    "sft_cli.chat_data.chat_files": "sft_cli.tasks.causal_lm.chats.chat_files",
    "sft_cli.classification.Classification": "sft_cli.tasks.classification.task.Classification",
    "sft_cli.data.image_folder": "sft_cli.tasks.classification.images.image_folder",
    "sft_cli.data.sklearn_digits": "sft_cli.tasks.classification.images.sklearn_digits",
    "sft_cli.data.torchvision_dataset": "sft_cli.tasks.classification.images.torchvision_dataset",
    "sft_cli.freeze.Gradual": "sft_cli.models.freeze.Gradual",
    "sft_cli.freeze.HeadOnly": "sft_cli.models.freeze.HeadOnly",
    "sft_cli.freeze.Lower": "sft_cli.models.freeze.Lower",
    "sft_cli.freeze.NoFreeze": "sft_cli.models.freeze.NoFreeze",
    "sft_cli.loggers.MLflow": "sft_cli.results.loggers.MLflow",
    "sft_cli.loggers.TensorBoard": "sft_cli.results.loggers.TensorBoard",
    "sft_cli.loss.CrossEntropy": "sft_cli.tasks.classification.loss.CrossEntropy",
    "sft_cli.loss.L2SP": "sft_cli.training.l2sp.L2SP",
    "sft_cli.loss.TokenCrossEntropy": "sft_cli.tasks.causal_lm.loss.TokenCrossEntropy",
    "sft_cli.models.hf_causal_lm": "sft_cli.models.hf.hf_causal_lm",
    "sft_cli.models.hf_classifier": "sft_cli.models.hf.hf_classifier",
    "sft_cli.models.torchvision_classifier": "sft_cli.models.vision.torchvision_classifier",
    "sft_cli.optim.constant": "sft_cli.training.optim.constant",
    "sft_cli.optim.cosine": "sft_cli.training.optim.cosine",
    "sft_cli.optim.linear": "sft_cli.training.optim.linear",
    "sft_cli.optim.onecycle": "sft_cli.training.optim.onecycle",
    "sft_cli.optim.plateau": "sft_cli.training.optim.plateau",
    "sft_cli.optim.step": "sft_cli.training.optim.step",
    "sft_cli.text_data.hub_dataset": "sft_cli.tasks.classification.texts.hub_dataset",
    "sft_cli.text_data.text_files": "sft_cli.tasks.classification.texts.text_files",
}


def upgrade_targets(cfg: DictConfig) -> DictConfig:
    """cfg with every `_target_` that MOVED lists (at any depth) rewritten to its new path."""
    def upgraded(node):
        if isinstance(node, dict):
            return {k: MOVED.get(v, v) if k == "_target_" and isinstance(v, str) else upgraded(v)
                    for k, v in node.items()}
        return [upgraded(v) for v in node] if isinstance(node, list) else node

    return OmegaConf.create(upgraded(OmegaConf.to_container(cfg)))


def load_meta(ckpt: Path) -> dict:
    return _read(ckpt, META_FILE, lambda p: json.loads(p.read_text()))


def load_state(ckpt: Path) -> dict:
    import torch

    def read(path: Path) -> dict:
        with warnings.catch_warnings():  # torch's notes on a foreign file's pickle protocol: the error says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)

    return _read(ckpt, STATE_FILE, read)


def load_weights(ckpt: Path, model: nn.Module) -> None:
    """Load model.safetensors (or a sharded checkpoint's shards/) into `model`; a different architecture is an
    error naming the keys. Collective under FSDP: every process calls it."""
    from safetensors.torch import load_file

    from sft_cli.models import adapters
    from sft_cli.training import shards

    try:
        trained = load_config(ckpt).get("adapter")
    except SFTError:  # no readable config.yaml: the weights' own checks below still speak for them
        trained = model.sft.adapter.settings if model.sft.adapter else None
    if problem := adapters.mismatch(trained, model, ckpt):  # resume= with another adapter.r, or adapter=none
        raise SFTError(problem)
    if shards.has_shards(ckpt):  # trainer.strategy=fsdp: read into this process's shards, or whole in one process
        weights = shards.load_weights(ckpt, model)
    else:
        weights = _read(ckpt, MODEL_FILE, lambda p: load_file(p))
    if model.sft.adapter:
        return adapters.load_adapter_weights(model, weights, ckpt / MODEL_FILE)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise SFTError(f"the weights in {ckpt / MODEL_FILE} do not fit the configured model "
                       f"{type(model).__name__} (a different model.name, small_input_stem or class count?):\n"
                       f"{str(e)[:800]}") from e


def copy_history(ckpt: Path, run_dir: Path, epoch: int, step: int) -> None:
    """Start a resumed run's folder with the source run's history up to the checkpoint: its checkpoint (as
    last, and the source's best as best, when it has one) and its metrics records. The source is only read."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    source_best = ckpt.resolve().parent / "best"
    for tag, src in (("last", ckpt.resolve()), ("best", source_best.resolve() if source_best.exists() else None)):
        if src is None:
            continue  # killed before its first validation: the resumed run's first one makes `best`
        if not (folder / src.name).exists():
            shutil.copytree(src, folder / src.name)
        (folder / tag).symlink_to(src.name, target_is_directory=True)
    source_run = ckpt.resolve().parent.parent
    if (source_run / "metrics.jsonl").is_file():
        kept = []
        for number, line in enumerate((source_run / "metrics.jsonl").read_text().splitlines(), 1):
            try:
                record = json.loads(line) if line else None
            except json.JSONDecodeError:  # the line a kill cut short
                log.warning(f"{source_run / 'metrics.jsonl'}:{number} is cut short (the run was killed while "
                            "writing it): the resumed run's history leaves it out")
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    lines = (source_run / "metrics.csv").read_text().splitlines() if (source_run / "metrics.csv").is_file() else []
    if lines:  # empty when the run was killed before its first row was flushed
        kept = [row for row in lines[1:] if row and int(row.split(",")[0]) <= epoch]
        (run_dir / "metrics.csv").write_text("\n".join([lines[0], *kept]) + "\n")


