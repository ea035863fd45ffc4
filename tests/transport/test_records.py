import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gkd_async.config.loading import load_config
from gkd_async.errors import RecordError
from gkd_async.transport.limits import (
    RecordLimits,
    check_prompt_record_within,
    check_rollout_within,
    check_scored_within,
    largest_record_bytes,
)
from gkd_async.transport.records import (
    PromptRecord,
    RolloutRecord,
    ScoredRecord,
    decode_rollout_record,
    decode_scored_record,
    encode_rollout_record,
    encode_scored_record,
    peek_group_id,
)


def make_rollout(rng, n=3, lengths=None, prompt_len=5, rewards=True, extra=None):
    lengths = np.asarray(lengths if lengths is not None else rng.integers(0, 7, size=n), dtype=np.int32)
    total = int(lengths.sum())
    return RolloutRecord(
        run_id="run",
        group_id="g0",
        sample_ids=[f"g0/{i}" for i in range(len(lengths))],
        step=3,
        policy_version=2,
        prompt_ids=rng.integers(0, 1000, size=prompt_len).astype(np.int32),
        response_ids=rng.integers(0, 1000, size=total).astype(np.int32),
        response_lengths=lengths,
        behaviour_logprobs=-rng.random(total).astype(np.float32),
        rewards=rng.random(len(lengths)).astype(np.float32) if rewards else None,
        extra=extra if extra is not None else {"answer": "42", "level": 2, "ok": True, "w": 0.5, "none": None},
        timing={"generate_s": 0.25},
    )


def make_scored(rng, rollout, k=4, dtype=np.float32):
    rows = rollout.num_response_tokens
    logits = rng.normal(size=(rows, k))
    logprobs = (logits - np.log(np.exp(logits).sum(-1, keepdims=True)) - 0.1).astype(dtype)
    return ScoredRecord(
        rollout=rollout,
        teacher_id="teacher-0",
        temperature=1.0,
        topk_ids=rng.integers(0, 1000, size=(rows, k)).astype(np.int32),
        topk_logprobs=logprobs,
        timing={"score_s": 0.5},
    )


