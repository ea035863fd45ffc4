"""The rollout worker's weight refresh against a real Redis, through both weight transports."""

import json
import threading
import time

import numpy as np
import pytest
import torch

from gkd_async.config.loading import load_config
from gkd_async.models.loading import load_model
from gkd_async.transport.records import PromptRecord, decode_rollout_record, encode_prompt_record
from gkd_async.transport.streams import StreamProducer
from gkd_async.weight_sync.files import WeightStore
from gkd_async.weight_sync.redis_buckets import RedisWeights
from workers.common import RunContext, RunFailedError
from workers.rollout import RolloutWorker


def make_worker(redis_server, names, tmp_path, transport):
    cfg = load_config(None, [f"logging.dir={tmp_path}", f"pipeline.weight_transport={transport}"])
    return RolloutWorker(RunContext(cfg, redis_server.url, names.run_id, tmp_path))


@pytest.fixture
def worker(redis_server, names, tmp_path):
    return make_worker(redis_server, names, tmp_path, "file")


def shifted(delta):
    return {k: v + delta for k, v in load_model("tiny:student").state_dict().items()}


def test_a_version_deleted_before_it_was_read_is_skipped_for_the_newest(worker, redis_client, names, tmp_path):
    store = WeightStore(redis_client, names.weights, tmp_path / "weights")
    gone = store.publish(shifted(0.1), 1)
    for path in gone.iterdir():
        path.unlink()
    gone.rmdir()  # as the learner does once two newer versions exist
    newest = shifted(0.2)
    threading.Timer(0.3, store.publish, args=(newest, 2)).start()
    start = time.monotonic()
    assert worker._refresh_weights(2)
    assert worker.engine.version == 2 and time.monotonic() - start < 30
    loaded = worker.engine.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in newest.items())


def test_weights_on_a_disk_this_machine_cannot_see_are_a_clear_error(worker, redis_client, names):
    redis_client.set(names.weights, json.dumps({"version": 1, "path": "/elsewhere/run/weights/v0000001"}))
    with pytest.raises(RunFailedError, match="needs the learner's logging.dir on a shared file system"):
        worker._refresh_weights(1)


def test_weights_that_do_not_load_are_skipped_unless_needed(worker, redis_client, names, tmp_path):
    store = WeightStore(redis_client, names.weights, tmp_path / "weights")
    before = {k: v.clone() for k, v in worker.engine.model.state_dict().items()}
    broken = shifted(0.1)
    broken[next(iter(broken))] = torch.full_like(broken[next(iter(broken))], float("nan"))
    store.publish(broken, 1)
    assert worker._refresh_weights(0)  # not needed: skipped, the engine keeps its weights
    assert worker.engine.version == 0 and 1 in worker.unloadable
    assert all(torch.equal(before[k], v) for k, v in worker.engine.model.state_dict().items())
    with pytest.raises(RunFailedError, match="version 1 .* could not be loaded .*NaN"):
        worker._refresh_weights(1)  # needed: waiting would hang the run, so it fails saying why


def test_weights_through_redis_need_no_directory_and_survive_a_replaced_version(redis_server, names, tmp_path):
    """The redis transport: a worker with no weights directory loads each version; a version replaced while
    it was announced is skipped for the newest."""
    worker = make_worker(redis_server, names, tmp_path / "elsewhere", "redis")
    store = RedisWeights(worker.ctx.client, names.weights, bucket_mb=0.01)  # several buckets
    store.publish(shifted(0.1), 1)
    assert worker._refresh_weights(1) and worker.engine.version == 1
    store.publish(shifted(0.2), 2)
    store.publish(shifted(0.3), 3)  # version 1 is gone now
    worker.ctx.client.set(names.weights, json.dumps({"version": 1}))  # an announcement of a forgotten version
    threading.Timer(0.3, store.publish, args=(shifted(0.4), 4)).start()
    assert worker._refresh_weights(4) and worker.engine.version == 4
    loaded = worker.engine.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in shifted(0.4).items())
    assert not (tmp_path / "elsewhere" / "weights").exists()


def test_groups_go_to_their_teachers_stream_and_an_unknown_teacher_is_dead_lettered(
    redis_server, redis_client, names, tmp_path
):
    cfg = load_config(
        None,
        [
            f"logging.dir={tmp_path}",
            "model.teachers.math=tiny:teacher",
            "model.teachers.code=tiny:teacher",
            "data.teacher_key=domain",
            "rollout.n=2",
            "rollout.max_new_tokens=4",
        ],
    )
    ctx = RunContext(cfg, redis_server.url, names.run_id, tmp_path)
    worker = RolloutWorker(ctx)
    prompts = [
        PromptRecord(names.run_id, f"g{i}", 1, 0, np.array([5, 6, 7], np.int32), {"domain": domain})
        for i, domain in enumerate(["math", "poetry", "code", "math"])
    ]
    StreamProducer(redis_client, ctx.names.prompts).add([encode_prompt_record(p) for p in prompts])
    worker.step()
    routed = {
        teacher: [
            decode_rollout_record(f[b"d"]).group_id for _, f in redis_client.xrange(ctx.names.rollouts_for(teacher))
        ]
        for teacher in ("math", "code")
    }
    assert routed == {"math": ["g0", "g3"], "code": ["g2"]}
    assert redis_client.xlen(ctx.names.rollouts) == 0
    [(_, dead)] = redis_client.xrange(ctx.names.dead)
    assert b"names teacher 'poetry' in its 'domain' field, which is not one of model.teachers" in dead[b"reason"]
    assert worker.consumer.pending_count() == 0
