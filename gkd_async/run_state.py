"""The run's state, one Redis key every stage reads: typed here, written to Redis as the short text that
`gkd-async inspect` shows ('running', 'stopping: interrupted', 'failed: learner: ...', 'stopped at step 7',
'done'). Every stage runs while it is RUNNING; STOPPING asks the learner to checkpoint and every stage to
return; the other three are how a run ended."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Phase(Enum):
    RUNNING = "running"
    STOPPING = "stopping"  # asked to stop (detail: why); the learner checkpoints, every stage returns
    STOPPED = "stopped"  # stopped early, after a checkpoint (detail: the step)
    DONE = "done"  # every step trained
    FAILED = "failed"  # detail: which stage, and why


_STOPPED_AT = re.compile(r"stopped at step (\d+)")


@dataclass(frozen=True)
class RunState:
    phase: Phase
    detail: str = ""

    @classmethod
    def running(cls) -> RunState:
        return cls(Phase.RUNNING)

    @classmethod
    def stopping(cls, why: str) -> RunState:
        return cls(Phase.STOPPING, why)

    @classmethod
    def stopped_at(cls, step: int) -> RunState:
        return cls(Phase.STOPPED, str(step))

    @classmethod
    def done(cls) -> RunState:
        return cls(Phase.DONE)

    @classmethod
    def failed(cls, why: str) -> RunState:
        return cls(Phase.FAILED, why)

    @property
    def is_running(self) -> bool:
        return self.phase is Phase.RUNNING

    @property
    def stop_requested(self) -> bool:
        return self.phase is Phase.STOPPING

    @property
    def ended(self) -> bool:
        """Neither running nor stopping: how the run ended is settled."""
        return self.phase in (Phase.STOPPED, Phase.DONE, Phase.FAILED)

    def __str__(self) -> str:
        if self.phase is Phase.STOPPED:
            return f"stopped at step {self.detail}"
        return f"{self.phase.value}: {self.detail}" if self.detail else self.phase.value

    @classmethod
    def parse(cls, text: str) -> RunState:
        """The state `str` wrote; unset (None, '') is RUNNING, as the launcher sets it before any stage starts.
        Text of no known form (written by something else) reads as FAILED, so that every stage stops."""
        if not text:
            return cls.running()
        if match := _STOPPED_AT.fullmatch(text):
            return cls.stopped_at(int(match.group(1)))
        name, _, detail = text.partition(": ")
        for phase in (Phase.RUNNING, Phase.STOPPING, Phase.DONE, Phase.FAILED):
            if name == phase.value:
                return cls(phase, detail)
        return cls.failed(f"unknown run state {text[:200]!r}")
