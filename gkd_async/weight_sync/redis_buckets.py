"""The `redis` transport (the default): each version travels through the run's Redis in buckets of at most
`pipeline.weight_bucket_mb`, each a safetensors blob under its own key; a tensor larger than a bucket is cut into
pieces of rows (a 0.5B student's float32 embedding is 544 MB, past the 512 MB a Redis value may hold by default).
The learner streams the parameters into buckets one at a time (its extra memory is a bucket, not the model) and
any worker that can reach Redis reads them, on any machine, including workers that join later: no shared disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import redis
import torch
from safetensors.torch import save

from gkd_async.errors import GKDError
from gkd_async.transport.redis_client import raises_unavailable
from gkd_async.weight_sync.buckets import _announced_version, iter_buckets, join_pieces, load_bucket, unshared

BULK_LIMITS_DEFAULT = {"proto-max-bulk-len": 512 * 2**20, "client-query-buffer-limit": 2**30}
BUCKET_HEADER_MARGIN = 4 * 2**20  # a bucket's safetensors header: names, dtypes, shapes and offsets


class RedisWeights:
    """The `redis` transport: a version is `<key>:v<version>` (its bucket count) and its buckets
    `<key>:v<version>:<i>`, each a safetensors blob; `<key>:order` lists versions by publication, so the
    oldest go first even across a learner restart (a resumed learner can publish lower versions again)."""

    needs_shared_directory = False

    def __init__(self, client: redis.Redis, key: str, url: str = "redis", bucket_mb: float = 64.0, keep: int = 2):
        self.client, self.key, self.url, self.keep = client, key, url, keep
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self._fits_checked = False

    def _version_key(self, version: int) -> str:
        return f"{self.key}:v{version}"

    @raises_unavailable
    def publish(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Write `tensors` (a state dict, or (name, tensor) pairs produced one at a time) as `version`, then
        announce it; returns the number of bytes written."""
        pairs = unshared(tensors).items() if isinstance(tensors, Mapping) else tensors
        self._check_bucket_fits()
        self._forget(version)  # a resumed learner publishes a version again
        count = written = 0
        for bucket in iter_buckets(pairs, self.bucket_bytes, split=True):
            blob = save(bucket)
            try:
                self.client.set(f"{self._version_key(version)}:{count}", blob)
            except redis.ResponseError as exc:  # e.g. past the server's maxmemory: the server is up, and says why
                raise GKDError(
                    f"Redis at {self.url} refused a weights bucket of {len(blob) / 2**20:.0f} MB of version {version} "
                    f"({exc}); Redis holds the two newest student versions ({written / 2**20:.0f} MB of this one so "
                    "far): give the server the memory (its maxmemory), or use pipeline.weight_transport=file"
                ) from None
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

    def _check_bucket_fits(self) -> None:
        """A bucket must fit in one Redis value and one request (the server's proto-max-bulk-len and
        client-query-buffer-limit, 512 MB and 1 GB by default): past them the server drops the connection,
        which would look like a server gone. Said once, before anything is written."""
        if self._fits_checked:
            return
        limits = dict(BULK_LIMITS_DEFAULT)
        for name in limits:
            try:
                got = self.client.config_get(name)
                limits[name] = int(got[name]) if got.get(name, "").isdigit() else limits[name]
            except redis.ResponseError:  # CONFIG refused (a managed Redis): assume the defaults
                pass
        need = self.bucket_bytes + BUCKET_HEADER_MARGIN
        for name, limit in limits.items():
            if need > limit:
                raise GKDError(
                    f"pipeline.weight_bucket_mb={self.bucket_bytes / 2**20:g} makes weights buckets of up to "
                    f"{need / 2**20:.0f} MB, more than the {limit / 2**20:.0f} MB of the {name} of Redis at "
                    f"{self.url}: lower pipeline.weight_bucket_mb (64 is the default), or raise {name} on the server"
                )
        self._fits_checked = True

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
            state.update(load_bucket(blob))
        return join_pieces(state)

    def close(self) -> None:
        """Nothing held open: the versions stay where readers find them."""
