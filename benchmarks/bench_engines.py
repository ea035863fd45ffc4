"""Rollout and teacher-scoring throughput, vLLM against HF transformers on the same tiny fp32 models.

Rollout: `--groups` prompt groups of `--n` samples, up to `--max-new-tokens` each, the way the rollout
worker calls each engine (HF: one group per generate call; vLLM: every group in one call), and vLLM one
group per call as well. Teacher: the teacher's top-k (`--k`) log-probs for every response token of the
samples generated above. Tokens/s count generated (rollout) or scored (teacher) response tokens; each
engine gets a warm-up call, then the fastest of three calls counts (sampling is seeded, so the three
produce the same tokens). Ratios are against HF, measured in the same run.

    .venv/bin/python benchmarks/bench_engines.py [--groups 16] [--n 8] [--max-new-tokens 64] [--k 256]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from gkd_async.config import VllmSection  # noqa: E402
from gkd_async.data import load_prompts  # noqa: E402
from gkd_async.engines import default_device  # noqa: E402
from gkd_async.engines.hf import HFRolloutEngine, HFTeacherEngine, Sample  # noqa: E402
from gkd_async.models import load_tokenizer  # noqa: E402


def timed(fn: Callable[[], list[list[Sample]]], repeats: int = 3) -> tuple[float, list[list[Sample]]]:
    """The fastest of `repeats` calls after a warm-up: the least disturbed by the other processes."""
    fn()
    best, out = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def tokens(groups: list[list[Sample]]) -> int:
    return sum(len(s.response_ids) for g in groups for s in g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--models", default="tiny:student,tiny:teacher", help="rollout models, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer("tiny:student")
    prompts = [p.ids for p in load_prompts(["tiny:addition"], tok)[: args.groups]]
    seeds = list(range(len(prompts)))
    sampling = (args.n, 1.0, 1.0, args.max_new_tokens)
    device = default_device()
    settings = VllmSection(kv_cache_memory_mb=512 if device == "cpu" else None)
    max_len = max(len(p) for p in prompts) + args.max_new_tokens + 8

    # HF first: vLLM binds this process's threads when it starts.
    hf_rollout = {}
    for spec in args.models.split(","):
        engine = HFRolloutEngine(spec, "float32", tok.pad_token_id, tok.eos_token_id, device)
        hf_rollout[spec] = timed(lambda engine=engine: engine.generate_groups(prompts, seeds, *sampling))
    samples = hf_rollout[args.models.split(",")[0]][1]
    pairs = [(p, s.response_ids) for p, g in zip(prompts, samples, strict=True) for s in g]
    scored = sum(len(r) for _, r in pairs)
    hf_teacher = HFTeacherEngine("tiny:teacher", "float32", tok.pad_token_id, device)
    hf_score_s, _ = timed(lambda: hf_teacher.score(pairs, args.k, 1.0, batch_size=8))

    from gkd_async.engines.vllm import VLLMRolloutEngine, VLLMTeacherEngine

    rows = []
    for spec, (hf_s, hf_out) in hf_rollout.items():
        engine = VLLMRolloutEngine(spec, "float32", tok.eos_token_id, settings, max_len)
        all_s, all_out = timed(lambda engine=engine: engine.generate_groups(prompts, seeds, *sampling))
        one_s, one_out = timed(
            lambda engine=engine: [
                engine.generate_groups([p], [s], *sampling)[0] for p, s in zip(prompts, seeds, strict=True)
            ]
        )
        hf_rate = tokens(hf_out) / hf_s
        rows.append((f"rollout {spec}: HF, one group per call", tokens(hf_out), hf_s, 1.0))
        rows.append(
            (f"rollout {spec}: vLLM, all groups in one call", tokens(all_out), all_s, tokens(all_out) / all_s / hf_rate)
        )
        rows.append(
            (f"rollout {spec}: vLLM, one group per call", tokens(one_out), one_s, tokens(one_out) / one_s / hf_rate)
        )
        del engine
    teacher = VLLMTeacherEngine("tiny:teacher", "float32", settings, max_len, max_topk=args.k)
    vllm_score_s, _ = timed(lambda: teacher.score(pairs, args.k, 1.0))
    rows.append((f"teacher tiny:teacher k={args.k}: HF, batch 8", scored, hf_score_s, 1.0))
    rows.append((f"teacher tiny:teacher k={args.k}: vLLM", scored, vllm_score_s, hf_score_s / vllm_score_s))

    print(f"device {device}, {args.groups} groups x n={args.n}, up to {args.max_new_tokens} new tokens, fp32")
    print(f"{'engine':<58} {'tokens':>8} {'seconds':>8} {'tokens/s':>10} {'vs HF':>7}")
    for name, count, seconds, ratio in rows:
        print(f"{name:<58} {count:>8} {seconds:>8.3f} {count / seconds:>10.0f} {ratio:>6.2f}x")


if __name__ == "__main__":
    main()