def assert_rollouts_equal(a, b):
    for name in ("run_id", "group_id", "sample_ids", "step", "policy_version", "extra", "timing"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("prompt_ids", "response_ids", "response_lengths", "behaviour_logprobs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    if a.rewards is None:
        assert b.rewards is None
    else:
        np.testing.assert_array_equal(a.rewards, b.rewards)


record_shapes = st.fixed_dictionaries(
    {
        "lengths": st.lists(st.integers(0, 40), min_size=1, max_size=6),
        "prompt_len": st.integers(1, 30),
        "k": st.integers(1, 64),
        "dtype": st.sampled_from([np.float32, np.float16]),
        "rewards": st.booleans(),
        "seed": st.integers(0, 2**32 - 1),
        "extra": st.dictionaries(
            st.text(max_size=8),
            st.one_of(st.none(), st.booleans(), st.integers(-(2**62), 2**62), st.floats(allow_nan=False), st.text()),
            max_size=4,
        ),
    }
)


@settings(max_examples=60, deadline=None)
@given(record_shapes)
def test_round_trip(shape):
    rng = np.random.default_rng(shape["seed"])
    rollout = make_rollout(
        rng, lengths=shape["lengths"], prompt_len=shape["prompt_len"], rewards=shape["rewards"], extra=shape["extra"]
    )
    decoded = decode_rollout_record(encode_rollout_record(rollout))
    assert_rollouts_equal(rollout, decoded)
    for i in range(rollout.n):
        np.testing.assert_array_equal(decoded.response(i), rollout.response(i))

    scored = make_scored(rng, rollout, k=shape["k"], dtype=shape["dtype"])
    back = decode_scored_record(encode_scored_record(scored))
    assert_rollouts_equal(rollout, back.rollout)
    assert back.topk_logprobs.dtype == np.dtype(shape["dtype"])
    np.testing.assert_array_equal(back.topk_ids, scored.topk_ids)
    np.testing.assert_array_equal(back.topk_logprobs, scored.topk_logprobs)
    assert (back.teacher_id, back.temperature, back.timing, back.k) == ("teacher-0", 1.0, {"score_s": 0.5}, shape["k"])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_record_error(data):
    for decode in (decode_rollout_record, decode_scored_record):
        with pytest.raises(RecordError):
            decode(data)


def test_every_truncation_raises_record_error():
    rng = np.random.default_rng(0)
    data = encode_scored_record(make_scored(rng, make_rollout(rng, lengths=[3, 2])))
    for cut in range(len(data)):
        with pytest.raises(RecordError):
            decode_scored_record(data[:cut])


def mutate(data: bytes, **changes):
    fields = msgpack.unpackb(data, raw=False)
    for key, value in changes.items():
        if value is KeyError:
            del fields[key]
        else:
            fields[key] = value
    return msgpack.packb(fields, use_bin_type=True)


@pytest.fixture
def scored_bytes():
    rng = np.random.default_rng(1)
    return encode_scored_record(make_scored(rng, make_rollout(rng, lengths=[3, 2])))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"schema": 2}, "schema version 2"),
        ({"kind": "rollout"}, "expected a scored record"),
        ({"teacher_id": KeyError}, "missing ['teacher_id']"),
        ({"surprise": 1}, "unknown ['surprise']"),
        (
            {"response_lengths": {"dtype": "<i4", "shape": [2], "data": np.array([3, 3], "<i4").tobytes()}},
            "do not add up",
        ),
        ({"topk_ids": {"dtype": "<f4", "shape": [5, 4], "data": bytes(80)}}, "dtype '<f4'"),
        ({"topk_ids": {"dtype": "<i4", "shape": [5, 4], "data": bytes(79)}}, "holds 79 bytes"),
        ({"topk_logprobs": {"dtype": "<f4", "shape": [4, 4], "data": bytes(64)}}, "topk_logprobs has shape"),
        ({"topk_logprobs": {"dtype": "<f4", "shape": [5, 4], "data": np.full((5, 4), np.nan, "<f4").tobytes()}}, "NaN"),
        ({"temperature": 0.0}, "temperature"),
        ({"step": -1}, "step must be"),
        ({"sample_ids": ["a", "a"]}, "duplicates"),
        ({"extra": {"x": [1, {"y": b"bytes"}]}}, "extra must map"),
        ({"extra": {"x": [[[[[[[[[[1]]]]]]]]]]}}, "at most 8 deep"),
    ],
)
def test_invalid_fields_are_named(scored_bytes, changes, message):
    with pytest.raises(RecordError) as err:
        decode_scored_record(mutate(scored_bytes, **changes))
    assert message in str(err.value)


def test_oversize_record_is_rejected(scored_bytes):
    with pytest.raises(RecordError, match="exceeds the limit"):
        decode_scored_record(scored_bytes, max_bytes=len(scored_bytes) - 1)
    decode_scored_record(scored_bytes, max_bytes=len(scored_bytes))


def test_unencodable_extra_is_a_record_error():
    record = make_rollout(np.random.default_rng(2), extra={"obj": object()})
    with pytest.raises(RecordError, match="extra fields"):
        encode_rollout_record(record)


def test_wire_format_is_little_endian_raw_bytes():
    rng = np.random.default_rng(3)
    record = make_rollout(rng, lengths=[2])
    fields = msgpack.unpackb(encode_rollout_record(record), raw=False)
    assert fields["schema"] == 1 and fields["kind"] == "rollout"
    assert fields["response_ids"]["dtype"] == "<i4"
    assert fields["response_ids"]["data"] == record.response_ids.astype("<i4").tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(
    "value, ok",
    [(-np.inf, True), (0.0, True), (-60000.0, True), (0.5, False), (np.inf, False), (np.nan, False), (-np.nan, False)],
)
def test_logprob_values_are_checked_in_both_dtypes(dtype, value, ok):
    rng = np.random.default_rng(4)
    scored = make_scored(rng, make_rollout(rng, lengths=[3]), dtype=dtype)
    scored.topk_logprobs = scored.topk_logprobs.copy()
    scored.topk_logprobs[1, 2] = value
    assert np.signbit(scored.topk_logprobs[1, 2]) == np.signbit(value)
    data = encode_scored_record(scored)
    if ok:
        assert decode_scored_record(data).topk_logprobs[1, 2] == scored.topk_logprobs[1, 2]
    else:
        with pytest.raises(RecordError, match="NaN or positive"):
            decode_scored_record(data)


