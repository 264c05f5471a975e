"""sft-predict for causal-LM checkpoints: answer prompts with the fine-tuned model, batched.

A prompt is rendered exactly as training rendered it (chats.render_prompt, ending where the response
starts) and continued until the model ends its turn. Batching never changes an answer: prompts are padded on
the left with an attention mask, so a greedy answer is the same alone or next to longer prompts.
"""

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from sft_cli import disk
from sft_cli.errors import SFTError
from sft_cli.models.hf import pad_with_eos
from sft_cli.results import console
from sft_cli.tasks.causal_lm import chats
from sft_cli.training import checkpoint, distributed, restore, runtime

log = logging.getLogger("sft_cli.generate")

# The tokens chat templates close a turn with (ChatML/Qwen, Llama 3, Gemma): generation stops at any of them
# that the tokenizer holds as a single token, as well as at EOS (a fine-tuned model ends its answer with the
# template's end-of-turn, which need not be the tokenizer's eos_token).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


@dataclass(frozen=True)
class GenerationOptions:
    """How to continue prompts; the values are checked on construction (SFTError naming the key)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy (deterministic); > 0: sampling at this temperature
    top_p: float = 1.0  # sampling only: the smallest set of tokens holding this much probability
    batch_size: int = 8
    seed: int = 0  # sampling only: with the prompt, it fixes the answer (SeededSampler)

    def __post_init__(self):
        if problems := option_problems(**{k: v for k, v in asdict(self).items() if k != "seed"}):
            raise SFTError("; ".join(problems))


    def seed_of(self, prompt_ids: list[int]) -> int:
        """The random stream of one prompt's answer: from the seed and the prompt's tokens."""
        return int.from_bytes(hashlib.sha256(json.dumps([self.seed, prompt_ids]).encode()).digest()[:8], "little")


def option_problems(max_new_tokens: int, temperature: float, top_p: float, batch_size: int) -> list[str]:
    """What is wrong with these GenerationOptions values, one message per key (empty when all is well)."""
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens={max_new_tokens} must be at least 1")
    if temperature < 0:
        problems.append(f"temperature={temperature} must be 0 (greedy) or more (sampling)")
    if not 0 < top_p <= 1:
        problems.append(f"top_p={top_p} must be in (0, 1]: 1 samples from every token")
    if batch_size < 1:
        problems.append(f"batch_size={batch_size} must be at least 1")
    return problems


def generate(model, tokenizer, prompts: list[str], options: GenerationOptions) -> list[str]:
    """The answer to each prompt (only the new text, special tokens removed, stripped), in prompt order.
    `model` is a transformers causal LM; its device is where generation runs."""
    return [text for text, _ in generate_ended(model, tokenizer, prompts, options)]


def generate_ended(model, tokenizer, prompts: list[str], options: GenerationOptions) -> list[tuple[str, bool]]:
    """generate()'s answers, each with whether it ended (EOS or an end-of-turn token among its new tokens) within
    options.max_new_tokens, rather than being cut there."""
    # Tokenized as training tokenized the same text: BOS added unless the text starts with it (a chat template
    # writes BOS itself, Llama 3 / Gemma / Mistral), so it is never doubled; Qwen-like tokenizers add none.
    encoded = [chats.encode(tokenizer, p) for p in prompts]
    # Similar lengths share a batch (less padding); answers go back to prompt order at the end.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad_with_eos(tokenizer)  # as training padded
    answers, stops = [("", False)] * len(prompts), stop_ids(model, tokenizer)
    device = next(model.parameters()).device
    for start in range(0, len(order), options.batch_size):
        batch = order[start:start + options.batch_size]
        # padded on the left, so that every prompt ends where generation starts
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding_side="left", return_tensors="pt")
        input_ids = padded["input_ids"]
        # Sampling draws through a logits processor with one random stream per prompt; generate() itself then
        # picks the one token left (greedy), so no generation_config default (top_k=50) samples on top of it.
        sampling = {} if options.temperature == 0 else {"logits_processor": LogitsProcessorList(
            [SeededSampler([options.seed_of(encoded[i]) for i in batch], options.temperature, options.top_p)])}
        output = model.generate(input_ids=input_ids.to(device), attention_mask=padded["attention_mask"].to(device),
                                do_sample=False, max_new_tokens=options.max_new_tokens, eos_token_id=stops,
                                pad_token_id=tokenizer.pad_token_id, synced_gpus=distributed.in_lockstep(),
                                **sampling)  # synced: FSDP's processes step together until all are done
        new = output[:, input_ids.shape[1]:]  # every row starts with the same padded prompt length
        for i, ids in zip(batch, new.tolist()):
            answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip(), not set(stops).isdisjoint(ids)
    return answers


class SeededSampler(LogitsProcessor):
    """Sampling at `temperature` from the top-p nucleus, each row of the batch from its own random stream (seeded
    from sft-predict's seed and the prompt's tokens): an answer depends on the seed and its prompt alone, not on
    the other prompts of its batch, their order or the batch size, so it is the same in every run (greedy's
    guarantee, for sampling). Returns scores that leave one token per row: the one drawn."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.seeds, self.temperature, self.top_p = seeds, temperature, top_p
        self.generators = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:  # on the device the scores are on
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        scores = scores.float() / self.temperature
        if self.top_p < 1:
            scores = TopPLogitsWarper(self.top_p)(input_ids, scores)
        probs = scores.softmax(dim=-1)
        drawn = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        return torch.full_like(scores, -math.inf).scatter_(1, drawn[:, None], 0.0)


