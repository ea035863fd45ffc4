"""Mini-batch updates (`trainer.ppo_mini_batch_size`, `trainer.ppo_epochs`): the learner's seconds per global
step with the batch's groups in 1, 2 or 4 optimiser steps, for 1 or 2 epochs, against one step of the whole
batch measured in the same run.

One FSDP2 rank (gloo on the CPU, NCCL on a GPU), AdamW, the fused LM-head loss at top-64, a batch of G groups
of n samples with P prompt and R response tokens (random ids and teacher scores: the cost does not depend on
them). The student defaults to `tiny:qwen-student` (tied embeddings, V = 151,936), where the optimiser step
over the embedding is a real part of a step's cost.

    .venv/bin/python benchmarks/bench_updates.py [--model tiny:qwen-student] [--groups 8] [--n 4]
        [--prompt 32] [--response 32] [--repeats 3] [--device cuda]
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
from gkd_async.train.batching import TrainSample
from gkd_async.train.step import StepAccumulator
from gkd_async.train.updates import MiniBatchUpdate

K = 64
SETTINGS = [(updates, epochs) for epochs in (1, 2) for updates in (1, 2, 4)]


def make_groups(vocab: int, groups: int, n: int, prompt: int, response: int) -> list[list[TrainSample]]:
    rng = np.random.default_rng(0)
    out = []
    for g in range(groups):
        prompt_ids = rng.integers(1, vocab, prompt).astype(np.int32)
        out.append([random_sample(rng, f"{g}/{i}", prompt_ids, response, vocab, K) for i in range(n)])
    return out


def seconds_per_step(model, optimizer, groups, cfg, updates: int, epochs: int, device: str, repeats: int) -> float:
    def one_step() -> None:
        update = MiniBatchUpdate(
            lambda: StepAccumulator(model, optimizer, 1, 0, K, cfg, device), 0, 1, len(groups) // updates, epochs
        )
        update.add(groups)
        update.finish()

    one_step()  # warm-up (and the optimiser's state)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        one_step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:qwen-student")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--response", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model, optimizer, dtype = one_rank_learner(args.model, args.device)
    groups = make_groups(model.config.vocab_size, args.groups, args.n, args.prompt, args.response)
    micro = args.n * 2  # two groups a micro-batch: the same micro-batches whatever the mini-batches
    cfg = load_config(None, [f"gkd.teacher_topk={K}", f"trainer.ppo_micro_batch_size_per_gpu={micro}"])
    print(
        f"{args.model} on {args.device} ({dtype}), {args.groups} groups x {args.n} samples, P = {args.prompt}, "
        f"R = {args.response}, median of {args.repeats}"
    )
    print(f"{'optimiser steps':>15} {'epochs':>6} {'s/step':>8} {'x baseline':>10}")
    baseline = None
    for updates, epochs in SETTINGS:
        seconds = seconds_per_step(model, optimizer, groups, cfg, updates, epochs, args.device, args.repeats)
        baseline = baseline or seconds
        print(f"{updates:>15} {epochs:>6} {seconds:>8.3f} {seconds / baseline:>9.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
