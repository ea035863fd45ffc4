"""Start-up on a large data set: loading verl rows from parquet with Qwen's real tokenizer and chat template
(tiny:qwen-student's), the first time (read, template, tokenize) in this process alone and with worker
processes besides it (`--workers`, default `data.tokenize_workers`'s: one per core but one, at most 8; at
least 1 here),
and the second time (from the
tokenized prompts kept in the cache), in one run against empty cache directories of its own.

    .venv/bin/python benchmarks/bench_data.py [--rows 100000] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=None, help="data.tokenize_workers")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as `gkd-async` sets it: one thread per encoder
    from gkd_async.config.model_data import DataSection
    from gkd_async.data.prompts import load_prompts, tokenize_workers
    from gkd_async.models.loading import load_tokenizer

    tokenizer = load_tokenizer("tiny:qwen-student")  # built (or found) before the cache is swapped
    with tempfile.TemporaryDirectory(prefix="gkd-bench-data-") as tmp:
        os.environ["GKD_ASYNC_CACHE"] = str(Path(tmp) / "cache")
        rows = [
            {
                "data_source": "openai/gsm8k",
                "prompt": [{"role": "user", "content": f"Natalia sold clips to {i} of her friends and then {i % 97} "
                            "more. How many clips did she sell altogether? Let's think step by step."}],
                "reward_model": {"style": "rule", "ground_truth": str(i + i % 97)},
                "extra_info": {"split": "train", "index": i},
            }
            for i in range(args.rows)
        ]  # fmt: skip
        path = Path(tmp) / "train.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        workers = max(1, tokenize_workers(args.workers))
        times = {}
        for label, count, cache in [("alone", 0, "a"), ("workers", workers, "b"), ("cached", workers, "b")]:
            os.environ["GKD_ASYNC_CACHE"] = str(Path(tmp) / f"cache-{cache}")
            data = DataSection(train_files=[str(path)], max_prompt_length=1024, tokenize_workers=count)
            start = time.perf_counter()
            prompts = load_prompts(data.train_files, tokenizer, data)
            times[label] = time.perf_counter() - start
        tokens = sum(len(p.ids) for p in prompts)
    print(f"{args.rows:,} verl rows, {tokens / len(prompts):.0f} prompt tokens each (Qwen tokenizer, chat template)")
    print(f"first load, this process alone:          {times['alone']:7.2f} s")
    speedup = times["alone"] / times["workers"]
    print(f"first load, with {workers} worker process(es): {times['workers']:7.2f} s   {speedup:.2f}x faster")
    cached = times["alone"] / times["cached"]
    print(f"second load (tokenized prompts cached):  {times['cached']:7.2f} s   {cached:.1f}x faster")


if __name__ == "__main__":
    main()
