"""The `file` transport: one directory per version in the run directory holding `model.safetensors` (a
`save_pretrained` layout); workers on other machines need that directory on a shared file system.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import redis
import torch
from safetensors.torch import load_file, save_file

from gkd_async.transport.redis_client import raises_unavailable
from gkd_async.weight_sync.buckets import _announced_version, unshared

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
