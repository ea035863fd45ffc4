"""The `ray` transport: the same buckets in Ray's object store, put by the learner and pulled by each worker
straight from the learner's node (no Redis hop; Ray moves objects between nodes itself). A small actor of the
run holds the references of the newest versions. Every reader must be inside the run's Ray cluster, so
workers started with `gkd-async worker` cannot use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import redis
import torch
from safetensors.torch import save

from gkd_async.errors import GKDError
from gkd_async.transport.redis_client import raises_unavailable
from gkd_async.weight_sync.buckets import iter_buckets, join_pieces, load_bucket, unshared
from gkd_async.weight_sync.redis_buckets import RedisWeights


class WeightHub:
    """The `ray` transport's registry, one Ray actor a run: the bucket references of the newest versions.

    Holding the references keeps the objects alive after the learner drops its own; forgetting a version
    frees them."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.versions: dict[int, list] = {}  # publication order: dicts keep insertion order

    def publish(self, version: int, refs: list) -> None:
        self.versions.pop(version, None)
        self.versions[version] = refs
        while len(self.versions) > self.keep:
            self.versions.pop(next(iter(self.versions)))

    def refs(self, version: int) -> list | None:
        return self.versions.get(version)


def weight_hub(name: str, namespace: str, keep: int = 2):
    """The run's WeightHub actor, started by the first caller. The launcher starts it before any stage, so
    that it lives as long as the run rather than as long as whichever stage happened to come first."""
    import ray

    hub = ray.remote(num_cpus=0)(WeightHub)
    return hub.options(name=name, namespace=namespace, get_if_exists=True).remote(keep)


class RayWeights:
    """The `ray` transport: buckets as objects in Ray's object store, announced in Redis like the others."""

    needs_shared_directory = False

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        hub_name: str,
        namespace: str,
        url: str = "redis",
        bucket_mb: float = 64.0,
        keep: int = 2,
    ) -> None:
        import ray

        if not ray.is_initialized():
            raise GKDError(
                "pipeline.weight_transport=ray moves the weights through Ray's object store, so every stage must "
                "run inside the run's Ray cluster; a stage started with `gkd-async worker` is not. Use "
                "pipeline.weight_transport=redis (or file) for standalone workers."
            )
        self.client, self.key, self.url, self.keep = client, key, url, keep
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.hub = weight_hub(hub_name, namespace, keep)

    @raises_unavailable
    def publish(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Put `tensors` into the object store as `version`, register them with the hub, then announce it."""
        import ray

        pairs = unshared(tensors).items() if isinstance(tensors, Mapping) else tensors
        refs, written = [], 0
        for bucket in iter_buckets(pairs, self.bucket_bytes, split=True):
            blob = save(bucket)
            refs.append(ray.put(blob))
            written += len(blob)
        ray.get(self.hub.publish.remote(version, refs))
        self.client.set(self.key, json.dumps({"version": version, "transport": "ray", "bytes": written}))
        return written

    latest = RedisWeights.latest  # the same announcement in Redis

    def read(self, version: int) -> dict[str, torch.Tensor] | None:
        """The state dict of `version`, pulled from the object store; None when the hub forgot it."""
        import ray

        refs = ray.get(self.hub.refs.remote(version))
        if refs is None:
            return None
        state: dict[str, torch.Tensor] = {}
        for blob in ray.get(refs):
            state.update(load_bucket(blob))
        return join_pieces(state)

    def close(self) -> None:
        """Nothing held open: the versions stay where readers find them."""
