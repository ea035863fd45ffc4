"""Publishing student weights and loading them on a rollout worker, per transport, against model size.

For 10M, 100M and 500M fp32 parameters (tensors of 4M parameters at most, like a model's layers): the
learner's publish (file: a safetensors file written to disk from the gathered state dict; redis: the
tensors streamed into 64 MB buckets in a private local redis-server) and a worker's read of that version,
one after the other on this machine. Ratios are against the file transport measured in the same run.
Memory on the learner's side is by construction: the file transport needs the whole state dict on rank 0's
CPU, the redis transport one bucket.

    .venv/bin/python benchmarks/bench_weights.py [--params 10 100 500]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from gkd_async.local_redis import LocalRedisServer
from gkd_async.redis_client import connect_redis
from gkd_async.weights import RedisWeights, WeightStore

TENSOR = 4_000_000


def model_of(millions: int) -> dict[str, torch.Tensor]:
    total, out, i = millions * 1_000_000, {}, 0
    while total > 0:
        size = min(TENSOR, total)
        out[f"model.layers.{i}.weight"] = torch.randn(size)
        total, i = total - size, i + 1
    return out


def touched(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sum(float(t.sum()) for t in state.values())
    return state


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, nargs="+", default=[10, 100, 500], help="millions of parameters")
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"fp32 weights, publish (learner) then read (rollout worker); redis buckets of {args.bucket_mb:g} MB")
    print(f"{'params':>7} {'transport':>9} {'MB':>7} {'publish s':>10} {'read s':>8} {'total s':>8} {'vs file':>8}")
    with LocalRedisServer() as server, tempfile.TemporaryDirectory(prefix="gkd-bench-weights-") as tmp:
        client = connect_redis(server.url)
        for millions in args.params:
            model = model_of(millions)
            megabytes = sum(t.numel() * t.element_size() for t in model.values()) / 2**20
            key = f"bench:{millions}:weights"
            stores = {
                "file": WeightStore(client, key + ":file", Path(tmp) / f"{millions}M"),
                "redis": RedisWeights(client, key, server.url, args.bucket_mb),
            }
            base = None
            for name, store in stores.items():
                tensors = model if name == "file" else iter(model.items())
                publish_s, _ = timed(lambda store=store, tensors=tensors: store.publish(tensors, 1))
                _, handle = store.latest()
                # summed inside the timing: safetensors maps a file lazily, so a read counts once touched
                read_s, loaded = timed(lambda store=store, handle=handle: touched(store.read(handle)))
                assert all(torch.equal(loaded[k], v) for k, v in model.items())
                total = publish_s + read_s
                base = base or total
                print(
                    f"{millions:>6}M {name:>9} {megabytes:7.0f} {publish_s:10.2f} {read_s:8.2f} {total:8.2f}"
                    f" {base / total:8.2f}",
                    flush=True,
                )
                del loaded
            client.flushdb()  # each size on its own: Redis holds one model at a time


if __name__ == "__main__":
    main()
