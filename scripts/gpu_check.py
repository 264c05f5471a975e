"""Train tokens/s and peak GPU memory of chat SFT on one CUDA machine (issue 19); scripts/gpu_check.sh runs it
after the CUDA tests. Each sft-train variant is a run of its own (as scripts/packing.py runs them), on the same
synthetic chats of skewed lengths (answers of 20 to ~600 words, log-uniform) and the same model:

    padded_fp32 / padded_bf16   dataset.group_by_length=true, --batch chats a step
    packed_fp32 / packed_bf16   dataset.packing=true, --rows rows of --row-tokens tokens a step
    packed_varlen_bf16          model.attn_implementation=flash_attention_2 (where flash-attn is installed)
    fsdp_1proc_bf16             trainer.strategy=fsdp in one process (trainer.devices=1): the model is NOT
                                sharded (FSDP2 wraps it only with several processes); its checkpoints are
                                written as DCP shards. What this exercises: the sharded checkpoint path
    loop_plain / loop_fsdp2 / loop_fsdp2_offload
                                the model sharded by sft-cli's FSDP2 wrapping (distributed._shard) in a process
                                group of one GPU (what the CLI cannot start: it shards only with several
                                processes), bf16 mixed precision, optionally with CPU offload, against the same
                                loop unsharded: the cost of FSDP2 itself on one device
    ddp_Ngpu / fsdp_Ngpu        only when N > 1 GPUs are visible: trainer.devices=N under torchrun

"bf16" is trainer.precision=bf16-mixed: with model.dtype=auto the weights and AdamW state are bf16 too on a GPU
that has it. tokens/s counts real (unpadded) tokens; peak memory is torch.cuda.max_memory_allocated.

    python scripts/gpu_check.py --out OUT [--model FOLDER]
"""

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packing import WORDS, write_chats  # noqa: E402  (the same synthetic chats as the CPU measurement)

# SmolLM2-135M-Instruct's shape (its config.json): a random Llama of it trains as fast and in as much memory
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
           "tie_word_embeddings": True}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": True}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VARLEN = ("model.attn_implementation=flash_attention_2 needs the flash-attn package (pip install flash-attn), "
          "which this machine lacks: with it, each packed batch is one padding-free row for the varlen kernel")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="folder for result.json (created)")
    p.add_argument("--model", default=None, help="a causal-LM folder; config.json + tokenizer without weights: "
                                                 "that architecture with random weights")
    p.add_argument("--work", default="/tmp/sft-gpu-check", help="runs, data and the model (emptied first)")
    p.add_argument("--chats", type=int, default=2400)
    p.add_argument("--batch", type=int, default=32, help="chats per padded step")
    p.add_argument("--rows", type=int, default=5, help="rows per packed step (about as many real tokens)")
    p.add_argument("--row-tokens", type=int, default=1024, help="dataset.max_length: tokens per packed row")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=5, help="steps per timed window (the first is warm-up)")
    p.add_argument("--budget-s", type=float, default=270, help="variants not started by then are skipped")
    p.add_argument("--tests-exit", type=int, default=None, help="(from gpu_check.sh) the CUDA tests' exit code")
    p.add_argument("--loop", choices=("plain", "fsdp2", "fsdp2_offload"), help="(internal) one loop variant")
    return p.parse_args(argv)


def write_model(args, work: Path) -> tuple[Path, str]:
    """The model folder the runs load, and what it is."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    folder = work / "model"
    if args.model:
        source = Path(args.model)
        if any(source.glob("*.safetensors")) or any(source.glob("*.bin")):
            return source.resolve(), f"{source} (its weights)"
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
        return folder, f"{source}'s architecture, random weights"
    tokenizer = toy_tokenizer()
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = os.environ.get("GPU_CHECK_SHAPE") == "tiny"
    shape = TINY | {"vocab_size": len(tokenizer)} if tiny else SMOLLM2
    config = LlamaConfig(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    what = "tiny 2-layer Llama" if tiny else "Llama of SmolLM2-135M's shape (30 layers, 576 wide, vocabulary 49152)"
    return folder, f"random {what}, a BPE tokenizer of the chats' words"


def toy_tokenizer():
    """A byte-level BPE tokenizer trained on the synthetic chats' words (a word is about a token), ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS), "<|im_start|>user\nQuestion 12: explain it.<|im_end|>\n<|im_start|>assistant\n"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>",
                                                                                          "<unk>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHATML
    return tokenizer


