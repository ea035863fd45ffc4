"""What every stage process shares: the run's Redis keys, its directory, liveness and the stop signal."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import redis

from gkd_async.config.plan import RunPlan
from gkd_async.config.schema import GKDConfig
from gkd_async.errors import ConfigError, GKDError, RedisUnavailableError, TeacherServerUnavailableError
from gkd_async.logs import configure_logging, get_logger
from gkd_async.models.loading import model_hidden_size
from gkd_async.redaction import SecretUrl
from gkd_async.run_state import RunState
from gkd_async.transport.limits import largest_record_bytes
from gkd_async.transport.redis_client import connect_redis, raises_unavailable
from gkd_async.transport.streams import Heartbeats, ProcessMemory, StreamConsumer, StreamNames
from gkd_async.weight_sync.base import WeightTransport
from gkd_async.weight_sync.factory import open_weight_transport


class RunFailedError(GKDError):
    """The run was stopped because one of its stages failed; the message says which and why."""


ACTOR_NAMESPACE = "gkd-async"  # stage actors (and the ray transport's hub) of every run


@dataclass
class RunContext:
    config: GKDConfig
    redis_url: SecretUrl  # a str is taken too; shown (repr, logs) without its password
    run_id: str
    run_dir: Path

    def __post_init__(self) -> None:
        if not isinstance(self.redis_url, SecretUrl):
            self.redis_url = SecretUrl(self.redis_url)

    @cached_property
    def client(self) -> redis.Redis:
        return connect_redis(self.url)

    @cached_property
    def names(self) -> StreamNames:
        return StreamNames(self.run_id, tuple(self.config.model.teachers))

    @property
    def url(self) -> str:
        """The URL itself, password and all: to connect with or hand to a stage, never to show."""
        return self.redis_url.get_secret_value()

    @property
    def shown_url(self) -> str:
        return str(self.redis_url)

    def consumer(self, stream: str, group: str, name: str) -> StreamConsumer:
        pipeline = self.config.pipeline
        return StreamConsumer(
            self.client,
            stream,
            group,
            name,
            dead_stream=self.names.dead,
            claim_idle_ms=int(pipeline.claim_timeout_s * 1000),
            delivery_limit=pipeline.delivery_limit,
            url=self.shown_url,
            dead_max_entries=pipeline.dead_letter_max_entries,
            dead_max_payload_bytes=pipeline.dead_letter_max_payload_kb * 1024,
            max_entry_bytes=self.max_record_bytes,
        )

    def weights(self) -> WeightTransport:
        """The run's weight transport (`pipeline.weight_transport`), as both ends of it see it."""
        return open_weight_transport(
            self.config, self.client, self.names.weights, self.run_id, self.run_dir, self.shown_url, ACTOR_NAMESPACE
        )

    @cached_property
    def max_record_bytes(self) -> int:
        mb = self.config.pipeline.max_record_mb
        if mb is not None:
            return int(mb * 2**20)
        hidden = 0  # gkd.teacher_signal=hidden: each response token carries the teacher's hidden state
        if RunPlan.of(self.config).hidden_signal:
            hidden = model_hidden_size(self.config.model.teacher, self.config.model.trust_remote_code)
        return largest_record_bytes(self.config, hidden)

    @raises_unavailable
    def state(self) -> RunState:
        value = self.client.get(self.names.state)
        return RunState.parse(value.decode(errors="replace") if value else "")

    @raises_unavailable
    def set_state(self, state: RunState) -> None:
        self.client.set(self.names.state, str(state))

    def stopped(self) -> bool:
        return not self.state().is_running

    def fail_unless_ended(self, why: str) -> None:
        """A launcher ending its stages: a run still running or stopping is marked failed, so that no stage
        left behind (or joining later) goes on; an ended run keeps how it ended."""
        if not self.state().ended:
            self.set_state(RunState.failed(why))

    def setup_logging(self, role: str, console: bool = False) -> None:
        configure_logging(self.run_dir / "logs" / f"{role}-{os.getpid()}.log", self.config.logging.level, console)


def teacher_role(teacher: str | None) -> str:
    """The heartbeat role of a teacher's scorers: the learner needs one alive for every teacher."""
    return "teacher" if teacher is None else f"teacher:{teacher}"


