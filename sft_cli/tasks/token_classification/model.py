"""The token classifier: any transformers AutoModelForTokenClassification with a new head for the data's tags."""

from sft_cli.models.hf import TextClassifier, _base, transformer_parts, with_new_head
from sft_cli.tasks.token_classification.conll import tagging_tokenizer


def hf_token_classifier(name_or_path: str, classes: list[str], weights: str | None = "pretrained") -> TextClassifier:
    """Any AutoModelForTokenClassification (BERT, RoBERTa, DeBERTa, ...) by hub name or local folder, with
    num_labels, id2label and label2id set from the training file's tags, and the tokenizer the data were
    tokenized with (a space before each word for byte-level BPE). weights=null: the architecture alone.
    Stages for freezing and layer-wise lr: the embeddings (stem), each encoder layer, then the head."""
    from transformers import AutoModelForTokenClassification

    tokenizer = tagging_tokenizer(name_or_path)
    model, created = with_new_head(AutoModelForTokenClassification, name_or_path, classes, weights,
                                   " as a token classifier")
    wrapper = TextClassifier(model, tokenizer)
    wrapper.sft = transformer_parts(wrapper, {f"model.{n}" for n in created}, _base(name_or_path) if weights else None)
    return wrapper


def position_limit(model) -> int | None:
    """The most tokens the model takes in one example: its tokenizer's model_max_length when set, else its
    position embeddings (None when it has neither: relative positions)."""
    saved = model.tokenizer.model_max_length
    positions = getattr(model.model.config, "max_position_embeddings", None)
    return saved if saved < 1_000_000 else positions
