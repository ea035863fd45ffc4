"""Versioned weights, both transports: directories (file) and buckets in Redis (redis)."""

import json
import subprocess
import sys

import pytest
import torch
from ranks import join_group, leave_group, spawn_ranks
from safetensors.torch import load_file, save_file

from gkd_async.models.loading import load_model, tied_aliases, without_tied
from gkd_async.train.checkpoint import full_state_dict, iter_full_tensors
from gkd_async.train.fsdp import shard_model
from gkd_async.transport.redis_client import connect_redis
from gkd_async.weight_sync.files import WEIGHTS_FILE, WeightStore
from gkd_async.weight_sync.ray_objects import RayWeights
from gkd_async.weight_sync.redis_buckets import RedisWeights


def weights(value):
    return {"a.weight": torch.full((2, 3), float(value)), "b.bias": torch.arange(4.0) + value}


def test_each_version_is_a_directory_announced_in_redis(redis_client, names, tmp_path):
    store = WeightStore(redis_client, names.weights, tmp_path)
    path = store.publish(weights(1), 1)
    assert path.is_dir() and (path / WEIGHTS_FILE).is_file()
    assert store.latest() == (1, path.resolve())
    loaded = WeightStore.load(path)
    assert all(torch.equal(loaded[k], v) for k, v in weights(1).items())


def test_old_versions_go_by_publication_order_not_number(redis_client, names, tmp_path):
    """A learner resumed from an older checkpoint publishes lower versions: those must survive."""
    store = WeightStore(redis_client, names.weights, tmp_path, keep=2)
    for version in (1, 2, 3):
        store.publish(weights(version), version)
    assert sorted(p.name for p in tmp_path.glob("v*")) == ["v0000002", "v0000003"]
    resumed = store.publish(weights(10), 2)  # the same version number again, new weights
    store.publish(weights(11), 1)
    assert sorted(p.name for p in tmp_path.glob("v*")) == ["v0000001", "v0000002"]
    assert store.latest()[0] == 1
    assert torch.equal(WeightStore.load(resumed)["a.weight"], weights(10)["a.weight"])


def model_like(value):
    """Tensors of several sizes and dtypes, one larger than a bucket of 1 KiB."""
    return {
        "embed.weight": torch.full((40, 16), float(value)),  # 2.5 KiB
        "layer.0.weight": torch.arange(24.0).reshape(4, 6) + value,
        "layer.0.bias": torch.full((6,), -float(value), dtype=torch.bfloat16),
        "head.weight": torch.full((3, 5), float(value)),
    }


def same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("as_pairs", [False, True])
def test_redis_weights_round_trip_in_buckets(redis_client, names, as_pairs):
    store = RedisWeights(redis_client, names.weights, bucket_mb=1 / 1024)
    tensors = model_like(3)
    written = store.publish(iter(tensors.items()) if as_pairs else tensors, 5)
    assert store.latest() == (5, 5)
    assert same(store.read(5), tensors)
    buckets = int(redis_client.get(f"{names.weights}:v5"))
    assert buckets == 2  # the 2.5 KiB tensor fills a bucket alone; the rest share the second
    assert written == sum(len(redis_client.get(f"{names.weights}:v5:{i}")) for i in range(buckets))
    assert json.loads(redis_client.get(names.weights))["version"] == 5


def test_redis_weights_keep_the_newest_by_publication_order(redis_client, names):
    """As with directories: a resumed learner publishes lower versions again, and those must survive."""
    store = RedisWeights(redis_client, names.weights, bucket_mb=1 / 1024, keep=2)
    for version in (1, 2, 3):
        store.publish(model_like(version), version)
    assert store.read(1) is None and same(store.read(2), model_like(2))
    assert redis_client.keys(f"{names.weights}:v1*") == []  # no bucket left behind
    store.publish(model_like(10), 2)  # the same version number again, new weights
    store.publish(model_like(11), 1)
    assert store.read(3) is None and store.latest()[0] == 1
    assert same(store.read(2), model_like(10)) and same(store.read(1), model_like(11))
    assert sorted(int(v) for v in redis_client.lrange(f"{names.weights}:order", 0, -1)) == [1, 2]


def test_a_reader_sees_a_version_replaced_mid_read_as_gone(redis_client, names):
    store = RedisWeights(redis_client, names.weights, bucket_mb=1 / 1024)
    store.publish(model_like(1), 1)
    redis_client.delete(f"{names.weights}:v1:1")  # as if forgotten between two bucket reads
    assert store.read(1) is None


def gather_both_ways(rank, world, init_file, out_dir):
    """Each rank builds the tiny model after joining the group, as a learner rank on a fresh cache does."""
    join_group(rank, world, init_file)
    model = shard_model(load_model("tiny:student"), "float32", False)
    whole = full_state_dict(model)
    streamed = dict(iter_full_tensors(model))
    if rank == 0:
        save_file(whole, f"{out_dir}/whole.safetensors")
        save_file(streamed, f"{out_dir}/streamed.safetensors")
    leave_group(rank, init_file)


def test_streamed_gather_equals_the_full_state_dict_on_two_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("GKD_ASYNC_CACHE", str(tmp_path / "cache"))  # empty: the ranks build the model
    spawn_ranks(gather_both_ways, 2, str(tmp_path / "init"), str(tmp_path))
    whole, streamed = load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "streamed.safetensors"))
    model = load_model("tiny:student")
    # the tied output layer travels once, under the embedding's name, as save_pretrained writes it
    assert set(whole) - set(streamed) == {"lm_head.weight"} == set(tied_aliases(model))
    assert same(without_tied(whole, tied_aliases(model)), streamed)
    assert same(streamed, without_tied(model.state_dict(), tied_aliases(model)))  # unsharded, HF names, untouched


def test_ray_weights_travel_through_the_object_store_to_another_process(ray_session, redis_server, names):
    """The `ray` transport: buckets put by one process, read by a Ray task in another through the run's hub
    actor; the newest two versions by publication order, as with the other transports."""
    import ray

    hub = f"{names.run_id}/weights"
    store = RayWeights(connect_redis(redis_server.url), names.weights, hub, "gkd-async", bucket_mb=1 / 1024)
    for version in (1, 2, 3):
        store.publish(model_like(version), version)
    assert store.latest() == (3, 3) and store.read(1) is None
    store.publish(iter(model_like(10).items()), 2)  # a resumed learner: version 2 again, now the newest

    @ray.remote
    def read_elsewhere(url, key, hub, version):
        from gkd_async.transport.redis_client import connect_redis
        from gkd_async.weight_sync.ray_objects import RayWeights

        return RayWeights(connect_redis(url), key, hub, "gkd-async").read(version)

    assert same(ray.get(read_elsewhere.remote(redis_server.url, names.weights, hub, 2)), model_like(10))
    assert same(ray.get(read_elsewhere.remote(redis_server.url, names.weights, hub, 3)), model_like(3))
    assert store.latest() == (2, 2)


def test_the_ray_transport_outside_ray_is_a_clear_error(redis_server, names):
    code = (
        "from gkd_async.transport.redis_client import connect_redis\n"
        "from gkd_async.weight_sync.ray_objects import RayWeights\n"
        f"RayWeights(connect_redis({redis_server.url!r}), 'k', 'hub', 'gkd-async')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0 and "every stage must run inside the run's Ray cluster" in done.stderr
    assert "pipeline.weight_transport=redis" in done.stderr
