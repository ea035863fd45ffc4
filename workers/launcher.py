"""Starting a run: its Redis, its directory, and its stages as Ray actors (or one stage standalone)."""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from gkd_async.checkpoint import resolve_checkpoint
from gkd_async.config import GKDConfig, StageResources, dump_config
from gkd_async.errors import GKDError, RayUnavailableError
from gkd_async.inspection import parse_number
from gkd_async.local_redis import LocalRedisServer
from gkd_async.logs import get_logger
from gkd_async.plan import RunPlan
from gkd_async.preflight import preflight
from gkd_async.process_settings import compact_malloc, private_files
from gkd_async.redis_client import connect_redis, resolve_url
from gkd_async.run_state import RunState
from gkd_async.streams import StreamNames
from gkd_async.weights import weight_hub
from workers.common import ACTOR_NAMESPACE, RunContext, RunFailedError

ROLES = ("rollout", "teacher", "learner")
ProgressFn = Callable[[dict[str, Any]], None]


def new_run_id() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


class RunInterruptedError(GKDError):
    """The run was stopped by SIGINT or SIGTERM; the message says where and how to resume."""

    exit_code = 130


def prepare_run(config: GKDConfig) -> tuple[RunContext, LocalRedisServer | None]:
    """Check the config against local files, then resolve the run id, directory and Redis (starting a
    private one when no URL is set)."""
    config = config.model_copy(deep=True)
    config.pipeline.run_id = config.pipeline.run_id or new_run_id()
    preflight(config)
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
        from workers.learner import LearnerRank

        return LearnerRank(ctx, rank, world_size, init_method)
    raise ValueError(f"unknown role {role!r}; one of {ROLES}")


class StageActor:
    """One stage process under Ray. Built from plain data so that nothing of ours is pickled."""

    def __init__(
        self,
        role: str,
        config: dict,
        url: str,
        run_id: str,
        run_dir: str,
        rank: int = 0,
        world_size: int = 1,
        init_method: str | None = None,
        teacher: str | None = None,
    ) -> None:
        import torch

        compact_malloc()
        private_files()  # a Ray worker does not inherit the command's umask
        torch.set_num_threads(1)
        self.role, self.worker, self.error = role, None, None
        # An error while the stage starts is kept for run() to raise: Ray reports a failed constructor only
        # as a dead actor, with the stage's own message buried in a long traceback.
        try:
            ctx = RunContext(GKDConfig.model_validate(config), url, run_id, Path(run_dir))
            ctx.setup_logging(f"{role}-{rank}" if role == "learner" else role)
            self.worker = make_worker(role, ctx, rank, world_size, init_method, teacher)
        except Exception as exc:
            self.error = exc

    def pid(self) -> int:
        return os.getpid()

    def run(self) -> Any:
        try:
            if self.error is not None:
                raise self.error
            return self.worker.run()
        except BaseException:  # Ray hands the driver the exception; the traceback goes to the stage's log
            get_logger(role=self.role).exception("stage failed")
            raise


_ray_temp_dir: str | None = None


STAGE_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # one torch thread per stage process


def init_ray(address: str | None = None) -> bool:
    """Join the Ray cluster at `address` (else $RAY_ADDRESS), or start a quiet private local Ray; True when
    this call connected (`stop_ray` then disconnects, leaving a joined cluster running). False when Ray is
    already up in this process.

    A private Ray's session files go to a directory of its own (0700, unpredictable name), removed by
    `stop_ray`. Ray's sockets live there, so it must be a short path: not the run directory. A joined
    cluster keeps its own object store and session directory (Ray refuses both settings when joining).
    """
    import ray

    global _ray_temp_dir
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        common["runtime_env"] = {"env_vars": dict(STAGE_ENV)}
        what = f"cannot join the Ray cluster at {address} (from ray.address or $RAY_ADDRESS)"
        how = "Check that its head is running (`ray status --address ADDRESS`), or unset both for a private local Ray."
        problem = _unreachable(address)  # Ray itself retries an unreachable head for minutes
        if problem:
            raise RayUnavailableError(f"{what}: {problem} {how}")
        try:
            ray.init(address=address, **common)
        except Exception as exc:
            raise RayUnavailableError(f"{what}: {exc}. {how}") from None
        return True
    _ray_temp_dir = tempfile.mkdtemp(prefix="ray-gkd-")
    # A private Ray's processes inherit this process's environment: setting the stage variables here for the
    # start instead of as a runtime_env saves a second a run (3 actors: 0.5 s instead of 1.5 s).
    saved = {name: os.environ.get(name) for name in STAGE_ENV}
    os.environ.update(STAGE_ENV)
    try:
        ray.init(include_dashboard=False, object_store_memory=200 * 2**20, _temp_dir=_ray_temp_dir, **common)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return True


