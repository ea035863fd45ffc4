"""What the cross-tokenizer branches cost the HF teacher (`teacher.cross_tokenizer_branches`): scoring a batch of
samples, against scoring it and then its branch rows (`HFTeacherEngine.score_branches`, one tree-attention pass a
batch), in one run.

A character-level teacher and a BPE student: most teacher rows lie inside a student token (`--share`, 0.75 for
about four characters a token), and each such row asks for up to `--per-row` strings scored one token further (4,
the default of teacher.cross_tokenizer_branches). The tree pass runs each sample's context once and its branch
tokens after it, with a dense [batch, 1, L, L] mask (L = P + R + branches): its size is printed too.
`--with-default` also times the `TeacherEngine` default (one whole sequence per branch, prompt log-probs over all
of it). `--backend vllm`: the vLLM teacher's own `score_branches` (one generated token a branch, its context read
from the prefix cache) in place of the tree pass.

    .venv/bin/python benchmarks/bench_branches.py [--models tiny:teacher tiny:qwen-teacher] [--prompt 512]
        [--response 256] [--samples 8] [--per-row 4] [--share 0.75] [--with-default] [--device cuda]
        [--backend vllm]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import AutoConfig

from gkd_async.config.engines import VllmSection
from gkd_async.engines.base import TeacherEngine
from gkd_async.engines.hf import HFTeacherEngine
from gkd_async.engines.vllm import VLLMTeacherEngine
from gkd_async.models.loading import resolve_model_path

K = 64


def median_s(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny:teacher", "tiny:qwen-teacher"])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--samples", type=int, default=8, help="one batch (teacher.batch_size)")
    parser.add_argument("--per-row", type=int, default=4)
    parser.add_argument("--share", type=float, default=0.75, help="the rows that ask for branches")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--with-default", action="store_true", help="also one whole sequence per branch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backend",
        choices=["hf", "vllm"],
        default="hf",
        help="vllm: one generated token a branch, prefix caching on (the tree and mask columns are vLLM's pass)",
    )
    parser.add_argument(
        "--kv-cache-mb", type=int, default=1024, help="vllm: its KV cache (on the CPU it must be given)"
    )
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(
        f"device {args.device}, {args.samples} samples of P = {args.prompt}, R = {args.response}, "
        f"{args.per_row} branches at {args.share:.0%} of the rows, top-{K}, median of {args.repeats}"
    )
    header = f"{'model':<18} {'branches':>8} {'score s':>8} {'+ tree s':>9} {'ratio':>6} {'mask MB':>8}"
    print(header + (f" {'+ default s':>12}" if args.with_default else ""))
    for spec in args.models:
        print(measure(spec, args), flush=True)


def measure(spec: str, args: argparse.Namespace) -> str:
    """One model's row: the batch scored, its branches by the tree pass (and by the default)."""
    if args.backend == "vllm":
        teacher: TeacherEngine = VLLMTeacherEngine(
            spec,
            "float32",
            VllmSection(kv_cache_memory_mb=args.kv_cache_mb if args.device == "cpu" else None),
            args.prompt + args.response + 8,
            max_topk=K,
            prefix_caching=True,
        )
        teacher.vocab_size = int(AutoConfig.from_pretrained(resolve_model_path(spec)).vocab_size)
    else:
        teacher = HFTeacherEngine(spec, "float32", pad_id=0, device=args.device)
    rng = np.random.default_rng(0)
    pairs = [
        (
            rng.integers(1, teacher.vocab_size, args.prompt).astype(np.int32),
            rng.integers(1, teacher.vocab_size, args.response).astype(np.int32),
        )
        for _ in range(args.samples)
    ]
    rows = np.sort(rng.choice(args.response, int(args.share * args.response), replace=False))
    branches = [
        [(int(row), int(t)) for row in rows for t in rng.integers(1, teacher.vocab_size, args.per_row)] for _ in pairs
    ]
    count = sum(len(b) for b in branches)
    score = median_s(lambda: teacher.score(pairs, K, 1.0, args.samples, sampled=True), args.repeats)
    tree = median_s(lambda: teacher.score_branches(pairs, branches, K, 1.0, args.samples), args.repeats)
    # the context runs to the last branch row, then every branch token: [batch, 1, L, L] in float32 here
    width = args.prompt + int(rows.max()) + max(len(b) for b in branches)
    mask_mb = args.samples * width * width * 4 / 1e6 if args.backend == "hf" else 0
    line = f"{spec:<18} {count:>8} {score:>8.3f} {tree:>9.3f} {(score + tree) / score:>5.2f}x {mask_mb:>8.0f}"
    if args.with_default:
        default = median_s(lambda: TeacherEngine.score_branches(teacher, pairs, branches, K, 1.0, args.samples), 1)
        line += f" {default:>12.3f}"
    return line


if __name__ == "__main__":
    main()
