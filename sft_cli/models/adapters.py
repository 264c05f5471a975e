"""LoRA adapters through Hugging Face peft (configs/adapter/lora.yaml; the peft extra).

adapter=lora freezes the base model's weights and adds trainable low-rank matrices beside its Linear (and, for
torchvision models, Conv) layers; the layers made from scratch (a classifier's head, a new stem) train in full
and are saved with the adapter (peft's modules_to_save). peft injects its layers in place, so the model keeps
its module names, stages and forward; `model.sft.adapter` names what may train, and freeze policies still
decide, stage by stage, whether it does. A checkpoint then holds only those tensors and names its base model
(base_record / check_base), which sft-eval, sft-predict and sft-export load again.
"""

import hashlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from sft_cli.errors import SFTError
from sft_cli.extras import install_command
from sft_cli.models.parts import Adapter

log = logging.getLogger(__name__)
# layers peft can adapt; transformers' GPT-2 style Conv1D is matched by name (transformers may be absent)
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class LoRA:
    """configs/adapter/lora.yaml: the rank, scale (alpha / r), dropout, which layers, and biases."""

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: every adaptable layer but the new head(s) and the LM head
    bias: str = "none"                        # none, all, lora_only: which biases train too
    modules_to_save: list[str] = field(default_factory=list)  # more modules trained in full and saved

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise SFTError(f"adapter.r={self.r!r} must be a whole number >= 1 (e.g. adapter.r=16)")
        if self.bias not in ("none", "all", "lora_only"):
            raise SFTError(f"adapter.bias={self.bias!r} must be one of none, all, lora_only")
        if not 0 <= self.dropout < 1:
            raise SFTError(f"adapter.dropout={self.dropout} must be in [0, 1)")
        # the update is scaled by alpha / r: alpha=0 trains adapters that change nothing, a negative one reverses them
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise SFTError(f"adapter.alpha={self.alpha!r} must be a number > 0: the adapter's update is scaled by "
                           "alpha / r, so alpha=0 changes nothing. The usual choice is twice the rank: adapter.alpha=32 "
                           "with adapter.r=16")


def apply(model: nn.Module, lora: "LoRA | None") -> nn.Module:
    """Inject the adapter built from configs/adapter/ into `model` in place (nothing for adapter=none) and
    record what may train, the base it needs and the peft model that wraps it (for export: save_pretrained,
    merge_and_unload) in model.sft.adapter."""
    if lora is None:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise SFTError(f"adapter=lora needs Hugging Face peft, which could not be imported ({e}): "
                       f"{install_command('peft')}") from e

    root, prefix = _root(model)
    in_full, by_hand = _in_full(model, root, prefix, lora.modules_to_save)
    targets = _targets(root, lora.target_modules, exclude=in_full + by_hand + _output_layers(root))
    settings = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          bias=lora.bias, modules_to_save=in_full or None)
    with warnings.catch_warnings():  # transformers' deprecation notes about what peft calls
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(root, settings)
    for name in by_hand:
        root.get_submodule(name).requires_grad_(True)
    model.sft.adapter = Adapter(  # peft_model is no submodule: it holds `root`, which `model` already holds
        peft=peft_model, in_full=[prefix + name for name in by_hand],
        trainable={n for n, p in model.named_parameters() if p.requires_grad},  # after by_hand's
        base_record=base_record(model), settings=asdict(lora))
    kinds = sorted({t.rsplit(".", 1)[-1] for t in targets})
    log.info(f"adapter: LoRA r={lora.r} alpha={lora.alpha} on {len(targets)} layers ({', '.join(kinds[:8])}"
             f"{', ...' if len(kinds) > 8 else ''})"
             + (f"; trained in full and saved with it: {in_full + by_hand}" if in_full + by_hand else ""))
    return model


def _root(model: nn.Module) -> tuple[nn.Module, str]:
    """What peft wraps: a transformers model held by our wrapper (TextClassifier, CausalLM) as .model, or a
    torchvision model itself; and its name prefix inside `model`."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "config"):
        return inner, "model."
    return model, ""


def _in_full(model: nn.Module, root: nn.Module, prefix: str, extra: list[str] | str) -> tuple[list, list]:
    """The modules trained in full and saved with the adapter: those the builder made from scratch (a new
    head, a new stem) and adapter.modules_to_save. peft finds its modules_to_save by how their names end, so
    those go to peft only where the name picks exactly the module meant (`fc` does); a new module it cannot
    pick apart (a new stem's `conv1`, which would also pick every block's conv1) trains in full beside peft
    (the second list). A name in adapter.modules_to_save must pick exactly the modules meant."""
    new = [m[len(prefix):] for name, members in model.sft.stages if name in model.sft.new_stages
           for m in members if m.startswith(prefix)]
    extra = [extra] if isinstance(extra, str) else list(extra)
    names = [n for n, _ in root.named_modules() if n]
    by_hand = [m for m in new if [n for n in names if n.endswith(m)] != [m]]
    for wanted in extra:
        meant = [n for n in names if n == wanted or n.endswith("." + wanted)]
        picked = [n for n in names if n.endswith(wanted)]
        if not meant or picked != meant:
            raise SFTError(f"adapter.modules_to_save names {wanted!r}, which "
                           + (f"peft would match in {len(picked)} modules ({', '.join(picked[:3])}, ...): give a "
                              "longer name, e.g. its full path" if meant else "matches no module of the model")
                           + f". Modules: {', '.join(n for n in names if '.' not in n)}, ...")
    return [m for m in new if m not in by_hand] + extra, by_hand


def _output_layers(root: nn.Module) -> list[str]:
    """A language model's output projection (lm_head): adapting it is rarely wanted and it may be tied."""
    get = getattr(root, "get_output_embeddings", None)
    out = get() if get is not None else None
    return [n for n, m in root.named_modules() if out is not None and m is out]


