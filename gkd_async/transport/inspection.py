"""What `gkd-async inspect` shows: per run and stream its length, groups, pending entries, consumers,
heartbeats, dead letters and rates, read from Redis without changing anything."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from gkd_async.transport.streams import StreamNames


def _text(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def parse_number(value: Any) -> Any:
    """An int or float when the text is one (JSON readers get numbers, not strings); else the text."""
    text = _text(value)
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def list_runs(client: redis.Redis) -> list[str]:
    runs = set()
    for key in client.scan_iter(match="gkd:*", count=500):
        parts = _text(key).split(":")
        if len(parts) >= 4 and parts[-2] == "rollouts":  # gkd:<run>:rollouts:<teacher>
            runs.add(":".join(parts[1:-2]))
        elif len(parts) >= 3:
            runs.add(":".join(parts[1:-1]))
    return sorted(runs)


def run_teachers(client: redis.Redis, run_id: str) -> tuple[str, ...]:
    """The teachers of a run with model.teachers: each has a rollouts stream of its own."""
    prefix = StreamNames(run_id).rollouts + ":"
    return tuple(sorted(_text(key)[len(prefix) :] for key in client.scan_iter(match=f"{prefix}*", count=500)))


def run_snapshot(client: redis.Redis, run_id: str, dead_limit: int = 20) -> dict[str, Any]:
    names = StreamNames(run_id, run_teachers(client, run_id))
    now = time.time()
    rollouts = [(f"rollouts/{t}", names.rollouts_for(t)) for t in names.teachers] or [("rollouts", names.rollouts)]
    streams = {}
    for label, key in (("prompts", names.prompts), *rollouts, ("scored", names.scored), ("dead", names.dead)):
        streams[label] = _stream_snapshot(client, key)
    heartbeats = {}
    for consumer, value in client.hgetall(names.heartbeats).items():
        heartbeats[_text(consumer)] = _heartbeat(value, now)
    dead = []
    for entry_id, fields in client.xrevrange(names.dead, count=dead_limit):
        dead.append(
            {
                "id": _text(entry_id),
                "from": _text(fields.get(b"stream")),
                "original_id": _text(fields.get(b"id")),
                "group_id": _text(fields.get(b"group_id")),
                "deliveries": parse_number(fields.get(b"deliveries")),
                "reason": _text(fields.get(b"reason")),
                "bytes": parse_number(fields.get(b"payload_bytes", len(fields.get(b"d", b"")))),
            }
        )
    progress = {_text(k): parse_number(v) for k, v in client.hgetall(names.progress).items()}
    state = client.get(names.state)
    return {
        "run_id": run_id,
        # The launcher sets the state before any stage runs; until the learner's first step there is no progress.
        "state": _text(state) if state else "starting",
        "time": now,
        "streams": streams,
        "heartbeats": heartbeats,
        "dead_letters": dead,
        "progress": progress,
        "trained_samples": int(progress.get("samples/trained", 0)),
    }


def _heartbeat(value: bytes, now: float) -> dict[str, Any]:
    """A consumer's heartbeat as a stage writes it (a JSON object with a numeric `ts`); anything else written
    under the key is shown as invalid, never trusted or crashed on."""
    try:
        info = json.loads(value)
        info["age_s"] = round(now - float(info["ts"]), 1)
    except (ValueError, TypeError, KeyError, IndexError):  # not JSON, not an object, no numeric ts
        return {"invalid": True, "age_s": None, "raw": _text(value)[:80]}
    return info


def _stream_snapshot(client: redis.Redis, key: str) -> dict[str, Any]:
    if not client.exists(key):
        return {"length": 0, "entries_added": 0, "groups": []}
    info = client.xinfo_stream(key)
    groups = []
    for group in client.xinfo_groups(key):
        name = _text(group["name"])
        consumers = [
            {"name": _text(c["name"]), "pending": int(c["pending"]), "idle_ms": int(c["idle"])}
            for c in client.xinfo_consumers(key, name)
        ]
        oldest = client.xpending_range(key, name, min="-", max="+", count=1)
        groups.append(
            {
                "name": name,
                "pending": int(group["pending"]),
                "lag": int(group.get("lag") or 0),
                "oldest_pending_idle_ms": int(oldest[0]["time_since_delivered"]) if oldest else 0,
                "consumers": consumers,
            }
        )
    return {"length": int(info["length"]), "entries_added": int(info.get("entries-added", 0)), "groups": groups}


def add_rates(current: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """Entries per second added to each stream since `previous` (a snapshot of the same run)."""
    for label, stream in current["streams"].items():
        rate = None
        if previous is not None:
            elapsed = current["time"] - previous["time"]
            before = previous["streams"].get(label, {}).get("entries_added", 0)
            if elapsed > 0:
                rate = (stream["entries_added"] - before) / elapsed
        stream["rate_per_s"] = rate
    return current
