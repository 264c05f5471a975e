"""The loss mask under real chat templates, not only ChatML: Llama 3.1 Instruct, Qwen2.5 Instruct and Gemma 3
(their published jinja files, in tests/chat_templates/), each with a small tokenizer built here the way the
model's own is built (its special tokens, its pre-tokenizer, BOS added or not). For multi-turn chats with a
system prompt, the learned tokens are exactly each assistant response and its end-of-turn token; a template
whose renderings are not prefixes of one another (one that rewrites earlier turns) is a clear error."""

import json
from pathlib import Path

import pytest
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from conftest import run_cli
from fixtures import write_tiny_llama
from sft_cli.errors import SFTError
from sft_cli.tasks.causal_lm.chats import IGNORE, chat_files, encode, render_prompt
from test_cli_errors import refused

TEMPLATES = Path(__file__).parent / "chat_templates"
# The pre-tokenizer regexes of the models' tokenizer.json: Llama 3 (tiktoken's cl100k, digits in threes) and
# Qwen2 (the same, one digit at a time); both then byte-level BPE
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
SYSTEM = "You are a terse assistant. Answer in one sentence."
CHATS = [
    [("system", SYSTEM), ("user", "What is two plus two?"), ("assistant", "Two plus two is four."),
     ("user", "And three plus 3?"), ("assistant", "Three plus three is 6, not 7."),
     ("user", "Name a colour."), ("assistant", "Blue.")],
    [("system", SYSTEM), ("user", "Hi there, how are you?"), ("assistant", "I am fine, thank you!")],
    [("user", "Translate to French: cat"), ("assistant", "chat"), ("user", "and dog?"), ("assistant", "chien")],
]


def corpus() -> list[str]:
    words = [content for chat in CHATS for _, content in chat]
    return words + ["system user assistant model", "Cutting Knowledge Date: December 2023", "Today Date: 26 Jul 2024",
                    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "<think>\n</think>\n\n"]


def byte_level(split: str, specials: list[str]) -> Tokenizer:
    """A byte-level BPE with the model's pre-tokenizer regex (Llama 3, Qwen2: tokenizer.json's Split + ByteLevel)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus() * 5, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return backend


def sentencepiece_like(specials: list[str]) -> Tokenizer:
    """A BPE over ▁-marked words, newlines apart, as Gemma's SentencePiece vocabulary splits text."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    alphabet = sorted({c for text in corpus() for c in text.replace(" ", "▁")})
    backend.train_from_iterator(corpus() * 5, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                                   initial_alphabet=alphabet))
    return backend


def add_bos(backend: Tokenizer, bos: str) -> None:
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[
        (bos, backend.token_to_id(bos))])


def llama3(folder: Path) -> str:
    """Llama 3.1 Instruct's layout: BOS <|begin_of_text|> added to every text (and written by the template
    too), EOS <|eot_id|>, no pad token."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|eom_id|>", "<|python_tag|>"]
    backend = byte_level(LLAMA3_SPLIT, specials)
    add_bos(backend, "<|begin_of_text|>")
    return save(folder, backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def qwen25(folder: Path) -> str:
    """Qwen2.5 Instruct's layout: no BOS, EOS <|im_end|>, pad <|endoftext|>."""
    backend = byte_level(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return save(folder, backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def gemma3(folder: Path) -> str:
    """Gemma 3's layout: BOS <bos> added to every text (and written by the template), EOS <eos>, pad <pad>,
    <start_of_turn>/<end_of_turn> single tokens."""
    backend = sentencepiece_like(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"])
    add_bos(backend, "<bos>")
    return save(folder, backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def save(folder: Path, backend: Tokenizer, **special) -> str:
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(folder)
    return str(folder)


MODELS = {  # template file, tokenizer, end-of-turn token
    "llama-3.1": ("llama-3.1-instruct.jinja", llama3, "<|eot_id|>"),
    "qwen2.5": ("qwen2.5-instruct.jinja", qwen25, "<|im_end|>"),
    "gemma-3": ("gemma-3-it.jinja", gemma3, "<end_of_turn>"),
}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CLI_CACHE", str(tmp_path / "cache"))


def jsonl(path: Path, chats: list) -> str:
    path.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in chat]}) + "\n"
                            for chat in chats))
    return str(path)


def learned_runs(item: dict) -> list[tuple[int, list[int]]]:
    """The learned tokens of an example, as runs of consecutive positions: (first position, tokens) each."""
    runs = []
    for i, (token, label) in enumerate(zip(item["input_ids"], item["labels"])):
        if label == IGNORE:
            continue
        assert label == token
        if runs and runs[-1][0] + len(runs[-1][1]) == i:
            runs[-1][1].append(token)
        else:
            runs.append((i, [token]))
    return runs


def learned_texts(tok, item: dict) -> list[str]:
    return [tok.decode(tokens) for _, tokens in learned_runs(item)]