def test_prompt_record_round_trip_and_validation():
    from gkd_async.transport.records import PromptRecord, decode_prompt_record, encode_prompt_record

    record = PromptRecord(
        "run", "0:5", step=4, min_version=3, prompt_ids=np.arange(1, 6, dtype=np.int32), extra={"answer": "7"}
    )
    back = decode_prompt_record(encode_prompt_record(record))
    assert (back.run_id, back.group_id, back.step, back.min_version, back.extra) == (
        "run",
        "0:5",
        4,
        3,
        {"answer": "7"},
    )
    np.testing.assert_array_equal(back.prompt_ids, record.prompt_ids)
    with pytest.raises(RecordError, match="expected a prompt record"):
        decode_prompt_record(encode_rollout_record(make_rollout(np.random.default_rng(0))))
    with pytest.raises(RecordError, match="non-empty"):
        decode_prompt_record(encode_prompt_record(PromptRecord("r", "g", 0, 0, np.zeros(0, np.int32))))


# ---------------------------------------------------------------- faults a crafted entry can carry
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("behaviour_logprobs", np.array([np.nan, -1, -1], np.float32), "behaviour_logprobs"),
        ("behaviour_logprobs", np.array([-np.inf, -1, -1], np.float32), "behaviour_logprobs"),
        ("rewards", np.array([np.nan], np.float32), "rewards must be finite"),
        ("rewards", np.array([np.inf], np.float32), "rewards must be finite"),
    ],
)
def test_non_finite_numbers_are_refused_at_decoding(field, value, message):
    record = make_rollout(np.random.default_rng(0), n=1, lengths=[3])
    setattr(record, field, value)
    with pytest.raises(RecordError, match=message):
        decode_rollout_record(encode_rollout_record(record))


def test_a_dimension_past_int32_is_a_record_error_not_a_crash():
    rng = np.random.default_rng(0)
    fields = msgpack.unpackb(encode_scored_record(make_scored(rng, make_rollout(rng, lengths=[0, 0, 0]))), raw=False)
    fields["topk_ids"] = {"dtype": "<i4", "shape": [0, 2**63], "data": b""}
    with pytest.raises(RecordError, match="no dimension may exceed"):
        decode_scored_record(msgpack.packb(fields, use_bin_type=True))


def test_limits_catch_what_the_codec_cannot_know():
    rng = np.random.default_rng(0)
    record = make_scored(rng, make_rollout(rng, lengths=[2, 3]))
    limits = RecordLimits(vocab_size=1000, max_prompt_length=5, max_new_tokens=3)
    check_scored_within(record, limits)  # the record fits: ids < 1000, prompt 5, responses <= 3
    topk_ids = record.topk_ids.copy()
    topk_ids[0, 0] = 999
    record.topk_ids = topk_ids
    check_scored_within(record, limits)
    with pytest.raises(RecordError, match="topk_ids holds token id 999, outside the vocabulary of 999"):
        check_scored_within(record, RecordLimits(999, 5, 3))
    with pytest.raises(RecordError, match="rollout.max_new_tokens=2"):
        check_scored_within(record, RecordLimits(1000, 5, 2))
    with pytest.raises(RecordError, match="data.max_prompt_length=4"):
        check_scored_within(record, RecordLimits(1000, 4, 3))
    # a group of another size than the run samples: ten million one-token samples would be scored otherwise
    check_scored_within(record, RecordLimits(1000, 5, 3, samples_per_group=2))
    with pytest.raises(RecordError, match="the group has 2 samples; this run samples 4 per prompt"):
        check_scored_within(record, RecordLimits(1000, 5, 3, samples_per_group=4))


def test_a_prompt_cannot_ask_for_weights_that_never_come():
    """Admission writes min_version = step - max_staleness: a prompt waiting for a newer version, or for a step
    past the run, is refused (and dead-lettered by the worker) instead of held while the worker heartbeats."""
    limits = RecordLimits.for_run(load_config(None, ["trainer.total_steps=10"]), 1000)
    ids = np.array([1, 2, 3], np.int32)
    check_prompt_record_within(PromptRecord("r", "g", 9, 8, ids), limits)
    with pytest.raises(RecordError, match="weights of version 10 or newer for step 9"):
        check_prompt_record_within(PromptRecord("r", "g", 9, 10, ids), limits)
    with pytest.raises(RecordError, match="step 10, past the run's trainer.total_steps=10"):
        check_prompt_record_within(PromptRecord("r", "g", 10, 9, ids), limits)
    assert limits.samples_per_group == 1  # rollout.n unset and no RL: one sample per prompt