def consumer_name(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def group_seed(seed: int, group_id: str) -> int:
    """A sampling seed that depends only on the run seed and the group, not on which worker runs it."""
    digest = hashlib.sha256(f"{seed}:{group_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class Liveness:
    """Heartbeats at most once per interval, from the worker's own loop."""

    def __init__(self, ctx: RunContext, role: str, name: str) -> None:
        self.beats = Heartbeats(ctx.client, ctx.names.heartbeats, ctx.shown_url)
        self.memory = ProcessMemory(ctx.client, ctx.names.memory, ctx.shown_url)
        self.role, self.name = role, name
        self.interval = ctx.config.pipeline.heartbeat_interval_s
        self.last = 0.0
        self.info: dict[str, object] = {}
        self.log = get_logger(role=role, consumer=name)

    def beat(self, **info: object) -> None:
        self.info = info
        if time.monotonic() - self.last >= self.interval:
            self.beat_now()

    def beat_now(self) -> None:
        """A heartbeat with the newest info the loop gave (from the worker's keep-alive thread too)."""
        self.beats.beat(self.name, self.role, **self.info)
        self.memory.report(self.name, self.role)
        self.last = time.monotonic()

    def leave(self) -> None:
        self.memory.report(self.name, self.role)  # the stage's last word on its process's peak
        self.beats.remove(self.name)


def is_entry_fault(exc: BaseException) -> bool:
    """True for an exception raised while handling entries that is not the run's or Redis's own failure:
    the entries are to blame (or the engine cannot take them), so they fail alone and the worker goes on."""
    not_the_entries = (
        RedisUnavailableError | redis.RedisError | RunFailedError | ConfigError | TeacherServerUnavailableError
    )
    return isinstance(exc, Exception) and not isinstance(exc, not_the_entries)


class KeepAlive:
    """A stage's heartbeat and its hold on the entries in hand, from a thread of their own: at a real size one
    generate or score call can take minutes (a 1.5B teacher on CPU, a 2 GB weight reload), longer than
    pipeline.teacher_timeout_s or pipeline.claim_timeout_s, and a heartbeat from the loop alone would have the
    learner fail the run for want of a teacher, or another worker take the entries over and do the work again.
    A process that dies (kill -9, a lost node) stops its thread with it, so its entries are reclaimed as before;
    a process alive but stuck inside a call keeps them (end it, and they are)."""

    def __init__(self, liveness: Liveness, consumer: StreamConsumer) -> None:
        self.liveness, self.consumer = liveness, consumer
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"keep-alive-{liveness.name}", daemon=True)

    def __enter__(self) -> KeepAlive:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stopping.wait(self.liveness.interval):
            try:
                self.liveness.beat_now()
                self.consumer.hold()
            except (GKDError, redis.RedisError) as exc:  # Redis away: the loop meets it too, and says so
                self.liveness.log.warning("keep-alive failed", error=str(exc))


class StageWorker:
    """A rollout or teacher worker: `step()` until the run stops, heartbeats from the loop."""

    role = "stage"

    def __init__(self, ctx: RunContext, name: str | None) -> None:
        self.ctx = ctx
        self.name = name or consumer_name(self.role)
        self.liveness = Liveness(ctx, self.role, self.name)
        self.done = 0

    consumer: StreamConsumer

    def step(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the worker holds besides its streams (child processes); called once as it stops."""

    def read_records(self, count: int, decode):
        """Up to `count` entries of this worker's input and what `decode` made of each; an entry that does not
        decode (a RecordError) is dead-lettered alone with its reason (StreamConsumer.read_records)."""
        return self.consumer.read_records(count, self.ctx.config.pipeline.read_block_ms, decode)

    def each_alone_on_failure(self, items: list, handle, entry_of) -> None:
        """`handle(items)`; when that raises for the entries' sake, `handle([item])` for each item alone and
        dead-letter, with the error, the entry of each item that fails alone. Its batch-mates go on."""
        try:
            handle(items)
            return
        except Exception as exc:
            if not is_entry_fault(exc):
                raise
            if len(items) > 1:
                self.liveness.log.warning("a batch failed; handling its entries one by one", error=repr(exc))
            else:
                self._dead_letter_for(entry_of(items[0]), exc)
                return
        for item in items:
            try:
                handle([item])
            except Exception as exc:
                if not is_entry_fault(exc):
                    raise
                self._dead_letter_for(entry_of(item), exc)

    def _dead_letter_for(self, entry, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self.liveness.log.warning("entry dead-lettered", entry=entry.id, reason=reason)
        self.consumer.dead_letter(entry.id, entry.payload, reason, entry.deliveries)

    def run(self) -> int:
        """Serve until the run stops; returns the number of groups this worker finished."""
        self.liveness.log.info("worker started")
        try:
            with KeepAlive(self.liveness, self.consumer):
                while not self.ctx.stopped():
                    self.step()
        finally:
            self.close()
            self.liveness.leave()
            self.liveness.log.info("worker stopped", done=self.done, state=str(self.ctx.state()))
        return self.done
