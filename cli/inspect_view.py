"""`gkd-async inspect`'s tables: a run's streams, heartbeats and dead letters as terminal text, every value read
from Redis shown safely (`shown`)."""

from __future__ import annotations

import re

from rich.console import Console
from rich.markup import escape

CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shown(value: object) -> str:
    """A value read from Redis as terminal text: control characters (terminal escapes) dropped, rich markup
    escaped. Whoever can write the run's keys must not be able to write to the operator's terminal."""
    return escape(CONTROL_CHARACTERS.sub("", str(value)))


def render_inspection(_out: Console, snapshots: list[dict]) -> None:
    """What `gkd-async inspect` prints for each run: where it stands, its streams, heartbeats and dead letters."""
    from rich.table import Table

    if not snapshots:
        _out.print("no gkd-async runs in this Redis")

    def fmt(value, spec: str) -> str:
        return format(value, spec) if isinstance(value, int | float) else "-"

    def table(*columns: str) -> Table:
        out = Table()
        for column in columns:
            out.add_column(column, overflow="fold")  # full names, wrapped, never cut
        return out

    for snap in snapshots:
        progress = snap["progress"]
        step = progress.get("training/global_step")
        if step is None:
            where = "no step yet (starting: models loading, first batch in flight)"
        else:
            where = f"step {fmt(step, '.0f')}/{fmt(progress.get('total_steps'), '.0f')}"
        _out.print(
            f"[bold]run {shown(snap['run_id'])}[/]  state {shown(snap['state'])}  {where}  "
            f"trained samples {snap['trained_samples']}"
        )
        if step is not None:
            _out.print(
                f"  distill loss {fmt(progress.get('actor/distill_loss'), '.4f')}  "
                f"pg loss {fmt(progress.get('actor/pg_loss'), '.4f')}  "
                f"entropy {fmt(progress.get('actor/entropy'), '.3f')}  "
                f"learner waiting {fmt(progress.get('perf/learner_wait_fraction'), '.0%')}  "
                f"{fmt(progress.get('timing/step_s'), '.2f')} s/step  "
                f"dead letters {fmt(progress.get('samples/dead_letters'), '.0f')}"
            )
        table_ = table("stream", "length", "rate/s", "group", "lag", "pending", "oldest idle s", "consumers")
        for label, stream in snap["streams"].items():
            rate = "-" if stream.get("rate_per_s") is None else f"{stream['rate_per_s']:.1f}"
            if not stream["groups"]:
                table_.add_row(shown(label), str(stream["length"]), rate, "-", "-", "-", "-", "-")
            for group in stream["groups"]:
                consumers = ", ".join(f"{shown(c['name'])} ({c['pending']})" for c in group["consumers"])
                table_.add_row(
                    shown(label),
                    str(stream["length"]),
                    rate,
                    shown(group["name"]),
                    str(group["lag"]),
                    str(group["pending"]),
                    f"{group['oldest_pending_idle_ms'] / 1000:.1f}",
                    consumers,
                )
        _out.print(table_)
        beats = table("consumer", "role", "last heartbeat s ago", "pid", "host")
        for name, info in sorted(snap["heartbeats"].items()):
            if info.get("invalid"):
                beats.add_row(shown(name), "[red]invalid heartbeat[/]", "-", "-", shown(info["raw"]))
                continue
            beats.add_row(
                *(shown(v) for v in (name, info.get("role"), info["age_s"], info.get("pid"), info.get("host")))
            )
        _out.print(beats)
        if snap["dead_letters"]:
            dead = table("dead letter", "from", "group", "deliveries", "reason")
            for d in snap["dead_letters"]:
                dead.add_row(
                    shown(d["original_id"] or d["id"]), shown(d["from"]), shown(d["group_id"] or "-"),
                    shown(d["deliveries"]), shown(d["reason"]),
                )  # fmt: skip
            _out.print(dead)
