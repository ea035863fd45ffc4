"""Start-up on a large data set: loading 100,000 verl rows from parquet with Qwen's real tokenizer and chat
template (tiny:qwen-student's), the first time (read, template, tokenize) and the second (from the tokenized
prompts kept in the cache), in one run against an empty cache directory of its own.

    .venv/bin/python benchmarks/bench_data.py [--rows 100000]
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
    args = parser.parse_args()
    from gkd_async.config import DataSection
    from gkd_async.data import load_prompts
    from gkd_async.models import load_tokenizer

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
        data = DataSection(train_files=[str(path)], max_prompt_length=1024)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            prompts = load_prompts(data.train_files, tokenizer, data)
            times.append(time.perf_counter() - start)
        tokens = sum(len(p.ids) for p in prompts)
    print(f"{args.rows:,} verl rows, {tokens / len(prompts):.0f} prompt tokens each (Qwen tokenizer, chat template)")
    print(f"first load (read + template + tokenize): {times[0]:7.2f} s")
    print(f"second load (tokenized prompts cached):  {times[1]:7.2f} s   {times[0] / times[1]:.1f}x faster")


if __name__ == "__main__":
    main()
