"""sft-export: a checkpoint as files other tools load. A transformers model becomes a save_pretrained() folder
(model, tokenizer, chat template) that plain `transformers` loads; a LoRA adapter is merged into its base first
(merge=true), or written as the peft adapter folder that `PeftModel.from_pretrained(base, folder)` loads
(merge=false). A torchvision model with an adapter becomes its merged state dict (model.safetensors)."""

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError

from sft_cli import disk
from sft_cli.errors import SFTError
from sft_cli.training import checkpoint, restore

log = logging.getLogger("sft_cli.export")


def export(cfg: DictConfig) -> Path:
    """Write the checkpoint cfg.checkpoint to the new or empty folder cfg.output; return it."""
    out = Path(cfg.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else "exists and is not empty"
        raise SFTError(f"output={out} {what}: output must be a new or empty folder (nothing is overwritten)")
    ckpt = checkpoint.resolve(cfg.checkpoint)
    run = ckpt.resolve().parent.parent  # a checkpoint's own folders, and its run's, are never written into
    if out.resolve() == run or run in out.resolve().parents:
        raise SFTError(f"output={out} lies inside the run folder of the checkpoint ({run}): choose a folder outside "
                       "it (e.g. output=exported/), so the run's checkpoints stay as they were written.")
    adapter, merge = bool(cfg.get("adapter")), cfg.get("merge", True)
    if not adapter and not (ckpt / "hf").is_dir():
        raise SFTError(f"{ckpt} holds a torchvision model: its weights are already a plain safetensors file, "
                       f"{ckpt / checkpoint.MODEL_FILE}; sft-export is for transformers models and adapters.")
    if not adapter and not merge:
        raise SFTError(f"merge=false writes a LoRA adapter folder, and {ckpt} holds no adapter (it was trained with "
                       "adapter=none): leave merge at its default, true.")
    if adapter and merge and "dtype" in cfg.model:
        cfg.model.dtype = "float32"  # a LoRA update merged into bf16 weights would be rounded away
    _, model = restore.load_model(cfg, ckpt, torch.device("cpu"))
    existed = out.exists()  # an empty folder: kept if the export fails, a new one removed
    try:
        return _readable(_write(cfg, ckpt, model, out, adapter, merge))
    except (OSError, SafetensorError) as e:  # a full disk, a folder that refuses files
        _remove_partial(out, existed)
        raise SFTError(f"the export to {disk.write_failed(out, e)} What was written is removed; the checkpoint is "
                       "untouched.") from e


def _remove_partial(out: Path, keep_folder: bool) -> None:
    """What a failed export wrote; the disk that failed it may refuse this too, and the error to report is the
    first."""
    with contextlib.suppress(OSError):
        if not keep_folder:
            shutil.rmtree(out, ignore_errors=True)
            return
        for path in out.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _write(cfg: DictConfig, ckpt: Path, model, out: Path, adapter: bool, merge: bool) -> Path:
    tokenizer = model.sft.tokenizer
    if adapter and not merge:
        if model.sft.adapter.in_full:
            raise SFTError(f"{ckpt} also trained newly made {model.sft.adapter.in_full} in full, which a peft adapter folder "
                           "cannot hold: export it merged (merge=true).")
        model.sft.adapter.peft.save_pretrained(out)  # adapter_config.json, adapter_model.safetensors (and a new head)
        _save_tokenizer(tokenizer, out)
        log.info(f"exported the LoRA adapter to {out}: peft's PeftModel.from_pretrained(<base model>, '{out}') "
                 f"loads it onto its base, {model.sft.adapter.base_record['source']}")
        return out
    merged = model.sft.adapter.peft.merge_and_unload() if adapter else model.model
    if tokenizer is None:  # torchvision: the merged model's state dict, which torchvision's model of `name` loads
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        classes = checkpoint.load_meta(ckpt).get("classes")
        save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, out / checkpoint.MODEL_FILE,
                  metadata={"format": "pt", "classes": json.dumps(classes)})
        stem = " with its 3x3 stride-1 conv1 and no maxpool (small_input_stem)" \
            if cfg.model.get("small_input_stem") else ""
        log.info(f"exported the merged weights to {out / checkpoint.MODEL_FILE}: torchvision.models.get_model("
                 f"'{cfg.model.name}', num_classes={len(classes)}){stem} loads them with load_state_dict")
        return out
    merged.save_pretrained(out)
    _save_tokenizer(tokenizer, out)
    # BertForTokenClassification -> AutoModelForTokenClassification: the Auto class that loads any task's model
    architecture = (merged.config.architectures or ["ModelForSequenceClassification"])[0]
    auto = "AutoModelFor" + architecture.rpartition("For")[2]
    log.info(f"exported {'the base model with its adapter merged ' if adapter else ''}to {out}: transformers' "
             f"{auto}.from_pretrained('{out}') loads it")
    return out


def _readable(out: Path) -> Path:
    """Give every exported file the mode a new file gets here (0644 under the usual umask): safetensors writes
    its weights through a private temporary file (0600), which other users, or a server, could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (p for p in out.rglob("*") if p.is_file()):
        path.chmod(0o666 & ~umask)
    return out


def _save_tokenizer(tokenizer, out: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
