"""Versioned weight directories: what the HF engine and vLLM's reload_weights read."""

import torch

from gkd_async.weights import WEIGHTS_FILE, WeightStore


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
