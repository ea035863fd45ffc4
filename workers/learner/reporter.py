"""A step's metrics (the seed's names), its log line and the run's progress hash in Redis: rank 0's job.
Ranks other than 0 get a `NullReporter`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np

from gkd_async.config.plan import RunPlan
from gkd_async.data.cursor import PromptCursor
from gkd_async.train.metrics import MetricsWriter
from gkd_async.transport.records import ScoredRecord
from workers.common import Liveness, RunContext
from workers.learner.intake import Intake


@dataclass
class StepTimings:
    wait_s: float = 0.0  # waiting for scored groups (reading, broadcasting, decoding)
    train_s: float = 0.0  # forward, backward and the optimiser step
    publish_s: float = 0.0
    step_s: float = 0.0

    @property
    def other_s(self) -> float:
        """The rest of the step: committing its marks (trained samples, acknowledgements), admitting prompts."""
        return max(0.0, self.step_s - self.wait_s - self.train_s - self.publish_s)


class StepClock:
    """Times one step's phases."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.timings = StepTimings()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        assert name in {f.name for f in fields(StepTimings)}, name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.timings, name, getattr(self.timings, name) + time.perf_counter() - t0)

    def timed(self, items: Iterator, name: str) -> Iterator:
        """`items`, the time spent waiting for each counted under `name`."""
        while True:
            with self.phase(name):
                item = next(items, StopIteration)
            if item is StopIteration:
                return
            yield item

    def stop(self) -> StepTimings:
        self.timings.step_s = time.perf_counter() - self.started
        return self.timings


class StepReporter:
    def __init__(
        self, ctx: RunContext, plan: RunPlan, metrics: MetricsWriter, liveness: Liveness, intake: Intake,
        cursor: PromptCursor,
    ) -> None:  # fmt: skip
        self.ctx, self.plan, self.metrics, self.log = ctx, plan, metrics, liveness.log
        self.intake, self.cursor = intake, cursor
        self.pending_eval: dict[str, float] = {}
        self.step_times: list[float] = []

    def evaluated(self, step: int, scores: dict[str, float], before_training: bool) -> None:
        """Evaluation scores join the next step's line; those taken before the run's first step, a line of their own."""
        if before_training:
            self.metrics.log(step, {"training/global_step": step, **scores})
        else:
            self.pending_eval = scores

    def report(self, step: int, records: list[ScoredRecord], stats: dict[str, float], t: StepTimings) -> None:
        self.step_times.append(t.step_s)
        staleness = [step - 1 - r.rollout.policy_version if self.plan.on_policy else 0 for r in records]
        counters = self.intake.counters
        tokens = stats.pop("tokens")  # a count for perf/tokens_per_s, not a metric of its own
        metrics = {
            **stats,
            "training/global_step": step,
            "staleness/mean": float(np.mean(staleness)),
            "staleness/max": float(np.max(staleness)),
            "samples/dropped_stale": counters["dropped_stale"],
            "samples/reweighted_stale": counters["reweighted_stale"],
            "samples/trained": counters["trained_samples"],
            "samples/duplicates": counters["duplicates"],
            "samples/dead_letters": counters["dead_letters"],
            "samples/unadmitted": counters["unadmitted"],
            **self.queue_depths(),
            "timing/step_s": t.step_s,
            "timing/wait_s": t.wait_s,
            "timing/train_s": t.train_s,
            "timing/publish_s": t.publish_s,
            # the stages' seconds spent on this step's groups: each group carries its share of a batched call
            "timing/generate_s": sum(r.rollout.timing.get("generate_s", 0.0) for r in records),
            "timing/load_weights_s": sum(r.rollout.timing.get("load_weights_s", 0.0) for r in records),
            "timing/score_s": sum(r.timing.get("score_s", 0.0) for r in records),
            "timing/other_s": t.other_s,
            "perf/tokens_per_s": tokens / t.step_s,
            "perf/learner_wait_fraction": t.wait_s / t.step_s,
            "training/epoch": self.cursor.epoch,
        }
        rewards = [float(x) for r in records if r.rollout.rewards is not None for x in r.rollout.rewards]
        if rewards:
            metrics["reward/mean"] = float(np.mean(rewards))
            metrics["reward/std"] = float(np.std(rewards))
        metrics.update(self.pending_eval)
        self.pending_eval = {}
        self.metrics.log(step, metrics)
        self.log.info(
            "step",
            step=step,
            distill_loss=metrics.get("actor/distill_loss"),
            pg_loss=metrics.get("actor/pg_loss"),
            step_s=t.step_s,
            wait_s=t.wait_s,
        )
        self.ctx.client.hset(
            self.ctx.names.progress, mapping={"total_steps": self.ctx.config.trainer.total_steps, **metrics}
        )

    def queue_depths(self) -> dict[str, float]:
        """Entries waiting in each stream (unread or unacknowledged); rollouts summed over the teachers' streams,
        and each teacher's apart."""
        names = self.ctx.names
        depths = {"queue/prompts": self._depth(names.prompts), "queue/scored": self._depth(names.scored)}
        per_teacher = {t: self._depth(names.rollouts_for(t)) for t in names.teachers}
        depths["queue/rollouts"] = sum(per_teacher.values()) if per_teacher else self._depth(names.rollouts)
        depths.update({f"queue/rollouts/{t}": depth for t, depth in per_teacher.items()})
        return depths

    def _depth(self, stream: str) -> float:
        groups = self.ctx.client.xinfo_groups(stream) if self.ctx.client.exists(stream) else []
        return float(max((int(g.get("lag") or 0) + int(g.get("pending") or 0) for g in groups), default=0))

    @property
    def median_step_s(self) -> float | None:
        return float(np.median(self.step_times)) if self.step_times else None

    def close(self) -> None:
        self.metrics.close()


class NullReporter:
    median_step_s = None

    def evaluated(self, step: int, scores: dict[str, float], before_training: bool) -> None:
        pass

    def report(self, step: int, records: list[ScoredRecord], stats: dict[str, float], t: StepTimings) -> None:
        pass

    def close(self) -> None:
        pass
