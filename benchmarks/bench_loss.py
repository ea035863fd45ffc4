"""Top-k distillation loss against a full-vocabulary generalized-JSD reference (what TRL's GKDTrainer
computes, which also needs the teacher's full logits): forward + backward time and peak memory.

Each measurement runs in a fresh process, so peak RSS belongs to that method alone. Printed as ratios
against the reference measured in the same run.

    .venv/bin/python benchmarks/bench_loss.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch
import torch.nn.functional as F

from gkd_async.loss.topk import distill_loss


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reference_generalized_jsd(student_logits, teacher_logits, mask, beta=0.5, temperature=1.0):
    """Full-vocabulary generalized JSD, batch-mean over valid tokens."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_m = torch.logsumexp(
        torch.stack([log_q + torch.log1p(torch.tensor(-beta)), log_p + torch.log(torch.tensor(beta))]), 0
    )
    kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True)
    kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True)
    per_token = (beta * kl_p + (1 - beta) * kl_q).sum(-1)
    return per_token[mask].sum() / mask.sum()


def random_topk(batch, steps, vocab, k, generator):
    """Teacher top-k as the scorer would send it, made chunk-wise so no full teacher logits exist."""
    ids = torch.empty(batch, steps, k, dtype=torch.int64)
    logprobs = torch.empty(batch, steps, k)
    for b in range(batch):
        logits = torch.randn(steps, vocab, generator=generator) * 3
        top = torch.log_softmax(logits, -1).topk(k, dim=-1)
        ids[b], logprobs[b] = top.indices, top.values
    return ids, logprobs


def measure(method, batch, steps, vocab, k, queue):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(batch, steps, vocab, generator=gen) * 3).requires_grad_(True)
    mask = torch.rand(batch, steps, generator=gen) < 0.9
    if method == "topk":
        ids, logprobs = random_topk(batch, steps, vocab, k, gen)
    before = rss_mb()
    if method == "reference":
        teacher = torch.randn(batch, steps, vocab, generator=gen) * 3
    start = time.perf_counter()
    if method == "reference":
        loss = reference_generalized_jsd(student, teacher, mask)
    else:
        total, count, _ = distill_loss(student, ids, logprobs, mask, "jsd")
        loss = total / count
    loss.backward()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((elapsed, peak - before))


def run(method, batch, steps, vocab, k=0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(method, batch, steps, vocab, k, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    args = parser.parse_args()
    shapes = [(8, 512, 32000), (2, 512, 151936)]
    if args.quick:
        shapes = [(2, 128, 32000), (1, 128, 151936)]
    print("jsd loss, forward + backward, float32, 1 thread; memory = peak RSS above the student's logits")
    print(f"{'B x T x V':>18} {'method':>16} {'time s':>8} {'peak MB':>9} {'time ratio':>11} {'mem ratio':>10}")
    for batch, steps, vocab in shapes:
        ref_time, ref_mem = run("reference", batch, steps, vocab)
        label = f"{batch}x{steps}x{vocab}"
        print(f"{label:>18} {'full-vocab ref':>16} {ref_time:8.2f} {ref_mem:9.0f} {1.0:11.2f} {1.0:10.2f}")
        for k in (64, 256):
            t, m = run("topk", batch, steps, vocab, k)
            print(f"{label:>18} {f'top-k k={k}':>16} {t:8.2f} {m:9.0f} {t / ref_time:11.2f} {m / ref_mem:10.2f}")


if __name__ == "__main__":
    main()
