"""The CUDA paths of chat SFT (issue 19): a packed bf16 run on the GPU, packed rows that keep their examples
apart under CUDA attention, logits at the learned positions alone, FSDP2 sharding and its sharded checkpoints.
They run where a CUDA GPU is visible and are skipped everywhere else; on a lent GPU machine
scripts/gpu_check.sh runs them (pytest -m cuda tests/test_cuda.py) before it measures anything."""

import json
from pathlib import Path

import pytest
import torch

from conftest import ok, read_json, run_cli
from fixtures import chat_rows, write_tiny_llama
from test_cli_chat import chat_args, write_jsonl

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")]
BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def gpu_args(cwd: Path) -> list[str]:
    """A packed chat run of a tiny Llama on the GPU."""
    return [*chat_args(cwd), "dataset.packing=true", "dataset.max_length=64", "trainer.batch_size=4",
            "trainer.device=cuda", "trainer.log_every_n_steps=1", "task.samples=2", "task.generate_samples=4",
            "task.sample_tokens=8"]


def rows(run: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.fixture(scope="module")
def cwd(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("cuda")
    write_tiny_llama(cwd / "tiny-llama")
    write_jsonl(cwd / "chats.jsonl", chat_rows(300, seed=1))
    return cwd


def test_a_packed_bf16_chat_run_on_the_gpu_learns_keeps_bf16_weights_and_answers(cwd: Path):
    precision = "bf16-mixed" if BF16 else "32"
    ok(run_cli("sft-train", *gpu_args(cwd), f"trainer.precision={precision}", "trainer.max_epochs=3",
               "hydra.run.dir=packed", cwd=cwd))
    summary = read_json(cwd / "packed" / "summary.json")
    assert summary["device"].startswith("cuda") and summary["precision"] == precision
    assert 0 < summary["peak_memory_bytes"] < 2**30  # torch.cuda.max_memory_allocated: a tiny model's, not RSS
    val = rows(cwd / "packed", "val")
    assert val[-1]["loss"] < 0.5 * val[0]["loss"], [r["loss"] for r in val]  # epoch 0 is the untrained model
    from safetensors.torch import load_file

    weights = load_file(cwd / "packed" / "checkpoints" / "last" / "model.safetensors")
    # model.dtype=auto: bf16 weights and optimizer state where training runs in bf16 on a GPU that has it
    assert {w.dtype for w in weights.values()} == {torch.bfloat16 if BF16 else torch.float32}
    result = ok(run_cli("sft-predict", "checkpoint=packed/checkpoints/best", "prompt=colour of apple",
                        "hydra.run.dir=predicted", cwd=cwd))
    assert "colour of apple" in result.output


def packed_and_unpacked(tmp_path: Path):
    """A tiny Llama on the GPU in fp32, and 8 examples of 3 to 14 tokens (the second half of each learned),
    packed into rows of 16 tokens (best-fit decreasing) and as they are."""
    from sft_cli.models.hf import hf_causal_lm
    from sft_cli.tasks.causal_lm.chats import IGNORE, PackedSequences, TokenSequences

    model = hf_causal_lm(str(write_tiny_llama(tmp_path / "llama")), dtype="float32").cuda()
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, model.model.config.vocab_size, (n,), generator=generator).tolist()
           for n in (9, 5, 14, 7, 3, 11, 6, 8)]
    labels = [[IGNORE] * (len(x) // 2) + x[len(x) // 2:] for x in ids]
    examples = TokenSequences(ids, labels)
    return model, [examples[i] for i in range(len(examples))], PackedSequences(examples, capacity=16)


def loss_and_grads(model, items: list[dict], continuous_positions: bool = False):
    """(summed loss, learned tokens, gradients) of one batch of `items`, as the causal-LM task computes them."""
    from sft_cli.tasks.causal_lm.chats import CausalCollate
    from sft_cli.tasks.causal_lm.loss import TokenCrossEntropy

    inputs, labels, _ = CausalCollate(0)(items)
    if continuous_positions:  # one causal sequence per row: the examples of a row see each other
        inputs["position_ids"] = torch.arange(labels.shape[1]).expand_as(labels)
    model.zero_grad()
    summed, tokens, _ = TokenCrossEntropy()(*model({k: v.cuda() for k, v in inputs.items()}, labels.cuda()))
    summed.backward()
    return summed.item(), tokens.item(), [p.grad.clone() for p in model.parameters()]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_packed_rows_give_the_unpacked_loss_and_gradients_under_cuda_attention(tmp_path: Path):
    model, items, packed = packed_and_unpacked(tmp_path)
    assert len(packed) >= 3  # a batch of several rows: rows must not see each other either
    rows_ = [packed[r] for r in range(len(packed))]
    loss, tokens, grads = loss_and_grads(model, items)  # padded, with an attention mask
    packed_loss, packed_tokens, packed_grads = loss_and_grads(model, rows_)
    assert packed_tokens == tokens and abs(packed_loss - loss) <= 1e-5 * abs(loss)
    assert max(relative(a, b) for a, b in zip(packed_grads, grads)) < 1e-4
    # the same rows as plain causal sequences differ: this test sees examples that attend to each other
    leaked, _, _ = loss_and_grads(model, rows_, continuous_positions=True)
    assert abs(leaked - loss) > 1e-3 * abs(loss)


def test_logits_at_the_learned_positions_equal_the_full_logits_on_cuda(tmp_path: Path):
    from sft_cli.models.hf import hf_causal_lm, next_token_positions
    from sft_cli.tasks.causal_lm.loss import TokenCrossEntropy

    model = hf_causal_lm(str(write_tiny_llama(tmp_path / "llama")), dtype="float32").cuda()
    ids = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(0)).cuda()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["attention_mask"][1, 16:] = 0  # row 1 is padded
    labels = torch.full_like(ids, -100)
    labels[0, 15:20], labels[1, 13:16] = ids[0, 15:20], ids[1, 13:16]  # long prompts, short answers
    with torch.no_grad():
        full, targets = next_token_positions(model(inputs), labels)
        learned, learned_targets = model(inputs, labels)
    assert learned.shape == (8, model.model.config.vocab_size) and torch.equal(learned_targets, targets)
    assert torch.allclose(learned, full, rtol=1e-5, atol=1e-5)
    results = []
    for autocast in (False, True):
        for learned_only in (False, True):
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast and BF16):
                outputs = model(inputs, labels) if learned_only else (model(inputs), labels)
                summed, tokens, correct = TokenCrossEntropy()(*outputs)
            summed.backward()
            results.append((summed.item(), tokens.item(), correct.item(), [p.grad.clone() for p in model.parameters()]))
    (full32, *counts32, grads32), (part32, *part_counts, part_grads), (full16, *_), (part16, *_) = results
    assert abs(part32 - full32) <= 1e-5 * full32 and part_counts == counts32
    assert max(relative(a, b) for a, b in zip(part_grads, grads32)) < 1e-4
    assert abs(part16 - full16) <= 2e-2 * full16  # bf16: the same loss up to bf16 rounding


