"""Classifiers from library factories (torchvision, transformers) with a head for your classes."""

from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn
from torchvision import models

from sft_cli.errors import SFTError, not_one_of
from sft_cli.models.parts import Parts
from sft_cli.models.stages import head_name, stage_names


def _load_weights_file(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise SFTError(f"model.weights={path} does not exist: give a torchvision weight name "
                       "(e.g. IMAGENET1K_V1), a local .pth/.safetensors file, or null for random init.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:  # corrupt file, pickled objects, or another architecture's keys
        raise SFTError(f"model.weights={path} could not be loaded into {type(model).__name__}: {e}") from e


def _pretrained(name: str, weights: str) -> nn.Module:
    try:
        enum = models.get_model_weights(name)[weights]
    except KeyError:
        raise SFTError(not_one_of("model.weights", weights, [w.name for w in models.get_model_weights(name)]
                                  + ["DEFAULT", "<path to a .pth/.safetensors file>", "null"])) from None
    try:
        return models.get_model(name, weights=enum)
    except (URLError, OSError, RuntimeError) as e:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
        raise SFTError(f"could not get the {enum} weights ({type(e).__name__}: {e}). Download {enum.url} and "
                       f"put it at {cache} (the torch hub cache, moved by $TORCH_HOME), pass a local file with "
                       "model.weights=/path/to/file.pth, or train from scratch with model.weights=null.") from e


def torchvision_classifier(name: str, classes: list[str], weights: str | None = None, small_input_stem: bool = False,
                           stem: list[str] = (), expand: list[str] = ()) -> nn.Module:
    """Any classification model in torchvision.models by name, pretrained or not, with a new head.

    The returned model carries `sft` (models.parts.Parts): its stages, for freeze policies (see
    stages.stage_names), those made here from scratch (the head, a small-input stem: never frozen), and
    where its pretrained weights came from.
    """
    available = models.list_models(module=models)
    if name not in available:
        raise SFTError(not_one_of("model.name", name, available))
    is_file = weights is not None and (Path(weights).suffix in (".pth", ".pt", ".safetensors") or "/" in weights)
    model = _pretrained(name, weights) if weights and not is_file else models.get_model(name, weights=None)
    if is_file:
        _load_weights_file(model, Path(weights))
    head = head_name(model)
    old = model.get_submodule(head)
    model.set_submodule(head, nn.Linear(old.in_features, len(classes)))
    created = {head}
    if small_input_stem:
        if not all(hasattr(model, m) for m in ("conv1", "bn1", "maxpool")):
            raise SFTError(f"model.small_input_stem=true needs a ResNet-style model (conv1, bn1, maxpool); {name} "
                           "has none. Upsample instead: dataset.transforms.image_size=224")
        # 3x3 stride 1 and no max-pool keep a 32x32 input at 32x32 in layer1 (the standard CIFAR ResNet stem).
        # bn1 starts afresh too: its pretrained statistics describe the old 7x7 convolution's outputs.
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.bn1 = nn.BatchNorm2d(model.conv1.out_channels)
        model.maxpool = nn.Identity()
        created |= {"conv1", "bn1"}
    stages = stage_names(model, stem, expand)
    model.sft = Parts(stages, new_stages=[name for name, members in stages if set(members) <= created])
    if weights:  # where the base weights came from, which an adapter checkpoint needs (adapters.base_record)
        file = Path(weights) if is_file else Path(torch.hub.get_dir()) / "checkpoints" / \
            Path(models.get_model_weights(name)[weights].url).name
        model.sft.base = {"source": str(file.absolute()), "files": [file] if file.is_file() else []}
    return model