def sft_train(name: str, args, work: Path, model: Path, extra: list[str], deadline: float) -> dict:
    """One sft-train run on the GPU: its tokens/s after the first (warm-up) window, real tokens a step, peak
    GPU memory (the most of any process), as summary.json and metrics.jsonl report them."""
    run_dir = work / name
    command = [sys.executable, "-m", "sft_cli.cli", "+experiment=chat_sft", f"model.name_or_path={model}",
               f"dataset.train_file={work / 'chats.jsonl'}", f"dataset.val_file={work / 'val.jsonl'}",
               f"dataset.max_length={args.row_tokens}", f"dataset.cache_dir={work / 'cache'}",
               "trainer.device=cuda", "trainer.max_epochs=3", f"trainer.max_steps={args.steps}",
               f"trainer.log_every_n_steps={args.log_every}", "trainer.eval_batch_size=8",
               "trainer.progress_bar=false", "report=false", "task.samples=0", "task.generate_samples=0",
               "task.validate_before_training=false", f"hydra.run.dir={run_dir}", *extra]
    started = time.perf_counter()
    code, out, err = run_until(command, deadline)
    if code:
        return {"error": (out + err)[-1500:]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if r["split"] == "train"]
    if len(windows) < 2:
        return {"error": f"{len(windows)} train window(s) in metrics.jsonl: raise --steps"}
    timed = windows[1:]  # the first window warms up (kernels, allocator)
    steps = windows[-1]["step"] - windows[0]["step"]
    summary = json.loads((run_dir / "summary.json").read_text())
    tokens, seconds = sum(r["tokens"] for r in timed), sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    last = run_dir / "checkpoints" / "last"
    result = {"tokens_per_s": tokens / seconds, "tokens_per_step": tokens / steps,
              "peak_memory_gib": summary["peak_memory_bytes"] / 2**30, "steps_timed": steps,
              "precision": summary["precision"], "processes": summary["processes"],
              "final_train_loss": windows[-1]["loss"], "run_s": round(time.perf_counter() - started, 1),
              "checkpoint": "shards" if (last / "shards").is_dir() else "model.safetensors"}
    if summary.get("peak_memory_per_process_bytes"):
        result["peak_memory_per_process_gib"] = [b / 2**30 for b in summary["peak_memory_per_process_bytes"]]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # weights and AdamW state: GBs a run
    return result


def one_loop(args) -> dict:
    """(--loop, in its own process) steps of bf16-mixed AdamW on packed rows of random tokens, the model as
    sft-train builds it (model.dtype=auto: bf16 weights on a bf16 GPU), unsharded or sharded by sft-cli's FSDP2
    wrapping in a process group of one GPU."""
    import torch
    import torch.distributed as dist

    from sft_cli.models.hf import hf_causal_lm
    from sft_cli.tasks.causal_lm.chats import CausalCollate, PackedSequences, TokenSequences
    from sft_cli.tasks.causal_lm.loss import TokenCrossEntropy
    from sft_cli.training import distributed

    device = torch.device("cuda")
    torch.manual_seed(0)
    if args.loop != "plain":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    model = hf_causal_lm(args.model, dtype="auto", precision="bf16-mixed", device="cuda").to(device).train()
    if args.loop != "plain":
        model = distributed._shard(model, device, "bf16-mixed", cpu_offload=args.loop == "fsdp2_offload")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rng = random.Random(0)
    vocab = model.model.config.vocab_size
    lengths = [min(round(math.exp(rng.uniform(math.log(20), math.log(600)))), args.row_tokens)
               for _ in range(args.rows * 12)]  # as the chats: 20 to 600 tokens, log-uniform, cut to a row
    ids = [[rng.randrange(10, vocab) for _ in range(n)] for n in lengths]
    packed = PackedSequences(TokenSequences(ids, ids), args.row_tokens)
    inputs, labels, counts = CausalCollate(0)([packed[r] for r in range(args.rows)])
    inputs, labels = {k: v.to(device) for k, v in inputs.items()}, labels.to(device)
    criterion, times = TokenCrossEntropy(), []
    for step in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            summed, tokens, _ = criterion(*model(inputs, labels))
        (summed / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= args.log_every:  # warm-up steps
            times.append(time.perf_counter() - start)
    seconds = sum(times) / len(times)
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"tokens_per_s": counts["tokens"] / seconds, "tokens_per_step": counts["tokens"],
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30, "steps_timed": len(times),
            "precision": "bf16-mixed", "processes": 1, "final_train_loss": float(summed / tokens)}


def loop(name: str, args, model: Path, deadline: float) -> dict:
    command = [sys.executable, __file__, "--loop", name.removeprefix("loop_"), "--model", str(model),
               "--rows", str(args.rows), "--row-tokens", str(args.row_tokens), "--steps", str(args.steps),
               "--log-every", str(args.log_every)]
    code, out, err = run_until(command, deadline)
    if code:
        return {"error": (out + err)[-1500:]}
    return json.loads(out.strip().splitlines()[-1])


