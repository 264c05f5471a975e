"""Classifiers from library factories (torchvision, transformers) with a head for your classes."""

from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn
from torchvision import models

from sft_cli.errors import SFTError, not_one_of
from sft_cli.freeze import stage_names


def head_name(model: nn.Module) -> str:
    """The classification head: the last nn.Linear in registration order (fc, classifier.3, heads.head, ...)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise SFTError(f"{type(model).__name__} has no nn.Linear layer to use as the classification head")
    return names[-1]


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

    The returned model carries `sft_stages`, the stages freeze policies act on (see freeze.stage_names),
    and `sft_new_stages`, those made here from scratch (the head, a small-input stem): never frozen.
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
    model.sft_stages = stage_names(model, stem, expand)
    model.sft_new_stages = [name for name, members in model.sft_stages if set(members) <= created]
    if weights:  # where the base weights came from, which an adapter checkpoint needs (adapters.base_record)
        file = Path(weights) if is_file else Path(torch.hub.get_dir()) / "checkpoints" / \
            Path(models.get_model_weights(name)[weights].url).name
        model.sft_base = {"source": str(file.absolute()), "files": [file] if file.is_file() else []}
    return model


class TextClassifier(nn.Module):
    """A transformers sequence classifier called as the recipe calls every model: logits = model(inputs),
    with `inputs` the batch dict of token tensors. Keeps its tokenizer so checkpoints can carry it."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.model(**inputs).logits

    def save_extras(self, folder: Path) -> None:
        """The transformers config and tokenizer, so a checkpoint rebuilds without the original source."""
        self.model.config.save_pretrained(folder / "hf")
        self.tokenizer.save_pretrained(folder / "hf")


