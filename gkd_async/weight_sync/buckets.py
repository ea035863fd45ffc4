"""What the transports share: weights cut into buckets of about pipeline.weight_bucket_mb, tied aliases left
out, and the version announced in Redis read back strictly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping

import torch

# `<name>#rows<start>:<stop>/<total>`: no parameter name has a "#" (they are dotted identifiers)
PIECE_MARK = "#rows"
_PIECE = re.compile(r"^(?P<name>[^#]+)#rows(?P<start>\d+):(?P<stop>\d+)/(?P<total>\d+)$")


def iter_buckets(
    pairs: Iterable[tuple[str, torch.Tensor]], size: int, split: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """The tensors of `pairs` in buckets of at most `size` bytes (a bucket is cut before the tensor that would
    overflow it). A tensor larger than `size` makes a bucket of its own, or, with `split`, is cut along its first
    dimension into pieces of at most `size` bytes, each named `<name>#rows<start>:<stop>/<total>` (`join_pieces`
    puts them back): a 0.5B student's embedding is 544 MB in float32, past the 512 MB a Redis value may hold."""
    bucket: dict[str, torch.Tensor] = {}
    filled = 0
    for name, tensor in pairs:
        tensor = tensor.detach().contiguous()
        for piece_name, piece in _pieces(name, tensor, size) if split else [(name, tensor)]:
            nbytes = piece.numel() * piece.element_size()
            if bucket and filled + nbytes > size:
                yield bucket
                bucket, filled = {}, 0
            bucket[piece_name] = piece
            filled += nbytes
    if bucket:
        yield bucket


def _pieces(name: str, tensor: torch.Tensor, size: int) -> list[tuple[str, torch.Tensor]]:
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes <= size or tensor.dim() == 0 or tensor.shape[0] < 2:
        return [(name, tensor)]
    total = tensor.shape[0]
    rows = max(1, size // max(1, nbytes // total))  # rows of one piece
    return [
        (f"{name}{PIECE_MARK}{start}:{min(start + rows, total)}/{total}", tensor[start : start + rows])
        for start in range(0, total, rows)
    ]


def join_pieces(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the pieces `iter_buckets(..., split=True)` cut put back together. Raises ValueError when a
    tensor's pieces do not cover its rows exactly once, in order (a bucket lost or mixed from two versions)."""
    if not any(PIECE_MARK in name for name in state):
        return state
    pieces: dict[str, list[tuple[int, int, int, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _PIECE.match(key)
        if match is None:
            out[key] = tensor
            continue
        start, stop, total = (int(match[part]) for part in ("start", "stop", "total"))
        pieces.setdefault(match["name"], []).append((start, stop, total, tensor))
    for name, parts in pieces.items():
        parts.sort(key=lambda part: part[0])
        covered = 0
        for start, stop, total, tensor in parts:
            if start != covered or stop <= start or tensor.shape[0] != stop - start or total != parts[0][2]:
                raise ValueError(f"weights: the pieces of {name!r} do not cover its rows once each")
            covered = stop
        if covered != parts[0][2] or name in out:
            raise ValueError(f"weights: the pieces of {name!r} cover {covered} of its {parts[0][2]} rows")
        out[name] = torch.cat([part[3] for part in parts])
    return out


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
