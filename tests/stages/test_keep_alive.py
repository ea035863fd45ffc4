"""A stage busy in one long call (a real-size teacher's first score, a 2 GB weight reload) is not taken for dead:
its heartbeat and its hold on the entries in hand go on from a thread, past pipeline.teacher_timeout_s and
pipeline.claim_timeout_s; once it stops, its entries are free to be reclaimed as a dead stage's are."""

import threading
import time
from pathlib import Path

from gkd_async.config.loading import load_config
from gkd_async.run_state import RunState
from gkd_async.transport.streams import Heartbeats, StreamProducer
from workers.common import RunContext, StageWorker


class SlowScorer(StageWorker):
    """Reads a batch, then spends `busy_s` in one call before forwarding it, as a slow teacher does."""

    role = "teacher"

    def __init__(self, ctx, busy_s: float) -> None:
        super().__init__(ctx, "slow-scorer")
        self.consumer = ctx.consumer(ctx.names.rollouts, "scorers", self.name)
        self.busy_s, self.in_call = busy_s, threading.Event()

    def step(self) -> None:
        self.liveness.beat(produced=self.done)
        entries = self.consumer.read(4, block_ms=50)
        if entries:
            self.in_call.set()
            time.sleep(self.busy_s)  # one long call: the loop sends no heartbeat meanwhile
            self.consumer.forward([e.id for e in entries], self.ctx.names.scored, [e.payload for e in entries])
            self.done += len(entries)
            self.ctx.set_state(RunState.done())  # one batch is the whole test


def test_a_stage_busy_past_the_timeouts_keeps_its_heartbeat_and_its_entries(redis_server, names, tmp_path):
    cfg = load_config(None, ["pipeline.claim_timeout_s=1.0", "pipeline.heartbeat_interval_s=0.1"])
    ctx = RunContext(cfg, redis_server.url, names.run_id, Path(tmp_path))
    StreamProducer(ctx.client, ctx.names.rollouts).add([f"group-{i}".encode() for i in range(4)])
    worker = SlowScorer(ctx, busy_s=4.0)  # four claim timeouts
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert worker.in_call.wait(30)
    other = ctx.consumer(ctx.names.rollouts, "scorers", "other-scorer")
    beats = Heartbeats(ctx.client, ctx.names.heartbeats)
    taken, alive = [], []
    while thread.is_alive() and not ctx.client.exists(ctx.names.scored):
        taken += other.read(4, block_ms=50)  # would reclaim anything idle past 1 s
        alive.append(bool(beats.alive("teacher", within_s=0.8)))  # 8 beats: room for a busy suite
        time.sleep(0.1)
    thread.join(30)
    assert taken == [], [e.payload for e in taken]
    assert len(alive) > 12 and all(alive)  # never 0.8 s without a heartbeat during a 4 s call
    scored = [fields[b"d"] for _, fields in ctx.client.xrange(ctx.names.scored)]
    assert sorted(scored) == [f"group-{i}".encode() for i in range(4)]  # forwarded once, by the busy scorer
    assert ctx.client.xlen(ctx.names.dead) == 0
    assert ctx.client.xpending(ctx.names.rollouts, "scorers")["pending"] == 0


def test_entries_of_a_consumer_that_stopped_holding_them_are_reclaimed(redis_server, names, tmp_path):
    """hold() keeps entries only while called; a consumer that no longer calls it (its process died) loses them
    to another after pipeline.claim_timeout_s, delivered a second time."""
    cfg = load_config(None, ["pipeline.claim_timeout_s=0.4"])
    ctx = RunContext(cfg, redis_server.url, names.run_id, Path(tmp_path))
    StreamProducer(ctx.client, ctx.names.rollouts).add([b"a", b"b"])
    holder = ctx.consumer(ctx.names.rollouts, "scorers", "holder")
    other = ctx.consumer(ctx.names.rollouts, "scorers", "other")
    held = holder.read(2)
    for _ in range(8):  # 0.8 s held, twice the claim timeout
        time.sleep(0.1)
        assert holder.hold() == 2
    assert other.read(2, block_ms=10) == []
    time.sleep(0.5)  # no more holding
    reclaimed = other.read(2, block_ms=10)
    assert sorted(e.payload for e in reclaimed) == sorted(e.payload for e in held)
    assert all(e.deliveries == 2 for e in reclaimed)
    assert holder.hold() == 0  # they are the other's now: not taken back