def _targets(root: nn.Module, wanted: list[str] | None, exclude: list[str]) -> list[str]:
    """Full names of the adaptable layers that `wanted` names (a layer's name, a suffix such as q_proj, or a
    module holding layers such as layer4 or encoder.layer.11); every adaptable layer when None."""
    attention = {n for n, m in root.named_modules() if isinstance(m, nn.MultiheadAttention)}
    layers = [n for n, m in root.named_modules()
              if n and (isinstance(m, ADAPTABLE) or type(m).__name__ == "Conv1D")
              and not any(n == e or n.startswith(e + ".") for e in exclude)
              # peft cannot adapt (or merge) grouped and depthwise convolutions; nn.MultiheadAttention never
              # calls its out_proj's forward, so an adapter there would not act
              and getattr(m, "groups", 1) == 1 and n.rpartition(".")[0] not in attention]
    if wanted is None:
        if not layers:
            raise SFTError(f"adapter=lora: {type(root).__name__} has no Linear or Conv layer to adapt")
        return layers
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    if not wanted:
        raise SFTError("adapter.target_modules=[] names no layer: name some, or null for every Linear/Conv layer")
    chosen = [n for n in layers if any(_names(n, w) for w in wanted)]
    unmatched = [w for w in wanted if not any(_names(n, w) for n in layers)]
    if unmatched:
        examples = ", ".join(sorted({n.split(".")[-1] for n in layers})[:12])
        holders = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in layers if "." in n)) or ["(none)"]
        raise SFTError(f"adapter.target_modules names {unmatched}, which match no Linear or Conv layer of "
                       f"{type(root).__name__} that LoRA can adapt (not a new head, which trains in full, nor "
                       "lm_head, grouped convolutions or attention inside nn.MultiheadAttention). Name layers "
                       f"(e.g. {examples}) or the modules holding them (e.g. {', '.join(holders[:4])}).")
    return chosen


def _names(layer: str, wanted: str) -> bool:
    """Whether `wanted`'s dotted parts occur in a row in the layer's name: q_proj, layer4, encoder.layer.11."""
    parts, want = layer.split("."), wanted.strip(".").split(".")
    return any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1))


def adapter_weights(model: nn.Module) -> dict:
    """The tensors an adapter checkpoint holds: what may train (LoRA matrices, new heads, biases per
    adapter.bias) and the buffers of the modules trained in full (a new BatchNorm's statistics)."""
    trainable, by_hand = model.sft.adapter.trainable, tuple(m + "." for m in model.sft.adapter.in_full)
    return {k: v for k, v in model.state_dict().items()
            if k in trainable or ".modules_to_save." in k or k.startswith(by_hand)}


# What an adapter's tensors, or what they do, depend on (adapter.dropout acts in training only: it may change)
SHAPING = ("r", "alpha", "target_modules", "bias", "modules_to_save")


def mismatch(trained: DictConfig | None, model: nn.Module, ckpt: Path) -> str | None:
    """Why the adapter `model` carries differs from the one the checkpoint `ckpt` was trained with (`trained`:
    its config.yaml's adapter node, empty for adapter=none), naming the keys; None when they match."""
    given = OmegaConf.to_container(trained) if isinstance(trained, DictConfig) else dict(trained or {})
    given.pop("_target_", None)
    before = {**asdict(LoRA()), **given} if given else {}
    now = model.sft.adapter.settings if model.sft.adapter else {}
    if not before and not now or before and now and all(before[k] == now[k] for k in SHAPING):
        return None

    def lora(settings: dict, keys=None) -> str:  # the values that differ from configs/adapter/lora.yaml's (and r)
        keys = keys or [k for k in SHAPING if k == "r" or settings[k] != getattr(LoRA(), k)]
        return "adapter=lora " + " ".join(f"adapter.{k}={_value(settings[k])}" for k in keys)

    if before and now:
        keys = [k for k in SHAPING if before[k] != now[k]]
        trained_with, configured = lora(before, keys), " ".join(f"adapter.{k}={_value(now[k])}" for k in keys)
    else:
        trained_with = lora(before) if before else "adapter=none"
        configured = lora(now) if now else "adapter=none"
    return (f"{ckpt} does not match the configured adapter: it was trained with {trained_with}, and the config now "
            f"has {configured}. A checkpoint continues (resume=) and loads (sft-eval, sft-predict, sft-export) only "
            f"with the adapter it was trained with: give {trained_with} (its config.yaml), or start a new run "
            "without resume=.")


