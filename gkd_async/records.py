"""The records that travel between the stages, and their wire format.

A record is one prompt's group of n samples (GRPO needs the whole group in one batch). On the wire it is
a msgpack map with a schema version; arrays are raw little-endian bytes with their dtype and shape.
Redis is a network input, so decoding trusts nothing: every field, dtype, shape and length is checked
and any fault is a `RecordError`. Nothing read from a stream is ever unpickled or evaluated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from gkd_async.errors import RecordError
from gkd_async.plan import RunPlan

if TYPE_CHECKING:
    from gkd_async.config import GKDConfig

SCHEMA_VERSION = 1
DEFAULT_MAX_RECORD_BYTES = 256 * 1024 * 1024

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
_MAX_DIMENSION = 2**31 - 1  # token positions and ids are int32 everywhere downstream


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
    `behaviour_logprobs[t]` is the log-prob the generating policy gave to the sampled token t.
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
    """

    rollout: RolloutRecord
    teacher_id: str
    temperature: float
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    timing: dict[str, float] = field(default_factory=dict)
    token_logprobs: np.ndarray | None = None

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
        }
    )


def decode_rollout_record(data: bytes, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> RolloutRecord:
    with _faults_as_record_errors("rollout"):
        return _rollout_from(_unpack(data, "rollout", _ROLLOUT_KEYS, max_bytes))


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
    )


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
_SCORED_OPTIONAL = frozenset({"token_logprobs"})


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
    }


def _array(values: np.ndarray, dtype: str) -> dict[str, Any]:
    arr = np.ascontiguousarray(values, dtype=np.dtype(dtype))
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
    )


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
    itemsize = np.dtype(dtype).itemsize
    if math.prod(shape) * itemsize != len(data):
        raise RecordError(
            f"{name} holds {len(data)} bytes, shape {shape} of {dtype} needs {math.prod(shape) * itemsize}"
        )
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)


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


@dataclass(frozen=True)
class RecordLimits:
    """What a record must fit: the token ids the models have and the lengths the run allows.

    The codec checks a record's shape; these limits check it against this run, so that a well-formed
    record with an out-of-range id or an oversized response fails alone instead of in a model.
    """

    vocab_size: int
    max_prompt_length: int
    max_new_tokens: int
    samples_per_group: int | None = None  # None: not checked
    total_steps: int | None = None  # None: not checked

    @classmethod
    def for_run(cls, config: GKDConfig, vocab_size: int) -> RecordLimits:
        """The limits of the run `config` describes, the one place they are derived from it: the lengths, the
        samples in each group (rollout.n; one per row when the rows are a scored data set) and the steps."""
        return cls(
            vocab_size,
            config.data.max_prompt_length,
            config.rollout.max_new_tokens,
            config.samples_per_group,
            config.trainer.total_steps,
        )


FIELDS_MARGIN = 16 * 2**20  # room for a row's own fields (reference answers, test cases) and the envelope


def largest_record_bytes(config: GKDConfig) -> int:
    """The size cap of a stream entry in this run (unless pipeline.max_record_mb sets one): twice what its
    largest scored record can take (every sample of a group at the longest prompt and response, each token
    with its teacher top-k ids and log-probs, its id, behaviour and teacher log-probs), plus room for the
    row's fields. A hostile entry is refused before it is decoded into that much memory."""
    tokens = config.data.max_prompt_length + config.rollout.max_new_tokens
    samples = config.samples_per_group
    k = RunPlan.of(config).topk
    logprob_bytes = 2 if config.teacher.logprob_dtype == "float16" else 4
    per_token = k * (4 + logprob_bytes) + 3 * 4
    return 2 * samples * tokens * per_token + FIELDS_MARGIN


def check_prompt_within(prompt_ids: np.ndarray, limits: RecordLimits) -> None:
    if prompt_ids.shape[0] > limits.max_prompt_length:
        raise RecordError(
            f"the prompt has {prompt_ids.shape[0]} tokens, more than data.max_prompt_length={limits.max_prompt_length}"
        )
    _check_ids("prompt_ids", prompt_ids, limits.vocab_size)


def check_prompt_record_within(record: PromptRecord, limits: RecordLimits) -> None:
    """A prompt as the learner's admission writes it: within the lengths and vocabulary, its step within the
    run and the weights it waits for no newer than its own step (else a worker would wait for ever)."""
    check_prompt_within(record.prompt_ids, limits)
    if limits.total_steps is not None and record.step >= limits.total_steps:
        raise RecordError(
            f"the prompt is for step {record.step}, past the run's trainer.total_steps={limits.total_steps}"
        )
    if record.min_version > record.step:
        raise RecordError(
            f"the prompt asks for student weights of version {record.min_version} or newer for step {record.step}; "
            "admission never asks for weights newer than the prompt's own step"
        )


def check_rollout_within(record: RolloutRecord, limits: RecordLimits) -> None:
    check_prompt_within(record.prompt_ids, limits)
    samples = len(record.response_lengths)
    if limits.samples_per_group is not None and samples != limits.samples_per_group:
        raise RecordError(
            f"the group has {samples} samples; this run samples {limits.samples_per_group} per prompt (rollout.n)"
        )
    longest = int(record.response_lengths.max(initial=0))
    if longest > limits.max_new_tokens:
        raise RecordError(f"a response has {longest} tokens, more than rollout.max_new_tokens={limits.max_new_tokens}")
    _check_ids("response_ids", record.response_ids, limits.vocab_size)


def check_scored_within(record: ScoredRecord, limits: RecordLimits) -> None:
    check_rollout_within(record.rollout, limits)
    _check_ids("topk_ids", record.topk_ids, limits.vocab_size)


def _check_ids(name: str, ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise RecordError(
            f"{name} holds token id {int(ids.max()) if ids.max() >= vocab_size else int(ids.min())}, outside the "
            f"vocabulary of {vocab_size} tokens"
        )