def test_fsdp_in_one_gpu_process_writes_shards_that_resume_predict_and_export_read(cwd: Path):
    # trainer.strategy=fsdp with trainer.devices=1: one process, the model unsharded, checkpoints as DCP shards
    args = [*gpu_args(cwd), "trainer.strategy=fsdp", f"trainer.precision={'bf16-mixed' if BF16 else '32'}",
            "trainer.max_steps=5"]
    ok(run_cli("sft-train", *args, "hydra.run.dir=fsdp", cwd=cwd))
    last = cwd / "fsdp" / "checkpoints" / "last"
    assert [s.name for s in (last / "shards").glob("*.distcp")] == ["__0_0.distcp"]
    assert not (last / "model.safetensors").exists()
    result = ok(run_cli("sft-train", *args[:-1], "trainer.max_steps=7", "resume=fsdp", "hydra.run.dir=fsdp-resumed",
                        cwd=cwd))
    assert "resumed from" in result.output and read_json(cwd / "fsdp-resumed" / "summary.json")["steps"] == 7
    assert "colour of apple" in ok(run_cli("sft-predict", "checkpoint=fsdp/checkpoints/best",
                                           "prompt=colour of apple", "hydra.run.dir=fsdp-predicted", cwd=cwd)).output
    ok(run_cli("sft-export", "checkpoint=fsdp/checkpoints/last", "output=fsdp-exported", cwd=cwd))
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(cwd / "fsdp-exported").cuda().eval()
    with torch.no_grad():
        assert torch.isfinite(exported(torch.tensor([[3, 4, 5, 6]]).cuda()).logits).all()


def test_fsdp2_shards_the_model_on_one_gpu_trains_as_unsharded_and_its_shards_load_back(tmp_path: Path):
    # What the CLI cannot start on one GPU (it shards with several processes only): sft-cli's FSDP2 wrapping in a
    # process group of one, against the same model unsharded, 3 SGD steps on packed rows, fp32
    import torch.distributed as dist

    from sft_cli.models.hf import hf_causal_lm
    from sft_cli.training import distributed, shards

    model, _, packed = packed_and_unpacked(tmp_path)
    rows_ = [packed[r] for r in range(len(packed))]
    folder = str(tmp_path / "llama")
    device = torch.device("cuda")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1, device_id=device)
    try:
        sharded = hf_causal_lm(folder, dtype="float32").cuda()
        sharded.load_state_dict(model.state_dict())
        sharded = distributed._shard(sharded, device, "32", cpu_offload=False)
        assert distributed.is_sharded(sharded)
        losses = []
        for trained in (model, sharded):
            optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
            for _ in range(3):
                loss, tokens, _ = loss_and_grads(trained, rows_)
                optimizer.step()
            losses.append(loss / tokens)
        assert abs(losses[0] - losses[1]) < 1e-5, losses
        shards.write(tmp_path / "ckpt", sharded, optimizer)
        assert (tmp_path / "ckpt" / "shards" / "__0_0.distcp").is_file()
        fresh = hf_causal_lm(folder, dtype="float32").cuda()
        loaded = shards.load_weights(tmp_path / "ckpt", fresh)
        fresh.load_state_dict(loaded)
        trained_weights = model.state_dict()
        assert all(relative(fresh.state_dict()[k], trained_weights[k]) < 1e-5 for k in trained_weights)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_on_two_gpus_trains_as_ddp_does(cwd: Path):
    args = [*gpu_args(cwd), "trainer.precision=32", "trainer.max_steps=5", "trainer.devices=2"]
    for strategy in ("ddp", "fsdp"):
        ok(run_cli("sft-train", *args, f"trainer.strategy={strategy}", f"hydra.run.dir={strategy}-2gpu", cwd=cwd))
    ddp, fsdp = ([r["loss"] for r in rows(cwd / f"{s}-2gpu", "train")] for s in ("ddp", "fsdp"))
    assert len(fsdp) == 5 and all(abs(a - b) < 1e-4 for a, b in zip(ddp, fsdp)), (ddp, fsdp)
    summary = read_json(cwd / "fsdp-2gpu" / "summary.json")
    assert summary["processes"] == 2 and len(summary["peak_memory_per_process_bytes"]) == 2
