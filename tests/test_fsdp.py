"""Sharded data parallel (trainer.strategy=fsdp: FSDP2) on CPU with gloo, started as users start it
(trainer.devices=2 runs torchrun): it trains exactly as DDP does, its checkpoints are shards that each process
wrote, and they load anywhere (one process, another process count, sft-export to a plain transformers folder)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import kill_within_an_epoch, ok, read_json, run_cli
from fixtures import chat_rows, write_tiny_llama
from test_cli_chat import chat_args, write_jsonl

TWO = {"OMP_NUM_THREADS": "1"}


def fsdp_args(cwd: Path) -> list[str]:
    """A packed chat run of a tiny Llama on 2 CPU processes: 5 optimizer steps, every one logged. Its 5 val
    examples in batches of 2 make 2 eval batches on one process and 1 on the other (FSDP must repeat one)."""
    return [*chat_args(cwd), "dataset.packing=true", "dataset.max_length=64", "trainer.batch_size=4",
            "trainer.max_steps=5", "trainer.log_every_n_steps=1", "trainer.device=cpu", "task.samples=2",
            "task.generate_samples=4", "task.sample_tokens=8", "trainer.eval_batch_size=2"]


def losses(run: Path, split: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == split]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The same 5 steps under trainer.strategy=ddp and =fsdp, 2 processes each."""
    cwd = tmp_path_factory.mktemp("fsdp")
    write_tiny_llama(cwd / "tiny-llama")
    write_jsonl(cwd / "chats.jsonl", chat_rows(96, seed=3))
    for strategy in ("ddp", "fsdp"):
        result = ok(run_cli("sft-train", *fsdp_args(cwd), "trainer.devices=2", f"trainer.strategy={strategy}",
                            f"hydra.run.dir={strategy}", cwd=cwd, env=TWO))
        assert f"launching {strategy.upper()} on 2 processes" in result.output
    return cwd


