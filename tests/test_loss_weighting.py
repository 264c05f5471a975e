"""The loss that is minimised is the loss that is reported: a token- (or example-, or class-weight-) weighted
mean over the whole optimizer step, however the step is split into micro-batches or processes. Each test records
the gradients the optimizer receives (grad_probe.RecordGrads) for one step over the same 8 examples, split two
ways, and requires them equal. On the loop that divided each micro-batch's own mean by the group size (the
gradient-accumulation bug the HF Trainer fixed with num_items_in_batch) they differed by 10-60%."""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import ok, run_cli
from fixtures import write_tiny_bert, write_tiny_llama
from grad_probe import max_relative_difference, recorded
from inprocess import train_here

TESTS = Path(__file__).parent
COLOURS = ["red", "blue", "green", "white", "black", "yellow", "purple", "orange"]


def write_chats(path: Path, n: int) -> Path:
    """n chats whose answers are 1 to 40 words long: micro-batches of two hold 2 to 80 learned tokens."""
    rows = []
    for i in range(n):
        answer = " ".join(COLOURS[(i + k) % 8] for k in range(1 if i % 2 else 40 - 4 * i))
        rows.append({"messages": [{"role": "user", "content": f"colour of {COLOURS[i % 8]}"},
                                  {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("weighting")
    write_tiny_llama(cwd / "tiny-llama")
    write_chats(cwd / "train.jsonl", 8)
    write_chats(cwd / "val.jsonl", 2)
    return cwd


def one_step(cwd: Path, record_to: str, suffix: str = "jsonl") -> list[str]:
    """One optimizer step over the whole 8-example train file, the gradients recorded."""
    return [f"dataset.train_file={cwd / ('train.' + suffix)}", f"dataset.val_file={cwd / ('val.' + suffix)}",
            "optimizer=sgd", "optimizer._target_=grad_probe.RecordGrads", f"+optimizer.record_to={cwd / record_to}",
            "optimizer.momentum=0", "optimizer.nesterov=false", "trainer.max_epochs=1", "trainer.device=cpu",
            "trainer.num_workers=0", "trainer.progress_bar=false", "report=false", "task.samples=0"]


def chat_step(cwd: Path, record_to: str) -> list[str]:
    return ["+experiment=chat_sft", f"model.name_or_path={cwd / 'tiny-llama'}", "trainer.gradient_clip_norm=null",
            f"dataset.cache_dir={cwd / 'cache'}", *one_step(cwd, record_to)]


@pytest.fixture(scope="module")
def whole_batch(chat: Path) -> list:
    """The gradient of one step of batch_size=8, one process."""
    train_here([*chat_step(chat, "whole"), "trainer.batch_size=8"], chat / "run-whole")
    return recorded(chat / "whole")


def test_accumulated_micro_batches_of_very_different_lengths_give_the_whole_batch_gradient(chat, whole_batch):
    # four micro-batches of 2, grouped by length: 2 learned tokens in one, ~70 in another
    train_here([*chat_step(chat, "accumulated"), "trainer.batch_size=2", "trainer.accumulate_grad_batches=4",
                "dataset.group_by_length=true"], chat / "run-accumulated")
    assert max_relative_difference(recorded(chat / "accumulated"), whole_batch) < 1e-6


def test_two_ddp_processes_give_the_one_process_gradient(chat, whole_batch):
    # 4 chats a process: their learned tokens differ, so a mean of per-process means would not be the mean
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    ok(run_cli("sft-train", *chat_step(chat, "ddp"), "trainer.batch_size=8", "trainer.devices=2",
               "hydra.run.dir=run-ddp", cwd=chat, env=env))
    for rank in (0, 1):  # after the all-reduce every process steps with the same gradient
        assert max_relative_difference(recorded(chat / "ddp", rank=rank), whole_batch) < 1e-6


def test_packed_rows_give_the_unpacked_gradient(chat, whole_batch):
    # the 8 chats packed into rows of max_length tokens (positions restarting, the first label of each chat
    # ignored): were a chat to attend to the one before it in its row, or be predicted from it, the gradient
    # would differ
    train_here([*chat_step(chat, "packed"), "trainer.batch_size=8", "dataset.packing=true"], chat / "run-packed")
    assert max_relative_difference(recorded(chat / "packed"), whole_batch) < 1e-5


def test_best_fit_decreasing_packs_every_example_once_into_rows_that_fit():
    from sft_cli.tasks.causal_lm.chats import IGNORE, CausalCollate, PackedSequences, TokenSequences

    lengths = [7, 3, 9, 2, 5, 5, 1, 8]
    ids = [[100 * i + k for k in range(n)] for i, n in enumerate(lengths)]
    packed = PackedSequences(TokenSequences(ids, [list(x) for x in ids]), capacity=10)
    assert sorted(i for row in packed.rows for i in row) == list(range(8))
    assert [sum(lengths[i] for i in row) for row in packed.rows] == [10, 10, 10, 10]  # 40 tokens in 4 full rows
    assert len(packed) == 4 and packed.fill == 1.0
    row = packed[0]
    starts = [k for k, position in enumerate(row["position_ids"]) if position == 0]
    assert all(row["labels"][k] == IGNORE for k in starts)  # never predicted from the example before
    inputs, labels, counts = CausalCollate(0)([packed[r] for r in range(len(packed))])
    assert "attention_mask" not in inputs and counts == {"examples": 8, "tokens": 40}


def test_class_weighted_cross_entropy_is_the_same_whole_or_accumulated(tmp_path: Path):
    # short texts are "pos", long ones "neg"; grouped by length, micro-batches hold one class each, and class
    # weights 4 (neg) and 1 (pos) give them weights 8 and 2: a mean of their means would weigh a "pos" text 4x
    # too much
    write_tiny_bert(tmp_path / "tiny-bert", dropout=0.0)
    rows = [("good" if i % 2 else " ".join(["bad"] + ["very"] * (6 + i)), "pos" if i % 2 else "neg") for i in range(8)]
    for name in ("train.tsv", "val.tsv"):
        (tmp_path / name).write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    args = ["+experiment=text_classification", f"model.name_or_path={tmp_path / 'tiny-bert'}",
            "loss.class_weights=[4.0,1.0]", f"dataset.cache_dir={tmp_path / 'cache'}", "trainer.gradient_clip_norm=null"]
    train_here([*args, *one_step(tmp_path, "whole", "tsv"), "trainer.batch_size=8"], tmp_path / "run-whole")
    train_here([*args, *one_step(tmp_path, "accumulated", "tsv"), "trainer.batch_size=2", "trainer.accumulate_grad_batches=4",
                "dataset.group_by_length=true"], tmp_path / "run-accumulated")
    assert max_relative_difference(recorded(tmp_path / "accumulated"), recorded(tmp_path / "whole")) < 1e-6


def test_packed_rows_flattened_for_a_varlen_kernel_give_the_same_logits(tmp_path: Path):
    # a flash attention model gets each packed batch as one padding-free row (transformers calls its varlen
    # kernel only for one row); SDPA builds the same block-diagonal mask from the positions, so on CPU the
    # flattened batch must give exactly the rows' logits at the learned positions
    from sft_cli.models.hf import hf_causal_lm
    from sft_cli.tasks.causal_lm.chats import CausalCollate, PackedSequences, TokenSequences

    write_tiny_llama(tmp_path / "tiny-llama")
    model = hf_causal_lm(str(tmp_path / "tiny-llama")).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [9, 4, 13, 6, 3, 11, 7]
    ids = [torch.randint(3, 60, (n,), generator=g).tolist() for n in lengths]
    packed = PackedSequences(TokenSequences(ids, [list(x) for x in ids]), capacity=16)
    rows = [packed[r] for r in range(len(packed))]
    assert len(rows) > 2
    (by_rows, row_labels, counts), (flat, flat_labels, flat_counts) = CausalCollate(0)(rows), CausalCollate(0, True)(rows)
    assert flat["input_ids"].shape == (1, sum(lengths)) and counts == flat_counts  # one row, no padding
    with torch.no_grad():
        (logits, targets), (flat_logits, flat_targets) = model(by_rows, row_labels), model(flat, flat_labels)
    assert torch.equal(targets, flat_targets) and torch.allclose(logits, flat_logits, atol=1e-5)


def test_a_flash_attention_model_without_its_kernel_says_how_to_get_it(tmp_path: Path):
    from sft_cli.errors import SFTError
    from sft_cli.models.hf import hf_causal_lm

    write_tiny_llama(tmp_path / "tiny-llama")
    try:
        hf_causal_lm(str(tmp_path / "tiny-llama"), attn_implementation="flash_attention_2")
    except SFTError as e:
        assert "model.attn_implementation=flash_attention_2" in str(e) and "model.attn_implementation=null" in str(e)
    else:
        pytest.skip("flash-attn is installed and usable here")