def hf_classifier(name_or_path: str, classes: list[str], weights: str | None = "pretrained") -> TextClassifier:
    """Any AutoModelForSequenceClassification by hub name or local folder, with num_labels, id2label and
    label2id set from the data. weights=null keeps the architecture and initialises it randomly.

    Stages for freezing: the embeddings (stem), each encoder layer, then what sits above (pooler, head)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report and progress bars; new layers are listed by sft-train
    hf_logging.disable_progress_bar()
    labels = {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
              "label2id": {c: i for i, c in enumerate(classes)}}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **labels)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if weights:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, config=config, ignore_mismatched_sizes=True, output_loading_info=True)
            created = set(info["missing_keys"]) | {k for k, *_ in info.get("mismatched_keys", [])}
        else:
            model = AutoModelForSequenceClassification.from_config(config)
            created = {n for n, _ in model.named_parameters()}
    except (OSError, ValueError) as e:
        raise SFTError(f"model.name_or_path={name_or_path} could not be loaded ({type(e).__name__}: {str(e)[:300]}). "
                       "Give a local folder saved with save_pretrained(), or run once with network access so the "
                       "hub files are cached.") from e
    model.float()  # transformers keeps a checkpoint's stored dtype (bf16, fp16): train in fp32, autocast on top
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # GPT-2 style: pad with end-of-sequence
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    wrapper = TextClassifier(model, tokenizer)
    _set_transformer_stages(wrapper, {f"model.{n}" for n in created})
    wrapper.sft_base = _base(name_or_path) if weights else None
    return wrapper


def _base(name_or_path: str) -> dict:
    """model.sft_base of a transformers model: its folder (or hub name) and weights files, where on disk."""
    from sft_cli.adapters import weights_files

    folder = Path(name_or_path)
    if not folder.is_dir():
        try:  # a hub name: the cached download, if there is one
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:
            return {"source": name_or_path, "files": []}
    return {"source": str(folder.absolute()) if Path(name_or_path).is_dir() else name_or_path,
            "files": weights_files(folder)}


def _set_transformer_stages(wrapper: nn.Module, created: set[str]) -> None:
    """Stages of a transformers model held as wrapper.model: the input embeddings (stem), each block of its
    largest ModuleList (encoder or decoder layers), then what sits above (pooler, final norm, head), which
    is depth 0 for layer-wise lr decay. Stages whose parameters are all in `created` (made from scratch
    here, not loaded) are new: they always train."""
    model = wrapper.model
    base = model.base_model_prefix
    blocks = max((n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.startswith(base)),
                 key=lambda n: sum(p.numel() for p in model.get_submodule(n).parameters()))
    parts = blocks.split(".")
    expand = ["model"] + [f"model.{'.'.join(parts[:i])}" for i in range(1, len(parts) + 1)]
    embeddings = model.get_input_embeddings()
    stem = [f"model.{n}" for n, m in model.named_modules() if m is embeddings][:1]
    if hasattr(model.base_model, "embeddings"):  # BERT-style: word, position and type embeddings together
        stem = [f"model.{base}.embeddings"]
    wrapper.sft_stages = stage_names(wrapper, stem, expand)
    last_block = max(i for i, (name, _) in enumerate(wrapper.sft_stages) if name.startswith(f"model.{blocks}."))
    wrapper.sft_top_stages = [name for name, _ in wrapper.sft_stages[last_block + 1:]]  # lr-decay depth 0
    params = [n for n, _ in wrapper.named_parameters()]

    def is_new(members: list[str]) -> bool:  # a tied lm_head owns no parameter of its own: not new
        own = [n for n in params if any(n == m or n.startswith(m + ".") for m in members)]
        return bool(own) and all(n in created for n in own)

    wrapper.sft_new_stages = [name for name, members in wrapper.sft_stages if is_new(members)]


class CausalLM(nn.Module):
    """A transformers causal LM called as the recipe calls every model: logits = model(inputs), with `inputs`
    the batch dict (input_ids, attention_mask). Keeps its tokenizer (and chat template) for checkpoints and
    generation."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.model(**inputs, use_cache=False).logits

    def save_extras(self, folder: Path) -> None:
        """The transformers config, generation config and tokenizer (with its chat template) in folder/hf."""
        self.model.config.save_pretrained(folder / "hf")
        self.model.generation_config.save_pretrained(folder / "hf")
        self.tokenizer.save_pretrained(folder / "hf")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_dtype(dtype: str, precision: str = "32", device: str = "cpu") -> torch.dtype:
    """model.dtype as a torch dtype. `auto` follows trainer.precision: bfloat16 weights (and optimizer state:
    half the memory) when training will run in bf16 on a CUDA GPU that has it natively, float32 elsewhere
    (CPUs, older GPUs, fp16 with its grad scaler, which needs float32 weights)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise SFTError(not_one_of("model.dtype", dtype, ["auto", *DTYPES]))
        return DTYPES[dtype]
    on_gpu = str(device) in ("auto", "cuda") or str(device).startswith("cuda:")
    bf16 = precision in ("auto", "bf16-mixed") and on_gpu and torch.cuda.is_available() and \
        torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if bf16 else torch.float32


def hf_causal_lm(name_or_path: str, weights: str | None = "pretrained", gradient_checkpointing: bool = False,
                 dtype: str = "auto", precision: str = "32", device: str = "cpu") -> CausalLM:
    """Any AutoModelForCausalLM (Llama, Qwen, SmolLM, GPT-2, ...) by hub name or local folder, with its
    tokenizer. weights=null keeps the architecture and initialises it randomly (a checkpoint is loaded next).
    Stages for freezing: the input embeddings (stem), each decoder layer, then the final norm and lm_head."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_dtype = weight_dtype(dtype, precision, device)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path), dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise SFTError(f"model.name_or_path={name_or_path} could not be loaded as a causal LM ({type(e).__name__}: "
                       f"{str(e)[:300]}). Give a local folder saved with save_pretrained(), or run once with "
                       "network access so the hub files are cached.") from e
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # most causal LMs: pad with end-of-sequence
        tokenizer.pad_token = tokenizer.eos_token
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()  # recompute activations in backward: less memory, ~30% slower
    wrapper = CausalLM(model, tokenizer)
    _set_transformer_stages(wrapper, set() if weights else {f"model.{n}" for n, _ in model.named_parameters()})
    wrapper.sft_base = _base(name_or_path) if weights else None
    return wrapper
