"""Generation for causal-LM checkpoints: batching never changes an answer, answers stop at EOS and at the
chat template's end of turn, greedy and seeded sampling are reproducible, and sft-predict's options are
checked (all at once, before the model loads). A tiny random Llama and a word-level tokenizer built here."""

import json
import types

import pytest
import torch
from omegaconf import OmegaConf

from sft_cli.errors import SFTError
from sft_cli.tasks.causal_lm import chats
from sft_cli.tasks.causal_lm import generate as gen
from sft_cli.tasks.causal_lm.generate import GenerationOptions
from sft_cli.training import checkpoint, restore

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "good answers are short and clear",
             "bad answers ramble on and on", "summarise this text please", "hello world how are you"]
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "[UNK]"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(SENTENCES + ["user assistant"], trainers.WordLevelTrainer(special_tokens=SPECIALS))
    # like Llama's: BOS in front of every text encoded with add_special_tokens=True
    bos = ("<s>", raw.token_to_id("<s>"))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   unk_token="[UNK]", additional_special_tokens=["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,  # peaked logits: no ties
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).float().eval()


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = [chat("hello"), chat("the cat sat on the mat and a dog ran in the park"), chat("summarise this text"),
           chat("good answers are short and clear but bad answers ramble on and on")]


def test_a_prompt_gets_the_same_greedy_answer_alone_and_in_a_batch_with_longer_prompts(model, tokenizer):
    options = GenerationOptions(max_new_tokens=8, batch_size=4)
    batched = gen.generate(model, tokenizer, PROMPTS, options)
    alone = [gen.generate(model, tokenizer, [p], options)[0] for p in PROMPTS]
    assert batched == alone
    assert sum(bool(a) for a in batched) >= 2 and len(set(batched)) >= 2  # real, differing answers
    assert gen.generate(model, tokenizer, PROMPTS, GenerationOptions(max_new_tokens=8, batch_size=3)) == batched
    assert tokenizer.padding_side == "right"  # the tokenizer is left as it was


def test_greedy_is_deterministic_and_seeded_sampling_is_reproducible(model, tokenizer):
    greedy = GenerationOptions(max_new_tokens=6)
    assert gen.generate(model, tokenizer, PROMPTS, greedy) == gen.generate(model, tokenizer, PROMPTS, greedy)

    def sample(seed, prompts=PROMPTS[:2], batch_size=8):
        torch.manual_seed(seed + 100)  # the global RNG plays no part: the options' seed decides
        options = GenerationOptions(max_new_tokens=6, temperature=20.0, top_p=0.95, seed=seed, batch_size=batch_size)
        return gen.generate(model, tokenizer, prompts, options)

    assert sample(1) == sample(1)
    assert len({tuple(sample(s)) for s in range(4)}) > 1  # at a high temperature seeds do differ
    # an answer depends on the seed and its prompt only: the same alone, in a batch, in another order
    batched = sample(3, PROMPTS)
    assert [sample(3, [p])[0] for p in PROMPTS] == batched == sample(3, PROMPTS, batch_size=3)
    assert sample(3, PROMPTS[::-1]) == batched[::-1]


@pytest.mark.parametrize("stop", ["<|im_end|>", "</s>"])
def test_an_answer_ends_at_the_end_of_turn_token_and_at_eos(model, tokenizer, stop):
    # The logits are steered: "good" first, then the stop token, then "bad" for ever.
    steps = iter(["good", stop])
    handle = model.lm_head.register_forward_hook(
        lambda module, args, out: out.index_add(-1, torch.tensor([tokenizer.convert_tokens_to_ids(next(steps, "bad"))]),
                                                torch.full((*out.shape[:-1], 1), 1e4)))
    try:
        assert gen.generate(model, tokenizer, [chat("hello")], GenerationOptions(max_new_tokens=5)) == ["good"]
    finally:
        handle.remove()


