"""Redis streams transport with at-least-once delivery.

Each stage reads its input stream through a consumer group and acknowledges an entry only in the same
MULTI/EXEC transaction that writes its result downstream, so a crash loses nothing: the entry stays
pending and another consumer reclaims it once it has been idle for `claim_idle_ms`. An entry delivered
more than `delivery_limit` times (it keeps killing its consumers) goes to the dead-letter stream with the
reason, as does an entry that is not a gkd-async entry at all. Duplicates are possible after a reclaim;
the learner de-duplicates by sample id.

Streams are never capped by length (MAXLEN would silently drop unread entries): the number of unread
entries is bounded upstream by admission control, and `trim_acknowledged` drops only entries that every
consumer group has acknowledged. The dead-letter stream is capped, and keeps at most a prefix of each
payload: the reason and where the entry came from are what an operator needs.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from gkd_async.errors import RecordError
from gkd_async.transport.records import peek_group_id
from gkd_async.transport.redis_client import raises_unavailable, unavailable_as_error

PAYLOAD_FIELD = b"d"
DEAD_LETTER_MAX_ENTRIES = 10_000
DEAD_LETTER_MAX_PAYLOAD_BYTES = 64 * 1024
READ_BUDGET_BYTES = 1 << 30  # one read takes at most this many bytes of entries at the size cap

T = TypeVar("T")


@dataclass(frozen=True)
class StreamNames:
    """The Redis keys of one run; with several teachers (`teachers`), one rollouts stream per teacher."""

    run_id: str
    teachers: tuple[str, ...] = ()

    def _key(self, name: str) -> str:
        return f"gkd:{self.run_id}:{name}"

    @property
    def prompts(self) -> str:
        return self._key("prompts")

    @property
    def rollouts(self) -> str:
        return self._key("rollouts")

    def rollouts_for(self, teacher: str | None) -> str:
        """The stream a teacher's scorers read: the run's one rollouts stream, or the named teacher's own."""
        return self.rollouts if teacher is None else self._key(f"rollouts:{teacher}")

    @property
    def rollout_streams(self) -> list[str]:
        return [self.rollouts_for(t) for t in self.teachers] if self.teachers else [self.rollouts]

    @property
    def scored(self) -> str:
        return self._key("scored")

    @property
    def dead(self) -> str:
        return self._key("dead")

    @property
    def heartbeats(self) -> str:
        return self._key("heartbeats")

    @property
    def weights(self) -> str:
        """JSON {version, path} of the newest published student weights."""
        return self._key("weights")

    @property
    def state(self) -> str:
        """The run's state (`gkd_async.run_state.RunState`): workers stop when it is not 'running'."""
        return self._key("state")

    @property
    def progress(self) -> str:
        """Hash of the learner's latest step metrics, for progress bars and inspect."""
        return self._key("progress")

    @property
    def memory(self) -> str:
        """Hash of each stage's process and its peak resident memory (`ProcessMemory`), for the memory ledger."""
        return self._key("memory")

    @property
    def rendezvous(self) -> str:
        """tcp://ADDRESS:PORT where learner rank 0 waits for the other ranks (torch.distributed)."""
        return self._key("rendezvous")

    def trained_at(self, step: int) -> str:
        """Set of the sample ids trained at `step`: the learner's de-duplication marks (the newest steps only)."""
        return self._key(f"trained:{step}")

    @property
    def trained_pattern(self) -> str:
        """A SCAN pattern matching every `trained_at` key of the run."""
        return self._key("trained:*")

    def streams(self) -> list[str]:
        return [self.prompts, *self.rollout_streams, self.scored, self.dead]


@dataclass(frozen=True)
class StreamEntry:
    stream: str
    id: str
    payload: bytes
    deliveries: int


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class StreamProducer:
    """Appends payloads to a stream."""

    def __init__(self, client: redis.Redis, stream: str, url: str = "redis") -> None:
        self.client, self.stream, self.url = client, stream, url

    @raises_unavailable
    def add(self, payloads: Sequence[bytes]) -> list[str]:
        pipe = self.client.pipeline(transaction=False)
        for payload in payloads:
            pipe.xadd(self.stream, {PAYLOAD_FIELD: payload})
        return [_text(entry_id) for entry_id in pipe.execute()]


HOLD_MAX_ENTRIES = 1000  # more than any stage holds at once (a read takes a batch)


