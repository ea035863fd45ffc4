"""The one interface every weight transport offers, as both of its ends see it: the learner publishes a version,
a rollout worker asks for the newest and reads it. `factory.open_weight_transport` picks the run's.

Five transports, chosen by `pipeline.weight_transport`, one file each: `redis` (redis_buckets.py, the default
under Ray), `in_process` (in_process.py, the default of the threads launcher), `file` (files.py), `ray`
(ray_objects.py) and `collective` (collective.py). Whichever it is, Redis announces only
the version number: a reader never follows a path or key read from Redis, and it reads safetensors (or raw
tensors over a process group), which hold nothing but tensors, so loading weights can never run code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

Tensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


@runtime_checkable
class WeightTransport(Protocol):
    needs_shared_directory: bool  # readers must see the learner's directory (a shared file system)

    def publish(self, tensors: Tensors, version: int) -> Any:
        """Make `tensors` the policy `version` and announce it (learner rank 0)."""

    def latest(self) -> tuple[int, Any] | None:
        """The newest announced version and a handle to read it by; None before the first publish."""

    def read(self, handle: Any) -> dict[str, torch.Tensor] | None:
        """The weights `latest()` announced; None when that version is gone since (ask `latest()` again)."""

    def close(self) -> None:
        """Release what this end holds (connections, threads); the published versions stay for readers."""