def test_an_answer_says_whether_it_ended_its_turn_or_was_cut_at_max_new_tokens(model, tokenizer):
    # steered as above: "good", then the end of turn at the second step, then "bad" for ever
    steps = iter(["good", "<|im_end|>"])
    handle = model.lm_head.register_forward_hook(
        lambda module, args, out: out.index_add(-1, torch.tensor([tokenizer.convert_tokens_to_ids(next(steps, "bad"))]),
                                                torch.full((*out.shape[:-1], 1), 1e4)))
    try:
        ended = gen.generate_ended(model, tokenizer, [chat("hello")], GenerationOptions(max_new_tokens=5))
        steps = iter(["good", "good"])  # the end of turn would come third: 2 new tokens cut it off
        cut = gen.generate_ended(model, tokenizer, [chat("hello")], GenerationOptions(max_new_tokens=2))
    finally:
        handle.remove()
    assert ended == [("good", True)] and cut == [("good good", False)]  # ends_turn 1, then 0


def test_stop_ids_hold_eos_and_the_end_of_turn_token(model, tokenizer):
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert set(gen.stop_ids(model, tokenizer)) == {tokenizer.eos_token_id, end_of_turn}


def test_a_prompt_that_starts_with_bos_gets_no_second_one(model, tokenizer, monkeypatch):
    seen = []
    monkeypatch.setattr(model, "generate", lambda input_ids, **kwargs: seen.append(input_ids[0].tolist()) or input_ids)
    gen.generate(model, tokenizer, ["<s>hello world", "hello world"], GenerationOptions(batch_size=1))
    assert seen[0] == seen[1] == tokenizer.convert_tokens_to_ids(["<s>", "hello", "world"])


@pytest.mark.parametrize("options, message", [
    ({"max_new_tokens": 0}, r"max_new_tokens=0 must be at least 1"),
    ({"temperature": -0.5}, r"temperature=-0.5 must be 0 \(greedy\) or more"),
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
    ({"batch_size": 0}, r"batch_size=0 must be at least 1"),
])
def test_bad_options_are_refused_with_the_key(options, message):
    with pytest.raises(SFTError, match=message):
        GenerationOptions(**options)


# sft-predict, with the checkpoint loading and chats stubbed (the task and chats are written elsewhere)

def predict_cfg(tmp_path, **overrides):
    cfg = {"checkpoint": str(tmp_path / "ckpt"), "prompt": None, "input": None, "output": None, "overwrite": False,
           "max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "batch_size": 2, "seed": 0,
           "trainer": {"device": "cpu", "precision": "32"}}
    return OmegaConf.create({**cfg, **overrides})


@pytest.fixture
def loaded(model, tokenizer, monkeypatch):
    """restore.load_model gives the tiny model and render_prompt renders ChatML (chats' own rendering is
    tested with it). Returns the list of load_model calls."""
    monkeypatch.setattr(chats, "render_prompt", lambda tok, prompt_format, item: chat(item))
    calls = []
    task = types.SimpleNamespace(info=lambda: {"prompt_format": {"format": "chat", "fields": {}}})
    wrapper = types.SimpleNamespace(model=model, tokenizer=tokenizer)
    monkeypatch.setattr(checkpoint, "resolve", lambda path: path)
    monkeypatch.setattr(restore, "load_model", lambda cfg, ckpt, device: calls.append(ckpt) or (task, wrapper))
    return calls


def test_predict_writes_one_row_per_prompt_as_jsonl(tmp_path, loaded, model, tokenizer):
    (tmp_path / "prompts.txt").write_text("hello\nsummarise this text\n")
    out = tmp_path / "answers.jsonl"
    rows = gen.predict(predict_cfg(tmp_path, input=str(tmp_path / "prompts.txt"), output=str(out)), tmp_path)
    expected = gen.generate(model, tokenizer, [chat("hello"), chat("summarise this text")],
                            GenerationOptions(max_new_tokens=6))
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == rows
    assert [(r["prompt"], r["rendered"], r["response"]) for r in rows] == [
        ("hello", chat("hello"), expected[0]), ("summarise this text", chat("summarise this text"), expected[1])]


