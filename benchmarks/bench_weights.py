"""Publishing student weights and loading them on a rollout worker, per transport, against model size.

For 10M, 100M and 500M fp32 parameters (tensors of 4M parameters at most, like a model's layers): the
learner's publish (file: a safetensors file written to disk from the gathered state dict; redis: the
tensors streamed into 64 MB buckets in a private local redis-server; ray: the same buckets put into Ray's
object store; collective: the same buckets sent by the learner straight to a connected worker over a gloo
pair, so the transfer is inside the publish) and a worker's read of that version in another process (a Ray
task or actor), one after the other on this machine. Ratios are against the file transport measured in
the same run. Memory on the learner's side is by construction: the file transport needs the whole state
dict on rank 0's CPU, the others one bucket (collective also keeps the newest version in host memory for
workers that connect later).

`--models random:qwen2.5-0.5b random:qwen2.5-1.5b` takes a real model's tensors instead (its shapes, random
values; nothing is built): a 0.5B student's float32 embedding alone is 544 MB, past the 512 MB a Redis value may
hold, which the tensors of 4M parameters never reach. GB/s is the model's bytes over publish + read.

    .venv/bin/python benchmarks/bench_weights.py [--params 10 100 500] [--models random:qwen2.5-0.5b]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch

from gkd_async.transport.local_redis import LocalRedisServer
from gkd_async.transport.redis_client import connect_redis
from gkd_async.weight_sync.collective import CollectiveWeights
from gkd_async.weight_sync.files import WeightStore
from gkd_async.weight_sync.ray_objects import RayWeights
from gkd_async.weight_sync.redis_buckets import RedisWeights

TENSOR = 4_000_000


def real_model(spec: str) -> dict[str, torch.Tensor]:
    """The tensors a learner publishes for `spec` (a `random:` preset): its state dict's shapes, tied aliases
    left out as the publisher does, random values."""
    from transformers import AutoModelForCausalLM

    from gkd_async.models.loading import RANDOM_PREFIX, RANDOM_PRESETS, preset_config, tied_aliases, without_tied

    config = preset_config(RANDOM_PRESETS[spec.removeprefix(RANDOM_PREFIX)])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = without_tied(model.state_dict(), tied_aliases(model))
    return {name: torch.randn(tensor.shape) for name, tensor in shapes.items()}


def model_of(millions: int) -> dict[str, torch.Tensor]:
    total, out, i = millions * 1_000_000, {}, 0
    while total > 0:
        size = min(TENSOR, total)
        out[f"model.layers.{i}.weight"] = torch.randn(size)
        total, i = total - size, i + 1
    return out


@ray.remote(num_cpus=0)
def read_in_another_process(
    transport: str, url: str, key: str, directory: str, hub: str, version: int
) -> tuple[float, float]:
    """A rollout worker's read: in a process of its own (a Ray task), touching every value once (safetensors
    maps a file lazily, so a file read counts once touched). Returns the sum of all values."""
    client = connect_redis(url)
    if transport == "file":
        store = WeightStore(client, key, Path(directory))
    elif transport == "redis":
        store = RedisWeights(client, key, url)
    else:
        store = RayWeights(client, key, hub, "bench")
    _, handle = store.latest()
    start = time.perf_counter()
    total = sum(float(t.double().sum()) for t in store.read(handle).values())
    return total, time.perf_counter() - start


@ray.remote(num_cpus=0)
class CollectiveReader:
    """A rollout worker of the collective transport: connected before the learner publishes."""

    def __init__(self, url: str, key: str) -> None:
        self.store = CollectiveWeights(connect_redis(url), key)
        self.store.latest()  # starts receiving

    def read(self, version: int) -> tuple[float, float]:
        """Waits for `version` (already sent when the learner's publish returned), then touches every value."""
        start = time.perf_counter()
        while (latest := self.store.latest()) is None or latest[0] != version:
            time.sleep(0.001)
        total = sum(float(t.double().sum()) for t in self.store.read(version).values())
        return total, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, nargs="+", default=[10, 100, 500], help="millions of parameters")
    parser.add_argument("--models", nargs="+", default=[], help="real shapes: random:qwen2.5-0.5b, random:qwen2.5-1.5b")
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    ray.init(num_cpus=2, object_store_memory=6 * 2**30, include_dashboard=False, log_to_driver=False)
    print(f"fp32 weights, publish (learner) then read (rollout worker); buckets of {args.bucket_mb:g} MB")
    print(
        f"{'params':>20} {'transport':>10} {'MB':>7} {'publish s':>10} {'read s':>8} {'total s':>8} {'GB/s':>6}"
        f" {'vs file':>8}"
    )
    with LocalRedisServer(tcp=True) as server, tempfile.TemporaryDirectory(prefix="gkd-bench-weights-") as tmp:
        client = connect_redis(server.url)
        for millions in [*args.params, *args.models]:
            model = real_model(millions) if isinstance(millions, str) else model_of(millions)
            expected = sum(float(t.double().sum()) for t in model.values())
            megabytes = sum(t.numel() * t.element_size() for t in model.values()) / 2**20
            label = millions if isinstance(millions, str) else f"{millions}M"
            slug = label.replace(":", "-").replace(".", "-")
            key, directory, hub = f"bench:{slug}:weights", str(Path(tmp) / slug), f"bench-{slug}"
            stores = {
                "file": WeightStore(client, key, Path(directory)),
                "redis": RedisWeights(client, key, server.url, args.bucket_mb),
                "ray": RayWeights(client, key, hub, "bench", server.url, args.bucket_mb),
                "collective": CollectiveWeights(client, key, server.url, args.bucket_mb),
            }
            stores["collective"].serve()
            reader = CollectiveReader.remote(server.url, key)
            while stores["collective"].connected_workers < 1:
                time.sleep(0.01)
            base = None
            for name, store in stores.items():
                tensors = model if name == "file" else iter(model.items())
                start = time.perf_counter()
                store.publish(tensors, 1)
                publish_s = time.perf_counter() - start
                if name == "collective":
                    total, read_s = ray.get(reader.read.remote(1))
                else:
                    total, read_s = ray.get(read_in_another_process.remote(name, server.url, key, directory, hub, 1))
                assert abs(total - expected) <= 1e-6 * abs(expected) + 1e-3, (name, total, expected)
                both = publish_s + read_s
                base = base or both
                print(
                    f"{label:>20} {name:>10} {megabytes:7.0f} {publish_s:10.2f} {read_s:8.2f} {both:8.2f}"
                    f" {megabytes / 1024 / both:6.2f} {base / both:8.2f}",
                    flush=True,
                )
                client.delete(key)
            stores["collective"].close()
            ray.kill(reader)
            client.flushdb()  # each size on its own: Redis holds one model at a time
            for actor in ray.util.list_named_actors(all_namespaces=True):
                if actor["namespace"] == "bench":
                    ray.kill(ray.get_actor(actor["name"], namespace="bench"))  # frees the ray arm's objects


if __name__ == "__main__":
    main()
