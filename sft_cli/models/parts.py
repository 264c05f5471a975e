"""What the loop knows of a model beyond its forward: one typed object that every model builder sets as
`model.sft`, and that freeze policies, optim (layer-wise lr), L2-SP, adapters and checkpoints read."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from sft_cli.errors import SFTError


@dataclass
class Adapter:
    """Set by adapters.apply (adapter=lora): what may train at all, and the base the adapter needs."""

    peft: object                   # the peft model wrapping the base (export: save_pretrained, merge_and_unload)
    trainable: set[str]            # parameter names that may train (LoRA matrices, new heads, biases per bias=)
    in_full: list[str]             # new modules peft cannot pick by name, trained in full beside it
    base_record: dict              # {"source", "fingerprint"} of the base weights (adapters.base_record)
    settings: dict = field(default_factory=dict)  # the LoRA settings it was made with (adapters.mismatch)


@dataclass
class Parts:
    """A model's stages (bottom to top; every trainable parameter in exactly one), those its builder made from
    scratch (a new head or stem: never frozen, never pulled towards pretrained values), the stages at depth 0
    of layer-wise lr decay, where its pretrained weights came from, its tokenizer, and what rebuilds it without its source."""

    stages: list[tuple[str, list[str]]]
    new_stages: list[str]
    top_stages: list[str] | None = None        # None: the last stage
    base: dict | None = None                   # {"source": folder, file or hub name, "files": [weights files]}
    tokenizer: object | None = None            # a transformers model's tokenizer (None: the model reads images)
    save_extras: Callable[[Path], None] | None = None  # writes dir/hf: a transformers config and tokenizer
    adapter: Adapter | None = field(default=None)

    @property
    def trainable(self) -> set[str] | None:
        """The parameter names that may train at all (an adapter's), or None: every parameter may."""
        return self.adapter.trainable if self.adapter else None

    @property
    def depth_zero(self) -> list[str]:
        return self.top_stages if self.top_stages is not None else [self.stages[-1][0]]


def require(model: nn.Module, builder: str) -> nn.Module:
    """model, if its builder gave it its Parts; else an error saying what a builder must set."""
    if not isinstance(getattr(model, "sft", None), Parts):
        raise SFTError(f"model <{builder}> returned a {type(model).__name__} without `sft`, the "
                       "sft_cli.models.parts.Parts that says its stages and new layers: set model.sft = Parts(...) "
                       "in the builder (see sft_cli/models/vision.py).")
    return model
