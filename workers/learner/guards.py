"""What stops a learner that cannot make progress: too many non-finite steps in a row, or no stage alive to
feed it."""

from __future__ import annotations

from gkd_async.config.plan import RunPlan
from gkd_async.errors import GKDError
from gkd_async.transport.streams import Heartbeats
from workers.common import RunContext, RunFailedError, teacher_role


class TeacherUnavailableError(GKDError):
    """No teacher scorer (or rollout worker) is alive, so no scored batch can arrive."""


class NonFiniteGuard:
    """A step whose loss or gradient norm is not finite is skipped (train.step.StepAccumulator); this counts them
    and fails the run after `limit` in a row. Every rank sees the same statistics, so every rank decides alike."""

    def __init__(self, limit: int, skipped: int = 0) -> None:
        self.limit, self.in_a_row, self.skipped = limit, 0, skipped

    def check(self, stats: dict[str, float], step: int) -> None:
        """Count the step `step` whose statistics are `stats`; adds `actor/skipped_steps` to them."""
        if stats.get("actor/skipped_nonfinite", 0.0) > 0:
            self.in_a_row += 1
            self.skipped += 1
            if self.in_a_row >= self.limit:
                raise RunFailedError(
                    f"the loss or gradient norm was not finite in {self.limit} steps in a row (the last at step "
                    f"{step}), each skipped without an update; lower trainer.lr, check the data and "
                    "rewards, or raise trainer.max_nonfinite_steps"
                )
        else:
            self.in_a_row = 0
        stats["actor/skipped_steps"] = float(self.skipped)


class StageWatchdog:
    """Fails the run, with the command that starts one, when no worker of a stage the learner waits on has sent
    a heartbeat within pipeline.teacher_timeout_s."""

    def __init__(self, ctx: RunContext, plan: RunPlan) -> None:
        self.ctx = ctx
        self.timeout = ctx.config.pipeline.teacher_timeout_s
        self.beats = Heartbeats(ctx.client, ctx.names.heartbeats, ctx.shown_url)
        self.roles = [("rollout", "rollout worker", "rollout")]
        if plan.teachers_score:  # a scored data set needs no scorer
            self.roles[:0] = [
                (
                    teacher_role(t),
                    "teacher scorer" + (f" of teacher {t}" if t else ""),
                    "teacher" + (f" --teacher {t}" if t else ""),
                )
                for t in plan.teacher_roles
            ]

    def check(self) -> None:
        ctx = self.ctx
        for role, what, command in self.roles:
            if not self.beats.alive(role, self.timeout):
                raise TeacherUnavailableError(
                    f"{'Rollout' if role == 'rollout' else 'Teacher'} request failed: no {what} "
                    f"has sent a heartbeat for {self.timeout:.0f}s on Redis {ctx.shown_url} (run {ctx.run_id}), "
                    f"so no scored batch can arrive. Start one with: gkd-async worker {command} --config "
                    f"{ctx.run_dir / 'config.yaml'} --redis-url URL --run-id {ctx.run_id}  (the full URL is in "
                    f"{ctx.run_dir / 'redis_url'}; pipeline.teacher_timeout_s sets this timeout)"
                )
