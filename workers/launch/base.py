"""What every way of starting a run shares: its id, directory and Redis (`prepare_run`), the worker of each
stage (`make_worker`), which stages it starts (`worker_stages`), and the launcher interface the run command
waits on (`StageLauncher`)."""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from gkd_async.config.loading import dump_config
from gkd_async.config.plan import RunPlan
from gkd_async.config.schema import GKDConfig
from gkd_async.errors import GKDError
from gkd_async.preflight.checks import preflight
from gkd_async.run_state import RunState
from gkd_async.transport.inspection import parse_number
from gkd_async.transport.local_redis import LocalRedisServer
from gkd_async.transport.redis_client import connect_redis
from gkd_async.transport.streams import StreamNames
from workers.common import RunContext
from workers.launch.memory import plan_memory, write_ledger

ROLES = ("rollout", "teacher", "learner")
ProgressFn = Callable[[dict[str, Any]], None]


def new_run_id() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


class RunInterruptedError(GKDError):
    """The run was stopped by SIGINT or SIGTERM; the message says where and how to resume."""

    exit_code = 130


def prepare_run(config: GKDConfig) -> tuple[RunContext, LocalRedisServer | None]:
    """Check the config against local files and its memory ledger against this machine, then resolve the run
    id, directory and Redis (starting a private one when no URL is set)."""
    config = config.model_copy(deep=True)
    config.pipeline.run_id = config.pipeline.run_id or new_run_id()
    ledger = plan_memory(config, preflight(config))
    server = None
    url = config.pipeline.redis_url.get_secret_value() if config.pipeline.redis_url is not None else None
    if url is None:
        server = LocalRedisServer().start()
        url = server.url
    else:
        connect_redis(url).close()
    run_dir = Path(config.logging.dir) / config.pipeline.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    write_ledger(run_dir, ledger)
    url_file = run_dir / "redis_url"
    url_file.unlink(missing_ok=True)
    fd = os.open(url_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private from its first byte
    with os.fdopen(fd, "w") as handle:
        handle.write(url + "\n")
    ctx = RunContext(config, url, config.pipeline.run_id, run_dir)
    ctx.set_state(RunState.running())
    return ctx, server


def make_worker(
    role: str,
    ctx: RunContext,
    rank: int = 0,
    world_size: int = 1,
    init_method: str | None = None,
    teacher: str | None = None,
    name: str | None = None,
):
    """The worker of one stage; `name` (rollout and teacher) is its consumer name, unset: role-host-pid."""
    if role == "rollout" and ctx.config.rollout.source == "dataset":
        from workers.dataset_source import DatasetSource

        return DatasetSource(ctx, name)
    if role == "rollout":
        from workers.rollout import RolloutWorker

        return RolloutWorker(ctx, name)
    if role == "teacher":
        from workers.teacher import TeacherScorer

        return TeacherScorer(ctx, name, teacher=teacher)
    if role == "learner":
        from workers.learner.rank import LearnerRank

        return LearnerRank(ctx, rank, world_size, init_method)
    raise ValueError(f"unknown role {role!r}; one of {ROLES}")


STAGE_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # one torch thread per stage process


def worker_stages(cfg: GKDConfig) -> list[tuple[str, int | str, str | None]]:
    """The rollout and teacher stages a run starts, as (role, index, teacher): with model.teachers,
    pipeline.num_teacher_scorers scorers for each teacher (index TEACHER-i), and none when a scored data set
    stands in for the teacher."""
    stages: list[tuple[str, int | str, str | None]] = [
        ("rollout", i, None) for i in range(cfg.pipeline.num_rollout_workers)
    ]
    plan = RunPlan.of(cfg)
    if plan.teachers_score:
        for teacher in plan.teacher_roles:
            for i in range(cfg.pipeline.num_teacher_scorers):
                stages.append(("teacher", i if teacher is None else f"{teacher}-{i}", teacher))
    return stages


class StageLauncher:
    """The stages of one run, however they were started: `wait()` returns the learner's summary or raises
    the error that ended the run, `stop()` asks for a checkpoint and the end, `shutdown()` ends what is
    left. A launcher says how to wait for its learner and how to notice a stage that failed."""

    ctx: RunContext
    log: Any

    def learner_done(self, timeout_s: float) -> bool:
        """Whether the learner has returned, waiting at most `timeout_s` (its error may be raised here already,
        else by `learner_result`)."""
        raise NotImplementedError

    def learner_result(self) -> dict[str, Any]:
        raise NotImplementedError

    def check_workers(self) -> None:
        """Raise the error of a rollout or teacher stage that failed (a stage that died is left to the others)."""
        raise NotImplementedError

    def shutdown(self, grace_s: float = 15.0) -> None:
        raise NotImplementedError

    def wait(self, on_progress: ProgressFn | None = None, poll_s: float = 0.5) -> dict[str, Any]:
        while not self.learner_done(poll_s):
            self.check_workers()
            if on_progress is not None:
                on_progress(self.progress())
        summary = self.learner_result()
        if on_progress is not None:
            on_progress(self.progress())
        return summary

    def progress(self) -> dict[str, float]:
        return read_progress(self.ctx.client, self.ctx.names)

    def stop(self, grace_s: float = 120.0) -> dict[str, Any] | None:
        """Ask the learner to checkpoint and every stage to return; the learner's summary, or None when it
        did not return within `grace_s` (or a second interrupt came)."""
        self.ctx.set_state(RunState.stopping("interrupted"))
        self.log.info("stopping: the learner saves a checkpoint")
        try:
            if not self.learner_done(grace_s):
                return None
            return self.learner_result()
        except KeyboardInterrupt:
            return None


def read_progress(client, names: StreamNames) -> dict[str, float]:
    """The learner's latest metrics: finite numbers only (anyone on the run's Redis can write the hash)."""
    out = {}
    for key, value in client.hgetall(names.progress).items():
        number = parse_number(value)
        if isinstance(number, int | float) and math.isfinite(number):
            out[key.decode(errors="replace")] = float(number)
    return out
