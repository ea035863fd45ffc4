"""Versioned student weights: one directory per version in the run directory, the newest announced in Redis.

Each version is a directory holding `model.safetensors` with HF parameter names (the layout of a
`save_pretrained` directory). Redis announces only the version number: a reader takes the directory of
that version inside its own run's weights directory, never a path read from Redis, and reads it with
safetensors, which holds nothing but tensors, so loading a file can never run code.
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

from gkd_async.redis_client import raises_unavailable

WEIGHTS_FILE = "model.safetensors"


class WeightStore:
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
        save_file(_unshared(state_dict), str(tmp / WEIGHTS_FILE), metadata={"version": str(version)})
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
        raw = self.client.get(self.key)
        if raw is None:
            return None
        try:
            version = json.loads(raw)["version"]
        except (ValueError, TypeError, KeyError):
            return None
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 10**7:
            return None
        return version, self.path_of(version)

    @staticmethod
    def load(path: Path) -> dict[str, torch.Tensor]:
        """The state dict in a version directory."""
        return load_file(str(Path(path) / WEIGHTS_FILE))


def _unshared(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): copy the repeats."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out
