"""Rollout and teacher-scoring throughput, vLLM against HF transformers on the same tiny fp32 models.

Rollout: `--groups` prompt groups of `--n` samples, up to `--max-new-tokens` each, the way the rollout
worker calls each engine (every group it has read in one call), each engine one group per call as well,
and the baseline: transformers' own `generate` one group per call (what the HF engine did before it
batched groups). Teacher: the teacher's top-k (`--k`) log-probs for every response token of the
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gkd_async.config.engines import VllmSection
from gkd_async.data.prompts import load_prompts
from gkd_async.engines import default_device  # noqa: E402
from gkd_async.engines.hf import HFRolloutEngine, HFTeacherEngine, Sample  # noqa: E402
from gkd_async.models.loading import load_tokenizer


def timed(fn: Callable[[], list[list[Sample]]], repeats: int = 3) -> tuple[float, list[list[Sample]]]:
    """The fastest of `repeats` calls after a warm-up: the least disturbed by the other processes."""
    fn()
    best, out = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


@torch.no_grad()
def transformers_generate(engine: HFRolloutEngine, prompt, n: int, max_new_tokens: int, seed: int) -> list[Sample]:
    """One group through `model.generate` with the scores kept for the behaviour log-probs."""
    ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64)).unsqueeze(0).expand(n, -1)
    torch.manual_seed(seed)
    out = engine.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        top_k=0,
        max_new_tokens=max_new_tokens,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=engine.pad_id,
        eos_token_id=engine.eos_id,
    )
    new = out.sequences[:, ids.shape[1] :]
    logprobs = torch.log_softmax(torch.stack(out.scores, 1).float(), -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    samples = []
    for row in range(n):
        eos = (new[row] == engine.eos_id).nonzero()
        length = int(eos[0]) + 1 if len(eos) else new.shape[1]
        samples.append(Sample(new[row, :length].numpy().astype(np.int32), logprobs[row, :length].numpy()))
    return samples


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
    hf_rollout, baseline, hf_one = {}, {}, {}
    for spec in args.models.split(","):
        engine = HFRolloutEngine(spec, "float32", tok.pad_token_id, tok.eos_token_id, device)
        hf_rollout[spec] = timed(lambda engine=engine: engine.generate_groups(prompts, seeds, *sampling))
        hf_one[spec] = timed(
            lambda engine=engine: [
                engine.generate_groups([p], [s], *sampling)[0] for p, s in zip(prompts, seeds, strict=True)
            ]
        )
        baseline[spec] = timed(
            lambda engine=engine: [
                transformers_generate(engine, p, args.n, args.max_new_tokens, s)
                for p, s in zip(prompts, seeds, strict=True)
            ]
        )
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
        base_s, base_out = baseline[spec]
        base_rate = tokens(base_out) / base_s
        for label, (seconds, out) in (
            ("transformers generate, one group per call", (base_s, base_out)),
            ("HF engine, all groups in one call", (hf_s, hf_out)),
            ("HF engine, one group per call", hf_one[spec]),
            ("vLLM, all groups in one call", (all_s, all_out)),
            ("vLLM, one group per call", (one_s, one_out)),
        ):
            rows.append((f"rollout {spec}: {label}", tokens(out), seconds, tokens(out) / seconds / base_rate))
        del engine
    teacher = VLLMTeacherEngine("tiny:teacher", "float32", settings, max_len, max_topk=args.k)
    vllm_score_s, _ = timed(lambda: teacher.score(pairs, args.k, 1.0))
    rows.append((f"teacher tiny:teacher k={args.k}: HF, batch 8", scored, hf_score_s, 1.0))
    rows.append((f"teacher tiny:teacher k={args.k}: vLLM", scored, vllm_score_s, hf_score_s / vllm_score_s))

    print(f"device {device}, {args.groups} groups x n={args.n}, up to {args.max_new_tokens} new tokens, fp32")
    print("ratios: rollout against transformers generate, teacher against HF, of the same model")
    print(f"{'engine':<68} {'tokens':>8} {'seconds':>8} {'tokens/s':>10} {'ratio':>7}")
    for name, count, seconds, ratio in rows:
        print(f"{name:<68} {count:>8} {seconds:>8.3f} {count / seconds:>10.0f} {ratio:>6.2f}x")


if __name__ == "__main__":
    main()
