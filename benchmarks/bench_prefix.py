"""Prefix-shared teacher scoring (`teacher.share_prompts`): the HF teacher's scored response tokens per second
with each prompt prefilled once for its group of n samples, against prefilled with every sample, in one run.

Groups of n samples share a prompt of P tokens, each with a response of R tokens; one forward a group (batch
size n) on both sides, top-k 256 (or the vocabulary). The bound of the ratio is (P + R) / R, the tokens a
forward runs per scored token without sharing: reached where the forward's cost is its tokens.

    .venv/bin/python benchmarks/bench_prefix.py [--models tiny:teacher tiny:qwen-teacher] [--prompts 64 512 2048]
        [--n 4 8] [--response 64] [--groups 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from gkd_async.engines.hf import HFTeacherEngine


def scored_tokens_per_s(teacher: HFTeacherEngine, pairs, n: int, k: int, repeats: int) -> float:
    teacher.score(pairs[:n], k, 1.0, n)  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        teacher.score(pairs, k, 1.0, n)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sum(len(r) for _, r in pairs) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny:teacher", "tiny:qwen-teacher"])
    parser.add_argument("--prompts", nargs="+", type=int, default=[64, 512, 2048])
    parser.add_argument("--n", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(f"device {args.device}, response {args.response} tokens, {args.groups} groups, median of {args.repeats}")
    print(f"{'model':<18} {'P':>5} {'n':>3} {'unshared tok/s':>15} {'shared tok/s':>13} {'ratio':>6} {'bound':>6}")
    for spec in args.models:
        teacher = HFTeacherEngine(spec, "float32", pad_id=0, device=args.device)
        k = min(256, teacher.vocab_size)
        rng = np.random.default_rng(0)
        for prompt_length in args.prompts:
            for n in args.n:
                pairs = []
                for _ in range(args.groups):
                    prompt = rng.integers(1, teacher.vocab_size, prompt_length).astype(np.int32)
                    pairs += [(prompt, rng.integers(1, teacher.vocab_size, args.response).astype(np.int32))
                              for _ in range(n)]  # fmt: skip
                teacher.share_prompts = False
                alone = scored_tokens_per_s(teacher, pairs, n, k, args.repeats)
                teacher.share_prompts = True
                shared = scored_tokens_per_s(teacher, pairs, n, k, args.repeats)
                bound = (prompt_length + args.response) / args.response
                print(
                    f"{spec:<18} {prompt_length:>5} {n:>3} {alone:>15.0f} {shared:>13.0f} {shared / alone:>5.2f}x "
                    f"{bound:>5.1f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
