"""Chat and instruction files -> tokenized causal-LM splits: labels learn exactly the response tokens (every
assistant turn, the end-of-turn/EOS included), layouts, templates, truncation, bad rows, prompts for prediction."""

import inspect
import io
import json
import pickle
from pathlib import Path

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from sft_cli import config
from sft_cli.errors import SFTError
from sft_cli.tasks.causal_lm.chats import (
    ALPACA,
    ALPACA_NO_INPUT,
    IGNORE,
    chat_files,
    encode,
    read_prompts,
    render_prompt,
)

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["You are a helpful assistant.", "Hi there, how are you?", "Hello friend, I am fine.",
          "What is two plus two?", "Two plus two is four.", "Translate to French: cat", "chat",
          "Below is an instruction that describes a task. Write a response.", "### Instruction:", "### Response:",
          "### Input:", "Name a colour.", "Blue.", "Summarise the text.", "The cat sat on the mat.", "A cat sat."]
SYSTEM, USER, ASSISTANT = "system", "user", "assistant"


def build_tokenizer(folder: Path, chat_tokens: bool, chat_template: str | None, bos: bool = False) -> str:
    """A byte-level BPE trained on the toy corpus, saved with save_pretrained as a stand-in for a hub model;
    EOS is </s> and there is no pad token (the loader pads with EOS, as for GPT-2 style models). With `bos`,
    it adds <s> in front of every text, as Llama's tokenizer does."""
    special = ["</s>"] + (["<s>"] if bos else []) + (["<|im_start|>", "<|im_end|>"] if chat_tokens else [])
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
            ("<s>", backend.token_to_id("<s>"))])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>",
                                               **({"bos_token": "<s>"} if bos else {}))
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    return build_tokenizer(tmp_path_factory.mktemp("chatml"), chat_tokens=True, chat_template=CHATML)