def _value(value) -> str:
    return "null" if value is None else f"'[{','.join(value)}]'" if isinstance(value, list) else str(value)


def load_adapter_weights(model: nn.Module, weights: dict, source: Path) -> None:
    """Load an adapter checkpoint's tensors into a model with the same adapter on its base weights."""
    expected = set(adapter_weights(model))
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise SFTError(f"the adapter in {source} does not fit the configured model and adapter (missing "
                       f"{missing[:5]}, unexpected {unexpected[:5]}): load it with the adapter settings it was "
                       "trained with (the checkpoint's config.yaml).")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # the same names with other shapes: another adapter.r
        raise SFTError(f"the adapter in {source} does not fit the configured adapter ({str(e)[:300]}): load it "
                       "with the adapter settings it was trained with, e.g. its adapter.r (the checkpoint's "
                       "config.yaml).") from e


# ---------------------------------------------------------------------------------------------- the base model


def base_record(model: nn.Module) -> dict:
    """Which base model an adapter needs: its source (a folder, a file, a hub name) and a fingerprint of its
    weights files where they are on disk. Builders say where their weights came from in model.sft.base."""
    base = model.sft.base or {}
    files = [Path(f) for f in base.get("files", [])]
    return {"source": base.get("source"), "fingerprint": fingerprint(files) if files else None,
            "whole_up_to": WHOLE_UP_TO}


def check_base(recorded: dict, model: nn.Module, ckpt: Path, key: str) -> None:
    """An error unless `model`'s base weights are the ones the adapter in `ckpt` was trained on."""
    now = model.sft.adapter.base_record
    if "whole_up_to" not in recorded and now["fingerprint"]:  # recorded before small files were hashed whole
        files = [Path(f) for f in (model.sft.base or {}).get("files", [])]
        now = {**now, "fingerprint": fingerprint(files, whole_up_to=0)}
    if recorded.get("fingerprint") and now["fingerprint"] and recorded["fingerprint"] != now["fingerprint"]:
        raise SFTError(f"{ckpt} holds a LoRA adapter trained on the base model {recorded.get('source')}, but the base "
                       f"loaded now ({now['source']}) has different weights (fingerprint {now['fingerprint']}, "
                       f"expected {recorded['fingerprint']}). An adapter on another base gives garbage: point "
                       f"{key} at the original base model.")


def base_key(model: DictConfig) -> str:
    """The config key that names the base: model.name_or_path (transformers) or model.weights (torchvision)."""
    return "model.name_or_path" if "name_or_path" in model else "model.weights"


def missing_base(recorded: dict, ckpt: Path, key: str) -> str:
    return (f"{ckpt} holds a LoRA adapter, which needs its base model {recorded.get('source')}, and that could not "
            f"be loaded. Put the base model back there, or pass {key}=<a copy of it> (its weights are checked "
            f"against fingerprint {recorded.get('fingerprint')}).")


# Weights files up to this size are hashed whole, so any changed byte is seen (about a second a GiB); a larger
# one is sampled, which any re-training or re-quantization of a model still changes everywhere.
WHOLE_UP_TO = 2 << 30


def fingerprint(files: list[Path], whole_up_to: int = WHOLE_UP_TO, chunks: int = 32, size: int = 1 << 16) -> str:
    """A sha256 over each file's name, size and contents: a file up to `whole_up_to` bytes whole; a larger one
    by its first and last MiB and `chunks` slices spread through it (a 15 GB model is read in milliseconds)."""
    digest = hashlib.sha256()
    for path in sorted(files):
        length = path.stat().st_size
        digest.update(json.dumps([path.name, length]).encode())
        with open(path, "rb") as f:
            if length <= whole_up_to:
                while block := f.read(1 << 24):
                    digest.update(block)
                continue
            for offset in [0, max(0, length - (1 << 20))] + [length * k // chunks for k in range(chunks)]:
                f.seek(offset)
                digest.update(f.read(1 << 20 if offset in (0, max(0, length - (1 << 20))) else size))
    return digest.hexdigest()[:16]


def weights_files(folder: Path) -> list[Path]:
    """A transformers folder's weights files (safetensors, or .bin when it has none)."""
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(folder.glob("*.bin"))
