"""Tiny datasets written in the real on-disk formats, for tests that must never download anything."""

import inspect
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def separable_images(n: int, num_classes: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """uint8 (n, size, size, 3) images whose class is easy to see: class c brightens horizontal band c
    (plus noise), so a small model learns it in a few steps."""
    rng = np.random.default_rng(seed)
    labels = [i % num_classes for i in range(n)]
    images = rng.integers(0, 80, size=(n, size, size, 3), dtype=np.uint8)
    band = max(1, size // num_classes)
    for i, c in enumerate(labels):
        images[i, c * band:(c + 1) * band, :, :] += 150
    return images, labels


def write_cifar10(root: Path, n_train: int = 250, n_test: int = 60, seed: int = 0) -> Path:
    """root/cifar-10-batches-py/ in the official python-pickle layout (data_batch_1..5, test_batch,
    batches.meta): rows of 3072 uint8 values, channel-major, as torchvision's CIFAR10 reads them.
    The md5s differ from the official files, so loading needs dataset.verify=false."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = separable_images(n_train + n_test, 10, 32, seed)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    chunks = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(chunks, 1):
        _pickle(folder / f"data_batch_{i}", {"data": rows[idx], "labels": [labels[j] for j in idx]})
    _pickle(folder / "test_batch", {"data": rows[n_train:], "labels": labels[n_train:]})
    _pickle(folder / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": len(chunks[0])})
    return folder


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_image_folder(root: Path, classes: list[str], per_class: int, size: int = 24, seed: int = 0) -> Path:
    """root/<class>/<i>.png with separable images, as torchvision's ImageFolder reads them."""
    images, labels = separable_images(per_class * len(classes), len(classes), size, seed)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = Path(root) / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    return Path(root)


POSITIVE = ["good", "great", "fine", "enjoyed"]
NEGATIVE = ["bad", "awful", "poor", "hated"]
FILLER = ["the", "a", "movie", "film", "book", "it", "was", "is", "very", "really", "and"]


def write_tiny_bert(folder: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """A 3-layer, 32-wide BERT with a WordPiece vocabulary of the toy words, saved with save_pretrained
    as a stand-in for a pretrained hub model (dropout=0: a forward pass draws nothing from the RNG)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes vocab=, 4.x vocab_file= (and silently ignores the other: every token [UNK])
    takes_vocab = "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters
    tokenizer = BertTokenizerFast(**{"vocab" if takes_vocab else "vocab_file": str(folder / "vocab.txt")})
    assert tokenizer("good")["input_ids"][1] == vocab.index("good")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) with label "pos" when the text holds a positive word, "neg" for a negative one;
    texts vary in length so batches pad differently."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = list(rng.choice(FILLER, size=int(rng.integers(2, 12))))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POSITIVE if label == "pos" else NEGATIVE)))
        rows.append((" ".join(words), label))
    return rows


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CODES = {"apple": "red", "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow",
         "plum": "purple", "rust": "orange", "rose": "pink", "sand": "beige"}


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """`messages` records of a synthetic mapping a tiny model learns in a few epochs: "colour of apple" ->
    "red", one of ten (plus a system turn in every third record)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        thing = list(CODES)[int(rng.integers(len(CODES)))]
        messages = [{"role": "user", "content": f"colour of {thing}"}, {"role": "assistant", "content": CODES[thing]}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "answer with one colour"})
        rows.append({"messages": messages})
    return rows


def write_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (random weights) with a byte-level BPE tokenizer trained on the chat rows' words and a
    ChatML chat template, pad token = eos token = <|im_end|>, saved with save_pretrained: a causal LM
    folder as a user's would be, built offline in a second."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [CHATML.replace("{", "").replace("}", "")] + [
        f"<|im_start|>user\ncolour of {k}<|im_end|>\n<|im_start|>assistant\n{v}<|im_end|>\nanswer with one colour"
        for k, v in CODES.items()] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
