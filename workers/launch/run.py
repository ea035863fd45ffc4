"""The run commands: `gkd-async run` (prepare, pick a launcher, wait, stop on a signal, say how to resume)
and `gkd-async worker` (one stage in this process, joining a run)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gkd_async.config.loading import dump_config
from gkd_async.config.schema import GKDConfig
from gkd_async.errors import GKDError
from gkd_async.train.checkpoint import resolve_checkpoint
from workers.common import RunContext
from workers.launch.base import ProgressFn, RunInterruptedError, make_worker, prepare_run
from workers.launch.memory import report_memory
from workers.launch.ray_actors import Pipeline, init_ray, private_object_store_bytes, stop_ray


def run_pipeline(config: GKDConfig, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """`gkd-async run`: start everything the config needs, train to the end, stop what was started.

    SIGINT or SIGTERM stops the run cleanly: the learner saves a checkpoint, every process and server this
    call started is ended, and RunInterruptedError says how to resume. A run that fails after its first
    checkpoint says the same.
    """
    called_at = time.time()
    ctx, server = prepare_run(config)
    started_ray = False
    pipeline = None
    try:
        try:
            threads = config.pipeline.launcher == "threads"
            started_ray = False if threads else init_ray(config.ray.address, private_object_store_bytes(config))
            with _sigterm_as_interrupt():  # after ray.init, which sets a SIGTERM handler of its own
                if threads:
                    from workers.launch.threads import ThreadedPipeline

                    pipeline = ThreadedPipeline(ctx)
                else:
                    pipeline = Pipeline(ctx)
                summary = pipeline.wait(on_progress)
            summary["memory"] = report_memory(ctx)
        except KeyboardInterrupt:
            with _sigterm_as_interrupt():  # a second SIGINT or SIGTERM gives up waiting for the checkpoint
                summary = pipeline.stop() if pipeline is not None else None
            raise RunInterruptedError(_interrupted_message(ctx, summary, pipeline is not None)) from None
        # Start-up: until the learner could train (wall clocks of two processes, maybe two machines).
        startup = {"startup_s": summary["ready_at"] - called_at} if summary.get("ready_at") else {}
        return {"run_id": ctx.run_id, "run_dir": str(ctx.run_dir), **summary, **startup}
    except RunInterruptedError:
        raise
    except GKDError as err:
        hint = resume_hint(ctx.run_dir)
        if hint:
            err.args = (f"{err}\n{hint}",)
        raise
    finally:
        with _sigterm_as_interrupt(ignore=True):
            if pipeline is not None:
                pipeline.shutdown()
            if started_ray:
                stop_ray()
            if server is not None:
                server.stop()


def resume_hint(run_dir: Path) -> str | None:
    """'continue it with: gkd-async resume RUN_DIR' once the run has a checkpoint, else None."""
    try:
        resolve_checkpoint(run_dir / "checkpoints")
    except GKDError:
        return None
    return f"the run has a checkpoint: continue it with  gkd-async resume {run_dir}"


def _interrupted_message(ctx: RunContext, summary: dict[str, Any] | None, started: bool = True) -> str:
    hint = (
        resume_hint(ctx.run_dir)
        or f"no checkpoint was saved; start again with  gkd-async run {ctx.run_dir}/config.yaml"
    )
    if not started:
        return f"interrupted while the stages were being started, before any training. {hint}"
    if summary is None:
        return f"interrupted; the learner did not save a checkpoint in time. {hint}"
    return f"interrupted at step {summary['step']}, checkpoint saved; {hint}"


@contextlib.contextmanager
def _sigterm_as_interrupt(ignore: bool = False) -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (so the run stops as on Ctrl-C), or with `ignore` is held off while
    the run's processes are being ended. Only in the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    handler = signal.SIG_IGN if ignore else interrupt
    previous = signal.signal(signal.SIGTERM, handler)
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignore else None
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def run_standalone(
    role: str,
    config: GKDConfig,
    redis_url: str,
    run_id: str,
    rank: int = 0,
    world_size: int = 1,
    init_method: str | None = None,
    teacher: str | None = None,
) -> Any:
    """`gkd-async worker ROLE`: one stage in this process, against an existing run's Redis."""
    run_dir = Path(config.logging.dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    config = config.model_copy(deep=True)
    config.pipeline.run_id = run_id
    if role == "learner" and rank == 0 and not (run_dir / "config.yaml").exists():
        (run_dir / "config.yaml").write_text(dump_config(config))
    ctx = RunContext(config, redis_url, run_id, run_dir)
    ctx.setup_logging(role, console=False)
    worker = make_worker(role, ctx, rank, world_size, init_method, teacher)
    return worker.run()