def _unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why nothing answers at a Ray address's HOST:PORT, or None ("auto" and the like are left to Ray)."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return f"nothing answers at {host}:{port} ({exc.strerror or exc})."
    return None


def stop_ray() -> None:
    """Shut down the Ray that `init_ray` started and remove its session files."""
    import ray

    global _ray_temp_dir
    ray.shutdown()
    if _ray_temp_dir is not None:
        shutil.rmtree(_ray_temp_dir, ignore_errors=True)
        _ray_temp_dir = None


def gpu_share(gpus: float, actors: int) -> float:
    """GPUs per stage actor: Ray hides the GPUs from an actor that asks for none, so every actor asks for an
    equal share, at most one GPU each (a fraction when several share one)."""
    if gpus <= 0 or actors == 0:
        return 0
    share = math.floor(min(1.0, gpus / actors) * 1e4) / 1e4  # Ray counts resources in steps of 1e-4
    return share if share < 1 else 1


STAGE_NAMES = {"rollout": "rollout workers", "teacher": "teacher scorers", "learner": "learner ranks"}


class StagePlacementError(GKDError):
    """A stage asks for more than any node of the Ray cluster has."""


def stage_request(stage: StageResources, gpu_default: float) -> dict[str, float]:
    """One actor's Ray resources: CPU, GPU (the equal share when unset) and the custom ones, zeros left out."""
    gpus = gpu_default if stage.num_gpus is None else stage.num_gpus
    request = {"CPU": stage.num_cpus, "GPU": gpus, **stage.resources}
    return {name: amount for name, amount in request.items() if amount}


def unplaceable(request: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """Why no node can hold one actor asking for `request` (each node's total resources), or None."""
    if any(all(node.get(name, 0) >= amount for name, amount in request.items()) for node in nodes):
        return None
    best = {name: max((node.get(name, 0) for node in nodes), default=0) for name in request}
    return f"no node of the Ray cluster has that much (the most any node has: {_shown(best)})"


def _shown(resources: dict[str, float]) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in resources.items()) or "nothing"


LEARNER_PLACEMENT_TIMEOUT_S = 120.0


