"""Versioned weights, both transports: directories (file) and buckets in Redis (redis)."""

import json
import subprocess
import sys

import pytest
import torch
from ranks import join_group, leave_group, spawn_ranks
from safetensors.torch import load, load_file, save_file

from gkd_async.errors import GKDError
from gkd_async.models.loading import load_model, tied_aliases, without_tied
from gkd_async.train.checkpoint import full_state_dict, iter_full_tensors
from gkd_async.train.fsdp import shard_model
from gkd_async.transport.local_redis import LocalRedisServer
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
    # the 2.5 KiB tensor is cut into pieces of at most a bucket (16 + 16 + 8 rows); the rest share the last bucket
    assert buckets == 3
    blobs = [load(redis_client.get(f"{names.weights}:v5:{i}")) for i in range(buckets)]
    filled = [sum(t.numel() * t.element_size() for t in blob.values()) for blob in blobs]
    assert filled == [1024, 1024, 512 + 96 + 12 + 60]
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


def test_a_real_students_embedding_travels_through_redis_in_buckets(redis_client, names):
    """Qwen2.5-0.5B's tied embedding in float32 (151,936 x 896, 544 MB) is past the 512 MB a Redis value may hold:
    it must travel cut into buckets of at most pipeline.weight_bucket_mb, and come back bit for bit."""
    embedding = torch.randn(151_936, 896, generator=torch.Generator().manual_seed(0))
    tensors = {"model.embed_tokens.weight": embedding, "model.norm.weight": torch.ones(896)}
    store = RedisWeights(redis_client, names.weights)  # the default bucket: 64 MB
    written = store.publish(iter(tensors.items()), 1)
    assert written > embedding.numel() * 4
    count = int(redis_client.get(f"{names.weights}:v1"))
    sizes = [redis_client.strlen(f"{names.weights}:v1:{i}") for i in range(count)]
    assert len(sizes) == 9 and max(sizes) <= 64 * 2**20 + 4096
    back = store.read(1)
    assert same(back, tensors)
    store._forget(1)


def test_a_bucket_past_the_servers_limits_is_said_before_anything_is_written(names):
    """A value past proto-max-bulk-len makes the server drop the connection, which reads as "is the server
    running?": the transport checks the bucket size against the server's limit first and names the key to change.
    A server that refuses a bucket (maxmemory) is named as such too."""
    with LocalRedisServer() as server:
        client = connect_redis(server.url)
        client.config_set("proto-max-bulk-len", 2**20)  # 1 MB, the least Redis takes
        store = RedisWeights(client, names.weights, bucket_mb=2)
        with pytest.raises(GKDError, match=r"pipeline.weight_bucket_mb=2 .* proto-max-bulk-len"):
            store.publish({"w": torch.zeros(2**20)}, 1)  # 4 MB
        assert client.keys("*") == []
        client.config_set("proto-max-bulk-len", 512 * 2**20)
        client.config_set("maxmemory", 2 * 2**20)
        client.config_set("maxmemory-policy", "noeviction")
        with pytest.raises(GKDError, match=r"refused a weights bucket of 2 MB of version 1 .*maxmemory"):
            store.publish({"w": torch.zeros(2**20)}, 1)
        client.close()


def test_pieces_that_do_not_cover_a_tensor_are_refused():
    from gkd_async.weight_sync.buckets import iter_buckets, join_pieces

    buckets = list(iter_buckets([("w", torch.arange(40.0).reshape(10, 4))], 48, split=True))  # 3 rows a piece
    pieces = {name: t for bucket in buckets for name, t in bucket.items()}
    assert sorted(pieces) == ["w#rows0:3/10", "w#rows3:6/10", "w#rows6:9/10", "w#rows9:10/10"]
    assert torch.equal(join_pieces(dict(pieces))["w"], torch.arange(40.0).reshape(10, 4))
    with pytest.raises(ValueError, match="cover"):
        join_pieces({k: v for k, v in pieces.items() if k != "w#rows3:6/10"})
    with pytest.raises(ValueError, match="cover 9 of its 10 rows"):
        join_pieces({k: v for k, v in pieces.items() if k != "w#rows9:10/10"})


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


def fails_in_another_process(module: str, opening: str, *words: str) -> None:
    """`opening` (a weight transport of `module` opened and used) run by a fresh Python fails, saying `words`."""
    code = f"from gkd_async.transport.redis_client import connect_redis\nfrom {module} import *\n{opening}\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0 and all(word in done.stderr for word in words), done.stderr[-2000:]


def test_the_ray_transport_outside_ray_is_a_clear_error(redis_server, names):
    opening = f"RayWeights(connect_redis({redis_server.url!r}), 'k', 'hub', 'gkd-async')"
    fails_in_another_process(
        "gkd_async.weight_sync.ray_objects",
        opening,
        "every stage must run inside the run's Ray cluster",
        "pipeline.weight_transport=redis",
    )


