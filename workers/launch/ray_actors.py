"""The stages as Ray actors: joining or starting Ray, each stage's resources and placement, and `Pipeline`, the
launcher of `pipeline.launcher=ray`."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gkd_async.config.pipeline import StageResources
from gkd_async.config.schema import GKDConfig
from gkd_async.errors import GKDError, RayUnavailableError
from gkd_async.logs import get_logger
from gkd_async.process_settings import compact_malloc, private_files
from gkd_async.run_state import RunState
from gkd_async.transport.redis_client import resolve_url
from gkd_async.weight_sync.ray_objects import weight_hub
from workers.common import ACTOR_NAMESPACE, RunContext, RunFailedError
from workers.launch.base import STAGE_ENV, StageLauncher, make_worker, worker_stages


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
LOOPBACK = "127.0.0.1"
# A private Ray never leaves this machine, so none of its processes (GCS, raylet, object manager, the agents,
# every worker's gRPC server) should listen beyond loopback. Ray binds them to its node IP, and resolves a
# loopback node IP to the machine's routed address unless it runs as on macOS and Windows, where a Ray is one
# machine's alone: this variable asks for that. Every Ray process reads it when it imports Ray, so it is set while
# Ray starts them; this process has read it already, so its copy of the flag is set for the start too.
PRIVATE_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


PRIVATE_STORE_BYTES = 200 * 2**20  # what the stages' own objects need: their configs, results, small buckets


def private_object_store_bytes(config: GKDConfig) -> int:
    """A private Ray's object store for this run: 200 MB, and with pipeline.weight_transport=ray room for the
    student versions it holds at once (the two newest, and the one being put), at most 30% of this machine's
    memory (Ray's own default); past that, Ray spills to disk. A 0.5B float32 student takes 2 GB a version."""
    if config.pipeline.weight_transport != "ray":
        return PRIVATE_STORE_BYTES
    import torch

    from gkd_async.models.loading import meta_model

    model = meta_model(config.model.student, config.model.trust_remote_code)
    element = getattr(torch, config.model.dtype).itemsize
    version = sum(p.numel() for p in model.parameters()) * element  # parameters() counts a tied weight once
    return int(min(PRIVATE_STORE_BYTES + 3 * version, 0.3 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")))


@contextlib.contextmanager
def loopback_ray_start(extra_env: dict[str, str] | None = None) -> Iterator[None]:
    """While Ray processes that never leave this machine start: PRIVATE_RAY_ENV (and `extra_env`) in the
    environment they inherit, and this process's copy of Ray's flag set alike; both as they were afterwards. Every
    node started inside (a private Ray, or the nodes of a `ray.cluster_utils.Cluster`) takes 127.0.0.1."""
    from ray._private import ray_constants

    env = {**(extra_env or {}), **PRIVATE_RAY_ENV}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    cluster_flag, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_flag
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def init_ray(address: str | None = None, object_store_bytes: int = PRIVATE_STORE_BYTES) -> bool:
    """Join the Ray cluster at `address` (else $RAY_ADDRESS), or start a quiet private local Ray; True when
    this call connected (`stop_ray` then disconnects, leaving a joined cluster running). False when Ray is
    already up in this process.

    A private Ray's object store holds `object_store_bytes` (`private_object_store_bytes` of the run's config).
    Its session files go to a directory of its own (0700, unpredictable name), removed by
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
        # A cluster on this machine's loopback (another private Ray of ours) has no node of the routed address: this
        # driver must take 127.0.0.1 too, or it waits for ever for a node of its own IP.
        on_loopback = address.removeprefix("ray://").rpartition(":")[0].strip("[]") in ("127.0.0.1", "localhost", "::1")
        try:
            with loopback_ray_start() if on_loopback else contextlib.nullcontext():
                ray.init(address=address, **common)
        except Exception as exc:
            raise RayUnavailableError(f"{what}: {exc}. {how}") from None
        return True
    _ray_temp_dir = tempfile.mkdtemp(prefix="ray-gkd-")
    # A private Ray's processes inherit this process's environment: setting the stage variables here for the
    # start instead of as a runtime_env saves a second a run (3 actors: 0.5 s instead of 1.5 s).
    with loopback_ray_start(STAGE_ENV):
        ray.init(
            include_dashboard=False,
            object_store_memory=object_store_bytes,
            _temp_dir=_ray_temp_dir,
            _node_ip_address=LOOPBACK,
            **common,
        )
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


def stage_args(ctx: RunContext) -> tuple[dict, str, str, str]:
    """What every stage actor is built from, as plain data: the config, the Redis URL as resolved here (a
    `${NAME}` in it need not be set on the nodes: the stages get the value in their arguments, within the
    cluster; never on a command line, in a log or in config.yaml), the run id and directory."""
    return ctx.config.model_dump(mode="json"), resolve_url(ctx.url), ctx.run_id, str(ctx.run_dir)


def stage_actor(ctx: RunContext, role: str, index: int | str, request: dict[str, float], **placement: Any):
    """The actor of one stage with its resources (`stage_request`) and a name that says whose stage it is
    (`ray list actors` on a shared cluster): call `.remote(role, *stage_args(ctx), ...)` on it."""
    resources = dict(request)
    return _remote_stage_actor().options(
        num_cpus=resources.pop("CPU", 0),
        num_gpus=resources.pop("GPU", 0),
        resources=resources,
        name=f"{ctx.run_id}/{role}-{index}",
        namespace=ACTOR_NAMESPACE,
        **placement,
    )


@functools.cache
def _remote_stage_actor():
    import ray

    return ray.remote(max_restarts=0)(StageActor)


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
        common = stage_args(ctx)
        self.actors: dict[str, list] = {"rollout": [], "teacher": [], "learner": []}
        self.learner_group = learner_placement_group(ctx.run_id, requests["learner"], world)
        self.weight_hub = None
        if cfg.pipeline.weight_transport == "ray":
            self.weight_hub = weight_hub(f"{ctx.run_id}/weights", ACTOR_NAMESPACE)

        def named(role: str, index: int | str):
            placement = {}
            if role == "learner" and self.learner_group is not None:
                placement["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=self.learner_group, placement_group_bundle_index=index
                )
            return stage_actor(ctx, role, index, requests[role], **placement)

        for role, index, teacher in stages:
            self.actors[role].append(named(role, index).remote(role, *common, teacher=teacher))
        ctx.client.delete(ctx.names.rendezvous)  # rank 0 announces where it listens (learner/rendezvous.py)
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


def _cause(err) -> BaseException:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err
