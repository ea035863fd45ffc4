"""The learner's LM head + distillation loss at a real vocabulary: full logits (`trainer.fused_lm_head=false`)
against the fused, chunked path (the default), forward + backward, peak memory and time, in one run.

Shapes are those of Qwen2.5-0.5B's head (hidden 896, vocabulary 151,936) over T response positions, the
teacher's top-256, forward KL. Each measurement runs in a fresh process; memory is the peak above what
the inputs take (peak RSS on the CPU, `torch.cuda.max_memory_allocated` on a GPU). Printed as ratios
against the full-logits path measured in the same run.

    .venv/bin/python benchmarks/bench_head.py [--tokens 2048 4096 8192] [--device cuda] [--dtype bfloat16] [--stale]
        [--hidden 896 3584]

`--stale` adds the fused path with every row a stale sample's, reweighted (pipeline.stale_policy=reweight: one more
log-softmax a chunk for the truncated importance weights); its loss differs by those weights, so no gap is shown.
`--hidden H ...` adds the fused path with gkd.teacher_signal=hidden from a teacher of hidden size H: its hidden
states [T, H] and output layer [V, H] (inputs, like the student's) instead of the top-256, the teacher's logits a
chunk at a time and the divergence over the whole vocabulary (another loss: no gap shown).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch

from gkd_async.loss.fused_head import HeadLoss, HeadTargets, fused_head_loss
from gkd_async.loss.topk import distill_loss

HIDDEN, VOCAB, TOPK = 896, 151_936, 256


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _inputs(tokens: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, HeadTargets]:
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(tokens, HIDDEN, generator=gen) / HIDDEN**0.5).to(device, dtype).requires_grad_(True)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen).to(device, dtype).requires_grad_(True)
    logprobs = torch.log_softmax(torch.randn(tokens, TOPK, generator=gen), -1) - 0.1
    targets = HeadTargets(
        topk_ids=torch.randint(0, VOCAB, (tokens, TOPK), generator=gen).to(device),
        topk_logprobs=logprobs.to(device),
        tokens=torch.zeros(tokens, dtype=torch.long, device=device),
        behaviour_logprobs=torch.zeros(tokens, device=device),
        advantages=torch.zeros(tokens, device=device),
    )
    return hidden, weight, targets


def measure(method: str, tokens: int, device: str, dtype_name: str, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    hidden, weight, targets = _inputs(tokens, device, getattr(torch, dtype_name))
    if method.startswith("hidden"):  # the teacher's hidden states and output layer stand for its top-k
        size = int(method.split()[-1])
        gen = torch.Generator().manual_seed(1)
        targets.topk_ids, targets.topk_logprobs = targets.topk_ids[:, :0], targets.topk_logprobs[:, :0]
        targets.teacher_hidden = torch.randn(tokens, size, generator=gen).to(device, getattr(torch, dtype_name))
        targets.teacher_weight = torch.randn(VOCAB, size, generator=gen).div_(size**0.5).to(device)  # no temporary
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_mb()
    start = time.perf_counter()
    if method == "full logits":
        logits = torch.nn.functional.linear(hidden, weight)[None]
        mask = torch.ones(1, tokens, dtype=torch.bool, device=device)
        total, count, _ = distill_loss(logits, targets.topk_ids[None], targets.topk_logprobs[None], mask)
        loss = total / count
    else:
        spec = HeadLoss()
        if method == "fused, reweighted":
            targets.reweighted = torch.ones(tokens, dtype=torch.bool, device=device)
            spec = HeadLoss(stale_weight_clip=2.0)
        total, _ = fused_head_loss(hidden, weight, None, targets, spec)
        loss = total / tokens
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    elapsed = time.perf_counter() - start
    queue.put((elapsed, peak, loss.item(), hidden.grad.norm().item(), weight.grad.norm().item()))


def run(method: str, tokens: int, device: str, dtype: str, threads: int) -> tuple[float, ...]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(method, tokens, device, dtype, threads, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return (float("nan"),) * 5  # killed: out of memory
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="of the hidden states and the head")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stale", action="store_true", help="add the fused path with stale rows reweighted")
    parser.add_argument("--hidden", type=int, nargs="*", default=[], help="teacher hidden sizes (teacher_signal)")
    args = parser.parse_args()
    print(
        f"LM head [{VOCAB} x {HIDDEN}] + forward KL on the teacher's top-{TOPK}, forward + backward, {args.dtype} "
        f"on {args.device}, {args.threads} thread(s); memory = peak above the inputs"
    )
    print(f"{'T':>6} {'path':>17} {'time s':>8} {'peak MB':>9} {'time ratio':>11} {'mem ratio':>10} {'grad gap':>9}")
    methods = ["full logits", "fused", *(["fused, reweighted"] * args.stale), *(f"hidden {h}" for h in args.hidden)]
    for tokens in args.tokens:
        results = {method: run(method, tokens, args.device, args.dtype, args.threads) for method in methods}
        base = results["full logits"]
        for name, (seconds, peak, loss, *norms) in results.items():
            gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip((loss, *norms), base[2:], strict=True))
            shown = "-" if name == "fused, reweighted" or name.startswith("hidden") else f"{gap:.1e}"
            print(
                f"{tokens:>6} {name:>17} {seconds:8.2f} {peak:9.0f} {seconds / base[0]:11.2f} {peak / base[1]:10.3f}"
                f" {shown:>9}"
            )


if __name__ == "__main__":
    main()
