"""A rollout worker's end of the collective weight transport in a process of its own, and how to compare what it got."""

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def model_like(value):
    """Tensors of several sizes and dtypes, one larger than a bucket of 1 KiB."""
    return {
        "embed.weight": torch.full((40, 16), float(value)),
        "layer.0.weight": torch.arange(24.0).reshape(4, 6) + value,
        "layer.0.bias": torch.full((6,), -float(value), dtype=torch.bfloat16),
        "layer.0.steps": torch.tensor(int(value), dtype=torch.int64),
        "head.mask": torch.arange(5) % 2 == 0,
    }


def same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def start_worker(redis_server, key, out: Path):
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", WORKER, redis_server.url, key, str(out)], env=env)


def received(out: Path, version: int, timeout_s: float = 60.0) -> dict[str, torch.Tensor]:
    path = out / f"v{version}.safetensors"
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"version {version} never reached {out.name}"
        time.sleep(0.05)
    return load_file(str(path))


WORKER = """
import sys, time
from safetensors.torch import save_file
from gkd_async.weight_sync.collective import CollectiveWeights
from gkd_async.transport.redis_client import connect_redis

url, key, out = sys.argv[1:4]
weights, seen = CollectiveWeights(connect_redis(url), key), None
while True:
    latest = weights.latest()
    if latest is not None and latest[0] != seen:
        state = weights.read(latest[0])
        if state is not None:
            seen = latest[0]
            save_file({k: v.clone() for k, v in state.items()}, f"{out}/v{seen}.tmp")
            import os; os.replace(f"{out}/v{seen}.tmp", f"{out}/v{seen}.safetensors")
    time.sleep(0.02)
"""