def run_until(command: list[str], deadline: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `command`, killed with every process it started (torchrun's) at the
    deadline (at least 20 s from now)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(deadline - time.time(), 20))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return 124, "", "stopped: past the time budget (--budget-s)"
    return proc.returncode, out, err


def variants(args, gpus: int) -> list[tuple[str, str, list[str] | None]]:
    """(name, what it is, sft-train overrides; None: a --loop variant)."""
    padded = ["dataset.group_by_length=true", f"trainer.batch_size={args.batch}"]
    packed = ["dataset.packing=true", f"trainer.batch_size={args.rows}"]
    fp32, bf16 = ["trainer.precision=32"], ["trainer.precision=bf16-mixed"]
    found = [("padded_fp32", f"group_by_length, {args.batch} chats a step, fp32", padded + fp32),
             ("packed_fp32", f"packing, {args.rows} rows of {args.row_tokens}, fp32", packed + fp32),
             ("packed_bf16", "packing, bf16-mixed (bf16 weights)", packed + bf16),
             *([("packed_varlen_bf16", "packing, flash_attention_2: one padding-free row a batch, bf16",
                 packed + bf16 + ["model.attn_implementation=flash_attention_2"])]
               if importlib.util.find_spec("flash_attn") else []),
             ("padded_bf16", "group_by_length, bf16-mixed (bf16 weights)", padded + bf16),
             ("fsdp_1proc_bf16", "strategy=fsdp devices=1: unsharded, DCP-shard checkpoints",
              packed + bf16 + ["trainer.strategy=fsdp"]),
             ("loop_plain", "packed rows, bf16, no sft-train: the baseline of the loop_fsdp2 rows", None),
             ("loop_fsdp2", "FSDP2 (distributed._shard) in a group of 1 GPU", None),
             ("loop_fsdp2_offload", "FSDP2 with CPUOffloadPolicy, 1 GPU", None)]
    if gpus > 1:
        rows = ["dataset.packing=true", f"trainer.batch_size={args.rows * gpus}", *bf16, f"trainer.devices={gpus}"]
        found += [(f"{s}_{gpus}gpu_bf16", f"packing, {args.rows} rows a GPU, torchrun, strategy={s}",
                   rows + [f"trainer.strategy={s}"]) for s in ("ddp", "fsdp")]
    return found


def table(result: dict) -> str:
    lines = [f"{'variant':<22} {'tokens/s':>9} {'tokens/step':>11} {'peak GiB':>8}  what"]
    for name, row in result["variants"].items():
        if "tokens_per_s" in row:
            lines.append(f"{name:<22} {row['tokens_per_s']:>9.0f} {row['tokens_per_step']:>11.0f} "
                         f"{row['peak_memory_gib']:>8.2f}  {row['what']}")
        else:
            lines.append(f"{name:<22} {'-':>9} {'-':>11} {'-':>8}  {row['what']}: "
                         + (row.get("status") or row.get("error", "")).strip().splitlines()[-1][:160])
    for key, value in result["ratios"].items():
        lines.append(f"{key}: {value:.2f}")
    return "\n".join(lines)


def ratios(rows: dict) -> dict:
    pairs = {"packed/padded tokens/s, fp32": ("packed_fp32", "padded_fp32", "tokens_per_s"),
             "packed/padded tokens/s, bf16": ("packed_bf16", "padded_bf16", "tokens_per_s"),
             "bf16/fp32 tokens/s, packed": ("packed_bf16", "packed_fp32", "tokens_per_s"),
             "packed/padded peak memory, bf16": ("packed_bf16", "padded_bf16", "peak_memory_gib"),
             "fsdp2/plain tokens/s, 1 GPU": ("loop_fsdp2", "loop_plain", "tokens_per_s"),
             "fsdp2 offload/plain peak memory, 1 GPU": ("loop_fsdp2_offload", "loop_plain", "peak_memory_gib")}
    return {key: rows[a][k] / rows[b][k] for key, (a, b, k) in pairs.items()
            if k in rows.get(a, {}) and rows.get(b, {}).get(k)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.loop:
        print(json.dumps(one_loop(args)))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 0
    deadline = time.time() + args.budget_s
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model, what = write_model(args, work)
    write_chats(work / "chats.jsonl", args.chats)
    write_chats(work / "val.jsonl", 16, seed=1)
    gpus = torch.cuda.device_count()
    result = {"device": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "model": what, "tests_exit": args.tests_exit,
              "settings": {k: getattr(args, k) for k in ("chats", "batch", "rows", "row_tokens", "steps", "log_every")},
              "variants": {}}
    print(f"{result['device']} x{gpus}, torch {result['torch']}, transformers {result['transformers']}; {what}")
    for name, about, overrides in variants(args, gpus):
        if time.time() > deadline - 25:
            row = {"error": "skipped: the time budget (--budget-s) ran out"}
        elif overrides is None:
            row = loop(name, args, model, deadline)
        else:
            row = sft_train(name, args, work, model, overrides, deadline)
        result["variants"][name] = {"what": about, **row}
        print(f"  {name}: " + (f"{row['tokens_per_s']:.0f} tokens/s, {row['peak_memory_gib']:.2f} GiB"
                               if "tokens_per_s" in row else row["error"].strip().splitlines()[-1][:200]), flush=True)
        if name == "packed_bf16" and not importlib.util.find_spec("flash_attn"):
            result["variants"]["packed_varlen_bf16"] = {"what": "packing, variable-length attention kernel",
                                                        "status": "not measured: no flash-attn here", "why": VARLEN}
            print(f"  packed_varlen_bf16: {VARLEN}")
    result["ratios"] = ratios(result["variants"])
    print(table(result))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2))
    failed = [n for n, r in result["variants"].items() if "error" in r]
    if failed:
        print(f"not measured: {', '.join(failed)} (result.json holds each error's end)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
