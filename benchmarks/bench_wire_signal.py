"""Bytes per scored response token on the wire: the teacher's top-k log-probs (gkd.teacher_signal=topk) against its
last hidden states (gkd.teacher_signal=hidden, teacher.hidden_dtype), and the full logits neither sends.

Each figure is a real scored record, encoded by the codec, divided by its response tokens: a group of n samples
of R tokens after a P-token prompt, with the rollout's own fields (ids, behaviour log-probs) and each token's
teacher log-prob included. Hidden sizes are those of Qwen2.5-0.5B (896), a 2,048-wide model and Qwen2.5-7B (3,584);
the vocabulary is Qwen's (151,936).

    .venv/bin/python benchmarks/bench_wire_signal.py [--n 4] [--prompt 64] [--response 256]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from gkd_async.models.hidden_signal import hidden_to_wire
from gkd_async.transport.records import RolloutRecord, ScoredRecord, encode_scored_record

VOCAB = 151_936


def record_bytes(n: int, prompt: int, response: int, k: int, logprob_dtype, hidden: int, hidden_dtype: str) -> int:
    rng = np.random.default_rng(0)
    rows = n * response
    rollout = RolloutRecord(
        "run", "g0", [f"g0/{i}" for i in range(n)], 0, 0,
        rng.integers(0, VOCAB, prompt).astype(np.int32), rng.integers(0, VOCAB, rows).astype(np.int32),
        np.full(n, response, np.int32), -rng.random(rows).astype(np.float32),
    )  # fmt: skip
    states = None if not hidden else hidden_to_wire(torch.randn(rows, hidden), hidden_dtype)
    scored = ScoredRecord(
        rollout, "teacher-0", 1.0,
        rng.integers(0, VOCAB, (rows, k)).astype(np.int32), -rng.random((rows, k)).astype(logprob_dtype),
        token_logprobs=-rng.random(rows).astype(np.float32), teacher_hidden=states,
    )  # fmt: skip
    return len(encode_scored_record(scored))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=256)
    args = parser.parse_args()
    tokens = args.n * args.response
    rows = [("top-256, float32", 256, np.float32, 0, ""), ("top-256, float16", 256, np.float16, 0, "")]
    rows += [(f"hidden {h}, {d}", 0, np.float32, h, d) for h in (896, 2048, 3584) for d in ("float32", "bfloat16")]
    sizes = {name: record_bytes(args.n, args.prompt, args.response, *spec) for name, *spec in rows}
    base = sizes["top-256, float32"] / tokens
    logits = base + VOCAB * 4  # the full logits in float32 beside the rest of the record: what no signal sends
    print(f"scored records of {args.n} x {args.response} response tokens after a {args.prompt}-token prompt")
    print(f"{'signal':>22} {'bytes/token':>12} {'x top-256 f32':>14} {'x full logits':>14}")
    for name, size in sizes.items():
        per_token = size / tokens
        print(f"{name:>22} {per_token:12.0f} {per_token / base:14.2f} {per_token / logits:14.4f}")
    print(f"{'full logits, float32':>22} {logits:12.0f} {logits / base:14.2f} {1:14.4f}")


if __name__ == "__main__":
    main()
