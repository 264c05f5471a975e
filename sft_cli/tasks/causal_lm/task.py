"""The causal-LM task (configs/task/causal_lm.yaml): instruction or chat fine-tuning of a language model.

Data come from chats.chat_files (messages, prompt/completion or alpaca files, rendered with the chat
template or a plain prompt format, labels masked to the response tokens), the model from
models.hf.hf_causal_lm, the loss from configs/loss/token_cross_entropy.yaml (loss.py). It reports the token-weighted loss,
perplexity and next-token accuracy on the learned tokens, and answers a few validation prompts greedily at
each validation (samples.jsonl), so progress can be read, not only measured. With task.generate_samples > 0 it
also judges the answers (judge: exact_match, json_valid, ... of answers.py), val metrics like the loss.
"""

import logging
import time

import torch
from omegaconf import DictConfig
from torch import nn

from sft_cli import config
from sft_cli.errors import SFTError
from sft_cli.task import Splits
from sft_cli.tasks.causal_lm import answers, chats
from sft_cli.models.hf import varlen_attention
from sft_cli.tasks.causal_lm.chats import PackedSequences
from sft_cli.tasks.causal_lm.metrics import TokenWindow
from sft_cli.training import distributed

log = logging.getLogger(__name__)

LOSS_METRICS = ("loss", "perplexity", "token_accuracy")  # what the window reports


