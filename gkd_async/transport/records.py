"""The records that travel between the stages, and their wire format.

A record is one prompt's group of n samples (GRPO needs the whole group in one batch). On the wire it is
a msgpack map with a schema version; arrays are raw little-endian bytes with their dtype and shape.
Redis is a network input, so decoding trusts nothing: every field, dtype, shape and length is checked
(wire.py) and any fault is a `RecordError`. Nothing read from a stream is ever unpickled or evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from gkd_async.errors import RecordError
from gkd_async.transport.wire import (
    _BFLOAT16,
    _FLOAT32,
    _HIDDEN_DTYPES,
    _INT32,
    _LOGPROB_DTYPES,
    SCHEMA_VERSION,
    FieldValue,
    _all_finite,
    _all_logprobs,
    _array,
    _faults_as_record_errors,
    _pack,
    _read_array,
    _read_count,
    _read_extra,
    _read_str,
    _read_timing,
    _unpack,
)

DEFAULT_MAX_RECORD_BYTES = 256 * 1024 * 1024


@dataclass
class PromptRecord:
    """One prompt admitted for training step `step`; its samples must come from a policy of version
    `min_version` or newer (the staleness bound)."""

    run_id: str
    group_id: str
    step: int
    min_version: int
    prompt_ids: np.ndarray
    extra: dict[str, FieldValue] = field(default_factory=dict)


@dataclass
class RolloutRecord:
    """n sampled responses to one prompt, as the rollout worker produced them.

    Responses are stored concatenated; `response_lengths[i]` tokens belong to sample i.
    `behaviour_logprobs[t]` is the log-prob the generating policy gave to the sampled token t;
    `student_topk_ids[t]` (rollout.student_topk) the ids of the generating policy's top-k at that position.
    """

    run_id: str
    group_id: str
    sample_ids: list[str]
    step: int
    policy_version: int
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    response_lengths: np.ndarray
    behaviour_logprobs: np.ndarray
    rewards: np.ndarray | None = None
    extra: dict[str, FieldValue] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    student_topk_ids: np.ndarray | None = None  # int32 [R, k_s]

    @property
    def n(self) -> int:
        return len(self.sample_ids)

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_ids.shape[0])

    def response_offsets(self) -> np.ndarray:
        """Start offset of each sample in the concatenated responses, plus the total at the end."""
        return np.concatenate([[0], np.cumsum(self.response_lengths, dtype=np.int64)])

    def response(self, i: int) -> np.ndarray:
        offsets = self.response_offsets()
        return self.response_ids[offsets[i] : offsets[i + 1]]


@dataclass
class ScoredRecord:
    """A rollout group plus the teacher's top-k log-probs for every response token.

    Row t of `topk_ids` / `topk_logprobs` is the teacher's distribution for response token t given the
    prompt and the response before it, at `temperature`; k may be 0 (`gkd.teacher_topk=0`). Entry t of
    `token_logprobs` is the teacher's log-prob of response token t itself, at `temperature` (what
    sampled-token distillation needs); optional on the wire, so records without it still decode.
    `teacher_hidden` (gkd.teacher_signal=hidden) row t is the teacher's last hidden state (after its final norm)
    at the position that predicts response token t: float32, or uint16 holding bfloat16 bit patterns.
    """

    rollout: RolloutRecord
    teacher_id: str
    temperature: float
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    timing: dict[str, float] = field(default_factory=dict)
    token_logprobs: np.ndarray | None = None
    teacher_hidden: np.ndarray | None = None  # [R, H]

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])


def encode_prompt_record(record: PromptRecord) -> bytes:
    return _pack(
        {
            "schema": SCHEMA_VERSION,
            "kind": "prompt",
            "run_id": record.run_id,
            "group_id": record.group_id,
            "step": int(record.step),
            "min_version": int(record.min_version),
            "prompt_ids": _array(record.prompt_ids, _INT32),
            "extra": dict(record.extra),
        }
    )


def decode_prompt_record(data: bytes, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> PromptRecord:
    with _faults_as_record_errors("prompt"):
        return _prompt_from(_unpack(data, "prompt", _PROMPT_KEYS, max_bytes))


def _prompt_from(fields: dict[str, Any]) -> PromptRecord:
    prompt_ids = _read_array(fields, "prompt_ids", (_INT32,), ndim=1)
    if prompt_ids.shape[0] < 1 or prompt_ids.min() < 0:
        raise RecordError("prompt_ids must be a non-empty array of non-negative token ids")
    return PromptRecord(
        run_id=_read_str(fields, "run_id"),
        group_id=_read_str(fields, "group_id"),
        step=_read_count(fields, "step"),
        min_version=_read_count(fields, "min_version"),
        prompt_ids=prompt_ids,
        extra=_read_extra(fields),
    )


def encode_rollout_record(record: RolloutRecord) -> bytes:
    return _pack({"schema": SCHEMA_VERSION, "kind": "rollout", **_rollout_fields(record)})


def encode_scored_record(record: ScoredRecord) -> bytes:
    logprob_dtype = np.dtype(record.topk_logprobs.dtype).newbyteorder("<").str
    if logprob_dtype not in _LOGPROB_DTYPES:
        logprob_dtype = _FLOAT32
    return _pack(
        {
            "schema": SCHEMA_VERSION,
            "kind": "scored",
            **_rollout_fields(record.rollout),
            "teacher_id": record.teacher_id,
            "temperature": float(record.temperature),
            "topk_ids": _array(record.topk_ids, _INT32),
            "topk_logprobs": _array(record.topk_logprobs, logprob_dtype),
            "teacher_timing": {k: float(v) for k, v in record.timing.items()},
            **({} if record.token_logprobs is None else {"token_logprobs": _array(record.token_logprobs, _FLOAT32)}),
            **({} if record.teacher_hidden is None else {"teacher_hidden": _hidden_array(record.teacher_hidden)}),
        }
    )


def decode_rollout_record(data: bytes, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> RolloutRecord:
    with _faults_as_record_errors("rollout"):
        return _rollout_from(_unpack(data, "rollout", _ROLLOUT_KEYS, max_bytes, optional=_ROLLOUT_OPTIONAL))


def decode_scored_record(data: bytes, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> ScoredRecord:
    with _faults_as_record_errors("scored"):
        return _scored_from(_unpack(data, "scored", _SCORED_KEYS, max_bytes, optional=_SCORED_OPTIONAL))


def _scored_from(fields: dict[str, Any]) -> ScoredRecord:
    rollout = _rollout_from(fields)
    rows = rollout.num_response_tokens
    topk_ids = _read_array(fields, "topk_ids", (_INT32,), ndim=2)
    topk_logprobs = _read_array(fields, "topk_logprobs", _LOGPROB_DTYPES, ndim=2)
    if topk_ids.shape[0] != rows:
        raise RecordError(f"topk_ids has shape {topk_ids.shape}, expected ({rows}, k)")
    if topk_logprobs.shape != topk_ids.shape:
        raise RecordError(f"topk_logprobs has shape {topk_logprobs.shape}, topk_ids {topk_ids.shape}")
    if topk_ids.size and topk_ids.min() < 0:
        raise RecordError("topk_ids holds a negative token id")
    if not _all_logprobs(topk_logprobs):
        raise RecordError("topk_logprobs holds NaN or positive values; log-probs must be <= 0")
    token_logprobs = None
    if "token_logprobs" in fields:
        token_logprobs = _read_array(fields, "token_logprobs", (_FLOAT32,), ndim=1)
        if token_logprobs.shape != (rows,):
            raise RecordError(f"token_logprobs has shape {token_logprobs.shape}, expected ({rows},)")
        if not _all_logprobs(token_logprobs):
            raise RecordError("token_logprobs holds NaN or positive values; log-probs must be <= 0")
    elif topk_ids.shape[1] == 0:
        raise RecordError("a scored record with k = 0 must carry token_logprobs")
    hidden = None
    if "teacher_hidden" in fields:
        hidden = _read_array(fields, "teacher_hidden", _HIDDEN_DTYPES, ndim=2)
        if hidden.shape[0] != rows or hidden.shape[1] < 1:
            raise RecordError(f"teacher_hidden has shape {hidden.shape}, expected ({rows}, hidden size)")
        if not _all_finite(hidden):
            raise RecordError("teacher_hidden holds NaN or infinite values")
    temperature = fields["temperature"]
    if not isinstance(temperature, float) or not (temperature > 0 and math.isfinite(temperature)):
        raise RecordError(f"temperature must be a positive float, got {temperature!r}")
    return ScoredRecord(
        token_logprobs=token_logprobs,
        rollout=rollout,
        teacher_id=_read_str(fields, "teacher_id"),
        temperature=temperature,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        timing=_read_timing(fields, "teacher_timing"),
        teacher_hidden=hidden,
    )


def _hidden_array(hidden: np.ndarray) -> dict[str, Any]:
    """float32 as it is; uint16 as the bfloat16 bit patterns it holds."""
    if hidden.dtype == np.uint16:
        return _array(hidden, _BFLOAT16)
    return _array(hidden, _FLOAT32)


_PROMPT_KEYS = frozenset({"schema", "kind", "run_id", "group_id", "step", "min_version", "prompt_ids", "extra"})
_ROLLOUT_KEYS = frozenset(
    {
        "schema",
        "kind",
        "run_id",
        "group_id",
        "sample_ids",
        "step",
        "policy_version",
        "prompt_ids",
        "response_ids",
        "response_lengths",
        "behaviour_logprobs",
        "rewards",
        "extra",
        "timing",
    }
)


_SCORED_KEYS = _ROLLOUT_KEYS | {"teacher_id", "temperature", "topk_ids", "topk_logprobs", "teacher_timing"}
_ROLLOUT_OPTIONAL = frozenset({"student_topk_ids"})
_SCORED_OPTIONAL = _ROLLOUT_OPTIONAL | {"token_logprobs", "teacher_hidden"}


def _rollout_fields(record: RolloutRecord) -> dict[str, Any]:
    return {
        "run_id": record.run_id,
        "group_id": record.group_id,
        "sample_ids": list(record.sample_ids),
        "step": int(record.step),
        "policy_version": int(record.policy_version),
        "prompt_ids": _array(record.prompt_ids, _INT32),
        "response_ids": _array(record.response_ids, _INT32),
        "response_lengths": _array(record.response_lengths, _INT32),
        "behaviour_logprobs": _array(record.behaviour_logprobs, _FLOAT32),
        "rewards": None if record.rewards is None else _array(record.rewards, _FLOAT32),
        "extra": dict(record.extra),
        "timing": {k: float(v) for k, v in record.timing.items()},
        **({} if record.student_topk_ids is None else {"student_topk_ids": _array(record.student_topk_ids, _INT32)}),
    }


def _rollout_from(fields: dict[str, Any]) -> RolloutRecord:
    sample_ids = fields["sample_ids"]
    if not isinstance(sample_ids, list) or not sample_ids or not all(isinstance(s, str) for s in sample_ids):
        raise RecordError("sample_ids must be a non-empty list of strings")
    if len(set(sample_ids)) != len(sample_ids):
        raise RecordError("sample_ids holds duplicates")
    n = len(sample_ids)
    prompt_ids = _read_array(fields, "prompt_ids", (_INT32,), ndim=1)
    response_ids = _read_array(fields, "response_ids", (_INT32,), ndim=1)
    lengths = _read_array(fields, "response_lengths", (_INT32,), ndim=1)
    behaviour = _read_array(fields, "behaviour_logprobs", (_FLOAT32,), ndim=1)
    if lengths.shape != (n,):
        raise RecordError(f"response_lengths has shape {lengths.shape}, expected ({n},) for {n} samples")
    if (lengths < 0).any() or int(lengths.sum(dtype=np.int64)) != response_ids.shape[0]:
        raise RecordError(f"response_lengths {lengths.tolist()} do not add up to {response_ids.shape[0]} tokens")
    if behaviour.shape != response_ids.shape:
        raise RecordError(f"behaviour_logprobs has shape {behaviour.shape}, response_ids {response_ids.shape}")
    if not (np.isfinite(behaviour).all() and _all_logprobs(behaviour)):
        raise RecordError(
            "behaviour_logprobs holds NaN, infinite or positive values; log-probs must be finite and <= 0"
        )
    if prompt_ids.shape[0] < 1:
        raise RecordError("prompt_ids is empty")
    if min(prompt_ids.min(), response_ids.min(initial=0)) < 0:
        raise RecordError("token ids must be non-negative")
    student_topk = None
    if "student_topk_ids" in fields:
        student_topk = _read_array(fields, "student_topk_ids", (_INT32,), ndim=2)
        if student_topk.shape[0] != response_ids.shape[0] or student_topk.shape[1] < 1:
            raise RecordError(f"student_topk_ids has shape {student_topk.shape}, expected ({response_ids.shape[0]}, k)")
        if student_topk.size and student_topk.min() < 0:
            raise RecordError("student_topk_ids holds a negative token id")
    rewards = None
    if fields["rewards"] is not None:
        rewards = _read_array(fields, "rewards", (_FLOAT32,), ndim=1)
        if rewards.shape != (n,):
            raise RecordError(f"rewards has shape {rewards.shape}, expected ({n},)")
        if not np.isfinite(rewards).all():
            raise RecordError(f"rewards must be finite, got {rewards.tolist()}")
    return RolloutRecord(
        run_id=_read_str(fields, "run_id"),
        group_id=_read_str(fields, "group_id"),
        sample_ids=sample_ids,
        step=_read_count(fields, "step"),
        policy_version=_read_count(fields, "policy_version"),
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        response_lengths=lengths,
        behaviour_logprobs=behaviour,
        rewards=rewards,
        extra=_read_extra(fields),
        timing=_read_timing(fields, "timing"),
        student_topk_ids=student_topk,
    )


def peek_group_id(data: bytes, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> str | None:
    """The group id a payload claims, without validating the rest; None when it names none.

    Dead letters carry it so that the learner can settle a group that failed in an earlier stage.
    """
    if not isinstance(data, bytes | bytearray) or not data or len(data) > max_bytes:
        return None
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:
        return None
    group_id = fields.get("group_id") if isinstance(fields, dict) else None
    return group_id if isinstance(group_id, str) and 0 < len(group_id) <= 256 else None
