"""Transformers models as the loop calls every model: logits = model(batch dict). Sequence classifiers with a head
for the data's classes, causal LMs; each keeps its tokenizer, and its stages for freezing."""

from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from sft_cli.errors import SFTError, not_one_of
from sft_cli.models.parts import Parts
from sft_cli.models.stages import stage_names


LOAD_ERRORS = (OSError, ValueError, SafetensorError)  # what from_pretrained raises for a model it cannot load


def load_failed(name_or_path: str, what: str, error: Exception) -> SFTError:
    """The error for a transformers model that from_pretrained could not load: an incomplete weights file is
    named as such (a cut download or copy), anything else with what transformers said."""
    if isinstance(error, SafetensorError):
        files = sorted(str(f) for f in Path(name_or_path).glob("*.safetensors")) or [name_or_path]
        return SFTError(f"model.name_or_path={name_or_path}: its weights ({', '.join(files)}) are incomplete or "
                        f"corrupt ({str(error)[:200]}): download or copy the model again.")
    return SFTError(f"model.name_or_path={name_or_path} could not be loaded{what} ({type(error).__name__}: "
                    f"{str(error)[:300]}). Give a local folder saved with save_pretrained(), or run once with network "
                    "access so the hub files are cached.")


def not_a_causal_lm(name_or_path: str) -> str | None:
    """Why the local transformers folder `name_or_path` holds no causal LM (a BERT classifier or encoder), from
    its config.json alone; None when it holds one, or when there is no such file to read (a hub name)."""
    import json

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        found = json.loads((Path(name_or_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a hub name, or a folder from_pretrained reports itself
    kind, architectures = found.get("model_type"), found.get("architectures") or []
    # BERT-like encoders have an LM-head class too, used only as a decoder (is_decoder=true) of an encoder-decoder
    causal = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (found.get("is_decoder") or not architectures or any(
        a.endswith(("CausalLM", "LMHeadModel", "ConditionalGeneration")) for a in architectures))
    if causal:
        return None
    return (f"model.name_or_path={name_or_path} holds a {kind} model ({', '.join(architectures) or 'no architecture'}),"
            " which is not a causal language model: task=causal_lm (+experiment=chat_sft) fine-tunes a model that "
            "generates text (Llama, Qwen, SmolLM, GPT-2: transformers' AutoModelForCausalLM). Point "
            "model.name_or_path at one, or fine-tune this model as a classifier (+experiment=text_classification).")


def pad_with_eos(tokenizer):
    """The tokenizer, padding with its end-of-sequence token if it has no pad token (GPT-2 style, most causal
    LMs)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except LOAD_ERRORS as e:
        raise load_failed(name_or_path, "", e) from e
    model, created = with_new_head(AutoModelForSequenceClassification, name_or_path, classes, weights, "")
    if tokenizer.pad_token is None and pad_with_eos(tokenizer).pad_token is not None:  # GPT-2 style
        model.config.pad_token_id = tokenizer.pad_token_id
    wrapper = TextClassifier(model, tokenizer)
    wrapper.sft = transformer_parts(wrapper, {f"model.{n}" for n in created}, _base(name_or_path) if weights else None)
    return wrapper


def with_new_head(auto_class, name_or_path: str, classes: list[str], weights: str | None, what: str):
    """(model, names of the parameters made from scratch): `auto_class` (AutoModelFor...Classification) with a
    new head for `classes` (num_labels, id2label, label2id), pretrained unless weights is null, in fp32."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report and progress bars; new layers are listed by sft-train
    hf_logging.disable_progress_bar()
    labels = {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
              "label2id": {c: i for i, c in enumerate(classes)}}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **labels)
        if weights:
            model, info = auto_class.from_pretrained(name_or_path, config=config, ignore_mismatched_sizes=True,
                                                     output_loading_info=True)
            created = set(info["missing_keys"]) | {k for k, *_ in info.get("mismatched_keys", [])}
        else:
            model = auto_class.from_config(config)
            created = {n for n, _ in model.named_parameters()}
    except LOAD_ERRORS as e:
        raise load_failed(name_or_path, what, e) from e
    return model.float(), created  # a checkpoint's stored dtype (bf16, fp16): train in fp32, autocast on top


def _base(name_or_path: str) -> dict:
    """Parts.base of a transformers model: its folder (or hub name) and weights files, where on disk."""
    from sft_cli.models.adapters import weights_files

    folder = Path(name_or_path)
    if not folder.is_dir():
        try:  # a hub name: the cached download, if there is one
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:
            return {"source": name_or_path, "files": []}
    return {"source": str(folder.absolute()) if Path(name_or_path).is_dir() else name_or_path,
            "files": weights_files(folder)}


def transformer_parts(wrapper: nn.Module, created: set[str], weights_from: dict | None) -> Parts:
    """The Parts of a transformers model held as wrapper.model (any task's builder uses it): the stages are
    the input embeddings (stem), each block of its
    largest ModuleList (encoder or decoder layers), then what sits above (pooler, final norm, head), which
    is depth 0 for layer-wise lr decay. Stages whose parameters are all in `created` (made from scratch
    here, not loaded) are new: they always train. `weights_from` is Parts.base (None: no pretrained weights)."""
    model = wrapper.model
    base = model.base_model_prefix
    blocks = max((n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.startswith(base)),
                 key=lambda n: sum(p.numel() for p in model.get_submodule(n).parameters()))
    path = blocks.split(".")
    expand = ["model"] + [f"model.{'.'.join(path[:i])}" for i in range(1, len(path) + 1)]
    embeddings = model.get_input_embeddings()
    stem = [f"model.{n}" for n, m in model.named_modules() if m is embeddings][:1]
    if hasattr(model.base_model, "embeddings"):  # BERT-style: word, position and type embeddings together
        stem = [f"model.{base}.embeddings"]
    stages = stage_names(wrapper, stem, expand)
    last_block = max(i for i, (name, _) in enumerate(stages) if name.startswith(f"model.{blocks}."))
    params = [n for n, _ in wrapper.named_parameters()]

    def is_new(members: list[str]) -> bool:  # a tied lm_head owns no parameter of its own: not new
        own = [n for n in params if any(n == m or n.startswith(m + ".") for m in members)]
        return bool(own) and all(n in created for n in own)

    return Parts(stages, new_stages=[name for name, members in stages if is_new(members)],
                 top_stages=[name for name, _ in stages[last_block + 1:]],  # lr-decay depth 0
                 base=weights_from, tokenizer=wrapper.tokenizer, save_extras=wrapper.save_extras)


class CausalLM(nn.Module):
    """A transformers causal LM called as the recipe calls every model: logits = model(inputs), with `inputs`
    the batch dict (input_ids, attention_mask). Keeps its tokenizer (and chat template) for checkpoints and
    generation."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def forward(self, inputs: dict, labels: torch.Tensor | None = None):
        """The logits (batch, time, vocab); with `labels`, only those at the positions whose next token is
        learned, with those tokens: ((n, vocab), (n,)). The output projection then runs on the n learned
        positions alone, so a batch of long prompts and short answers never holds batch x time x vocab logits
        (49k-wide for SmolLM2). Models that scale or cap their logits inside forward take the full path."""
        if labels is None or _transforms_logits(self.model.config):
            logits = self.model(**inputs, use_cache=False).logits
            return logits if labels is None else next_token_positions(logits, labels)
        hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state
        hidden, targets = next_token_positions(hidden, labels)
        return self.model.get_output_embeddings()(hidden), targets

    def save_extras(self, folder: Path) -> None:
        """The transformers config, generation config and tokenizer (with its chat template) in folder/hf."""
        self.model.config.save_pretrained(folder / "hf")
        self.model.generation_config.save_pretrained(folder / "hf")
        self.tokenizer.save_pretrained(folder / "hf")


def next_token_positions(values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values at each position t whose label t+1 is learned (not -100), those labels): position t predicts
    token t+1. values: (batch, time, ...), labels: (batch, time)."""
    targets = labels[:, 1:]
    learned = targets != -100
    return values[:, :-1][learned], targets[learned]


def varlen_attention(model: nn.Module) -> bool:
    """Whether the transformers model attends with a flash (variable-length) kernel: transformers then keeps
    packed examples apart by their restarting positions only in a batch of one row (flattened, padding-free)."""
    return "flash" in str(getattr(model.config, "_attn_implementation", None) or "")


def _transforms_logits(config) -> bool:
    """Whether the model changes its logits after the output projection (Gemma 2's soft-capping, Cohere's and
    Granite's scaling), which the learned-positions path would skip."""
    return any(getattr(config, key, None) not in (None, 1, 1.0)
               for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


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
                 dtype: str = "auto", precision: str = "32", device: str = "cpu",
                 attn_implementation: str | None = None) -> CausalLM:
    """Any AutoModelForCausalLM (Llama, Qwen, SmolLM, GPT-2, ...) by hub name or local folder, with its
    tokenizer. weights=null keeps the architecture and initialises it randomly (a checkpoint is loaded next).
    attn_implementation: transformers' (null: its default, SDPA; flash_attention_2: the varlen kernel).
    Stages for freezing: the input embeddings (stem), each decoder layer, then the final norm and lm_head."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if problem := not_a_causal_lm(name_or_path):
        raise SFTError(problem)
    torch_dtype = weight_dtype(dtype, precision, device)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, **attention)
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path), dtype=torch_dtype,
                                                     **attention)
    except ImportError as e:  # flash_attention_2 without the flash-attn package (or without CUDA)
        raise SFTError(f"model.attn_implementation={attn_implementation} cannot be used here ({str(e)[:300]}). "
                       "Install its kernel (pip install flash-attn, on a CUDA machine), or set "
                       "model.attn_implementation=null (transformers' default, SDPA).") from e
    except LOAD_ERRORS as e:
        raise load_failed(name_or_path, " as a causal LM", e) from e
    pad_with_eos(tokenizer)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()  # recompute activations in backward: less memory, ~30% slower
    wrapper = CausalLM(model, tokenizer)
    wrapper.sft = transformer_parts(wrapper, set() if weights else {f"model.{n}" for n, _ in model.named_parameters()},
                         _base(name_or_path) if weights else None)
    return wrapper
