"""Starting small runs and reading what they left behind: shared by the pipeline, offline-scoring, served-teacher and
cross-tokenizer tests."""

import json
from pathlib import Path


def small(tmp_path, *overrides):
    return [
        "rollout.n=2",
        "rollout.max_new_tokens=8",
        "trainer.train_batch_size=2",
        "trainer.lr=3e-3",
        "gkd.teacher_topk=32",
        "pipeline.read_block_ms=200",
        "pipeline.heartbeat_interval_s=0.5",
        "logging.tensorboard=false",
        f"logging.dir={tmp_path}",
        *overrides,
    ]


def joins(redis_server, names):
    """Overrides that put a run on the session's Redis under the test's own run id."""
    return [f"pipeline.redis_url={redis_server.url}", f"pipeline.run_id={names.run_id}"]


def trained_log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "trained_samples.jsonl").read_text().splitlines()]


def observe(client, stream):
    """A consumer group of the test's own that never acknowledges: the learner trims only what every group
    has acknowledged, so the stream keeps every entry for the test to read at the end."""
    client.xgroup_create(stream, "observer", id="0", mkstream=True)