def learner_placement_group(run_id: str, request: dict[str, float], world: int, timeout_s: float | None = None):
    """The learner ranks' reservation: one bundle per rank (each rank's request, e.g. one GPU), packed onto
    as few nodes as possible (NCCL within a node is faster than across). None for a single rank or an
    empty request (Ray refuses empty bundles; such ranks go anywhere). A cluster that cannot hold all the
    ranks at once within the time limit is a StagePlacementError, and the reservation is withdrawn."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if world < 2 or not request:
        return None
    group = placement_group([dict(request) for _ in range(world)], strategy="PACK", name=f"{run_id}/learner")
    ready, _ = ray.wait([group.ready()], timeout=LEARNER_PLACEMENT_TIMEOUT_S if timeout_s is None else timeout_s)
    if not ready:
        remove_placement_group(group)
        raise StagePlacementError(
            f"the {world} learner ranks cannot be placed together: each asks for {_shown(request)} (ray.learner.*) "
            "and the cluster could not hold all of them at once. Free or add resources, or lower "
            "pipeline.num_learner_ranks or ray.learner.*."
        )
    return group


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


class Pipeline(StageLauncher):
    """All stages of one run as Ray actors."""

    def __init__(self, ctx: RunContext) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ctx = ctx
        cfg = ctx.config
        stages = worker_stages(cfg)
        teachers = sum(role == "teacher" for role, _, _ in stages)
        world = cfg.pipeline.num_learner_ranks
        gpus = gpu_share(ray.cluster_resources().get("GPU", 0), cfg.pipeline.num_rollout_workers + teachers + world)
        requests = {role: stage_request(getattr(cfg.ray, role), gpus) for role in ("rollout", "teacher", "learner")}
        counts = {"rollout": cfg.pipeline.num_rollout_workers, "teacher": teachers, "learner": world}
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        for role, request in requests.items():
            problem = unplaceable(request, nodes) if counts[role] else None
            if problem:
                raise StagePlacementError(
                    f"the {STAGE_NAMES[role]} cannot be placed: each asks for {_shown(request)} (ray.{role}.*), "
                    f"but {problem}. Lower ray.{role}.num_cpus / num_gpus / resources, or add a node that has them."
                )
        # The URL as resolved here: a `${NAME}` in it need not be set on the nodes (the stages get the value in
        # their arguments, within the cluster; never on a command line, in a log or in config.yaml).
        common = (cfg.model_dump(mode="json"), resolve_url(ctx.url), ctx.run_id, str(ctx.run_dir))
        self.actors: dict[str, list] = {"rollout": [], "teacher": [], "learner": []}

        remote = ray.remote(max_restarts=0)(StageActor)
        self.learner_group = learner_placement_group(ctx.run_id, requests["learner"], world)
        self.weight_hub = None
        if cfg.pipeline.weight_transport == "ray":
            self.weight_hub = weight_hub(f"{ctx.run_id}/weights", ACTOR_NAMESPACE)

        def named(role: str, index: int | str):  # `ray list actors` on a shared cluster tells whose stage is whose
            request = dict(requests[role])
            placement = {}
            if role == "learner" and self.learner_group is not None:
                placement["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=self.learner_group, placement_group_bundle_index=index
                )
            return remote.options(
                num_cpus=request.pop("CPU", 0),
                num_gpus=request.pop("GPU", 0),
                resources=request,
                name=f"{ctx.run_id}/{role}-{index}",
                namespace=ACTOR_NAMESPACE,
                **placement,
            )

        for role, index, teacher in stages:
            self.actors[role].append(named(role, index).remote(role, *common, teacher=teacher))
        ctx.client.delete(ctx.names.rendezvous)  # rank 0 announces where it listens (learner.rendezvous)
        for rank in range(world):
            self.actors["learner"].append(named("learner", rank).remote("learner", *common, rank, world))
        self.worker_refs = {a.run.remote(): (role, a) for role in ("rollout", "teacher") for a in self.actors[role]}
        self.learner_refs = [a.run.remote() for a in self.actors["learner"]]
        self.learner_pending = list(self.learner_refs)
        self.log = get_logger(run_id=ctx.run_id)

    def pids(self, role: str) -> list[int]:
        import ray

        return ray.get([a.pid.remote() for a in self.actors[role]])

    def learner_done(self, timeout_s: float) -> bool:
        import ray

        pending = self.learner_pending
        done, self.learner_pending = ray.wait(pending, timeout=timeout_s, num_returns=len(pending))
        for ref in done:
            self._result(ref)  # raises the rank's error, if any
        return not self.learner_pending

    def learner_result(self) -> dict[str, Any]:
        return self._result(self.learner_refs[0])

    def check_workers(self) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        finished, _ = ray.wait(list(self.worker_refs), timeout=0, num_returns=len(self.worker_refs))
        for ref in finished:
            role, _actor = self.worker_refs.pop(ref)
            try:
                ray.get(ref)
            except RayTaskError as err:  # the stage raised: the run cannot go on
                self.ctx.set_state(RunState.failed(f"{role}: {_cause(err)}"))
                self._result_or_raise(err, role)
            except RayActorError:  # the process died: the others reclaim its entries
                self.log.warning("stage process died; its pending entries will be reclaimed", role=role)

    def _result(self, ref, role: str = "learner") -> Any:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(ref)
        except RayTaskError as err:
            self._result_or_raise(err, role)
        except RayActorError as err:
            raise RunFailedError(
                f"the {role} process died ({type(err).__name__}); its log is in {self.ctx.run_dir / 'logs'}"
            ) from None

    def _result_or_raise(self, err, role: str) -> None:
        cause = _cause(err)
        if isinstance(cause, GKDError):
            raise cause from None
        raise RunFailedError(
            f"the {role} stage failed: {type(cause).__name__}: {cause} (its log is in {self.ctx.run_dir / 'logs'})"
        ) from None

    def shutdown(self, grace_s: float = 15.0) -> None:
        import ray

        self.ctx.fail_unless_ended("stopped by the launcher")
        refs = list(self.worker_refs)
        if refs:
            ray.wait(refs, timeout=grace_s, num_returns=len(refs))
        for actors in self.actors.values():
            for actor in actors:
                ray.kill(actor)
        if self.weight_hub is not None:
            ray.kill(self.weight_hub)
        if self.learner_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.learner_group)


def read_progress(client, names: StreamNames) -> dict[str, float]:
    """The learner's latest metrics: finite numbers only (anyone on the run's Redis can write the hash)."""
    out = {}
    for key, value in client.hgetall(names.progress).items():
        number = parse_number(value)
        if isinstance(number, int | float) and math.isfinite(number):
            out[key.decode(errors="replace")] = float(number)
    return out


def _cause(err) -> BaseException:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


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
            started_ray = False if threads else init_ray(config.ray.address)
            with _sigterm_as_interrupt():  # after ray.init, which sets a SIGTERM handler of its own
                if threads:
                    from workers.stage_threads import ThreadedPipeline

                    pipeline = ThreadedPipeline(ctx)
                else:
                    pipeline = Pipeline(ctx)
                summary = pipeline.wait(on_progress)
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
