"""The wire format's pieces, strict: a msgpack envelope within a size cap, arrays as raw little-endian bytes with
their dtype and shape, and readers of each field kind that turn any fault into a `RecordError`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np

from gkd_async.errors import RecordError

SCHEMA_VERSION = 1
# A data row's field as records carry it to the reward function: a scalar, or lists and string-keyed maps of
# them (verl's `reward_model: {ground_truth: ...}`, `extra_info: {...}`), nested at most MAX_FIELD_DEPTH deep.
FieldValue = Any
MAX_FIELD_DEPTH = 8


def is_field_value(value: Any, depth: int = 0) -> bool:
    """Whether `value` is a FieldValue: what a record's `extra` may hold."""
    if value is None or isinstance(value, str | int | float | bool):
        return True
    if depth >= MAX_FIELD_DEPTH:
        return False
    if isinstance(value, list | tuple):
        return all(is_field_value(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_field_value(v, depth + 1) for k, v in value.items())
    return False


_INT32 = "<i4"
_FLOAT32 = "<f4"
_FLOAT16 = "<f2"
_LOGPROB_DTYPES = (_FLOAT32, _FLOAT16)
_BFLOAT16 = "bf16"  # numpy has no bfloat16: the raw 16-bit patterns travel as uint16, under this tag
_HIDDEN_DTYPES = (_FLOAT32, _BFLOAT16)
_STORED_AS = {_BFLOAT16: "<u2"}
_MAX_DIMENSION = 2**31 - 1  # token positions and ids are int32 everywhere downstream


def _array(values: np.ndarray, dtype: str) -> dict[str, Any]:
    arr = np.ascontiguousarray(values, dtype=np.dtype(_STORED_AS.get(dtype, dtype)))
    return {"dtype": dtype, "shape": list(arr.shape), "data": arr.data}  # packed without an extra copy


def _pack(fields: dict[str, Any]) -> bytes:
    try:
        return msgpack.packb(fields, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise RecordError(
            f"cannot encode record: {exc} (extra fields must be str, int, float, bool, None, or lists and maps of them)"
        ) from exc


def _unpack(
    data: bytes, kind: str, keys: frozenset[str], max_bytes: int, optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RecordError(f"a record must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise RecordError(
            f"record of {len(data)} bytes exceeds the limit of {max_bytes} (derived from the run's lengths, "
            "rollout.n and gkd.teacher_topk, or pipeline.max_record_mb)"
        )
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types on corrupt input; all mean "not a record"
        raise RecordError(f"not a msgpack record: {type(exc).__name__}: {exc}") from None
    if not isinstance(fields, dict):
        raise RecordError(f"a record must be a msgpack map, got {type(fields).__name__}")
    if fields.get("schema") != SCHEMA_VERSION:
        raise RecordError(f"schema version {fields.get('schema')!r} is not supported (expected {SCHEMA_VERSION})")
    if fields.get("kind") != kind:
        raise RecordError(f"expected a {kind} record, got kind {fields.get('kind')!r}")
    missing, unknown = keys - fields.keys(), fields.keys() - keys - optional
    if missing or unknown:
        raise RecordError(f"{kind} record fields: missing {sorted(missing)}, unknown {sorted(map(str, unknown))}")
    return fields


def _read_array(fields: dict[str, Any], name: str, dtypes: tuple[str, ...], ndim: int) -> np.ndarray:
    spec = fields[name]
    if not isinstance(spec, dict) or spec.keys() != {"dtype", "shape", "data"}:
        raise RecordError(f"{name} must be a map with dtype, shape and data")
    dtype, shape, data = spec["dtype"], spec["shape"], spec["data"]
    if dtype not in dtypes:
        raise RecordError(f"{name} has dtype {dtype!r}, expected one of {list(dtypes)}")
    if not isinstance(shape, list) or len(shape) != ndim or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RecordError(f"{name} has shape {shape!r}, expected {ndim} non-negative dimensions")
    if any(d > _MAX_DIMENSION for d in shape):
        raise RecordError(f"{name} has shape {shape!r}; no dimension may exceed {_MAX_DIMENSION}")
    if not isinstance(data, bytes):
        raise RecordError(f"{name} data must be bytes")
    stored = np.dtype(_STORED_AS.get(dtype, dtype))
    itemsize = stored.itemsize
    if math.prod(shape) * itemsize != len(data):
        raise RecordError(
            f"{name} holds {len(data)} bytes, shape {shape} of {dtype} needs {math.prod(shape) * itemsize}"
        )
    return np.frombuffer(data, dtype=stored).reshape(shape)


def _all_logprobs(values: np.ndarray, tolerance: float = 1e-3) -> bool:
    """True when no value is NaN or above `tolerance`; -inf is allowed. One pass over the data."""
    if values.size == 0:
        return True
    if values.dtype == np.float16:
        # numpy's float16 math is slow; compare bit patterns instead. As int16, every value above the
        # tolerance (or a NaN with the sign bit clear) sorts above the tolerance's pattern; as uint16, a NaN
        # with the sign bit set sorts above -inf (0xFC00).
        bits = values.view(np.int16)
        limit = np.array(tolerance, dtype=np.float16).view(np.int16)
        return bool(bits.max() <= limit) and bool(values.view(np.uint16).max() <= 0xFC00)
    return bool(values.max() <= tolerance)  # a NaN makes max NaN and the comparison False


def _all_finite(values: np.ndarray) -> bool:
    """No NaN or infinity; a uint16 array holds bfloat16 bit patterns (all exponent bits set: not finite)."""
    if values.dtype == np.uint16:
        return not bool(((values & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(values).all())


def _read_extra(fields: dict[str, Any]) -> dict[str, FieldValue]:
    extra = fields["extra"]
    if not isinstance(extra, dict) or not is_field_value(extra, depth=-1):
        raise RecordError(
            f"extra must map strings to str, int, float, bool, None, or lists and maps of them at most "
            f"{MAX_FIELD_DEPTH} deep"
        )
    return extra


def _read_str(fields: dict[str, Any], name: str) -> str:
    value = fields[name]
    if not isinstance(value, str):
        raise RecordError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _read_count(fields: dict[str, Any], name: str) -> int:
    value = fields[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RecordError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _read_timing(fields: dict[str, Any], name: str) -> dict[str, float]:
    value = fields[name]
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, float) and math.isfinite(v) for k, v in value.items()
    ):
        raise RecordError(f"{name} must map strings to finite floats")
    return value


@contextlib.contextmanager
def _faults_as_record_errors(kind: str) -> Iterator[None]:
    """Whatever a crafted record makes the checks above trip over is still only a bad record."""
    try:
        yield
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(f"malformed {kind} record: {type(exc).__name__}: {exc}") from None