def test_peek_group_id_reads_the_claimed_group_or_none():
    rng = np.random.default_rng(0)
    assert peek_group_id(encode_rollout_record(make_rollout(rng))) == "g0"
    assert peek_group_id(b"\x93garbage") is None
    assert peek_group_id(msgpack.packb({"group_id": 7})) is None
    assert peek_group_id(b"") is None


def test_token_logprobs_travel_and_k_may_be_zero_with_them():
    """Sampled-token distillation: the teacher's log-prob of every response token; with it, k = 0 is a
    valid record (nothing but those log-probs on the wire), without it k = 0 is refused."""
    rng = np.random.default_rng(3)
    rollout = make_rollout(rng, lengths=[3, 0, 5])
    scored = make_scored(rng, rollout, k=1)
    scored.topk_ids, scored.topk_logprobs = scored.topk_ids[:, :0], scored.topk_logprobs[:, :0]
    scored.token_logprobs = -rng.random(rollout.num_response_tokens).astype(np.float32)
    back = decode_scored_record(encode_scored_record(scored))
    assert back.k == 0 and back.topk_ids.shape == (8, 0)
    np.testing.assert_array_equal(back.token_logprobs, scored.token_logprobs)
    assert decode_scored_record(encode_scored_record(make_scored(rng, rollout))).token_logprobs is None
    with pytest.raises(RecordError, match="k = 0 must carry token_logprobs"):
        scored.token_logprobs = None
        decode_scored_record(encode_scored_record(scored))
    for bad, message in (
        (np.zeros(7, np.float32), r"token_logprobs has shape \(7,\)"),
        (np.full(8, 0.5, np.float32), "NaN or positive"),
    ):
        scored.token_logprobs = bad
        with pytest.raises(RecordError, match=message):
            decode_scored_record(encode_scored_record(scored))


