"""The `in_process` transport (the default of `pipeline.launcher=threads`): the learner and the rollout workers are
threads of one process, so a version is handed over as one copy of the tensors in memory: no serialising, no Redis
value, no file. At a 0.5B student that is 2 GB a step neither written nor read (over Redis: about 13 s a sync
step here).

The copy is needed: on one rank the learner's gather (`DTensor.full_tensor`) gives views of its parameters, which
its next optimiser step changes (tests/weight_sync/test_weights.py saw a published version move with them). The
readers treat the tensors as read-only (an HF rollout engine adopts them as its parameters), so every rollout
worker of the process shares that one copy of the newest version. Redis still announces the version number, for
`gkd-async inspect` and the run's other tools.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping

import redis
import torch

from gkd_async.errors import GKDError
from gkd_async.transport.redis_client import raises_unavailable
from gkd_async.weight_sync.buckets import _announced_version

_LOCK = threading.Lock()
_NEWEST: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}  # the run's announcement key -> its newest version


class InProcessWeights:
    """The `in_process` transport: the newest version's tensors in this process, under the run's key."""

    needs_shared_directory = False

    def __init__(self, client: redis.Redis, key: str, url: str = "redis") -> None:
        self.client, self.key, self.url = client, key, url

    @raises_unavailable
    def publish(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """A copy of `tensors` becomes the newest version (the one before it is let go) and is announced; returns
        its bytes. A tied pair (two names of one tensor) stays one tensor in the copy."""
        copies: dict[tuple, torch.Tensor] = {}  # storage -> its copy, so that tied names keep sharing one
        state = {}
        for name, tensor in tensors.items() if isinstance(tensors, Mapping) else tensors:
            ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if ptr not in copies:
                copies[ptr] = tensor.detach().clone()
            state[name] = copies[ptr]
        size = sum(t.numel() * t.element_size() for t in copies.values())
        with _LOCK:
            _NEWEST[self.key] = (version, state)
        self.client.set(self.key, json.dumps({"version": version, "transport": "in_process", "bytes": size}))
        return size

    @raises_unavailable
    def latest(self) -> tuple[int, int] | None:
        with _LOCK:
            held = _NEWEST.get(self.key)
        if held is not None:
            return held[0], held[0]
        if _announced_version(self.client.get(self.key)) is not None:
            raise GKDError(
                "the learner publishes its weights with pipeline.weight_transport=in_process, in the memory of the "
                "process of `gkd-async run` (pipeline.launcher=threads); a stage in another process cannot read "
                "them: run the whole pipeline with pipeline.launcher=threads, or set pipeline.weight_transport=redis "
                "on every stage"
            )
        return None

    def read(self, handle: int) -> dict[str, torch.Tensor] | None:
        """The tensors of version `handle`; None when a newer version replaced it since (ask `latest()` again)."""
        with _LOCK:
            held = _NEWEST.get(self.key)
        return dict(held[1]) if held is not None and held[0] == handle else None

    def close(self) -> None:
        """Nothing of this end's own: the newest version stays for the readers until `release`."""

    @classmethod
    def release(cls, key: str) -> None:
        """Let the run's newest version go (the launcher, when its stages have ended)."""
        with _LOCK:
            _NEWEST.pop(key, None)