def test_fsdp_trains_exactly_as_ddp_does(runs: Path):
    ddp, fsdp = losses(runs / "ddp", "train"), losses(runs / "fsdp", "train")
    assert [s for s, _ in fsdp] == [1, 2, 3, 4, 5]
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(ddp, fsdp)), (ddp, fsdp)
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(losses(runs / "ddp", "val"), losses(runs / "fsdp", "val")))
    # answers are generated in lockstep by both processes under FSDP (every forward pass is collective)
    samples = [json.loads(line) for line in (runs / "fsdp" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2  # before training and after, one writer
    summary = read_json(runs / "fsdp" / "summary.json")
    assert summary["processes"] == 2 and summary["steps"] == 5


def test_each_process_writes_its_own_shard_of_the_checkpoint(runs: Path):
    last = runs / "fsdp" / "checkpoints" / "last"
    assert not (last / "model.safetensors").exists() and "optimizer" not in torch.load(last / "state.pt")
    shards = sorted((last / "shards").glob("*.distcp"))
    assert [s.name for s in shards] == ["__0_0.distcp", "__1_0.distcp"]
    sizes = [s.stat().st_size for s in shards]
    assert max(sizes) < 0.6 * sum(sizes)  # weights and AdamW state split about evenly: each process holds half
    assert read_json(last / "meta.json")["sharded"] is True


def test_a_sharded_checkpoint_exports_one_plain_transformers_model_with_ddps_logits(runs: Path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ok(run_cli("sft-export", "checkpoint=fsdp/checkpoints/last", "output=exported", cwd=runs))
    exported = AutoModelForCausalLM.from_pretrained(runs / "exported").eval()
    reference = AutoModelForCausalLM.from_pretrained(runs / "tiny-llama").eval()
    weights = load_file(runs / "ddp" / "checkpoints" / "last" / "model.safetensors")
    reference.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
    ids = torch.randint(0, exported.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, reference(ids).logits, atol=1e-4)
    # sft-predict and sft-eval read the shards in one process, without launching any
    result = ok(run_cli("sft-predict", "checkpoint=fsdp/checkpoints/best", "prompt=colour of apple", cwd=runs))
    assert "colour of apple" in result.output


def test_fsdp_mistakes_are_named_before_anything_runs(runs: Path):
    result = run_cli("sft-train", *fsdp_args(runs), "trainer.strategy=zero3", cwd=runs)
    assert result.returncode == 1 and "trainer.strategy" in result.output and "fsdp" in result.output
    result = run_cli("sft-train", *fsdp_args(runs), "trainer.cpu_offload=true", cwd=runs)
    assert result.returncode == 1 and "trainer.strategy=fsdp" in result.output
    # a DDP checkpoint holds whole weights and optimizer state: it resumes under the strategy that wrote it
    result = run_cli("sft-train", *fsdp_args(runs), "trainer.strategy=fsdp", "resume=ddp", "hydra.run.dir=mixed",
                     cwd=runs)
    assert result.returncode == 1 and "trainer.strategy=ddp" in result.output and "Traceback" not in result.output


def test_a_damaged_sharded_checkpoint_is_named_without_a_traceback(runs: Path, tmp_path: Path):
    for damaged, damage in (("lost", lambda shards: (shards / "__1_0.distcp").unlink()),
                            ("cut", lambda shards: (shards / ".metadata").write_bytes(b"\x80\x04"))):
        shutil.copytree(runs / "fsdp" / "checkpoints" / "last", runs / damaged / "last")
        damage(runs / damaged / "last" / "shards")
        result = run_cli("sft-export", f"checkpoint={damaged}/last", f"output={tmp_path / damaged}", cwd=runs)
        assert result.returncode == 1 and "is incomplete or corrupt" in result.output, result.output[-2000:]
        assert "Traceback" not in result.output and "Use another checkpoint" in result.output


def test_sgd_trains_sharded_and_a_val_split_smaller_than_the_processes_is_named(runs: Path):
    # SGD's fused kernel takes no DTensor: it runs unfused. The one val example leaves one process none to
    # evaluate, which FSDP's collective forward passes cannot do without: an error, not a hang
    result = run_cli("sft-train", *fsdp_args(runs), "optimizer=sgd", "trainer.max_steps=1", "trainer.devices=2",
                     "trainer.strategy=fsdp", "task.validate_before_training=false", "dataset.val_size=1",
                     "task.samples=0", "hydra.run.dir=sgd", cwd=runs, env=TWO, timeout=120)
    assert result.returncode == 1 and "fewer examples than there are processes" in result.output, result.output[-3000:]
    assert "runs unfused" in result.output and losses(runs / "sgd", "train")[0][0] == 1


@pytest.mark.slow  # three torchruns of 2 processes and one single-process run: about 2 minutes
def test_a_killed_fsdp_run_resumes_exactly_also_on_another_process_count(tmp_path: Path):
    from safetensors.torch import load_file

    write_tiny_llama(tmp_path / "tiny-llama")
    write_jsonl(tmp_path / "chats.jsonl", chat_rows(96, seed=3))
    args = [*fsdp_args(tmp_path), "trainer.max_steps=null", "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=2",
            "trainer.strategy=fsdp", "task.samples=0", "task.generate_samples=0"]
    two = [*args, "trainer.devices=2"]
    ok(run_cli("sft-train", *two, "hydra.run.dir=whole", cwd=tmp_path, env=TWO))
    kill_within_an_epoch(two, tmp_path)
    ok(run_cli("sft-train", *two, "resume=killed", "hydra.run.dir=resumed", cwd=tmp_path, env=TWO))
    for run in ("whole", "resumed"):
        ok(run_cli("sft-export", f"checkpoint={run}/checkpoints/last", f"output={run}-exported", cwd=tmp_path))
    whole, resumed = (load_file(tmp_path / f"{run}-exported" / "model.safetensors") for run in ("whole", "resumed"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # bitwise, as an uninterrupted run
    assert read_json(tmp_path / "resumed" / "summary.json")["best_value"] == \
        read_json(tmp_path / "whole" / "summary.json")["best_value"]
    # The shards 2 processes wrote continue in 1 (its batches are drawn by another sampler: not the same steps)
    result = ok(run_cli("sft-train", *args, "resume=killed", "hydra.run.dir=one", cwd=tmp_path))
    assert "resumed from" in result.output
    one, whole = (read_json(tmp_path / run / "summary.json") for run in ("one", "whole"))
    # an epoch's batch count may differ by one between counts (DistributedSampler pads each process's share)
    assert one["epochs"] == 2 and abs(one["steps"] - whole["steps"]) <= 1 and one["processes"] == 1


@pytest.mark.slow  # two torchruns of 2 processes: about a minute
def test_lora_and_gradient_checkpointing_train_under_fsdp_as_under_ddp(tmp_path: Path):
    write_tiny_llama(tmp_path / "tiny-llama")
    write_jsonl(tmp_path / "chats.jsonl", chat_rows(96, seed=3))
    args = [*fsdp_args(tmp_path), "adapter=lora", "model.gradient_checkpointing=true", "trainer.devices=2"]
    for strategy in ("ddp", "fsdp"):
        ok(run_cli("sft-train", *args, f"trainer.strategy={strategy}", f"hydra.run.dir={strategy}", cwd=tmp_path,
                   env=TWO))
    ddp, fsdp = losses(tmp_path / "ddp", "train"), losses(tmp_path / "fsdp", "train")
    assert len(fsdp) == 5 and all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(ddp, fsdp)), (ddp, fsdp)
    assert fsdp[-1][1] < fsdp[0][1]
    ok(run_cli("sft-export", "checkpoint=fsdp/checkpoints/last", "output=merged", cwd=tmp_path))
    assert (tmp_path / "merged" / "model.safetensors").is_file()  # the base with the adapter merged
