"""Does vLLM's prefix cache spare a teacher the prefill of a prompt shared by a group's samples when it scores
with `prompt_logprobs` (as gkd-async's vLLM teacher does)? The same requests (groups of n samples sharing a
P-token prompt, R-token responses, top-k prompt log-probs) timed with `enable_prefix_caching` off and on, in one
run, each engine warmed up on other prompts first; the scores are checked equal.

    .venv/bin/python benchmarks/bench_vllm_prefix.py [--model tiny:teacher] [--prompts 256 896] [--n 8]

`--served`: the same for a served teacher (teacher.backend=openai): a `vllm serve` of the model (the tests' own
launcher, tests/served.py) with `--enable-prefix-caching` and with `--no-enable-prefix-caching`, scored through
gkd-async's served engine, a group's n samples a request; it adds the server's own prefix-cache hits
(`vllm:prefix_cache_hits`, tokens).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from gkd_async.config.engines import ServedTeacherSection, VllmSection
from gkd_async.engines.served import ServedTeacherEngine
from gkd_async.engines.vllm import import_vllm, start_llm
from gkd_async.models.loading import model_vocab_size


def requests_of(rng, vocab: int, groups: int, n: int, prompt_length: int, response_length: int) -> list[dict]:
    out = []
    for _ in range(groups):
        prompt = rng.integers(1, vocab, prompt_length).tolist()
        out += [{"prompt_token_ids": prompt + rng.integers(1, vocab, response_length).tolist()} for _ in range(n)]
    return out


def prefix_cache_hits(base_url: str) -> float:
    """Tokens the server found in its prefix cache so far (its Prometheus metrics)."""
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:prefix_cache_hits"))


def served_seconds(args, caching: bool, scores: dict, hits: dict) -> dict[int, float]:
    """Median seconds per prompt length through a served teacher, its prefix caching on or off."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from served import vllm_server

    flag = "--enable-prefix-caching" if caching else "--no-enable-prefix-caching"
    vocab, seconds = model_vocab_size(args.model), {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        vllm_server(
            args.model, args.k, max(args.prompts) + args.response + 8, Path(tmp) / "server.log", (flag,)
        ) as base,
    ):
        engine = ServedTeacherEngine(ServedTeacherSection(base_url=base))
        for prompt_length in args.prompts:
            warm = requests_of(np.random.default_rng(99), vocab, 1, 2, prompt_length, args.response)
            engine.score(pairs_of(warm, prompt_length), args.k, 1.0, args.n)
            times, before = [], prefix_cache_hits(base)
            for repeat in range(args.repeats):  # new prompts each time: only a group's own prefix could be reused
                batch = requests_of(np.random.default_rng(repeat), vocab, args.groups, args.n, prompt_length,
                                    args.response)  # fmt: skip
                start = time.perf_counter()
                out = engine.score(pairs_of(batch, prompt_length), args.k, 1.0, args.n)
                times.append(time.perf_counter() - start)
            seconds[prompt_length] = statistics.median(times)
            hits[caching, prompt_length] = (prefix_cache_hits(base) - before) / args.repeats
            scores[caching, prompt_length] = [lps[:, 0].tolist() for _, lps in out]
        engine.close()
    return seconds


def pairs_of(requests: list[dict], prompt_length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    ids = [np.asarray(r["prompt_token_ids"], np.int32) for r in requests]
    return [(seq[:prompt_length], seq[prompt_length:]) for seq in ids]


def served_main(args) -> None:
    scores: dict = {}
    hits: dict = {}
    seconds = {caching: served_seconds(args, caching, scores, hits) for caching in (False, True)}
    print(f"served {args.model}: {args.groups} groups x {args.n} samples (a group a request), response {args.response}")
    print(f"{'P':>5} {'caching off s':>14} {'caching on s':>13} {'on / off':>9} {'cache hits':>11} {'same scores':>12}")
    for p in args.prompts:
        off, on = seconds[False][p], seconds[True][p]
        same = np.allclose(scores[False, p], scores[True, p], atol=1e-4)
        print(f"{p:>5} {off:>14.3f} {on:>13.3f} {on / off:>8.2f}x {hits[True, p]:>11.0f} {str(same):>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:teacher")
    parser.add_argument("--prompts", nargs="+", type=int, default=[256, 896])
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--served", action="store_true", help="through a `vllm serve` and the served engine")
    args = parser.parse_args()
    if args.served:
        served_main(args)
        return
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