def stop_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: EOS, the model's own generation_config EOS ids (Llama 3 instruct
    lists several), and the end-of-turn tokens of END_OF_TURN that the tokenizer holds as one token."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN if token in vocab)
    return sorted(i for i in ids if i is not None)


def predict(cfg: DictConfig, out_dir: Path) -> list[dict]:
    """Answer cfg.prompt or every prompt of cfg.input with the checkpoint's model; rows {prompt, rendered,
    response} written to cfg.output (.jsonl) or printed as a table. Everything is checked before the model
    loads."""
    options = _check(cfg)
    ckpt = checkpoint.resolve(cfg.checkpoint)
    device = runtime.pick_device(cfg.trainer.device)
    task, model = restore.load_model(cfg, ckpt, device)
    prompt_format = task.info()["prompt_format"]
    items = [str(cfg.prompt)] if cfg.prompt is not None else chats.read_prompts(Path(cfg.input), prompt_format)
    if not items:
        raise SFTError(f"input={cfg.input} holds no prompts")
    rendered = [chats.render_prompt(model.tokenizer, prompt_format, item) for item in items]
    for item, text in zip(items, rendered):
        if not chats.encode(model.tokenizer, text):  # nothing to continue from: generate() would fail in the model
            raise SFTError(f"the prompt {item!r} is rendered by this checkpoint's {prompt_format['format']} format "
                           "as no token at all, and generation needs at least one token to continue: give a prompt "
                           "with some text.")
    with torch.inference_mode(), runtime.autocast(device, cfg.trainer.precision):
        responses = generate(model.model, model.tokenizer, rendered, options)
    rows = [{"prompt": item, "rendered": text, "response": response}
            for item, text, response in zip(items, rendered, responses)]
    _write(rows, cfg.output)
    return rows


def _check(cfg: DictConfig) -> GenerationOptions:
    """Every problem with the command line at once, as one SFTError; the generation options otherwise."""
    problems = []
    if (cfg.prompt is None) == (cfg.input is None):
        problems.append('give exactly one of prompt="..." or input=<.txt, .jsonl or .json file of prompts>')
    elif cfg.input is not None and not Path(cfg.input).is_file():
        problems.append(f"input={cfg.input} is not a file: give a .txt (one prompt per line), .jsonl or .json file")
    if cfg.output is not None:
        path = Path(cfg.output)
        if path.suffix != ".jsonl" or path.is_dir():
            problems.append(f"output={cfg.output} must be a file ending in .jsonl (or leave it out to print a table)")
        elif path.exists() and not cfg.get("overwrite", False):
            problems.append(f"output={cfg.output} already exists and is left untouched: choose a new file name, "
                            "or add overwrite=true to replace it")
        elif why := disk.cannot_write(path):
            problems.append(f"output={cfg.output} cannot be written ({why}): choose a path in a folder you can "
                            "write to")
    values = {key: cfg[key] for key in ("max_new_tokens", "temperature", "top_p", "batch_size")}
    problems += option_problems(**values)
    if problems:
        raise SFTError(problems[0] if len(problems) == 1 else
                       "sft-predict cannot start:\n" + "\n".join(f"  - {p}" for p in problems))
    return GenerationOptions(**values, seed=cfg.get("seed") or 0)  # sampling: the run's seed, or seed=N


def _write(rows: list[dict], output: str | None) -> None:
    if output is None:
        console.print_ranking([{"prompt": r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"]),
                                "response": r["response"]} for r in rows], ["prompt", "response"], "answers")
        return
    disk.write_output("output", Path(output), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    log.info(f"wrote {len(rows)} answers to {output}")
