"""Does vLLM's prefix cache spare a teacher the prefill of a prompt shared by a group's samples when it scores
with `prompt_logprobs` (as gkd-async's vLLM teacher does)? The same requests (groups of n samples sharing a
P-token prompt, R-token responses, top-k prompt log-probs) timed with `enable_prefix_caching` off and on, in one
run, each engine warmed up on other prompts first; the scores are checked equal.

    .venv/bin/python benchmarks/bench_vllm_prefix.py [--model tiny:teacher] [--prompts 256 896] [--n 8]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np

from gkd_async.config.engines import VllmSection
from gkd_async.engines.vllm import import_vllm, start_llm
from gkd_async.models.loading import model_vocab_size


def requests_of(rng, vocab: int, groups: int, n: int, prompt_length: int, response_length: int) -> list[dict]:
    out = []
    for _ in range(groups):
        prompt = rng.integers(1, vocab, prompt_length).tolist()
        out += [{"prompt_token_ids": prompt + rng.integers(1, vocab, response_length).tolist()} for _ in range(n)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:teacher")
    parser.add_argument("--prompts", nargs="+", type=int, default=[256, 896])
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    vllm = import_vllm()
    vocab = model_vocab_size(args.model)
    params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=args.k, detokenize=False)
    seconds: dict[tuple[bool, int], float] = {}
    scores: dict[tuple[bool, int], list] = {}
    for caching in (False, True):
        llm = start_llm(
            args.model, "float32", VllmSection(), max_model_len=max(args.prompts) + args.response + 8,
            max_logprobs=args.k, prefix_caching=caching,
        )  # fmt: skip
        for prompt_length in args.prompts:
            warm = requests_of(np.random.default_rng(99), vocab, 1, 2, prompt_length, args.response)
            llm.generate(warm, params, use_tqdm=False)
            times = []
            for repeat in range(args.repeats):  # new prompts each time: only a group's own prefix could be reused
                batch = requests_of(
                    np.random.default_rng(repeat), vocab, args.groups, args.n, prompt_length, args.response
                )
                start = time.perf_counter()
                outputs = llm.generate(batch, params, use_tqdm=False)
                times.append(time.perf_counter() - start)
            seconds[caching, prompt_length] = statistics.median(times)
            scores[caching, prompt_length] = [
                [sorted(d.items())[0][1].logprob for d in out.prompt_logprobs[1:]] for out in outputs
            ]
        del llm
        gc.collect()
    print(f"{args.model}: {args.groups} groups x {args.n} samples, response {args.response}, prompt top-{args.k}")
    print(f"{'P':>5} {'caching off s':>14} {'caching on s':>13} {'on / off':>9} {'same scores':>12}")
    for prompt_length in args.prompts:
        off, on = seconds[False, prompt_length], seconds[True, prompt_length]
        same = np.allclose(scores[False, prompt_length], scores[True, prompt_length], atol=1e-4)
        print(f"{prompt_length:>5} {off:>14.3f} {on:>13.3f} {on / off:>8.2f}x {str(same):>12}")


if __name__ == "__main__":
    main()
