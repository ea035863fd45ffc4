"""The command line as a user meets it: clear errors, and inspect's view of a run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gkd_async.config.trainer import LoggingSection
from gkd_async.train.metrics import MetricsWriter
from gkd_async.transport.streams import Heartbeats, StreamConsumer, StreamNames, StreamProducer

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=REPO, timeout=120, env=env
    )


def test_worker_without_a_run_says_what_to_give():
    result = cli("worker", "teacher")
    assert result.returncode == 2 and "--redis-url and --run-id" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["teacher", "model.teachers.math=tiny:teacher", "data.teacher_key=domain"], "name it with --teacher NAME"),
        (["teacher", "--teacher", "math"], "this run has one teacher (model.teacher); drop --teacher"),
        (["rollout", "--teacher", "math"], "a rollout worker has none"),
    ],
)
def test_a_teacher_scorer_of_several_teachers_names_its_teacher(redis_server, names, tmp_path, args, message):
    role, *rest = args
    result = cli(
        "worker", role, "--redis-url", redis_server.url, "--run-id", names.run_id, *rest, f"logging.dir={tmp_path}"
    )
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_unknown_worker_role():
    result = cli("worker", "critic", "--redis-url", "redis://x", "--run-id", "r")
    assert result.returncode == 2 and "rollout, teacher, learner" in result.stderr


def test_worker_against_unreachable_redis_names_the_url():
    result = cli("worker", "rollout", "--redis-url", "redis://127.0.0.1:1/0", "--run-id", "r")
    assert result.returncode == 2 and "cannot reach Redis at redis://127.0.0.1:1/0" in result.stderr


def test_resume_needs_a_run_directory(tmp_path):
    result = cli("resume", str(tmp_path))
    assert result.returncode == 2 and "not a run directory" in result.stderr


def test_run_with_a_missing_model_path_is_a_clear_error(tmp_path):
    result = cli("run", f"model.student={tmp_path / 'nope'}", f"logging.dir={tmp_path}")
    assert result.returncode == 2 and "no config.json" in result.stderr and "Traceback" not in result.stderr


def test_inspect_shows_streams_consumers_heartbeats_and_dead_letters(redis_server, redis_client, names):
    StreamProducer(redis_client, names.rollouts).add([b"a", b"b", b"c"])
    consumer = StreamConsumer(redis_client, names.rollouts, "teacher", "teacher-1", dead_stream=names.dead)
    [first, *_] = consumer.read(count=3)
    consumer.dead_letter(first.id, first.payload, "RecordError: broken on purpose")
    Heartbeats(redis_client, names.heartbeats).beat("teacher-1", "teacher")
    result = cli("inspect", "--redis-url", redis_server.url, "--run", names.run_id, env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"run {names.run_id}" in out and "teacher-1 (2)" in out
    assert "RecordError: broken on purpose" in out and "rollouts" in out
    listed = cli("inspect", "--redis-url", redis_server.url, "--json")
    assert names.run_id in listed.stdout


def test_inspect_rates_come_from_entries_added_between_snapshots(redis_client, names):
    from gkd_async.transport.inspection import add_rates, run_snapshot

    producer = StreamProducer(redis_client, names.prompts)
    producer.add([b"x"] * 2)
    first = add_rates(run_snapshot(redis_client, names.run_id), None)
    assert first["streams"]["prompts"]["rate_per_s"] is None
    producer.add([b"y"] * 6)
    second = run_snapshot(redis_client, names.run_id)
    second["time"] = first["time"] + 2.0
    assert add_rates(second, first)["streams"]["prompts"]["rate_per_s"] == 3.0
    assert second["streams"]["prompts"]["length"] == 8


def test_inspect_an_operator_can_read(redis_server, redis_client, names):
    long_name = "teacher-a-rather-long-hostname-of-a-gpu-node-0042-pid-1234567"
    consumer = StreamConsumer(redis_client, names.rollouts, "teacher", long_name, dead_stream=names.dead)
    StreamProducer(redis_client, names.rollouts).add([b"x"])
    consumer.read(count=1)
    starting = cli("inspect", "--redis-url", redis_server.url, "--run", names.run_id, env={"COLUMNS": "100"})
    assert "state starting" in starting.stdout and "no step yet" in starting.stdout
    assert long_name in starting.stdout.replace("\n", "").replace("│", "").replace(" ", "")  # folded, not cut
    redis_client.hset(
        names.progress,
        mapping={
            "training/global_step": 7,
            "total_steps": 20,
            "actor/distill_loss": 0.25,
            "perf/learner_wait_fraction": 0.5,
        },
    )
    redis_client.set(names.state, "running")
    shown = cli("inspect", "--redis-url", redis_server.url, "--run", names.run_id, env={"COLUMNS": "200"}).stdout
    assert "step 7/20" in shown and "distill loss 0.2500" in shown and "learner waiting 50%" in shown
    [snap] = json.loads(cli("inspect", "--redis-url", redis_server.url, "--run", names.run_id, "--json").stdout)
    assert snap["progress"]["training/global_step"] == 7 and snap["progress"]["actor/distill_loss"] == 0.25


def test_inspect_shows_each_teachers_stream_apart(redis_server, redis_client, names):
    from gkd_async.transport.inspection import list_runs, run_snapshot

    routed = StreamNames(names.run_id, ("math", "chat"))
    StreamProducer(redis_client, routed.rollouts_for("math")).add([b"x", b"y"])
    StreamProducer(redis_client, routed.rollouts_for("chat")).add([b"z"])
    snapshot = run_snapshot(redis_client, names.run_id)
    assert snapshot["streams"]["rollouts/math"]["length"] == 2 and snapshot["streams"]["rollouts/chat"]["length"] == 1
    assert "rollouts" not in snapshot["streams"]
    assert names.run_id in list_runs(redis_client) and f"{names.run_id}:rollouts" not in list_runs(redis_client)
    shown = cli("inspect", "--redis-url", redis_server.url, "--run", names.run_id, env={"COLUMNS": "160"})
    assert "rollouts/math" in shown.stdout and "rollouts/chat" in shown.stdout


def test_a_runs_wandb_run_is_named_and_kept_for_resume(tmp_path, monkeypatch):
    """logging.wandb_entity and logging.run_name reach W&B; a second writer in the same run directory (what
    `gkd-async resume` starts) continues the same W&B run; another run gets its own, named by its run id."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = LoggingSection(tensorboard=False, wandb=True, wandb_entity="acme", run_name="qwen3-gkd")
    first = MetricsWriter(tmp_path / "run", settings, "run-1")
    assert (first.wandb.name, first.wandb.entity, first.wandb.project) == ("qwen3-gkd", "acme", "gkd-async")
    first_id = first.wandb.id
    first.log(1, {"actor/distill_loss": 0.5})
    first.close()
    again = MetricsWriter(tmp_path / "run", settings, "run-1")
    assert again.wandb.id == first_id == (tmp_path / "run" / "wandb_run_id").read_text()
    again.close()
    other = MetricsWriter(tmp_path / "other", LoggingSection(tensorboard=False, wandb=True), "run-2")
    assert other.wandb.id != first_id and other.wandb.name == "run-2"
    other.close()


def test_run_takes_the_redis_url_from_gkd_redis_url_as_worker_does(redis_server, redis_client, names, tmp_path):
    env = {**os.environ, "GKD_REDIS_URL": redis_server.url}
    args = [
        "run",
        "pipeline.launcher=threads",
        "pipeline.mode=sync",
        "trainer.total_steps=1",
        "rollout.max_new_tokens=4",
    ]
    result = cli(*args, f"pipeline.run_id={names.run_id}", f"logging.dir={tmp_path}", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(redis_client.hget(names.progress, "training/global_step")) == 1  # in that Redis, not a private one