@pytest.fixture(scope="module")
def tok(tokenizer):
    return transformers.AutoTokenizer.from_pretrained(tokenizer)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test tokenizes into its own cache, never into ~/.cache."""
    monkeypatch.setenv("SFT_CLI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def masked(tok, text: str) -> list[int]:
    return [IGNORE] * len(ids(tok, text))


def start_of_response(item: dict) -> int:
    return next(i for i, label in enumerate(item["labels"]) if label != IGNORE)


def build(tmp_path, tokenizer, records, **kwargs):
    kwargs.setdefault("val_file", jsonl(tmp_path / "val.jsonl", records[:2]))
    return chat_files(jsonl(tmp_path / "train.jsonl", records), tokenizer, **kwargs)


# ---- labels, token by token --------------------------------------------------------------------------------


def test_single_turn_chat_learns_the_answer_and_its_end_of_turn_only(tmp_path, tokenizer, tok):
    record = chat((USER, "Hi there, how are you?"), (ASSISTANT, "Hello friend, I am fine."))
    splits = build(tmp_path, tokenizer, [record])
    prompt = "<|im_start|>user\nHi there, how are you?<|im_end|>\n<|im_start|>assistant\n"
    answer = ids(tok, "Hello friend, I am fine.<|im_end|>")
    item = splits.train[0]
    assert item["input_ids"] == ids(tok, prompt) + answer + ids(tok, "\n")
    assert item["labels"] == masked(tok, prompt) + answer + masked(tok, "\n")  # learned up to the end of turn
    assert tok.convert_tokens_to_ids("<|im_end|>") in answer
    assert splits.prompt_format["format"] == "messages" and splits.prompt_format["chat_template"] == CHATML
    assert splits.prompt_format["end_of_turn"] == "<|im_end|>"
    assert splits.tokenizer.chat_template == CHATML and splits.tokenizer.pad_token == "</s>"
    assert splits.counts == {"examples": 1, "truncated": 0, "dropped": 0, "skipped_rows": 0}
    assert splits.classes == [] and splits.train_targets == [] and splits.group_lengths is None


def test_multi_turn_chat_learns_every_assistant_turn_and_no_system_or_user_token(tmp_path, tokenizer, tok):
    record = chat((SYSTEM, "You are a helpful assistant."), (USER, "What is two plus two?"),
                  (ASSISTANT, "Two plus two is four."), (USER, "Name a colour."), (ASSISTANT, "Blue."))
    item = build(tmp_path, tokenizer, [record]).train[0]
    first = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is two plus two?"
    pieces = [(first + "<|im_end|>\n<|im_start|>assistant\n", False), ("Two plus two is four.<|im_end|>", True),
              ("\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n", False),
              ("Blue.<|im_end|>", True), ("\n", False)]
    assert item["input_ids"] == [t for text, _ in pieces for t in ids(tok, text)]
    assert item["labels"] == [t for text, learn in pieces for t in (ids(tok, text) if learn else masked(tok, text))]


def test_prompt_completion_learns_the_completion_and_eos(tmp_path, tokenizer, tok):
    splits = build(tmp_path, tokenizer, [{"prompt": "Translate to French: cat\n", "completion": "chat"}])
    prompt, answer = "Translate to French: cat\n", ids(tok, "chat") + [tok.eos_token_id]
    item = splits.train[0]
    assert item["input_ids"] == ids(tok, prompt) + answer
    assert item["labels"] == masked(tok, prompt) + answer
    assert splits.prompt_format["format"] == "prompt_completion"
    assert splits.prompt_format["prompt_template"] == "{prompt}"


@pytest.mark.parametrize("given", ["The cat sat on the mat.", "", None])
def test_alpaca_uses_the_alpaca_prompt_with_an_input_section_only_when_there_is_an_input(tmp_path, tokenizer, tok,
                                                                                          given):
    record = {"instruction": "Summarise the text.", "output": "A cat sat."}
    if given is not None:
        record["input"] = given
    splits = build(tmp_path, tokenizer, [record])
    prompt = ALPACA.format(instruction="Summarise the text.", input=given) if given else \
        ALPACA_NO_INPUT.format(instruction="Summarise the text.")
    assert ("### Input:" in prompt) == bool(given)
    answer = ids(tok, "A cat sat.") + [tok.eos_token_id]
    item = splits.train[0]
    assert item["input_ids"] == ids(tok, prompt) + answer
    assert item["labels"] == masked(tok, prompt) + answer


def test_train_on_prompt_learns_every_token(tmp_path, tokenizer):
    records = [chat((SYSTEM, "You are a helpful assistant."), (USER, "Hi there"), (ASSISTANT, "Hello friend."))]
    item = build(tmp_path, tokenizer, records, train_on_prompt=True).train[0]
    assert item["labels"] == item["input_ids"]
    item = build(tmp_path, tokenizer, [{"prompt": "cat", "completion": "chat"}], train_on_prompt=True).train[0]
    assert item["labels"] == item["input_ids"]


def test_collate_pads_right_and_keeps_the_eos_label_when_pad_is_eos(tmp_path, tokenizer, tok):
    records = [{"prompt": "Translate to French: cat\n", "completion": "chat"},
               {"prompt": "Name a colour.\n", "completion": "Blue. The cat sat on the mat."}]
    splits = build(tmp_path, tokenizer, records)
    eos = tok.eos_token_id
    assert splits.tokenizer.pad_token_id == eos
    items = [splits.train[0], splits.train[1]]
    inputs, labels, counts = splits.collate(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert counts == {"examples": 2, "tokens": sum(lengths)}  # for tokens/s: the padding is not counted
    short = lengths.index(min(lengths))
    n, width = lengths[short], max(lengths)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == labels.shape == (2, width)
    assert inputs["input_ids"].dtype == inputs["attention_mask"].dtype == labels.dtype == torch.long
    assert labels[short, n - 1] == eos and inputs["input_ids"][short, n - 1] == eos  # the EOS is learned ...
    assert (inputs["input_ids"][short, n:] == eos).all() and (labels[short, n:] == IGNORE).all()  # ... padding not
    assert inputs["attention_mask"][short].tolist() == [1] * n + [0] * (width - n)
    assert labels[short, :n].tolist() == items[short]["labels"]
    again = pickle.loads(pickle.dumps(splits.collate))  # DataLoader workers pickle it
    assert torch.equal(again(items)[1], labels)


# ---- default and user templates --------------------------------------------------------------------------


def test_a_tokenizer_without_a_template_gets_chatml_with_im_end_when_it_is_one_token(tmp_path):
    folder = build_tokenizer(tmp_path / "tok", chat_tokens=True, chat_template=None)
    splits = build(tmp_path, folder, [chat((USER, "Hi there"), (ASSISTANT, "Hello friend."))])
    tok = splits.tokenizer
    assert "<|im_end|>" in splits.prompt_format["chat_template"] == tok.chat_template
    item = splits.train[0]
    answer = ids(tok, "Hello friend.<|im_end|>")
    assert item["labels"][-len(answer) - 1:] == answer + [IGNORE]  # the newline after <|im_end|> is not learned
    assert item["input_ids"][-len(answer) - 1:-1] == answer


def test_a_tokenizer_without_im_end_ends_turns_with_eos_in_the_default_template(tmp_path):
    folder = build_tokenizer(tmp_path / "tok", chat_tokens=False, chat_template=None)
    splits = build(tmp_path, folder, [chat((USER, "Hi there"), (ASSISTANT, "Hello friend."))])
    tok, item = splits.tokenizer, splits.train[0]
    content = ids(tok, "Hello friend.")
    start = start_of_response(item)
    assert item["labels"][start:start + len(content)] == content
    assert item["labels"][start + len(content)] == tok.eos_token_id  # the end of turn is EOS, and learned
    assert item["labels"][start + len(content) + 1:] == masked(tok, "\n")  # what follows it is not
    assert splits.prompt_format["end_of_turn"] == "</s>"


def test_a_template_file_is_used_and_one_that_is_not_prefix_consistent_is_an_error(tmp_path, tokenizer, tok):
    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}</s>\n{% endfor %}"
                    "{% if add_generation_prompt %}[assistant]\n{% endif %}")
    records = [chat((USER, "Hi there"), (ASSISTANT, "Hello friend."))]
    splits = build(tmp_path, tokenizer, records, chat_template=str(good))
    item = splits.train[0]
    assert item["input_ids"] == ids(tok, "[user]\nHi there</s>\n[assistant]\nHello friend.</s>\n")
    assert item["labels"] == masked(tok, "[user]\nHi there</s>\n[assistant]\n") + ids(tok, "Hello friend.</s>") + \
        masked(tok, "\n")
    assert splits.tokenizer.chat_template == good.read_text()
    # a space ending the generation prompt merges with the answer's first word (" friend" is one token): the
    # tokens of the prompt alone are then no prefix of the whole conversation's
    records = [chat((USER, "Hi there"), (ASSISTANT, "friend, I am fine."))]
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                   "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(SFTError, match=r"train\.jsonl:1: the record cannot be masked by prefix under .*bad\.jinja: "
                                       r"its text up to assistant turn 1 begins the whole conversation, but its tokens "
                                       r"do not \(a token spans the end of the prompt and the start of the response"):
        build(tmp_path, tokenizer, records, chat_template=str(bad))
    with pytest.raises(SFTError, match=r"dataset.chat_template=.*missing\.jinja: no such file"):
        build(tmp_path, tokenizer, records, chat_template=str(tmp_path / "missing.jinja"))


def test_a_template_that_is_invalid_jinja_or_never_writes_the_answer_is_named(tmp_path, tokenizer):
    records = [chat((USER, "Hi there"), (ASSISTANT, "Hello friend.")), chat((USER, "Name a colour."), (ASSISTANT, "Blue."))]
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }{% endfor %}")  # one brace short
    with pytest.raises(SFTError, match=r"dataset.chat_template: the chat template file .*broken\.jinja is not a valid "
                                       r"Jinja template \(unexpected '}', at line 1\)") as error:
        build(tmp_path, tokenizer, records, chat_template=str(broken))
    assert "skip_bad_rows" not in str(error.value)  # no row is at fault
    silent = tmp_path / "silent.jinja"  # drops the assistant's turns: nothing is left to learn
    silent.write_text("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['role'] }}: {{ m['content'] }}\n"
                      "{% endif %}{% endfor %}")
    with pytest.raises(SFTError, match=r"train\.jsonl: no example has a response token to learn: the chat template "
                                       r"file .*silent\.jinja never renders the assistant's content"):
        build(tmp_path, tokenizer, records, chat_template=str(silent))


def test_a_tokenizer_without_eos_or_template_is_named_with_what_to_set(tmp_path):
    folder = tmp_path / "no-eos"
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "Hi": 1, "there": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    with pytest.raises(SFTError, match=rf"the tokenizer of {folder} has no eos_token and no chat template: .*Set "
                                       r"\"eos_token\" in its tokenizer_config.json"):
        build(tmp_path, str(folder), [chat((USER, "Hi there"), (ASSISTANT, "there"))])


def test_a_tokenizer_that_adds_bos_gets_it_once_in_every_layout_and_in_rendered_prompts(tmp_path):
    folder = build_tokenizer(tmp_path / "tok", chat_tokens=True, chat_template=None, bos=True)
    own = tmp_path / "own.jinja"  # a template that writes BOS itself (Llama 3, Gemma)
    own.write_text("{{ bos_token }}" + CHATML)
    records = [chat((USER, "Hi there"), (ASSISTANT, "Blue.")), {"prompt": "cat\n", "completion": "chat"}]
    for i, (record, template) in enumerate([(records[0], None), (records[0], str(own)), (records[1], None)]):
        (tmp_path / str(i)).mkdir()
        splits = build(tmp_path / str(i), folder, [record], chat_template=template)
        tok, item = splits.tokenizer, splits.train[0]
        assert item["input_ids"][0] == tok.bos_token_id and item["input_ids"].count(tok.bos_token_id) == 1
        prompt = render_prompt(tok, splits.prompt_format, record)
        assert encode(tok, prompt) == item["input_ids"][:start_of_response(item)]


# ---- truncation ------------------------------------------------------------------------------------------


def test_max_length_truncates_from_the_right_counts_and_drops_examples_without_a_response_token(tmp_path, tokenizer,
                                                                                                  tok):
    fits = {"prompt": "cat\n", "completion": "chat"}
    cut = {"prompt": "cat\n", "completion": "The cat sat on the mat. " * 3}
    gone = {"prompt": "The cat sat on the mat. " * 4 + "\n", "completion": "chat"}
    max_length = 12
    assert len(ids(tok, gone["prompt"])) > max_length > len(ids(tok, "cat\n")) + 3
    splits = build(tmp_path, tokenizer, [fits, cut, gone, fits], max_length=max_length)
    assert splits.counts == {"examples": 3, "truncated": 2, "dropped": 1, "skipped_rows": 0}
    truncated = splits.train[1]
    assert len(truncated["input_ids"]) == max_length
    assert truncated["input_ids"] == (ids(tok, cut["prompt"] + cut["completion"]))[:max_length]
    assert truncated["labels"][start_of_response(truncated):] == truncated["input_ids"][start_of_response(truncated):]
    with pytest.raises(SFTError, match=r"no example is left: 1 of 1 .*Raise dataset\.max_length"):
        build(tmp_path, tokenizer, [gone], max_length=max_length, val_file=None)


# ---- layouts, files and bad rows -------------------------------------------------------------------------


def test_the_layout_is_detected_per_file_from_the_first_valid_record_and_can_be_forced(tmp_path, tokenizer, tok):
    both = {"prompt": "cat\n", "completion": "chat", "instruction": "Name a colour.", "output": "Blue."}
    records = ["{not json", both, both]
    assert build(tmp_path, tokenizer, records, skip_bad_rows=True, val_file=None, val_size=1) \
        .prompt_format["format"] == "prompt_completion"
    splits = build(tmp_path, tokenizer, records, skip_bad_rows=True, format="alpaca", val_size=1, val_file=None)
    assert splits.prompt_format["format"] == "alpaca" and splits.skipped == {"dataset.train_file": 1}
    assert splits.train[0]["input_ids"][-3:] == (ids(tok, "Blue.") + [tok.eos_token_id])[-3:]
    # a forced layout the records are not in names the first record and the key it lacks
    with pytest.raises(SFTError, match=r"train\.jsonl:1: the record has no 'messages' among its .*format=messages"):
        build(tmp_path, tokenizer, [{"prompt": "cat", "completion": "chat"}], format="messages")
    with pytest.raises(SFTError, match=r"dataset.format='sharegpt' is not one of: auto, messages"):
        build(tmp_path, tokenizer, [both], format="sharegpt")


def test_fields_map_the_files_own_key_names(tmp_path, tokenizer, tok):
    record = {"conversation": [{"from": "user", "value": "Hi there"}, {"from": "assistant", "value": "Blue."}]}
    fields = {"messages": "conversation", "role": "from", "content": "value"}
    item = build(tmp_path, tokenizer, [record], fields=fields).train[0]
    assert item["labels"][start_of_response(item):] == ids(tok, "Blue.<|im_end|>") + [IGNORE]
    with pytest.raises(SFTError, match="dataset.fields has the unknown key.* answer"):
        build(tmp_path, tokenizer, [record], fields={"answer": "a"})


@pytest.mark.parametrize("record,problem", [
    ("{not json", "is not valid JSON"),
    ('["a list"]', "is a JSON list, not an object"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "has no assistant turn"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "'role' is 'bot', not one of: system, user, assistant"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 4}]}, "non-string 'content': 4"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}, "empty 'content'"),
    ({"messages": []}, "not a non-empty list"),
])
def test_a_bad_record_is_an_error_with_path_and_line_or_is_skipped_and_counted(tmp_path, tokenizer, record, problem):
    good = chat((USER, "Hi there"), (ASSISTANT, "Blue."))
    records = [good, record, good, record]
    with pytest.raises(SFTError, match=rf"train\.jsonl:2: the record .*{problem}.*skip_bad_rows=true"):
        build(tmp_path, tokenizer, records)
    splits = build(tmp_path, tokenizer, records, skip_bad_rows=True)
    assert splits.counts["skipped_rows"] == 2 and splits.counts["examples"] == 2


def test_sharegpt_conversations_are_messages_with_human_gpt_and_system_roles(tmp_path, tokenizer, tok):
    sharegpt = {"conversations": [{"from": "system", "value": "You are a helpful assistant."},
                                  {"from": "human", "value": "What is two plus two?"},
                                  {"from": "gpt", "value": "Two plus two is four."}], "id": "x1"}
    same = chat((SYSTEM, "You are a helpful assistant."), (USER, "What is two plus two?"),
                (ASSISTANT, "Two plus two is four."))
    (tmp_path / "a").mkdir()
    read, expected = build(tmp_path / "a", tokenizer, [sharegpt]), build(tmp_path, tokenizer, [same])
    assert read.prompt_format["format"] == "messages" and read.train[0] == expected.train[0]
    assert read.references["val"] == expected.references["val"]  # answered and judged the same way
    assert render_prompt(read.tokenizer, read.prompt_format, sharegpt) == expected.sample_prompts[0]
    bad = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Blue."}]}
    with pytest.raises(SFTError, match=r"train\.jsonl:2: the record has a message 1 whose 'from' is 'bot'"):
        build(tmp_path, tokenizer, [sharegpt, bad])


def test_openai_messages_keep_role_and_content_and_tool_turns_are_bad_rows(tmp_path, tokenizer, tok):
    named = {"messages": [{"role": "user", "content": "Hi there", "name": "ann"},
                          {"role": "assistant", "content": "Blue.", "name": "bot", "weight": 1}]}
    plain = chat((USER, "Hi there"), (ASSISTANT, "Blue."))
    (tmp_path / "a").mkdir()
    assert build(tmp_path / "a", tokenizer, [named]).train[0] == build(tmp_path, tokenizer, [plain]).train[0]
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    tool_call = {"messages": [{"role": "user", "content": "Hi"}, call]}
    tool_turn = {"messages": [{"role": "user", "content": "Hi"}, {**call, "content": "Let me look."},
                              {"role": "tool", "tool_call_id": "1", "content": "blue"},
                              {"role": "assistant", "content": "Blue."}]}
    for record, problem in ((tool_call, "an assistant message 1 that only calls tools"),
                            (tool_turn, "a message 2 with the role 'tool': tool turns are not supported")):
        with pytest.raises(SFTError, match=rf"train\.jsonl:2: the record has {problem}.*skip_bad_rows=true"):
            build(tmp_path, tokenizer, [plain, record])
    assert build(tmp_path, tokenizer, [plain, tool_call, tool_turn], skip_bad_rows=True).counts["skipped_rows"] == 2


def test_missing_fields_in_plain_layouts_are_bad_rows(tmp_path, tokenizer):
    with pytest.raises(SFTError, match=r"train\.jsonl:2: the record has no completion: no 'completion'"):
        build(tmp_path, tokenizer, [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(SFTError, match=r"train\.jsonl:2: the record has an empty 'output'"):
        build(tmp_path, tokenizer, [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ""}])


def test_a_json_list_is_read_and_its_bad_items_are_named_by_index(tmp_path, tokenizer, tok):
    good = {"prompt": "cat\n", "completion": "chat"}
    path = tmp_path / "train.json"
    path.write_text(json.dumps([good, good, good, good]))
    splits = chat_files(str(path), tokenizer, val_size=1)
    assert len(splits.train) == 3 and len(splits.val) == 1
    assert splits.train[0]["labels"] == masked(tok, "cat\n") + ids(tok, "chat") + [tok.eos_token_id]
    path.write_text(json.dumps([good, {"prompt": "cat\n"}]))
    with pytest.raises(SFTError, match=r"train\.json\[1\]: the record has no completion"):
        chat_files(str(path), tokenizer)
    path.write_text(json.dumps({"data": [good]}))
    with pytest.raises(SFTError, match="holds a JSON dict; a .json file must hold a list"):
        chat_files(str(path), tokenizer)


def test_splits_val_size_val_and_test_files_and_group_lengths(tmp_path, tokenizer):
    records = [{"prompt": f"cat {i}\n", "completion": "chat " * (1 + i % 5)} for i in range(40)]
    train = jsonl(tmp_path / "train.jsonl", records)
    a, b = (chat_files(train, tokenizer, val_size=0.25, split_seed=1) for _ in range(2))
    assert (len(a.train), len(a.val), a.test) == (30, 10, None)
    assert a.val.input_ids == b.val.input_ids and a.counts["examples"] == 30  # seeded
    assert chat_files(train, tokenizer, val_size=0.25, split_seed=2).val.input_ids != a.val.input_ids
    full = chat_files(train, tokenizer, val_file=jsonl(tmp_path / "v.jsonl", records[:3]),
                      test_file=jsonl(tmp_path / "t.jsonl", records[:5]), group_by_length=True)
    assert (len(full.train), len(full.val), len(full.test)) == (40, 3, 5)
    assert full.group_lengths == [len(ids) for ids in full.train.input_ids]
    with pytest.raises(SFTError, match=r"dataset.val_file=.*holds messages records but dataset.train_file holds "
                                       "prompt_completion"):
        chat_files(train, tokenizer, val_file=jsonl(tmp_path / "m.jsonl", [chat((USER, "a"), (ASSISTANT, "b"))]))


def test_tokenized_files_are_cached(tmp_path, tokenizer, cache):
    train = jsonl(tmp_path / "train.jsonl", [chat((USER, "Hi there"), (ASSISTANT, "Blue."))] * 3)
    val = jsonl(tmp_path / "val.jsonl", [chat((USER, "Hi there"), (ASSISTANT, "Blue."))])
    first = chat_files(train, tokenizer, val_file=val)
    assert len(list(cache.glob("chat-*.pt"))) == 2  # train and val
    again = chat_files(train, tokenizer, val_file=val)
    assert again.train.input_ids == first.train.input_ids and again.counts == first.counts
    assert len(list(cache.glob("chat-*.pt"))) == 2
    chat_files(train, tokenizer, val_file=val, train_on_prompt=True)  # other labels: tokenized again
    assert len(list(cache.glob("chat-*.pt"))) == 4


@pytest.mark.parametrize("damage", ["not a torch file", "cut in half", "a byte changed in a tensor"])
def test_a_damaged_cache_entry_is_tokenized_again_with_a_warning(tmp_path, tokenizer, cache, caplog, damage):
    train = jsonl(tmp_path / "train.jsonl", [chat((USER, "Hi there"), (ASSISTANT, f"Blue {i}.")) for i in range(30)])
    val = jsonl(tmp_path / "val.jsonl", [chat((USER, "Hi there"), (ASSISTANT, "Blue."))])
    first = chat_files(train, tokenizer, val_file=val)
    entry = max(cache.glob("chat-*.pt"), key=lambda p: p.stat().st_size)  # train's
    data = entry.read_bytes()
    if damage == "not a torch file":
        data = b"Invalid magic number" * 10
    elif damage == "cut in half":
        data = data[:len(data) // 2]
    else:  # the labels' ids are stored as int64: a high byte flipped in the data region, which torch reads without error
        stored = torch.load(io.BytesIO(data), weights_only=True)
        value = stored["labels"]["flat"].numpy().tobytes()
        at = data.index(value) + len(value) - 1
        data = data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1:]
    entry.write_bytes(data)
    with caplog.at_level("WARNING"):
        again = chat_files(train, tokenizer, val_file=val)
    assert again.train.input_ids == first.train.input_ids and again.train.labels == first.train.labels
    assert f"the token cache entry {entry} is unreadable" in caplog.text and "tokenizing again" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        chat_files(train, tokenizer, val_file=val)  # the entry was written anew
    assert "unreadable" not in caplog.text


# ---- prompts for prediction ------------------------------------------------------------------------------


def test_render_prompt_is_the_training_sequence_up_to_the_response_in_every_layout(tmp_path, tokenizer, tok):
    cases = [chat((SYSTEM, "You are a helpful assistant."), (USER, "Name a colour."), (ASSISTANT, "Blue.")),
             {"prompt": "Translate to French: cat\n", "completion": "chat"},
             {"instruction": "Summarise the text.", "input": "The cat sat on the mat.", "output": "A cat sat."},
             {"instruction": "Name a colour.", "output": "Blue."}]
    for i, record in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        splits = build(tmp_path / str(i), tokenizer, [record, record], val_file=None, val_size=1)
        item = splits.train[0]
        prompt = render_prompt(splits.tokenizer, splits.prompt_format, record)
        assert encode(splits.tokenizer, prompt) == item["input_ids"][:start_of_response(item)]
        assert splits.sample_prompts == [prompt]  # the validation sample is the same prompt
        assert splits.sample_references == [record.get("output") or record.get("completion") or "Blue."]
        json.dumps(splits.prompt_format)  # saved with checkpoints


def test_render_prompt_takes_plain_strings_and_records_of_other_layouts(tmp_path, tokenizer):
    splits = build(tmp_path, tokenizer, [chat((USER, "Hi there"), (ASSISTANT, "Blue."))])
    pf, tok = splits.prompt_format, splits.tokenizer
    expected = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, pf, "Name a colour.") == expected
    assert render_prompt(tok, pf, {"prompt": "Name a colour."}) == expected
    assert render_prompt(tok, pf, {"instruction": "Name a colour.", "output": "ignored"}) == expected
    # a conversation's final assistant turn is the response: dropped; an open last user turn is kept
    turns = chat((USER, "Hi there"), (ASSISTANT, "Blue."), (USER, "Name a colour."))
    assert render_prompt(tok, pf, turns).endswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(tok, pf, chat(*[(m["role"], m["content"]) for m in turns["messages"]], (ASSISTANT, "x"))) \
        == render_prompt(tok, pf, turns)
    alpaca = build(tmp_path, tokenizer, [{"instruction": "a", "output": "b"}] * 2, val_file=None, val_size=1)
    expected = ALPACA_NO_INPUT.format(instruction="Name a colour.")
    assert render_prompt(tok, alpaca.prompt_format, "Name a colour.") == expected


def test_read_prompts_reads_txt_jsonl_and_json_and_names_a_bad_line(tmp_path, tokenizer):
    pf = build(tmp_path, tokenizer, [chat((USER, "Hi there"), (ASSISTANT, "Blue."))]).prompt_format
    txt = tmp_path / "p.txt"
    txt.write_text("Name a colour.\n\n  Hi there  \n")
    assert read_prompts(txt, pf) == ["Name a colour.", "  Hi there  "]
    records = [{"prompt": "a"}, chat((USER, "b")), {"instruction": "c"}]
    assert read_prompts(Path(jsonl(tmp_path / "p.jsonl", records)), pf) == records
    (tmp_path / "p.json").write_text(json.dumps(records))
    assert read_prompts(tmp_path / "p.json", pf) == records
    with pytest.raises(SFTError, match=r"p\.jsonl:2: the record has none of the fields"):
        read_prompts(Path(jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"text": "b"}])), pf)
    with pytest.raises(SFTError, match=r"p\.jsonl:1: the record is not valid JSON"):
        read_prompts(Path(jsonl(tmp_path / "p.jsonl", ["{"])), pf)


# ---- the YAML ----------------------------------------------------------------------------------------------


def test_the_yaml_composes_and_binds_to_chat_files():
    with initialize_config_dir(str(Path(config.find_config_dir())), version_base="1.3"):
        cfg = compose("train", overrides=["dataset=chat_files", "model=causal_lm", "model.name_or_path=/m"])
    values = OmegaConf.to_container(cfg.dataset, resolve=True, throw_on_missing=False)
    assert values["_target_"] == "sft_cli.tasks.causal_lm.chats.chat_files" and values["tokenizer"] == "/m"
    signature = inspect.signature(chat_files)
    signature.bind(**{k: v for k, v in values.items() if not k.startswith("_")})
    defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    for key in ("format", "max_length", "val_size", "train_on_prompt", "chat_template", "skip_bad_rows",
                "group_by_length"):
        assert values[key] == defaults[key], key
