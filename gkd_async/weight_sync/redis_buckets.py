"""The `redis` transport (the default): each version travels through the run's Redis in buckets of about
`pipeline.weight_bucket_mb`, each a safetensors blob under its own key. The learner streams the parameters
into buckets one at a time (its extra memory is a bucket, not the model) and any worker that can reach Redis
reads them, on any machine, including workers that join later: no shared disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import redis
import torch
from safetensors.torch import load, save

from gkd_async.transport.redis_client import raises_unavailable
from gkd_async.weight_sync.buckets import _announced_version, iter_buckets, unshared


class RedisWeights:
    """The `redis` transport: a version is `<key>:v<version>` (its bucket count) and its buckets
    `<key>:v<version>:<i>`, each a safetensors blob; `<key>:order` lists versions by publication, so the
    oldest go first even across a learner restart (a resumed learner can publish lower versions again)."""

    needs_shared_directory = False

    def __init__(self, client: redis.Redis, key: str, url: str = "redis", bucket_mb: float = 64.0, keep: int = 2):
        self.client, self.key, self.url, self.keep = client, key, url, keep
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))

    def _version_key(self, version: int) -> str:
        return f"{self.key}:v{version}"

    @raises_unavailable
    def publish(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Write `tensors` (a state dict, or (name, tensor) pairs produced one at a time) as `version`, then
        announce it; returns the number of bytes written."""
        pairs = unshared(tensors).items() if isinstance(tensors, Mapping) else tensors
        self._forget(version)  # a resumed learner publishes a version again
        count = written = 0
        for bucket in iter_buckets(pairs, self.bucket_bytes):
            blob = save(bucket)
            self.client.set(f"{self._version_key(version)}:{count}", blob)
            count, written = count + 1, written + len(blob)
        self.client.set(self._version_key(version), count)
        self.client.set(self.key, json.dumps({"version": version, "transport": "redis", "bytes": written}))
        order = f"{self.key}:order"
        self.client.lrem(order, 0, version)
        self.client.rpush(order, version)
        for old in self.client.lrange(order, 0, -self.keep - 1):
            self._forget(int(old))
            self.client.lrem(order, 1, old)
        return written

    def _forget(self, version: int) -> None:
        count = self.client.get(self._version_key(version))
        self.client.delete(self._version_key(version))  # first: a reader then sees the version as gone
        if count is not None:
            keys = [f"{self._version_key(version)}:{i}" for i in range(int(count))]
            for start in range(0, len(keys), 512):
                self.client.delete(*keys[start : start + 512])

    @raises_unavailable
    def latest(self) -> tuple[int, int] | None:
        """The newest announced version (twice: the version is its own handle); None when there is none."""
        version = _announced_version(self.client.get(self.key))
        return None if version is None else (version, version)

    @raises_unavailable
    def read(self, version: int) -> dict[str, torch.Tensor] | None:
        """The state dict of `version`, bucket by bucket; None when it was replaced while being read."""
        count = self.client.get(self._version_key(version))
        if count is None:
            return None
        state: dict[str, torch.Tensor] = {}
        for i in range(int(count)):
            blob = self.client.get(f"{self._version_key(version)}:{i}")
            if blob is None:
                return None
            state.update(load(blob))
        return state

    def close(self) -> None:
        """Nothing held open: the versions stay where readers find them."""