def test_predict_answers_one_prompt_on_screen(tmp_path, loaded, model, tokenizer):
    rows = gen.predict(predict_cfg(tmp_path, prompt="hello, world"), tmp_path)
    assert [r["prompt"] for r in rows] == ["hello, world"]
    assert rows[0]["response"] == gen.generate(model, tokenizer, [chat("hello, world")], GenerationOptions(6))[0]


@pytest.mark.parametrize("overrides, message", [
    ({}, r"exactly one of prompt=.* or input="),
    ({"prompt": "hi", "input": "prompts.txt"}, r"exactly one of prompt=.* or input="),
    ({"input": "missing.jsonl"}, r"input=missing.jsonl is not a file"),
    ({"prompt": "hi", "output": "answers.csv"}, r"output=answers.csv must be a file ending in .jsonl"),
    ({"prompt": "hi", "max_new_tokens": 0}, r"max_new_tokens=0 must be at least 1"),
    ({"prompt": "hi", "temperature": -1}, r"temperature=-1 must be 0"),
    ({"prompt": "hi", "top_p": 0}, r"top_p=0 must be in \(0, 1\]"),
])
def test_predict_refuses_bad_options_before_loading_the_model(tmp_path, loaded, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SFTError, match=message):
        gen.predict(predict_cfg(tmp_path, **overrides), tmp_path)
    assert loaded == []


def test_predict_lists_every_problem_at_once(tmp_path, loaded):
    with pytest.raises(SFTError) as error:
        gen.predict(predict_cfg(tmp_path, output="a.csv", temperature=-1, top_p=2), tmp_path)
    assert str(error.value).count("\n  - ") == 4  # prompt/input, output, temperature, top_p


def test_predict_keeps_an_existing_output_unless_overwrite(tmp_path, loaded):
    out = tmp_path / "answers.jsonl"
    out.write_text("earlier answers\n")
    with pytest.raises(SFTError, match=r"already exists and is left untouched.*overwrite=true"):
        gen.predict(predict_cfg(tmp_path, prompt="hello", output=str(out)), tmp_path)
    assert loaded == [] and out.read_text() == "earlier answers\n"
    gen.predict(predict_cfg(tmp_path, prompt="hello", output=str(out), overwrite=True), tmp_path)
    assert json.loads(out.read_text())["prompt"] == "hello"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """tests/fixtures.py's tiny Llama: ChatML, and no BOS (an empty prompt/completion prompt is no token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fixtures import write_tiny_llama

    folder = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion"])
def test_an_empty_prompt_is_an_empty_user_turn_or_refused_when_it_renders_to_no_token(tmp_path, monkeypatch,
                                                                                        tiny_llama, fmt):
    from fixtures import CHATML

    model, tokenizer = tiny_llama
    prompt_format = {"format": fmt, "fields": {}, "chat_template": CHATML, "prompt_template": "{prompt}"}
    task = types.SimpleNamespace(info=lambda: {"prompt_format": prompt_format})
    monkeypatch.setattr(checkpoint, "resolve", lambda path: path)
    monkeypatch.setattr(restore, "load_model",
                        lambda cfg, ckpt, device: (task, types.SimpleNamespace(model=model, tokenizer=tokenizer)))
    if fmt == "messages":  # an empty user turn is a valid chat: answered
        rows = gen.predict(predict_cfg(tmp_path, prompt=""), tmp_path)
        assert rows[0]["prompt"] == "" and rows[0]["rendered"] == "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    else:
        with pytest.raises(SFTError, match=r"the prompt '' is rendered .* as no token at all.*give a prompt with"):
            gen.predict(predict_cfg(tmp_path, prompt=""), tmp_path)
