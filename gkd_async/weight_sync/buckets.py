"""What the transports share: weights cut into buckets of about pipeline.weight_bucket_mb, tied aliases left
out, and the version announced in Redis read back strictly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping

import torch


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