class StreamConsumer:
    """One named consumer in a consumer group of one stream."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        dead_stream: str,
        claim_idle_ms: int = 60_000,
        delivery_limit: int = 3,
        url: str = "redis",
        dead_max_entries: int = DEAD_LETTER_MAX_ENTRIES,
        dead_max_payload_bytes: int = DEAD_LETTER_MAX_PAYLOAD_BYTES,
        max_entry_bytes: int | None = None,
    ) -> None:
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        # Redis hands over a whole read before any entry can be checked: with entries of up to max_entry_bytes
        # (the size cap), a read takes no more of them than fit READ_BUDGET_BYTES.
        self.max_entries_a_read = None if max_entry_bytes is None else max(1, READ_BUDGET_BYTES // max_entry_bytes)
        self.dead_stream, self.claim_idle_ms, self.delivery_limit = dead_stream, claim_idle_ms, delivery_limit
        self.dead_max_entries, self.dead_max_payload_bytes = dead_max_entries, dead_max_payload_bytes
        self.url = url
        self.ensure_group()

    @raises_unavailable
    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    @raises_unavailable
    def read(self, count: int, block_ms: int | None = None) -> list[StreamEntry]:
        """Up to `count` entries: first those other consumers left idle too long, then new ones.

        Blocks up to `block_ms` for new entries when nothing was reclaimed. At most `max_entries_a_read`.
        """
        if self.max_entries_a_read is not None:
            count = min(count, self.max_entries_a_read)
        entries = self._reclaim(count)
        if len(entries) < count:
            response = self.client.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: ">"},
                count=count - len(entries),
                block=None if entries else block_ms,
            )
            for _, messages in response or []:
                entries.extend(self._accept(messages, deliveries=1))
        return entries

    def read_records(
        self,
        count: int,
        block_ms: int | None,
        decode: Callable[[bytes], T],
        dead_lettered: Callable[[StreamEntry], None] | None = None,
    ) -> list[tuple[StreamEntry, T]]:
        """Up to `count` entries (as `read`), each with what `decode` made of its payload. An entry whose decoding
        raises a RecordError is dead-lettered alone, with the error as its reason (then `dead_lettered(entry)`),
        and its batch-mates are returned: every stage reads its input through here."""
        decoded = []
        for entry in self.read(count, block_ms):
            try:
                decoded.append((entry, decode(entry.payload)))
            except RecordError as err:
                self.dead_letter(entry.id, entry.payload, f"RecordError: {err}", entry.deliveries)
                if dead_lettered is not None:
                    dead_lettered(entry)
        return decoded

    @raises_unavailable
    def ack(self, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            self.client.xack(self.stream, self.group, *entry_ids)

    @raises_unavailable
    def forward(
        self, entry_ids: Sequence[str], out_stream: str | Sequence[str], payloads: Sequence[bytes]
    ) -> list[str]:
        """Write results downstream (to one stream, or each payload to its own) and acknowledge their inputs in
        one transaction."""
        streams = [out_stream] * len(payloads) if isinstance(out_stream, str) else list(out_stream)
        if len(streams) != len(payloads):
            raise ValueError(f"{len(payloads)} payloads for {len(streams)} streams")
        pipe = self.client.pipeline(transaction=True)
        for stream, payload in zip(streams, payloads, strict=True):
            pipe.xadd(stream, {PAYLOAD_FIELD: payload})
        if entry_ids:
            pipe.xack(self.stream, self.group, *entry_ids)
        results = pipe.execute()
        return [_text(entry_id) for entry_id in results[: len(payloads)]]

    @raises_unavailable
    def dead_letter(self, entry_id: str, payload: bytes, reason: str, deliveries: int = 1) -> None:
        """Move an entry to the dead-letter stream with the reason, and acknowledge it here.

        The dead letter names the group the payload claims (so the learner can settle it) and keeps at most
        `dead_max_payload_bytes` of the payload; the stream keeps about the newest `dead_max_entries`.
        """
        fields = {
            PAYLOAD_FIELD: payload[: self.dead_max_payload_bytes],
            b"payload_bytes": str(len(payload)),
            b"stream": self.stream,
            b"id": entry_id,
            b"group": self.group,
            b"consumer": self.consumer,
            b"deliveries": str(deliveries),
            b"reason": reason[:4096],
            b"ts": repr(time.time()),
        }
        group_id = peek_group_id(payload)
        if group_id is not None:
            fields[b"group_id"] = group_id
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.dead_stream, fields, maxlen=self.dead_max_entries, approximate=True)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()

    @raises_unavailable
    def hold(self) -> int:
        """Keep the entries this consumer holds: reset their idle time (XCLAIM to itself, JUSTID, so no delivery is
        counted), so that a consumer still busy with them after claim_idle_ms keeps them instead of another taking
        them over. Only entries idle less than half that are touched: one idle longer may be another's by now.
        Returns how many were kept."""
        pending = self.client.xpending_range(
            self.stream, self.group, min="-", max="+", count=HOLD_MAX_ENTRIES, consumername=self.consumer
        )
        ids = [p["message_id"] for p in pending if int(p["time_since_delivered"]) < self.claim_idle_ms // 2]
        if ids:
            self.client.xclaim(self.stream, self.group, self.consumer, min_idle_time=0, message_ids=ids, justid=True)
        return len(ids)

    @raises_unavailable
    def pending_count(self) -> int:
        return int(self.client.xpending(self.stream, self.group)["pending"])

    def _reclaim(self, count: int) -> list[StreamEntry]:
        pending = self.client.xpending_range(
            self.stream, self.group, min="-", max="+", count=count, idle=self.claim_idle_ms
        )
        if not pending:
            return []
        delivered = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        # XCLAIM with min_idle_time re-checks the idle time, so two consumers never both win an entry.
        claimed = self.client.xclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms, message_ids=list(delivered)
        )
        entries = []
        for entry_id, fields in claimed:
            entry_id = _text(entry_id)
            deliveries = delivered.get(entry_id, 0) + 1
            if fields is None:  # trimmed or deleted from the stream while pending
                self.client.xack(self.stream, self.group, entry_id)
                continue
            if deliveries > self.delivery_limit:
                self.dead_letter(
                    entry_id,
                    fields.get(PAYLOAD_FIELD, b""),
                    f"delivered {deliveries} times without being acknowledged (delivery_limit="
                    f"{self.delivery_limit}); its consumers probably crash on it",
                    deliveries,
                )
                continue
            entries.extend(self._accept([(entry_id, fields)], deliveries))
        return entries

    def _accept(self, messages: list[tuple[Any, dict]], deliveries: int) -> list[StreamEntry]:
        accepted = []
        for entry_id, fields in messages:
            entry_id = _text(entry_id)
            payload = fields.get(PAYLOAD_FIELD) if fields else None
            if payload is None:
                keys = sorted(_text(k) for k in (fields or {}))
                self.dead_letter(entry_id, b"", f"not a gkd-async entry: fields {keys}, expected ['d']", deliveries)
                continue
            accepted.append(StreamEntry(self.stream, entry_id, payload, deliveries))
        return accepted


def _entry_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def trim_acknowledged(client: redis.Redis, stream: str, url: str = "redis") -> int:
    """Delete the entries of `stream` that every consumer group has acknowledged; returns how many.

    The bound for each group is its oldest pending entry, or the entry after the last one it was given;
    nothing at or after the smallest bound is touched, so no unread or pending entry is ever lost. A
    stream without consumer groups is left alone (nobody has read it yet).
    """
    with unavailable_as_error(url):
        groups = client.xinfo_groups(stream) if client.exists(stream) else []
        if not groups:
            return 0
        bounds = []
        for group in groups:
            pending = client.xpending(stream, group["name"])
            if pending["pending"]:
                bounds.append(_entry_id(_text(pending["min"])))
            else:
                ms, seq = _entry_id(_text(group["last-delivered-id"]))
                bounds.append((ms, seq + 1))
        ms, seq = min(bounds)
        return int(client.xtrim(stream, minid=f"{ms}-{seq}", approximate=False))


class Heartbeats:
    """Liveness of every consumer of a run: one JSON value per consumer in a Redis hash."""

    def __init__(self, client: redis.Redis, key: str, url: str = "redis") -> None:
        self.client, self.key, self.url = client, key, url

    @raises_unavailable
    def beat(self, consumer: str, role: str, **info: Any) -> None:
        value = {"role": role, "ts": time.time(), "pid": os.getpid(), "host": socket.gethostname(), **info}
        self.client.hset(self.key, consumer, json.dumps(value))

    @raises_unavailable
    def remove(self, consumer: str) -> None:
        self.client.hdel(self.key, consumer)

    @raises_unavailable
    def all(self) -> dict[str, dict[str, Any]]:
        beats = {}
        for consumer, value in self.client.hgetall(self.key).items():
            try:
                beats[_text(consumer)] = json.loads(value)
            except ValueError:
                continue
        return beats

    def alive(self, role: str, within_s: float) -> list[str]:
        now = time.time()
        return [c for c, v in self.all().items() if v.get("role") == role and now - float(v.get("ts", 0)) <= within_s]


class ProcessMemory:
    """Each stage's process and the peak resident memory it has reached, one JSON value per stage in a Redis hash
    (kept after the stage leaves): what `gkd-async run` sets beside its memory ledger at the end."""

    def __init__(self, client: redis.Redis, key: str, url: str = "redis") -> None:
        self.client, self.key, self.url = client, key, url

    @raises_unavailable
    def report(self, consumer: str, role: str) -> None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts kilobytes
        value = {"role": role, "process": f"{socket.gethostname()}:{os.getpid()}", "peak_rss": peak}
        self.client.hset(self.key, consumer, json.dumps(value))

    @raises_unavailable
    def by_process(self) -> dict[str, dict[str, Any]]:
        """host:pid -> {"roles": the roles of its stages, "peak_rss": the largest peak it reported}."""
        out: dict[str, dict[str, Any]] = {}
        for value in self.client.hvals(self.key):
            try:
                entry = json.loads(value)
                process, role, peak = str(entry["process"]), str(entry["role"]), int(entry["peak_rss"])
            except (ValueError, KeyError, TypeError):
                continue
            seen = out.setdefault(process, {"roles": [], "peak_rss": 0})
            if role not in seen["roles"]:
                seen["roles"].append(role)
            seen["peak_rss"] = max(seen["peak_rss"], peak)
        return out