class CausalLMTask:
    """Next-token loss on the response tokens; the prompt format is what a checkpoint needs besides its config."""

    predict_example = 'prompt="..."'  # what sft-train suggests after a run
    # every metric the task can report (what a sweep checks trainer.monitor against before its runs are built);
    # an instance lists those its config reports: the answer metrics only with generate_samples > 0
    metrics = (*LOSS_METRICS, *answers.BUILT_IN, *answers.OPTIONAL)

    def __init__(self, samples: int = 4, sample_tokens: int = 64, validate_before_training: bool = True,
                 generate_samples: int = 16, generate_every_n_validations: int = 1, generate_batch_size: int = 16,
                 answer_regex: str | None = None, answer_json_keys: list[str] | None = None,
                 answer_metrics: dict | None = None, rouge_l: bool = False):
        self.samples, self.sample_tokens = samples, sample_tokens
        self.validate_before_training = validate_before_training
        for key, value, least in (("generate_samples", generate_samples, 0), ("generate_batch_size", generate_batch_size, 1),
                                  ("generate_every_n_validations", generate_every_n_validations, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise SFTError(f"task.{key}={value!r} must be a whole number, at least {least}"
                               + (" (0: no generated-answer metrics)" if least == 0 else ""))
        self.judged_samples, self.generate_every = generate_samples, generate_every_n_validations
        self.generate_batch_size = generate_batch_size
        self.answer_metrics = answers.AnswerMetrics(answer_regex, answer_json_keys, answer_metrics, rouge_l)
        self.metrics = (*LOSS_METRICS, *self.answer_metrics.names) if generate_samples else LOSS_METRICS
        # trainer.monitor naming a metric this config turns off: what turns it on (checks.check_monitor)
        self.metrics_off = self.answer_metrics.off()
        if not generate_samples:
            self.metrics_off |= {name: "task.generate_samples=0 turns the generated-answer metrics off: set "
                                       "task.generate_samples=16 (val examples answered and judged at each "
                                       "validation), or monitor val/loss"
                                 for name in (*answers.BUILT_IN, *answers.OPTIONAL, *self.answer_metrics.custom)}
        # the metrics of train rows: the window's (answers are judged on val and test only)
        self.train_metrics = LOSS_METRICS
        self.validations = 0  # val splits judged or skipped so far: every generate_every_n_validations-th is judged
        self.references: dict[str, list[tuple]] = {}
        self.answered: dict[str, str] = {}  # rendered val prompt -> the answer the last validation judged
        self.prompt_format: dict | None = None
        self.tokenizer = None  # the data's tokenizer, its chat template set to the one the data were rendered with
        self.sample_prompts: list[str] = []
        self.sample_references: list[str] = []
        self.sample_questions: list[str] = []
        self.criterion = None

    def data(self, dataset: DictConfig) -> Splits:
        splits = config.build(dataset)
        if not hasattr(splits, "prompt_format"):
            raise SFTError(f"task=causal_lm needs chat or instruction data (dataset=chat_files), not "
                           f"<{dataset._target_}>: set dataset=chat_files dataset.train_file=..., or task=classification")
        self.prompt_format, self.tokenizer = splits.prompt_format, splits.tokenizer
        self.packed = isinstance(splits.train, PackedSequences)
        self.collate = splits.collate
        self.sample_prompts = splits.sample_prompts[:self.samples]
        self.sample_references = splits.sample_references[:self.samples]
        self.sample_questions = splits.sample_questions[:self.samples]
        self.references = splits.references
        return splits

    def info(self) -> dict:
        return {"prompt_format": self.prompt_format}

    def set_info(self, info: dict) -> None:
        self.prompt_format = info["prompt_format"]

    def model(self, model: DictConfig, pretrained: bool = True) -> nn.Module:
        built = config.build(model, **({} if pretrained else {"weights": None}))
        if self.tokenizer is not None:
            built.tokenizer = self.tokenizer  # checkpoints (hf/) then hold the chat template training used
        if getattr(self, "packed", False) and varlen_attention(built.model):
            self.collate.flatten = True  # the loaders share this collate: their batches become one row each
            log.info(f"dataset.packing=true with {built.model.config._attn_implementation}: each batch is one "
                     "padding-free row, its examples told apart by their restarting positions")
        elif getattr(self, "packed", False):
            _check_packing(built, model.get("name_or_path"))
        return built

    def set_loss(self, loss: DictConfig, splits: Splits, model: nn.Module) -> None:
        self.criterion = config.build(loss)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        inputs, labels, counts = batch
        summed, tokens, correct = self.criterion(*model(inputs, labels))  # logits at the learned positions only
        record = (summed.detach(), tokens, correct, counts["examples"], counts["tokens"])
        return summed, tokens, record  # the loop divides by the learned tokens of the whole step

    def window(self, device: torch.device) -> TokenWindow:
        return TokenWindow(device)

    def generate_samples(self, model: nn.Module) -> list[dict]:
        """Greedy answers to the first validation prompts: {prompt (as rendered), question (the last user turn),
        reference, response} each."""
        answered, self.answered = self.answered, {}
        if not self.sample_prompts:
            return []
        if all(p in answered for p in self.sample_prompts):  # judged by this validation: the same greedy answers
            responses = [answered[p] for p in self.sample_prompts]
        else:
            from sft_cli.tasks.causal_lm.generate import GenerationOptions, generate

            options = GenerationOptions(max_new_tokens=self.sample_tokens, temperature=0.0,
                                        batch_size=len(self.sample_prompts))
            model.eval()
            log.info(f"answering {len(self.sample_prompts)} validation prompts (up to {self.sample_tokens} new "
                     "tokens each; task.samples=0 skips this) ...")
            start = time.perf_counter()
            responses = generate(model.model, model.tokenizer, self.sample_prompts, options)
            log.info(f"samples.jsonl: {len(responses)} answers in {time.perf_counter() - start:.1f} s")
        return [{"prompt": p, "question": q, "reference": r, "response": a}
                for p, q, r, a in zip(self.sample_prompts, self.sample_questions, self.sample_references, responses)]

    def judge(self, model: nn.Module, split: str) -> dict:
        """The generated-answer metrics (answers.py) of the first task.generate_samples examples of `split`, on
        every generate_every_n_validations-th validation (the first: before training) and every test, with
        `answers` (a row per example: prompt, reference, answer and its scores) and `generate_s` as details; {}
        otherwise. Greedy, batched and left-padded as sft-predict; under DDP each process answers its share
        and the answers are gathered once, so every process returns the same."""
        if split == "val":
            self.answered = {}
        if not self.judged_samples:
            return {}
        if split == "val":
            count, self.validations = self.validations, self.validations + 1
            if count % self.generate_every:
                return {}
        items = self.references.get(split, [])[:self.judged_samples]
        if not items:
            return {}
        from sft_cli.tasks.causal_lm.generate import GenerationOptions, generate_ended

        options = GenerationOptions(max_new_tokens=self.sample_tokens, temperature=0.0,
                                    batch_size=self.generate_batch_size)
        texts = [chats.prompt_texts(self.tokenizer, self.prompt_format, prompt) for prompt, _ in items]
        model.eval()
        start = time.perf_counter()
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # resume stays bitwise
            generated = distributed.shard_and_gather(
                [rendered for rendered, _ in texts],
                lambda prompts: generate_ended(model.model, model.tokenizer, prompts, options))
        seconds = time.perf_counter() - start
        if split == "val":  # generate_samples, called next for samples.jsonl, reuses them
            self.answered = {rendered: answer for (rendered, _), (answer, _) in zip(texts, generated)}
        rows = []
        for (_, question), (_, reference), (answer, ended) in zip(texts, items, generated):
            item = answers.Answer(question, answer, reference, ended)
            rows.append({"prompt": question, "reference": reference, "answer": answer,
                         **self.answer_metrics.scores(item)})
        means = self.answer_metrics.means(rows)
        log.info(f"{split}: {len(rows)} answers generated in {seconds:.2f} s (up to {self.sample_tokens} new tokens "
                 f"each; task.generate_samples={self.judged_samples}, 0 turns this off): "
                 + " ".join(f"{k} {v:.3f}" for k, v in means.items()))
        return {**means, "answers": rows, "generate_s": seconds}

    def predict(self, cfg: DictConfig, out_dir) -> list[dict]:
        from sft_cli.tasks.causal_lm.generate import (
            predict,  # generation: only sft-predict needs it
        )

        return predict(cfg, out_dir)


def _check_packing(model: nn.Module, name: str) -> None:
    """dataset.packing=true relies on the model's attention keeping packed examples apart by their positions
    (transformers' causal mask does, for the models that build it with create_causal_mask). Check it on two
    short sequences: the second, packed after the first, must get the logits it gets alone."""
    lm, was_training = model.model, model.training
    ids = torch.arange(3, 11).remainder(lm.config.vocab_size - 3).add(3)[None]  # 8 ordinary token ids
    model.eval()
    with torch.no_grad():
        alone = lm(input_ids=ids[:, 4:], use_cache=False).logits
        packed = lm(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]), use_cache=False).logits
    model.train(was_training)
    if not torch.allclose(packed[:, 4:], alone, atol=1e-4, rtol=1e-4):
        raise SFTError(f"dataset.packing=true: model {name} lets packed examples attend to each other (its "
                       "attention ignores the restarting positions), which would train on wrong contexts. Set "
                       "dataset.packing=false (dataset.group_by_length=true also saves most padding).")
