"""Packed learner batches (`trainer.pack_sequences`): the learner's response tokens per second with samples packed
end to end into rows of up to `--max-tokens` tokens, against padded micro-batches (sorted by length, the
default), measured in the same run.

One FSDP2 rank (gloo on the CPU, NCCL on a GPU), AdamW, the fused LM-head loss at top-64; response lengths drawn
from a long tail (log-normal, median 128, clipped to 8..1,024), prompts of P tokens, random ids and teacher
scores (the cost does not depend on them). The student defaults to `tiny:qwen-student` (V = 151,936).

    .venv/bin/python benchmarks/bench_packing.py [--model tiny:qwen-student] [--samples 32] [--prompt 64]
        [--micro-batch 4] [--max-tokens 4096] [--repeats 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
from one_rank_learner import one_rank_learner, random_sample

from gkd_async.config.loading import load_config
from gkd_async.train.batching import TrainSample, micro_batches
from gkd_async.train.step import train_step

K = 64


def long_tailed_samples(vocab: int, count: int, prompt: int) -> list[TrainSample]:
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(np.exp(rng.normal(np.log(128), 1.0, count))), 8, 1024).astype(int)
    return [
        random_sample(rng, str(i), rng.integers(1, vocab, prompt).astype(np.int32), int(r), vocab, K)
        for i, r in enumerate(lengths)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:qwen-student")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=4, help="padded: trainer.ppo_micro_batch_size_per_gpu")
    parser.add_argument("--max-tokens", type=int, default=4096, help="packed: trainer.ppo_max_token_len_per_gpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model, optimizer, dtype = one_rank_learner(args.model, args.device)
    samples = long_tailed_samples(model.config.vocab_size, args.samples, args.prompt)
    responses = sum(len(s.response_ids) for s in samples)
    lengths = sorted(len(s.response_ids) for s in samples)
    print(
        f"{args.model} on {args.device} ({dtype}), {args.samples} samples, P = {args.prompt}, responses "
        f"{lengths[0]}..{lengths[-1]} (median {lengths[len(lengths) // 2]}), median of {args.repeats}"
    )
    print(f"{'batches':>34} {'micro-batches':>13} {'tokens in':>10} {'s/step':>8} {'resp. tok/s':>11} {'x padded':>9}")
    settings = {
        f"padded, {args.micro_batch} a micro-batch": [f"trainer.ppo_micro_batch_size_per_gpu={args.micro_batch}"],
        f"packed, rows of {args.max_tokens} tokens": [
            "trainer.pack_sequences=true",
            f"trainer.ppo_max_token_len_per_gpu={args.max_tokens}",
        ],
    }
    baseline = None
    for name, overrides in settings.items():
        cfg = load_config(None, [f"gkd.teacher_topk={K}", *overrides])
        t = cfg.trainer
        batches = micro_batches(
            sorted(samples, key=lambda s: s.length), t.ppo_micro_batch_size_per_gpu, t.ppo_max_token_len_per_gpu,
            t.pack_sequences,
        )  # fmt: skip
        width = sum(
            sum(s.length for s in b) if t.pack_sequences else len(b) * max(s.length for s in b) for b in batches
        )
        train_step(model, optimizer, samples, 1, 0, K, cfg, args.device)  # warm-up
        times = []
        for _ in range(args.repeats):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(model, optimizer, samples, 1, 0, K, cfg, args.device)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        baseline = baseline or seconds
        print(
            f"{name:>34} {len(batches):>13} {width:>10} {seconds:>8.2f} {responses / seconds:>11.0f} "
            f"{baseline / seconds:>8.2f}x"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
