"""How the launcher places stage actors on GPUs (Ray hides GPUs from actors that ask for none) and joins
an existing Ray cluster."""

import os
import socket
import subprocess
import sys
import time

import pytest

from workers.launch.base import STAGE_ENV
from workers.launch.ray_actors import gpu_share


@pytest.mark.parametrize(("gpus", "actors"), [(1, 3), (1, 4), (2, 3), (8, 3), (3, 7)])
def test_every_actor_gets_a_share_that_fits(gpus, actors):
    share = gpu_share(gpus, actors)
    assert 0 < share <= 1
    assert share * actors <= gpus + 1e-9
    assert share == 1 or share * actors > gpus - actors * 1e-4  # nothing left idle beyond rounding


def test_no_gpus_means_cpu_actors():
    assert gpu_share(0, 3) == 0


def test_stage_processes_of_a_private_ray_get_one_torch_thread(ray_session):
    """The private Ray passes the stage variables by inheritance (not a runtime_env, which costs a second
    of actor start-up)."""
    import ray

    @ray.remote(num_cpus=0)
    def environment():
        return {name: os.environ.get(name) for name in STAGE_ENV}

    assert ray.get(environment.remote()) == STAGE_ENV


def test_an_unreachable_ray_cluster_is_a_clear_error_at_once(tmp_path):
    """Ray itself retries an unreachable head for minutes; `gkd-async run` says what is wrong in seconds."""
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", f"ray.address=127.0.0.1:{port}", f"logging.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"cannot join the Ray cluster at 127.0.0.1:{port} (from ray.address" in done.stderr
    assert "nothing answers" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_run_joins_an_existing_ray_cluster(ray_session, tmp_path):
    """`gkd-async run ray.address=...` in another process puts its stages on the cluster this test runs
    (they appear there as named actors while it runs) instead of starting a Ray of its own, and leaves the
    cluster up."""
    import ray

    from workers.common import ACTOR_NAMESPACE

    address = ray.get_runtime_context().gcs_address
    cli = [sys.executable, "-m", "cli.main", "run", f"ray.address={address}", "pipeline.run_id=joined"]
    small = ["trainer.total_steps=4", "trainer.train_batch_size=2", "rollout.max_new_tokens=8"]
    log = tmp_path / "run.log"
    with log.open("w") as out:  # a file, not a pipe: nobody drains a pipe while the loop polls
        run = subprocess.Popen(
            [*cli, *small, f"logging.dir={tmp_path}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        seen: set[str] = set()
        while run.poll() is None:
            actors = ray.util.list_named_actors(all_namespaces=True)
            seen |= {a["name"] for a in actors if a["namespace"] == ACTOR_NAMESPACE}
            time.sleep(0.2)
    assert run.returncode == 0, log.read_text()[-2000:]
    assert {"joined/rollout-0", "joined/teacher-0", "joined/learner-0"} <= seen
    assert ray.is_initialized() and ray.cluster_resources().get("CPU")


def test_stage_requests_and_whether_a_node_can_hold_them():
    from gkd_async.config.pipeline import StageResources
    from workers.launch.ray_actors import stage_request, unplaceable

    assert stage_request(StageResources(), 0) == {}
    assert stage_request(StageResources(), 0.5) == {"GPU": 0.5}  # unset GPUs: the equal share
    request = stage_request(StageResources(num_cpus=2, num_gpus=1, resources={"teacher_node": 1}), 0.5)
    assert request == {"CPU": 2, "GPU": 1, "teacher_node": 1}
    nodes = [{"CPU": 8, "GPU": 0}, {"CPU": 1, "GPU": 4, "teacher_node": 1}]
    # CPUs on one node, the GPU and the custom resource on the other: no single node holds the actor
    assert "the most any node has: CPU 8, GPU 4, teacher_node 1" in unplaceable(request, nodes)
    assert unplaceable(request, [*nodes, {"CPU": 2, "GPU": 1, "teacher_node": 2}]) is None


def test_a_stage_the_cluster_cannot_hold_is_refused_before_anything_starts(ray_session, tmp_path):
    """Ray would leave such an actor pending forever; the run says which stage asked for what."""
    from gkd_async.config.loading import load_config
    from workers.launch.ray_actors import StagePlacementError
    from workers.launch.run import run_pipeline

    cfg = load_config(None, ["ray.teacher.resources={teacher_node: 1}", f"logging.dir={tmp_path}"])
    with pytest.raises(
        StagePlacementError, match=r"the teacher scorers cannot be placed: each asks for teacher_node 1"
    ):
        run_pipeline(cfg)
    cfg = load_config(None, ["ray.learner.num_cpus=64", f"logging.dir={tmp_path}"])
    with pytest.raises(StagePlacementError, match=r"learner ranks .* CPU 64 \(ray.learner.\*\).*the most any node has"):
        run_pipeline(cfg)


def test_learner_ranks_that_cannot_be_reserved_together_are_refused(ray_session, names):
    """Each rank fits on the node, all of them at once do not: a clear error, and no reservation left."""
    import ray

    from workers.launch.ray_actors import StagePlacementError, learner_placement_group

    assert learner_placement_group(names.run_id, {"CPU": 1}, 1) is None  # one rank: nothing to reserve
    assert learner_placement_group(names.run_id, {}, 4) is None  # Ray refuses empty bundles
    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(StagePlacementError, match=r"the 3 learner ranks cannot be placed together: each asks for CPU"):
        learner_placement_group(names.run_id, {"CPU": cpus / 2}, 3, timeout_s=3)
    groups = [g for g in ray.util.placement_group_table().values() if g["name"] == f"{names.run_id}/learner"]
    assert groups and all(g["state"] == "REMOVED" for g in groups)


def test_a_private_rays_object_store_holds_the_ray_transports_versions_of_a_real_student():
    """pipeline.weight_transport=ray keeps the two newest student versions and puts a third in the object store:
    at 0.5B in float32, 2 GB each, where the tiny models' 200 MB store would spill every version to disk."""
    from gkd_async.config.loading import load_config
    from workers.launch.ray_actors import PRIVATE_STORE_BYTES, private_object_store_bytes

    assert private_object_store_bytes(load_config(None, [])) == PRIVATE_STORE_BYTES  # the redis transport
    student = "model.student=random:qwen2.5-0.5b"
    fp32 = private_object_store_bytes(load_config(None, [student, "pipeline.weight_transport=ray"]))
    bf16 = private_object_store_bytes(
        load_config(None, [student, "pipeline.weight_transport=ray", "model.dtype=bfloat16"])
    )
    params = 494_032_768  # Qwen2.5-0.5B, its tied embedding counted once
    assert fp32 == PRIVATE_STORE_BYTES + 3 * 4 * params
    assert bf16 == PRIVATE_STORE_BYTES + 3 * 2 * params
