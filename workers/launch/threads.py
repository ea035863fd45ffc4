"""`pipeline.launcher=threads`: every stage of a run as a thread of the launcher's own process, without Ray.

The stages are the same workers and talk through the same Redis streams as under Ray; only where they run
differs. One process imports torch and transformers once and starts no Ray, so a short run on one machine
starts several seconds sooner (see benchmarks/bench_vs_trl.py). Torch releases the GIL in its kernels, so
the stages still overlap; with Python-heavy stages (tiny models) they contend for it, which is why Ray stays
the default for async runs and for anything across machines or with several learner ranks.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from gkd_async.errors import GKDError
from gkd_async.logs import get_logger
from gkd_async.run_state import RunState
from gkd_async.weight_sync.in_process import InProcessWeights
from workers.common import RunContext, RunFailedError, consumer_name
from workers.launch.base import STAGE_ENV, StageLauncher, make_worker, worker_stages


class StageThread(threading.Thread):
    """Builds one stage's worker and runs it, keeping its result or the error that ended it.

    Waited on through `finished`, not `join`: on Python 3.11 a KeyboardInterrupt (Ctrl-C, or SIGTERM as the
    launcher turns it) raised inside `join` marks a thread that is still running as stopped, and the stop
    that follows would not wait for the learner's checkpoint."""

    def __init__(self, role: str, index: int | str, build: Callable[[], Any]) -> None:
        super().__init__(name=f"gkd-{role}-{index}", daemon=True)  # a stage that hangs cannot hold the exit
        self.role, self.build = role, build
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.build().run()
        except BaseException as exc:  # kept for the launcher's thread to raise; the traceback goes to the log
            self.error = exc
            get_logger(role=self.role, stage=self.name).exception("stage failed")
        finally:
            self.finished.set()


class ThreadedPipeline(StageLauncher):
    """All stages of one run as threads of this process."""

    def __init__(self, ctx: RunContext) -> None:
        import torch

        self.ctx = ctx
        cfg = ctx.config
        for name, value in STAGE_ENV.items():
            os.environ.setdefault(name, value)
        torch.set_num_threads(1)  # one torch thread per stage, as in the stage processes under Ray
        ctx.setup_logging("stages")  # one file for the process: every line names its stage
        self.log = get_logger(run_id=ctx.run_id)

        def stage(role: str, index: int | str, teacher: str | None = None) -> Callable[[], Any]:
            # Each stage gets a context of its own (a Redis client is not shared between threads) and, being
            # one of several consumers in this process, a consumer name of its own.
            name = None if role == "learner" else f"{consumer_name(role)}-{index}"
            run = RunContext(cfg, ctx.redis_url, ctx.run_id, ctx.run_dir)
            return lambda: make_worker(role, run, teacher=teacher, name=name)

        self.workers = [StageThread(role, i, stage(role, i, teacher)) for role, i, teacher in worker_stages(cfg)]
        self.learner = StageThread("learner", 0, stage("learner", 0))
        for thread in [*self.workers, self.learner]:
            thread.start()

    def learner_done(self, timeout_s: float) -> bool:
        return self.learner.finished.wait(timeout_s)

    def learner_result(self) -> dict[str, Any]:
        if self.learner.error is not None:
            self._raise(self.learner)
        return self.learner.result

    def check_workers(self) -> None:
        for thread in list(self.workers):
            if thread.finished.is_set() and thread.error is not None:
                self.workers.remove(thread)  # reported once
                self.ctx.set_state(RunState.failed(f"{thread.role}: {thread.error}"))
                self._raise(thread)

    def shutdown(self, grace_s: float = 15.0) -> None:
        """End every stage: a stage still running after `grace_s` is left to end with the process (a thread
        cannot be killed); it finds the run stopped, or its Redis gone, at its next read."""
        self.ctx.fail_unless_ended("stopped by the launcher")
        for thread in [*self.workers, self.learner]:
            if not thread.finished.wait(grace_s):
                self.log.warning("stage thread still running at shutdown", stage=thread.name)
        InProcessWeights.release(self.ctx.names.weights)  # the newest version, if in_process weights held it

    def _raise(self, thread: StageThread) -> None:
        error = thread.error
        if isinstance(error, GKDError | KeyboardInterrupt):
            raise error
        raise RunFailedError(
            f"the {thread.role} stage failed: {type(error).__name__}: {error} "
            f"(its log is in {self.ctx.run_dir / 'logs'})"
        ) from error
