"""Versioned student weights: safetensors files in the run directory, the newest announced in Redis.

safetensors holds nothing but tensors, so loading a file can never run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import redis
import torch
from safetensors.torch import load_file, save_file

from gkd_async.redis_client import raises_unavailable


class WeightStore:
    def __init__(self, client: redis.Redis, key: str, directory: Path, url: str = "redis", keep: int = 2) -> None:
        self.client, self.key, self.directory, self.url, self.keep = client, key, Path(directory), url, keep

    @raises_unavailable
    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"v{version:07d}.safetensors"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(_unshared(state_dict), str(tmp), metadata={"version": str(version)})
        tmp.replace(path)
        self.client.set(self.key, json.dumps({"version": version, "path": str(path.resolve())}))
        for old in sorted(self.directory.glob("v*.safetensors"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    @raises_unavailable
    def latest(self) -> tuple[int, Path] | None:
        raw = self.client.get(self.key)
        if raw is None:
            return None
        info = json.loads(raw)
        return int(info["version"]), Path(info["path"])

    @staticmethod
    def load(path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path))


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
