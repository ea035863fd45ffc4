import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis

from gkd_async.errors import RedisUnavailableError
from gkd_async.redaction import redact_url
from gkd_async.transport.local_redis import LocalRedisServer, free_port
from gkd_async.transport.redis_client import connect_redis
from gkd_async.transport.streams import Heartbeats, StreamConsumer, StreamNames, StreamProducer, trim_acknowledged

REPO = Path(__file__).resolve().parents[2]


def consumer(client, names, name, **kwargs):
    kwargs.setdefault("claim_idle_ms", 60_000)
    return StreamConsumer(client, names.rollouts, "scorers", name, dead_stream=names.dead, **kwargs)


def downstream_payloads(client, stream):
    return [fields[b"d"] for _, fields in client.xrange(stream)]


def test_produce_consume_forward_ack(redis_client, names):
    producer = StreamProducer(redis_client, names.rollouts)
    ids = producer.add([f"s{i}".encode() for i in range(5)])
    assert len(ids) == 5
    worker = consumer(redis_client, names, "w0")
    entries = worker.read(count=10, block_ms=100)
    assert [e.payload for e in entries] == [f"s{i}".encode() for i in range(5)]
    assert [e.id for e in entries] == ids and all(e.deliveries == 1 for e in entries)
    assert worker.pending_count() == 5

    worker.forward([e.id for e in entries[:3]], names.scored, [e.payload + b"!" for e in entries[:3]])
    assert worker.pending_count() == 2
    assert downstream_payloads(redis_client, names.scored) == [b"s0!", b"s1!", b"s2!"]
    worker.ack([e.id for e in entries[3:]])
    assert worker.pending_count() == 0
    assert worker.read(count=10, block_ms=50) == []


def test_read_blocks_until_an_entry_arrives(redis_server, redis_client, names):
    worker = consumer(redis_client, names, "w0")
    producer = StreamProducer(connect_redis(redis_server.url), names.rollouts)
    timer = threading.Timer(0.3, lambda: producer.add([b"late"]))
    timer.start()
    start = time.monotonic()
    entries = worker.read(count=1, block_ms=5000)
    assert [e.payload for e in entries] == [b"late"]
    assert 0.2 < time.monotonic() - start < 4.0


def test_idle_entries_of_a_stalled_consumer_are_reclaimed_and_deduplicated(redis_client, names):
    StreamProducer(redis_client, names.rollouts).add([f"sample-{i}".encode() for i in range(6)])
    slow = consumer(redis_client, names, "slow", claim_idle_ms=200)
    fast = consumer(redis_client, names, "fast", claim_idle_ms=200)
    stuck = slow.read(count=4)
    rest = fast.read(count=10, block_ms=10)
    assert [e.payload for e in rest] == [b"sample-4", b"sample-5"]  # only the two nobody holds
    fast.ack([e.id for e in rest])
    time.sleep(0.3)
    reclaimed = fast.read(count=10)
    assert sorted(e.payload for e in reclaimed) == sorted(e.payload for e in stuck)
    assert all(e.deliveries == 2 for e in reclaimed)
    fast.forward([e.id for e in reclaimed], names.scored, [e.payload for e in reclaimed])
    # The slow consumer wakes up and finishes its batch too: a duplicate downstream, which the learner's
    # de-duplication by sample id absorbs.
    slow.forward([e.id for e in stuck], names.scored, [e.payload for e in stuck])
    got = downstream_payloads(redis_client, names.scored)
    assert len(got) == 8 and set(got) == {f"sample-{i}".encode() for i in range(4)}


