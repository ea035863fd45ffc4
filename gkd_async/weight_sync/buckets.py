"""What the transports share: weights cut into buckets of about pipeline.weight_bucket_mb, tied aliases left
out, and the version announced in Redis read back strictly.
"""

from __future__ import annotations

import json
import re
import warnings
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


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
MAX_HEADER_BYTES = 16 * 2**20


def load_bucket(blob: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors blob as views of `blob`, not copies: `safetensors.torch.load` copies each
    tensor once more, 2 GB a 0.5B student's version, seconds on the rollout's side in every reload. The views are
    read-only (the blob is `bytes`): copy them (as loading into a model does) before writing to them. The header is
    checked as strictly as safetensors does: known dtypes, shapes that match their byte ranges, ranges inside the
    blob, in order and without gaps."""
    if len(blob) < 8:
        raise ValueError("weights bucket: shorter than a safetensors header")
    size = int.from_bytes(blob[:8], "little")
    if size > MAX_HEADER_BYTES or 8 + size > len(blob):
        raise ValueError(f"weights bucket: a header of {size} bytes in a blob of {len(blob)}")
    try:
        header = json.loads(blob[8 : 8 + size])
    except ValueError as exc:
        raise ValueError(f"weights bucket: the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("weights bucket: the header is not a map")
    header.pop("__metadata__", None)
    entries = []
    for name, entry in header.items():
        try:
            dtype, shape, (start, stop) = _DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            if not all(isinstance(x, int) and x >= 0 for x in [*shape, start, stop]):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"weights bucket: tensor {name!r} has no valid dtype, shape and offsets") from None
        numel = 1
        for dim in shape:
            numel *= dim
        if stop - start != numel * dtype.itemsize:
            raise ValueError(f"weights bucket: tensor {name!r} of shape {shape} spans {stop - start} bytes")
        entries.append((start, stop, name, dtype, shape, numel))
    entries.sort()
    end = 0
    for start, stop, name, *_ in entries:
        if start != end:
            raise ValueError(f"weights bucket: tensor {name!r} does not start where the one before it ends")
        end = stop
    if 8 + size + end != len(blob):
        raise ValueError(f"weights bucket: its tensors take {end} bytes of the {len(blob) - 8 - size} after the header")
    out = {}
    with warnings.catch_warnings():  # torch warns that a view of `bytes` is not writable: it is not meant to be
        warnings.simplefilter("ignore", UserWarning)
        for start, _stop, name, dtype, shape, numel in entries:
            if numel == 0:
                out[name] = torch.empty(shape, dtype=dtype)
            else:
                out[name] = torch.frombuffer(blob, dtype=dtype, count=numel, offset=8 + size + start).view(shape)
    return out


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
