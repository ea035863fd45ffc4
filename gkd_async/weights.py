"""Versioned student weights, from the learner to the rollout workers, the newest announced in Redis.

Three transports, chosen by `pipeline.weight_transport`:

- `redis` (the default): each version travels through the run's Redis in buckets of about
  `pipeline.weight_bucket_mb`, each a safetensors blob under its own key. The learner streams the
  parameters into buckets one at a time (its extra memory is a bucket, not the model) and any worker that
  can reach Redis reads them, on any machine, including workers that join later: no shared disk.
- `file`: one directory per version in the run directory holding `model.safetensors` (a `save_pretrained`
  layout); workers on other machines need that directory on a shared file system.
- `ray`: the same buckets in Ray's object store, put by the learner and pulled by each worker straight
  from the learner's node (no Redis hop; Ray moves objects between nodes itself). A small actor of the run
  holds the references of the newest versions. Every reader must be inside the run's Ray cluster, so
  workers started with `gkd-async worker` cannot use it.

Either way Redis announces only the version number: a reader never follows a path or key read from
Redis, and it reads safetensors, which holds nothing but tensors, so loading weights can never run code.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import redis
import torch
from safetensors.torch import load, load_file, save, save_file

from gkd_async.errors import GKDError
from gkd_async.redis_client import raises_unavailable

WEIGHTS_FILE = "model.safetensors"


class WeightStore:
    """The `file` transport: a directory per version."""

    needs_shared_directory = True

    def __init__(self, client: redis.Redis, key: str, directory: Path, url: str = "redis", keep: int = 2) -> None:
        self.client, self.key, self.directory, self.url, self.keep = client, key, Path(directory), url, keep
        # Publication order, oldest first: a resumed learner's versions can be lower than those on disk.
        self._published = sorted(self.directory.glob("v*"), key=lambda p: p.stat().st_mtime_ns)

    @raises_unavailable
    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_of(version)
        tmp = self.directory / f".v{version:07d}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(unshared(state_dict), str(tmp / WEIGHTS_FILE), metadata={"version": str(version)})
        shutil.rmtree(path, ignore_errors=True)  # a resumed learner publishes a version again
        tmp.rename(path)
        self.client.set(self.key, json.dumps({"version": version, "path": str(path.resolve())}))
        self._published = [p for p in self._published if p != path] + [path]
        for old in self._published[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self._published = self._published[-self.keep :]
        return path

    def path_of(self, version: int) -> Path:
        return self.directory / f"v{version:07d}"

    @raises_unavailable
    def latest(self) -> tuple[int, Path] | None:
        """The newest announced version and its directory in this store; None when there is none (or the
        announcement is not one the learner writes)."""
        version = _announced_version(self.client.get(self.key))
        return None if version is None else (version, self.path_of(version))

    @staticmethod
    def load(path: Path) -> dict[str, torch.Tensor]:
        """The state dict in a version directory."""
        return load_file(str(Path(path) / WEIGHTS_FILE))

    def read(self, handle: Path) -> dict[str, torch.Tensor] | None:
        """The state dict `latest()` pointed at; None when that version was deleted since (read anew)."""
        return self.load(handle) if Path(handle).is_dir() else None

    def close(self) -> None:
        """Nothing held open: the versions stay where readers find them."""


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
        for bucket in iter_buckets(pairs, self.bucket_bytes):
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
            state.update(load(blob))
        return state

    def close(self) -> None:
        """Nothing held open: the versions stay where readers find them."""


def iter_buckets(pairs: Iterable[tuple[str, torch.Tensor]], size: int) -> Iterator[dict[str, torch.Tensor]]:
    bucket: dict[str, torch.Tensor] = {}
    filled = 0
    for name, tensor in pairs:
        bucket[name] = tensor.detach().contiguous()
        filled += tensor.numel() * tensor.element_size()
        if filled >= size:
            yield bucket
            bucket, filled = {}, 0
    if bucket:
        yield bucket


def _announced_version(raw: bytes | None) -> int | None:
    """The version in an announcement the learner writes; None for none or anything else."""
    if raw is None:
        return None
    try:
        version = json.loads(raw)["version"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 10**7:
        return None
    return version


def unshared(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): copy the repeats."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out