WORKER_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from gkd_async.transport.redis_client import connect_redis
    from gkd_async.transport.streams import StreamConsumer, StreamNames
    url, run, name, crash_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    names = StreamNames(run)
    client = connect_redis(url)
    worker = StreamConsumer(client, names.rollouts, "scorers", name, dead_stream=names.dead, claim_idle_ms=300)
    done = 0
    while True:
        entries = worker.read(count=3, block_ms=200)
        if not entries:
            break
        if done + len(entries) > crash_after:
            print("crashing holding", len(entries), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        worker.forward([e.id for e in entries], names.scored, [e.payload for e in entries])
        done += len(entries)
    """
)


def test_every_sample_arrives_exactly_once_across_a_kill_9(redis_server, redis_client, names):
    total = 40
    StreamProducer(redis_client, names.rollouts).add([f"sample-{i}".encode() for i in range(total)])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", WORKER_SCRIPT, redis_server.url, names.run_id]
    victim = subprocess.run([*args, "victim", "10"], env=env, capture_output=True, text=True, timeout=60)
    assert victim.returncode == -signal.SIGKILL, victim.stderr
    assert "crashing holding" in victim.stdout
    held = redis_client.xpending(names.rollouts, "scorers")["pending"]
    assert held > 0

    survivor = subprocess.run([*args, "survivor", "1000000"], env=env, capture_output=True, text=True, timeout=60)
    assert survivor.returncode == 0, survivor.stderr
    # The survivor first drains the new entries, then (after the claim timeout) the victim's held ones.
    for _ in range(50):
        if redis_client.xpending(names.rollouts, "scorers")["pending"] == 0:
            break
        time.sleep(0.1)
        subprocess.run([*args, "survivor", "1000000"], env=env, capture_output=True, timeout=60)
    got = downstream_payloads(redis_client, names.scored)
    assert sorted(got) == sorted(f"sample-{i}".encode() for i in range(total))  # no loss, no duplicate
    assert redis_client.xlen(names.dead) == 0


def test_poison_entry_reaches_the_dead_letter_stream(redis_client, names):
    StreamProducer(redis_client, names.rollouts).add([b"poison"])
    worker = consumer(redis_client, names, "w0", claim_idle_ms=50, delivery_limit=2)
    deliveries = []
    for _ in range(5):  # each read "crashes" before acknowledging
        time.sleep(0.08)
        deliveries += [e.deliveries for e in worker.read(count=1, block_ms=10)]
    assert deliveries == [1, 2]
    assert worker.pending_count() == 0
    [(_, dead)] = redis_client.xrange(names.dead)
    assert dead[b"d"] == b"poison" and dead[b"deliveries"] == b"3"
    assert b"delivered 3 times" in dead[b"reason"] and dead[b"stream"] == names.rollouts.encode()


def test_malformed_entry_is_dead_lettered_and_the_rest_flows(redis_client, names):
    redis_client.xadd(names.rollouts, {b"junk": b"1"})
    StreamProducer(redis_client, names.rollouts).add([b"good"])
    worker = consumer(redis_client, names, "w0")
    assert [e.payload for e in worker.read(count=10, block_ms=10)] == [b"good"]
    [(_, dead)] = redis_client.xrange(names.dead)
    assert b"not a gkd-async entry" in dead[b"reason"]


def test_dead_letter_records_the_reason_given(redis_client, names):
    StreamProducer(redis_client, names.rollouts).add([b"\x00bad"])
    worker = consumer(redis_client, names, "w0")
    [entry] = worker.read(count=1)
    worker.dead_letter(entry.id, entry.payload, "RecordError: not a msgpack record", entry.deliveries)
    assert worker.pending_count() == 0
    [(_, dead)] = redis_client.xrange(names.dead)
    assert dead[b"reason"] == b"RecordError: not a msgpack record" and dead[b"id"] == entry.id.encode()


def test_read_records_dead_letters_what_does_not_decode_and_returns_the_rest(redis_client, names):
    """The one read -> decode -> dead-letter loop every stage reads through: an entry whose decoding raises a
    RecordError goes to the dead letters alone with its reason; its batch-mates come back decoded, in order."""
    from gkd_async.errors import RecordError

    def decode(payload: bytes) -> int:
        if not payload.isdigit():
            raise RecordError(f"not a number: {payload!r}")
        return int(payload)

    ids = StreamProducer(redis_client, names.rollouts).add([b"1", b"two", b"3"])
    worker, dead = consumer(redis_client, names, "w0"), []
    decoded = worker.read_records(3, None, decode, dead.append)
    assert [(entry.id, value) for entry, value in decoded] == [(ids[0], 1), (ids[2], 3)]
    assert [entry.id for entry in dead] == [ids[1]] and worker.pending_count() == 2  # the dead one acknowledged
    [(_, letter)] = redis_client.xrange(names.dead)
    assert letter[b"reason"] == b"RecordError: not a number: b'two'" and letter[b"id"] == ids[1].encode()
    StreamProducer(redis_client, names.rollouts).add([b"4"])
    with pytest.raises(ValueError):  # any other error is not the entry's to answer for: raised, not dead-lettered
        worker.read_records(1, None, lambda payload: int("x"))
    assert redis_client.xlen(names.dead) == 1


def test_heartbeats(redis_client, names):
    beats = Heartbeats(redis_client, names.heartbeats)
    beats.beat("teacher-0", "teacher", processed=3)
    beats.beat("rollout-0", "rollout")
    redis_client.hset(names.heartbeats, "teacher-old", '{"role": "teacher", "ts": 1.0}')
    assert beats.alive("teacher", within_s=5) == ["teacher-0"]
    assert beats.all()["teacher-0"]["processed"] == 3
    beats.remove("teacher-0")
    assert beats.alive("teacher", within_s=5) == []


def test_unreachable_redis_is_a_clear_error():
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    start = time.monotonic()
    with pytest.raises(RedisUnavailableError) as err:
        connect_redis(url, retries=2, backoff_cap_s=0.1)
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "127.0.0.1" in msg and "secret" not in msg and "pipeline.redis_url" in msg


def test_lost_connection_is_retried_then_reported():
    server = LocalRedisServer(password="pw", tcp=True).start()
    port = server.port
    client = connect_redis(server.url, retries=8, backoff_cap_s=0.3)
    producer = StreamProducer(client, "gkd:retry:rollouts", url=server.url)
    producer.add([b"before"])
    server.stop()
    # Back within the retry budget: the write goes through.
    restarted = LocalRedisServer(port=port, password="pw")
    threading.Timer(0.3, restarted.start).start()
    assert len(producer.add([b"after"])) == 1
    restarted.stop()
    # Gone for good: a clear error naming the URL, not a hang.
    with pytest.raises(RedisUnavailableError) as err:
        producer.add([b"lost"])
    assert f"127.0.0.1:{port}" in str(err.value) and "pw" not in str(err.value)


def test_a_password_can_come_from_the_environment(redis_server, monkeypatch):
    url = redis_server.url.replace(redis_server.password, "${GKD_TEST_REDIS_PASSWORD}")
    with pytest.raises(RedisUnavailableError, match="GKD_TEST_REDIS_PASSWORD, which is not set"):
        connect_redis(url)
    monkeypatch.setenv("GKD_TEST_REDIS_PASSWORD", redis_server.password)
    assert connect_redis(url).ping()
    assert redis_server.password not in redact_url(url)


def test_wrong_password_is_named(redis_server):
    url = redis_server.url.replace(redis_server.password, "wrong")
    with pytest.raises(RedisUnavailableError, match="refused the credentials"):
        connect_redis(url, retries=0)


def test_redact_url():
    assert redact_url("redis://:pw@host:1/0") == "redis://:***@host:1/0"
    assert redact_url("redis://user:pw@host/0") == "redis://user:***@host/0"
    assert redact_url("redis://host:1") == "redis://host:1"
    assert redact_url("rediss://u:p#w@rd@host:1/0") == "rediss://u:***@host:1/0"
    assert redact_url("redis://:a/b@host/0") == "redis://:***@host/0"
    assert redact_url("redis://secret@host/0") == "redis://***@host/0"
    assert redact_url("redis://host:1/0?password=s3cret&db=2") == "redis://host:1/0?password=***&db=2"
    assert redact_url("unix:///run/redis.sock?db=0&password=s3cret") == "unix:///run/redis.sock?db=0&password=***"
    assert redact_url("rediss://h:1/0?ssl_password=s3cret&x=1") == "rediss://h:1/0?ssl_password=***&x=1"
    assert redact_url("https://h/v1?api_key=s3cret&token=t0k") == "https://h/v1?api_key=***&token=***"


def test_local_server_needs_its_password_and_stops_by_pid(monkeypatch):
    """A run's private Redis opens no TCP port: its socket is in a directory only this user can enter, so
    nothing else on the machine can reach it, or listen there first to collect its password."""
    import psutil

    with LocalRedisServer() as server:
        pid = server.pid
        assert connect_redis(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(unix_socket_path=str(server.socket_path)).ping()
        assert psutil.Process(pid).net_connections("inet") == []
        assert server.socket_path.parent.stat().st_mode & 0o777 == 0o700
        assert server.socket_path.stat().st_mode & 0o077 == 0
    with LocalRedisServer(tcp=True) as server:  # where a port is asked for: loopback only
        assert connect_redis(server.url).ping()
        listening = {c.laddr.ip for c in psutil.Process(server.pid).net_connections("inet") if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.05)


def test_missing_redis_server_binary_says_how_to_install(monkeypatch, tmp_path):
    from gkd_async.errors import RedisServerNotFoundError

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisServerNotFoundError, match="apt-get install redis-server"):
        LocalRedisServer().start()


def test_dead_letters_are_capped_and_keep_a_prefix_of_the_payload(redis_client, names):
    worker = StreamConsumer(
        redis_client, names.rollouts, "teacher", "t0", dead_stream=names.dead, dead_max_entries=5,
        dead_max_payload_bytes=10,
    )  # fmt: skip
    ids = StreamProducer(redis_client, names.rollouts).add([b"x" * 1000] * 400)
    for entry_id in ids:
        worker.dead_letter(entry_id, b"x" * 1000, "RecordError: too long " + "!" * 10_000)
    # Approximate trimming keeps whole nodes: bounded, not exact (with 400 added, far fewer are kept).
    assert redis_client.xlen(names.dead) < 200
    [(_, newest)] = redis_client.xrevrange(names.dead, count=1)
    assert newest[b"d"] == b"x" * 10 and newest[b"payload_bytes"] == b"1000"
    assert newest[b"reason"].startswith(b"RecordError: too long") and len(newest[b"reason"]) <= 4096


def test_trimming_keeps_every_unread_and_pending_entry(redis_client, names):
    ids = StreamProducer(redis_client, names.scored).add([str(i).encode() for i in range(10)])
    assert trim_acknowledged(redis_client, names.scored) == 0  # no group has read anything yet
    fast = StreamConsumer(redis_client, names.scored, "learner", "l0", dead_stream=names.dead)
    slow = StreamConsumer(redis_client, names.scored, "observer", "o0", dead_stream=names.dead)
    taken = fast.read(count=6)
    fast.ack([e.id for e in taken[:2] + taken[3:]])  # the third stays pending
    slow.ack([e.id for e in slow.read(count=8)])
    assert trim_acknowledged(redis_client, names.scored) == 2  # before the learner's pending entry
    assert [e.decode() for e, _ in redis_client.xrange(names.scored)] == ids[2:]
    fast.ack([taken[2].id])
    assert trim_acknowledged(redis_client, names.scored) == 4  # up to the learner's unread entries
    assert [e.decode() for e, _ in redis_client.xrange(names.scored)] == ids[6:]


def test_forward_sends_each_payload_to_its_own_stream_in_one_transaction(redis_client, names):
    """Several teachers: a rollout worker routes each group to its teacher's stream, and acks its inputs with it."""
    routed = StreamNames(names.run_id, ("math", "chat"))
    assert routed.rollout_streams == [routed.rollouts_for("math"), routed.rollouts_for("chat")]
    assert routed.rollouts not in routed.streams() and routed.rollouts_for("chat") in routed.streams()
    StreamProducer(redis_client, names.prompts).add([b"p0", b"p1", b"p2"])
    worker = StreamConsumer(redis_client, names.prompts, "rollout", "w0", dead_stream=names.dead)
    entries = worker.read(count=3)
    targets = [routed.rollouts_for(t) for t in ("math", "chat", "math")]
    worker.forward([e.id for e in entries], targets, [b"a", b"b", b"c"])
    assert downstream_payloads(redis_client, routed.rollouts_for("math")) == [b"a", b"c"]
    assert downstream_payloads(redis_client, routed.rollouts_for("chat")) == [b"b"]
    assert worker.pending_count() == 0
    with pytest.raises(ValueError, match="2 payloads for 1 streams"):
        worker.forward([], [targets[0]], [b"x", b"y"])