@pytest.mark.parametrize("model", MODELS)
def test_the_learned_tokens_are_each_assistant_response_and_its_end_of_turn(tmp_path, model):
    template, build_tokenizer, end = MODELS[model]
    folder = build_tokenizer(tmp_path / model)
    splits = chat_files(jsonl(tmp_path / "train.jsonl", CHATS), folder, val_file=jsonl(tmp_path / "val.jsonl", CHATS),
                        chat_template=str(TEMPLATES / template))
    tok = splits.tokenizer
    assert splits.prompt_format["end_of_turn"] == end and len(tok(end, add_special_tokens=False)["input_ids"]) == 1
    for chat, item in zip(CHATS, splits.train):
        messages = [{"role": r, "content": c} for r, c in chat]
        whole = tok.apply_chat_template(messages, tokenize=False)
        assert tok.decode(item["input_ids"]) == whole  # the tokens are the template's text, BOS once
        if tok.bos_token:
            assert item["input_ids"].count(tok.bos_token_id) == 1 and item["input_ids"][0] == tok.bos_token_id
        responses = [c for r, c in chat if r == "assistant"]
        assert learned_texts(tok, item) == [r + end for r in responses]
        # prediction renders the last prompt as training did: its tokens are those before the last response
        prompt = render_prompt(tok, splits.prompt_format, {"messages": messages[:-1]})
        assert encode(tok, prompt) == item["input_ids"][:learned_runs(item)[-1][0]]


def test_gemma_folds_the_system_prompt_into_the_first_user_turn_and_a_bad_role_order_is_a_bad_row(tmp_path):
    folder = gemma3(tmp_path / "gemma")
    template = str(TEMPLATES / "gemma-3-it.jinja")
    val = jsonl(tmp_path / "val.jsonl", CHATS)
    splits = chat_files(jsonl(tmp_path / "train.jsonl", CHATS[1:2]), folder, val_file=val, chat_template=template)
    item = splits.train[0]
    prompt = splits.tokenizer.decode(item["input_ids"][:learned_runs(item)[0][0]])
    assert prompt == f"<bos><start_of_turn>user\n{SYSTEM}\n\nHi there, how are you?<end_of_turn>\n" \
                     "<start_of_turn>model\n"
    two_users = [("user", "Hi there, how are you?"), ("user", "Name a colour."), ("assistant", "Blue.")]
    with pytest.raises(SFTError, match=r"train\.jsonl:2: the record could not be rendered by the chat template "
                                       r"\(TemplateError: Conversation roles must alternate user/assistant/"):
        chat_files(jsonl(tmp_path / "train.jsonl", [CHATS[1], two_users]), folder, val_file=val, chat_template=template)
    splits = chat_files(jsonl(tmp_path / "train.jsonl", [CHATS[1], two_users]), folder, val_file=val,
                        chat_template=template, skip_bad_rows=True)
    assert len(splits.train) == 1 and splits.skipped == {"dataset.train_file": 1}


THINKING = [("system", SYSTEM), ("user", "What is two plus two?"),
            ("assistant", "<think>\nTwo and two.\n</think>\n\nTwo plus two is four."), ("user", "Name a colour."),
            ("assistant", "Blue.")]


def test_a_template_that_rewrites_earlier_turns_cannot_be_masked_by_prefix_and_says_what_to_use(tmp_path):
    folder = qwen25(tmp_path / "qwen")
    crafted = str(TEMPLATES / "thinking-stripped.jinja")  # drops the reasoning of turns before the last question
    val = jsonl(tmp_path / "val.jsonl", CHATS)
    with pytest.raises(SFTError) as error:
        chat_files(jsonl(tmp_path / "train.jsonl", [CHATS[1], THINKING]), folder, val_file=val, chat_template=crafted)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'train.jsonl'}:2: the record cannot be masked by prefix under the chat "
                              f"template file {crafted}: the conversation up to assistant turn 1 renders as ")
    assert "<think>" in message and "the template rewrites or drops earlier turns once later ones follow" in message
    assert "dataset.chat_template=default (ChatML) or dataset.chat_template=path/to/template.jinja" in message
    # one turn, or no reasoning, is rendered the same whatever follows: those records are masked as usual
    splits = chat_files(jsonl(tmp_path / "train.jsonl", [CHATS[1], THINKING[:3]]), folder, val_file=val,
                        chat_template=crafted)
    assert learned_texts(splits.tokenizer, splits.train[1]) == [THINKING[2][1] + "<|im_end|>"]
    # the fix the message names: ChatML renders every turn as written
    splits = chat_files(jsonl(tmp_path / "train.jsonl", [THINKING]), folder, val_file=val, chat_template="default")
    assert learned_texts(splits.tokenizer, splits.train[0]) == [THINKING[2][1] + "<|im_end|>", "Blue.<|im_end|>"]


def test_sft_train_refuses_such_a_template_in_one_message_without_a_traceback(tmp_path):
    write_tiny_llama(tmp_path / "tiny-llama")
    jsonl(tmp_path / "chats.jsonl", [CHATS[1], THINKING] * 10)
    refused(run_cli("sft-train", "+experiment=chat_sft", "dataset.train_file=chats.jsonl",
                    f"model.name_or_path={tmp_path / 'tiny-llama'}",
                    f"dataset.chat_template={TEMPLATES / 'thinking-stripped.jinja'}", cwd=tmp_path),
            "chats.jsonl:2: the record cannot be masked by prefix under the chat template file",
            "dataset.chat_template=default (ChatML)")
