"""The `collective` weight transport: learner rank 0 sends buckets straight to rollout workers over gloo pairs,
with workers in processes of their own that join late, die, and outlive a learner."""

import json
import signal
import time

import pytest
from safetensors.torch import load_file
from weight_workers import model_like, received, same, start_worker

from gkd_async.transport.redis_client import connect_redis
from gkd_async.weight_sync.collective import CollectiveWeights, allocate_bucket, describe_bucket


def test_a_described_bucket_allocates_the_same_names_dtypes_and_shapes():
    bucket = model_like(3)
    allocated = allocate_bucket(describe_bucket(bucket))
    assert list(allocated) == list(bucket)
    assert all(allocated[k].dtype == t.dtype and allocated[k].shape == t.shape for k, t in bucket.items())


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"w": ["float32", [2]]}, "the description is not a list"),
        ([["w", "float32"]], "is not a tensor's name, dtype and shape"),
        ([["w", "nn", [2]]], "is not a tensor's name, dtype and shape"),
        ([["w", "Tensor", [2]]], "is not a tensor's name, dtype and shape"),
        ([[3, "float32", [2]]], "is not a tensor's name, dtype and shape"),
        ([["w", "float32", [-1]]], "has the shape"),
        ([["w", "float32", [2.5]]], "has the shape"),
        ([["w", "float32", 4]], "has the shape"),
    ],
)
def test_a_bucket_description_that_is_not_ours_is_refused(meta, message):
    with pytest.raises(ValueError, match=message):
        allocate_bucket(json.dumps(meta).encode())


def test_versions_reach_every_worker_including_late_ones_and_survive_a_dead_worker_and_a_new_learner(
    redis_server, names, tmp_path
):
    client = connect_redis(redis_server.url)
    learner = CollectiveWeights(client, names.weights, bucket_mb=1 / 1024)
    workers = {"a": start_worker(redis_server, names.weights, tmp_path / "a")}
    try:
        learner.publish(model_like(1), 1)  # before any worker connected: kept for them
        assert same(received(tmp_path / "a", 1), model_like(1))
        learner.publish(iter(model_like(2).items()), 2)  # streamed pairs, as the learner publishes
        assert same(received(tmp_path / "a", 2), model_like(2))
        assert json.loads(client.get(names.weights)) == {
            "version": 2,
            "transport": "collective",
            "bytes": sum(t.numel() * t.element_size() for t in model_like(2).values()),
            "workers": 1,
        }

        workers["b"] = start_worker(redis_server, names.weights, tmp_path / "b")
        assert same(received(tmp_path / "b", 2), model_like(2))  # a late worker gets the newest at once
        assert not (tmp_path / "b" / "v1.safetensors").exists()

        workers["a"].send_signal(signal.SIGKILL)
        workers["a"].wait()
        start = time.monotonic()
        learner.publish(model_like(3), 3)
        assert time.monotonic() - start < 30  # a dead worker costs a failed send, not the timeout
        assert same(received(tmp_path / "b", 3), model_like(3))
        assert json.loads(client.get(names.weights))["workers"] == 1
        assert not (tmp_path / "a" / "v3.safetensors").exists()

        learner.close()  # a learner restarted from a checkpoint: a new rank 0, a version published again
        resumed = CollectiveWeights(client, names.weights, bucket_mb=1 / 1024)
        resumed.publish(model_like(20), 2)
        deadline = time.monotonic() + 60
        while not same(load_file(str(tmp_path / "b" / "v2.safetensors")), model_like(20)):
            assert time.monotonic() < deadline, "the worker never took the resumed learner's version"
            time.sleep(0.1)
        resumed.close()
    finally:
        for worker in workers.values():
            worker.kill()
            worker.wait()


def test_rank_0_announces_an_address_other_machines_reach_even_when_its_host_name_is_loopback(monkeypatch):
    """/etc/hosts often maps the host name to 127.0.1.1: without Ray, the address announced for rank 0 is then
    the local end of the route to the run's Redis host, unless that Redis is on this machine too."""
    import ipaddress
    import socket

    import ray

    from gkd_async.transport.network import node_address

    resolve = socket.gethostbyname
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(
        socket, "gethostbyname", lambda name: "127.0.1.1" if name == socket.gethostname() else resolve(name)
    )
    assert node_address() == "127.0.1.1"
    assert node_address(toward="127.0.0.1") == "127.0.1.1"  # a run all on this machine
    assert node_address(toward="localhost") == "127.0.1.1"
    routed = node_address(toward="10.1.2.3")  # another machine: no packet is sent
    assert not ipaddress.ip_address(routed).is_loopback
    with socket.socket() as sock:
        sock.bind((routed, 0))  # succeeds only for an address of this machine
