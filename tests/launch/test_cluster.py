"""A run across several Ray nodes on this one machine (`ray.cluster_utils.Cluster`): each stage pinned to
its nodes by custom resources, each node with a model cache and temp directory of its own, the weights
through Redis, and a node removed mid-run whose rollout worker's pending prompts are taken over by the
worker on another node."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis

from gkd_async.transport.streams import StreamNames
from workers.launch.base import read_progress
from workers.launch.ray_actors import PRIVATE_RAY_ENV, loopback_ray_start

pytestmark = pytest.mark.slow
STEPS, BATCH, N = 120, 2, 2  # long enough to catch a worker with prompts in hand (0.04 s a step)


def node_env(root: Path, name: str) -> dict[str, str]:
    """What makes a node's processes see a disk of their own: their model cache and temp directory."""
    (root / name / "tmp").mkdir(parents=True)
    return {"GKD_ASYNC_CACHE": str(root / name / "cache"), "TMPDIR": str(root / name / "tmp")}


def pending_on(node, client, stream: str) -> list[str]:
    """Entry ids pending for consumers whose process runs on `node` (consumer names end with the pid)."""
    pids = set()
    for _, process in node.live_processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            pids |= {child.pid for child in psutil.Process(process.pid).children(recursive=True)}
    try:
        pending = client.xpending_range(stream, "rollout", min="-", max="+", count=100)
    except redis.ResponseError:  # no stream or group yet
        return []
    return [p["message_id"].decode() for p in pending if int(p["consumer"].decode().rsplit("-", 1)[-1]) in pids]


@pytest.mark.timeout(900)
def test_a_run_across_nodes_loses_nothing_when_a_node_goes(redis_server, redis_client, names, tmp_path):
    from ray.cluster_utils import Cluster

    nodes = tmp_path / "nodes"
    prompts = StreamNames(names.run_id).prompts
    # Every node on loopback, and the driver too (PRIVATE_RAY_ENV): a driver must find a node of its own IP, and
    # this process may hold the suite's private Ray, whose node IP is 127.0.0.1, whatever this machine's is.
    with loopback_ray_start():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's: holds no stage
    try:
        with loopback_ray_start():
            doomed = cluster.add_node(num_cpus=1, resources={"rollout_node": 1}, env_vars=node_env(nodes, "a"))
            cluster.add_node(
                num_cpus=1, resources={"rollout_node": 1, "teacher_node": 1}, env_vars=node_env(nodes, "b")
            )
            cluster.add_node(num_cpus=1, resources={"learner_node": 1}, env_vars=node_env(nodes, "c"))
        cluster.wait_for_nodes()
        overrides = [
            f"ray.address={cluster.address}",
            # the password in a variable the driver alone has: the nodes were started without it
            "pipeline.redis_url=" + redis_server.url.replace(redis_server.password, "${GKD_CLUSTER_TEST_PASSWORD}"),
            f"pipeline.run_id={names.run_id}",
            "pipeline.num_rollout_workers=2",
            "ray.rollout.resources={rollout_node: 1}",  # one worker on node a, one on node b
            "ray.teacher.resources={teacher_node: 1}",
            "ray.learner.resources={learner_node: 1}",
            "pipeline.claim_timeout_s=3",  # a dead worker's pending prompts go to the other after 3 s idle
            "pipeline.read_block_ms=200",
            "pipeline.heartbeat_interval_s=0.5",
            f"trainer.total_steps={STEPS}",
            f"trainer.train_batch_size={BATCH}",
            f"rollout.n={N}",
            "rollout.max_new_tokens=8",
            "gkd.teacher_topk=32",
            "trainer.lr=3e-3",
            "logging.tensorboard=false",
            f"logging.dir={tmp_path / 'runs'}",
        ]
        log = tmp_path / "run.log"
        with log.open("w") as out:
            run = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "run", *overrides],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "OMP_NUM_THREADS": "1",
                    "GKD_ASYNC_CACHE": str(nodes / "driver"),
                    "GKD_CLUSTER_TEST_PASSWORD": redis_server.password,
                    **PRIVATE_RAY_ENV,
                },
            )
            deadline = time.monotonic() + 600
            held: list[str] = []  # prompt entries the worker on the doomed node has read and not acknowledged
            while read_progress(redis_client, names).get("training/global_step", 0) < 3 or not held:
                assert run.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the run made no progress"
                held = pending_on(doomed, redis_client, prompts)
                time.sleep(0.01)
            step_at_removal = read_progress(redis_client, names)["training/global_step"]
            cluster.remove_node(doomed)  # its rollout worker dies with it, prompts in hand
            run.wait(timeout=600)
        assert run.returncode == 0, log.read_text()[-3000:]
    finally:
        cluster.shutdown()

    assert step_at_removal < STEPS  # the node went while the run was training
    (run_dir,) = (tmp_path / "runs").iterdir()
    trained = [
        sid
        for line in (run_dir / "trained_samples.jsonl").read_text().splitlines()
        for sid in json.loads(line)["sample_ids"]
    ]
    assert len(trained) == len(set(trained)) == STEPS * BATCH * N  # every sample once: none lost, none twice
    assert not (run_dir / "weights").exists()  # the weights went through Redis
    for node, models in (("a", {"student"}), ("b", {"student", "teacher"}), ("c", {"student"})):
        built = {p.name.split("-")[0] for p in (nodes / node / "cache" / "models").iterdir()}
        assert models <= built, node  # each node loaded its models from its own disk
    assert "stage process died" in log.read_text()  # the launcher saw the worker go, and the run went on
    # What the dead worker held was delivered again, to the worker on the other node, and acknowledged.
    assert not redis_client.xpending_range(prompts, "rollout", min="-", max="+", count=100)
    assert held
