"""Where a step's groups come from. Rank 0 reads them through the intake and hands each chunk of newly
accepted groups to every rank at once (a broadcast whose header carries a typed `Chunk` status); the other
ranks receive the raw records and decode them with the validating codec. A feed also commits the step and
holds the intake's part of a checkpoint, so the loop never asks which rank it runs on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

from gkd_async.transport.records import ScoredRecord
from workers.common import Liveness, RunContext, RunFailedError
from workers.learner.guards import StageWatchdog
from workers.learner.intake import Accepted, Intake, IntakeSettings, decode_for_learner


class Chunk(IntEnum):
    """What rank 0 broadcasts with each chunk of a step's groups (an int in the header tensor)."""

    MORE = 0  # more chunks follow
    FAILED = 1  # rank 0 failed: every rank drops the step and stops
    HALT = 2  # a stop was asked for: every rank drops the step and returns
    LAST = 3  # the chunk completes the batch


class Halted(Exception):
    """A stop was requested: every rank drops the step, checkpoints and returns."""


@dataclass
class FedChunk:
    records: list[ScoredRecord]  # every rank's copy of the chunk's groups
    accepted: list[Accepted] = field(default_factory=list)  # rank 0's intake entries behind them


class ChunkWire:
    """The broadcast of one chunk's raw records from rank 0: header (status, count, bytes), lengths, bytes."""

    def __init__(self, world: int) -> None:
        self.world = world

    def send(self, payloads: list[bytes], status: Chunk) -> None:
        if self.world == 1:
            return
        self._header(status, len(payloads), sum(map(len, payloads)))
        if status in (Chunk.MORE, Chunk.LAST):
            dist.broadcast(torch.tensor([len(p) for p in payloads], dtype=torch.int64), src=0)
            dist.broadcast(torch.frombuffer(bytearray(b"".join(payloads)), dtype=torch.uint8), src=0)

    def receive(self) -> tuple[list[bytes], Chunk]:
        status, count, total = self._header(Chunk.MORE, 0, 0)
        if status not in (Chunk.MORE, Chunk.LAST):
            return [], status
        lengths = torch.zeros(count, dtype=torch.int64)
        data = torch.empty(total, dtype=torch.uint8)
        dist.broadcast(lengths, src=0)
        dist.broadcast(data, src=0)
        raw, out, offset = data.numpy().tobytes(), [], 0
        for length in lengths.tolist():
            out.append(raw[offset : offset + length])
            offset += length
        return out, status

    @staticmethod
    def _header(status: Chunk, count: int, total: int) -> tuple[Chunk, int, int]:
        header = torch.tensor([status, count, total], dtype=torch.int64)
        dist.broadcast(header, src=0)
        code, count, total = (int(x) for x in header)
        return Chunk(code), count, total


class LeaderFeed:
    """Rank 0: polls the intake until the batch is complete, handing out each chunk as soon as it has one
    (trainer.stream_batches), beating its heartbeat, and failing the run when no stage feeds it."""

    def __init__(
        self, ctx: RunContext, intake: Intake, liveness: Liveness, watchdog: StageWatchdog, wire: ChunkWire
    ) -> None:
        self.ctx, self.intake, self.liveness, self.watchdog, self.wire = ctx, intake, liveness, watchdog, wire
        self.batch_size = ctx.config.trainer.train_batch_size

    def chunks(self, step: int, published: int) -> Iterator[FedChunk]:
        batch: dict[str, Accepted] = {}  # every group accepted for this step
        handed: set[str] = set()
        status = Chunk.MORE
        while status is not Chunk.LAST:
            try:
                chunk = self._collect(step, published, batch, handed)
            except Halted:
                self.wire.send([], Chunk.HALT)
                raise
            except BaseException:
                self.wire.send([], Chunk.FAILED)
                raise
            status = Chunk.LAST if len(batch) >= self.batch_size else Chunk.MORE
            self.wire.send([a.payload for a in chunk], status)
            handed.update(a.record.rollout.group_id for a in chunk)
            yield FedChunk([a.record for a in chunk], chunk)

    def _collect(self, step: int, published: int, batch: dict[str, Accepted], handed: set[str]) -> list[Accepted]:
        """Poll until the batch holds groups not yet handed out (or is complete); returns those, in group order."""
        cfg = self.ctx.config
        last_progress = time.monotonic()
        while len(batch) < self.batch_size:
            self.liveness.beat(step=step)
            state = self.ctx.state()
            if state.stop_requested:
                raise Halted()
            if not state.is_running:
                raise RunFailedError(f"the run was stopped: {state}")
            read = self.intake.poll(step, published, cfg.trainer.total_steps, batch, cfg.pipeline.read_block_ms)
            if len(batch) > len(handed) and cfg.trainer.stream_batches:
                break
            if read:
                last_progress = time.monotonic()
            if time.monotonic() - last_progress > cfg.pipeline.teacher_timeout_s:
                self.watchdog.check()
                last_progress = time.monotonic()
        return [batch[g] for g in sorted(batch) if g not in handed]

    def commit(self, step: int, accepted: list[Accepted], skipped_nonfinite: bool) -> None:
        self.intake.commit(step, accepted, **({"skipped_nonfinite": True} if skipped_nonfinite else {}))

    def state(self) -> dict[str, Any]:
        return {"intake": self.intake.state()}

    def restore(self, state: dict[str, Any], step: int) -> None:
        if "intake" not in state:  # a checkpoint written before the intake had a state of its own
            state["intake"] = {"admission": {"cursor": state["cursor"]}, "counters": state["counters"]}
        self.intake.restore(state["intake"], step)
        self.liveness.log.info("resumed", step=step)

    @property
    def counters(self) -> dict[str, int]:
        return dict(self.intake.counters)


class FollowerFeed:
    """Ranks other than 0: the chunks rank 0 broadcasts, decoded here; nothing to commit or keep."""

    def __init__(self, settings: IntakeSettings, wire: ChunkWire) -> None:
        self.settings, self.wire = settings, wire
        self.counters: dict[str, int] = {}

    def chunks(self, step: int, published: int) -> Iterator[FedChunk]:
        status = Chunk.MORE
        while status is not Chunk.LAST:
            payloads, status = self.wire.receive()
            if status is Chunk.HALT:
                raise Halted()
            if status is Chunk.FAILED:
                raise RunFailedError("rank 0 of the learner stopped the run")
            yield FedChunk([decode_for_learner(p, self.settings) for p in payloads])

    def commit(self, step: int, accepted: list[Accepted], skipped_nonfinite: bool) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any], step: int) -> None:
        pass
