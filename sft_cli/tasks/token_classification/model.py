"""The token classifier: any transformers AutoModelForTokenClassification with a new head for the data's tags."""

from sft_cli.models.hf import LOAD_ERRORS, TextClassifier, _base, load_failed, transformer_parts
from sft_cli.tasks.token_classification.conll import tagging_tokenizer


def hf_token_classifier(name_or_path: str, classes: list[str], weights: str | None = "pretrained") -> TextClassifier:
    """Any AutoModelForTokenClassification (BERT, RoBERTa, DeBERTa, ...) by hub name or local folder, with
    num_labels, id2label and label2id set from the training file's tags, and the tokenizer the data were
    tokenized with (a space before each word for byte-level BPE). weights=null: the architecture alone.
    Stages for freezing and layer-wise lr: the embeddings (stem), each encoder layer, then the head."""
    from transformers import AutoConfig, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report; new layers are listed by sft-train
    hf_logging.disable_progress_bar()
    labels = {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
              "label2id": {c: i for i, c in enumerate(classes)}}
    tokenizer = tagging_tokenizer(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, **labels)
        if weights:
            model, info = AutoModelForTokenClassification.from_pretrained(
                name_or_path, config=config, ignore_mismatched_sizes=True, output_loading_info=True)
            created = set(info["missing_keys"]) | {k for k, *_ in info.get("mismatched_keys", [])}
        else:
            model = AutoModelForTokenClassification.from_config(config)
            created = {n for n, _ in model.named_parameters()}
    except LOAD_ERRORS as e:
        raise load_failed(name_or_path, " as a token classifier", e) from e
    model.float()  # a checkpoint's stored dtype (bf16, fp16): train in fp32, autocast on top
    wrapper = TextClassifier(model, tokenizer)
    wrapper.sft = transformer_parts(wrapper, {f"model.{n}" for n in created}, _base(name_or_path) if weights else None)
    return wrapper


def position_limit(model) -> int | None:
    """The most tokens the model takes in one example: its tokenizer's model_max_length when set, else its
    position embeddings (None when it has neither: relative positions)."""
    saved = model.tokenizer.model_max_length
    positions = getattr(model.model.config, "max_position_embeddings", None)
    return saved if saved < 1_000_000 else positions