def publish_train_read(rank, world, init_file, url, key, out_dir):
    """A learner rank of one: publishes both ways (streamed, and the whole state dict), changes its weights in
    place as an optimiser step does, then reads what it published."""
    from gkd_async.weight_sync.in_process import InProcessWeights

    join_group(rank, world, init_file)
    model = shard_model(load_model("tiny:student"), "float32", False)
    before = {name: t.clone() for name, t in iter_full_tensors(model)}
    store = InProcessWeights(connect_redis(url), key)
    for version, tensors in (
        (1, iter_full_tensors(model)),
        (2, without_tied(full_state_dict(model), tied_aliases(model))),
    ):
        store.publish(tensors, version)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1.0)
        latest = store.latest()
        save_file(store.read(latest[1]), f"{out_dir}/v{latest[0]}.safetensors")
        before = {name: t.clone() for name, t in iter_full_tensors(model)}
    save_file(before, f"{out_dir}/trained.safetensors")
    leave_group(rank, init_file)


def test_in_process_weights_are_a_copy_the_learners_next_steps_leave_alone(tmp_path, redis_server, names):
    """pipeline.weight_transport=in_process keeps the tensors the learner's gather made, without a copy of its
    own: they must be the gather's, not views of the learner's parameters, which the next step changes."""
    spawn_ranks(publish_train_read, 1, str(tmp_path / "init"), redis_server.url, names.weights, str(tmp_path))
    model = load_model("tiny:student")
    published = without_tied(model.state_dict(), tied_aliases(model))
    plus_one = {name: t + 1.0 for name, t in published.items()}
    assert same(load_file(str(tmp_path / "v1.safetensors")), published)  # as published, before the step
    assert same(load_file(str(tmp_path / "v2.safetensors")), plus_one)
    assert not same(load_file(str(tmp_path / "trained.safetensors")), plus_one)  # the learner did move on


def test_in_process_weights_hand_over_the_newest_version_and_announce_it(redis_server, redis_client, names):
    from gkd_async.weight_sync.in_process import InProcessWeights

    learner, reader = InProcessWeights(redis_client, names.weights), InProcessWeights(redis_client, names.weights)
    assert reader.latest() is None
    learner.publish(model_like(1), 1)
    learner.publish(iter(model_like(2).items()), 2)
    assert reader.latest() == (2, 2) and reader.read(1) is None  # replaced: ask latest() again
    assert same(reader.read(2), model_like(2)) and json.loads(redis_client.get(names.weights))["version"] == 2
    fails_in_another_process(  # a stage in another process sees the announcement and cannot have the tensors
        "gkd_async.weight_sync.in_process",
        f"InProcessWeights(connect_redis({redis_server.url!r}), {names.weights!r}).latest()",
        "a stage in another process cannot read them",
        "pipeline.weight_transport=redis",
    )
    InProcessWeights.release(names.weights)
    assert reader.read(2) is None


def test_a_bucket_is_read_as_views_of_its_blob_exactly_as_safetensors_reads_it():
    """load_bucket reads safetensors without copying: the same names, dtypes, shapes and values as
    safetensors.torch.load for every dtype a model has (an empty tensor and a scalar too), and a header that lies
    about its tensors is refused, never read past the blob."""
    import struct

    from safetensors.torch import save

    from gkd_async.weight_sync.buckets import load_bucket

    tensors = {
        "w": torch.randn(5, 7),
        "h": torch.randn(3, dtype=torch.float16),
        "b": torch.randn(4, 2).to(torch.bfloat16),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    blob = save(tensors, metadata={"format": "pt"})
    assert same(load_bucket(blob), load(blob)) and same(load_bucket(blob), tensors)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])

    def with_header(changed):
        text = json.dumps(changed).encode()
        return struct.pack("<Q", len(text)) + text + blob[8 + size :]

    assert same(load_bucket(with_header(header)), tensors)  # the rebuilt blob is sound
    for change, why in [
        (lambda h: h["w"].update(shape=[5, 8]), "spans"),
        (lambda h: h["w"].update(dtype="F99"), "no valid dtype"),
        (lambda h: h["w"].update(data_offsets=[h["w"]["data_offsets"][0] + 4, h["w"]["data_offsets"][1] + 4]),
         "does not start where"),
        (lambda h: h.pop("w"), "does not start where|take"),
    ]:  # fmt: skip
        lying = json.loads(json.dumps(header))
        change(lying)
        with pytest.raises(ValueError, match=why):
            load_bucket(with_header(lying))
    with pytest.raises(ValueError, match="header of"):
        load_bucket(struct.pack("<Q", 2**40) + blob[8:])
    with pytest.raises(ValueError, match="take"):
        load_bucket(blob[:-4])