@pytest.mark.parametrize(("dtype", "value_bytes"), [(np.float32, 4), (np.float16, 2)])
def test_a_scored_token_at_the_real_vocabulary_costs_k_ids_and_k_logprobs_on_the_wire(dtype, value_bytes):
    """The design's wire size: top-256 of a 151,936-token vocabulary is k x (4 + 4) bytes a response token in
    float32 (k x (4 + 2) in float16), not V x 4; the rest of the record is a fixed overhead per group."""
    rng = np.random.default_rng(1)
    sizes = {}
    for tokens in (64, 512):
        rollout = make_rollout(rng, lengths=[tokens // 4] * 4, prompt_len=32)
        record = make_scored(rng, rollout, k=256, dtype=dtype)
        record.topk_ids = rng.integers(0, 151_936, size=(tokens, 256)).astype(np.int32)
        sizes[tokens] = len(encode_scored_record(record))
        check_scored_within(record, RecordLimits(vocab_size=151_936, max_prompt_length=32, max_new_tokens=128))
    per_token = (sizes[512] - sizes[64]) / (512 - 64)
    assert 256 * (4 + value_bytes) <= per_token <= 256 * (4 + value_bytes) + 16  # + the token's own fields
    assert sizes[64] - 64 * per_token < 2048  # the per-group overhead


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_size_cap_fits_the_runs_largest_record_and_little_more(dtype):
    config = load_config(
        None,
        ["rollout.n=4", "data.max_prompt_length=64", "rollout.max_new_tokens=512", "gkd.teacher_topk=256",
         f"teacher.logprob_dtype={dtype}"],
    )  # fmt: skip
    cap = largest_record_bytes(config)
    rng = np.random.default_rng(0)
    largest = make_scored(rng, make_rollout(rng, lengths=[512] * 4, prompt_len=64), k=256, dtype=np.dtype(dtype))
    data = encode_scored_record(largest)
    assert len(data) < cap < 3 * len(data) + 16 * 2**20  # the run's own records pass; the cap is not 256 MB
    decode_scored_record(data, cap)
    with pytest.raises(RecordError, match="exceeds the limit"):
        decode_scored_record(data + b"\0" * (cap - len(data) + 1), cap)


def test_the_students_top_k_ids_travel_with_the_rollout_and_are_checked():
    """rollout.student_topk: the ids ride in the rollout record and on into the scored one; a wrong shape or a
    negative id is named at decoding, an id past the vocabulary by the run's limits; the size cap counts them."""
    rng = np.random.default_rng(3)
    rollout = make_rollout(rng, lengths=[2, 3])
    rollout.student_topk_ids = rng.integers(0, 50, (5, 6)).astype(np.int32)
    back = decode_rollout_record(encode_rollout_record(rollout))
    np.testing.assert_array_equal(back.student_topk_ids, rollout.student_topk_ids)
    scored = decode_scored_record(encode_scored_record(make_scored(rng, rollout)))
    np.testing.assert_array_equal(scored.rollout.student_topk_ids, rollout.student_topk_ids)
    assert decode_rollout_record(encode_rollout_record(make_rollout(rng))).student_topk_ids is None
    data = encode_rollout_record(rollout)
    bad_shape = {"dtype": "<i4", "shape": [4, 6], "data": bytes(96)}
    with pytest.raises(RecordError, match=r"student_topk_ids has shape \(4, 6\), expected \(5, k\)"):
        decode_rollout_record(mutate(data, student_topk_ids=bad_shape))
    negative = {"dtype": "<i4", "shape": [5, 1], "data": np.full(5, -1, "<i4").tobytes()}
    with pytest.raises(RecordError, match="student_topk_ids holds a negative token id"):
        decode_rollout_record(mutate(data, student_topk_ids=negative))
    vocab = int(max(back.prompt_ids.max(), back.response_ids.max())) + 1
    back.student_topk_ids = back.student_topk_ids.copy()
    back.student_topk_ids[1, 2] = vocab
    with pytest.raises(
        RecordError, match=f"student_topk_ids holds token id {vocab}, outside the vocabulary of {vocab}"
    ):
        check_rollout_within(back, RecordLimits(vocab, 5, 3))
    union = ["gkd.topk_source=union", "rollout.student_topk=32", "gkd.teacher_topk=64"]
    assert largest_record_bytes(load_config(None, union)) > largest_record_bytes(
        load_config(None, ["gkd.teacher_topk=96"])
    )


def test_teacher_hidden_states_round_trip_and_are_checked():
    """gkd.teacher_signal=hidden: a scored record's [R, H] hidden states travel as float32 or as bfloat16 bit
    patterns (uint16) and decode to the same values; a wrong row count, a NaN or infinity (bfloat16's all-ones
    exponent too) or another dtype is a RecordError."""
    import torch

    from gkd_async.models.hidden_signal import hidden_from_wire, hidden_to_wire

    rng = np.random.default_rng(4)
    record = make_scored(rng, make_rollout(rng, lengths=[3, 2]), k=1)
    record.topk_ids, record.topk_logprobs = np.zeros((5, 0), np.int32), np.zeros((5, 0), np.float32)  # k = 0
    record.token_logprobs = -rng.random(5).astype(np.float32)
    states = torch.randn(5, 7, dtype=torch.float64) * 40
    for dtype, tolerance in (("float32", 1e-6), ("bfloat16", 2**-8)):
        record.teacher_hidden = hidden_to_wire(states, dtype)
        back = decode_scored_record(encode_scored_record(record)).teacher_hidden
        np.testing.assert_array_equal(back, record.teacher_hidden)
        np.testing.assert_allclose(hidden_from_wire(back).double().numpy(), states.numpy(), rtol=tolerance)
    for bad, message in (
        (hidden_to_wire(states[:4], "float32"), r"teacher_hidden has shape \(4, 7\), expected \(5, hidden size\)"),
        (np.full((5, 7), np.nan, np.float32), "teacher_hidden holds NaN or infinite values"),
        (np.full((5, 7), 0x7F80, np.uint16), "teacher_hidden holds NaN or infinite values"),  # bfloat16 +inf
    ):
        record.teacher_hidden = bad
        with pytest.raises(RecordError, match=message):
            decode_scored_record(encode_scored_record(record))
    fields = msgpack.unpackb(encode_scored_record(record), raw=False)
    fields["teacher_hidden"]["dtype"] = "<f2"
    with pytest.raises(RecordError, match="teacher_hidden has dtype '<f2'"):
        decode_scored_record(msgpack.packb(fields, use_bin_type=True))
