"""Fault injection with real processes and a real Redis: a bad entry, reward, weight announcement,
signal or start-up error fails alone (or stops the run cleanly), and nothing admitted is lost."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from gkd_async.config.loading import load_config
from gkd_async.models.loading import ModelLoadError
from gkd_async.run_state import RunState
from gkd_async.transport.records import RolloutRecord, encode_rollout_record
from gkd_async.transport.redis_client import connect_redis
from gkd_async.weight_sync.files import WeightStore
from workers.common import RunContext
from workers.launch.base import read_progress
from workers.launch.ray_actors import Pipeline
from workers.launch.run import run_pipeline
from workers.launch.threads import ThreadedPipeline

REPO = Path(__file__).resolve().parents[2]


def small(tmp_path, *overrides):
    return [
        "rollout.n=2",
        "rollout.max_new_tokens=8",
        "trainer.train_batch_size=2",
        "gkd.teacher_topk=16",
        "pipeline.read_block_ms=200",
        "pipeline.heartbeat_interval_s=0.5",
        "logging.tensorboard=false",
        f"logging.dir={tmp_path}",
        *overrides,
    ]


def trained(run_dir):
    lines = [json.loads(line) for line in (Path(run_dir) / "trained_samples.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines], [sid for line in lines for sid in line["sample_ids"]]


def dead_reasons(client, names):
    return [fields[b"reason"].decode() for _, fields in client.xrange(names.dead)]


def test_weights_are_read_only_from_the_runs_own_directory(redis_client, names, tmp_path):
    store = WeightStore(redis_client, names.weights, tmp_path / "weights")
    redis_client.set(names.weights, json.dumps({"version": 3, "path": "/etc"}))
    assert store.latest() == (3, tmp_path / "weights" / "v0000003")
    for bad in ({"path": "/etc"}, {"version": "../etc"}, {"version": -1}, "not json {"):
        redis_client.set(names.weights, bad if isinstance(bad, str) else json.dumps(bad))
        assert store.latest() is None


def test_progress_keeps_only_numbers(redis_client, names):
    redis_client.hset(names.progress, mapping={"training/global_step": 3, "actor/entropy": "oops", "x": "nan"})
    assert read_progress(redis_client, names) == {"training/global_step": 3.0}


@pytest.mark.slow
def test_poison_entries_and_failing_rewards_fail_alone(ray_session, redis_server, tmp_path, names):
    reward = tmp_path / "reward.py"
    reward.write_text(
        "import os, time\n"
        "def score(prompt, response, **extra):\n"
        "    if int(extra['answer']) % 4 == 0:\n"
        "        raise ValueError('boom')\n"
        "    if int(extra['answer']) % 4 == 1:\n"
        "        time.sleep(600)\n"
        "    if int(extra['answer']) % 4 == 2:\n"
        "        os._exit(7)\n"
        "    return 1.0\n"
    )
    client = connect_redis(redis_server.url)
    # Groups of the run's two samples: one with a token id past the vocabulary, one with a 20,000-token
    # response; and a group of another size than rollout.n.
    for group, lengths, first in (("poison-a", [1, 1], 10**6), ("poison-b", [20_000, 1], 0), ("poison-c", [1], 0)):
        response = np.full(sum(lengths), 3, np.int32)
        response[0] = first
        record = RolloutRecord(
            names.run_id, group, [f"{group}/{i}" for i in range(len(lengths))], 0, 0, np.array([1, 2], np.int32),
            response, np.array(lengths, np.int32), np.full(len(response), -1.0, np.float32),
        )  # fmt: skip
        client.xadd(names.rollouts, {b"d": encode_rollout_record(record)})
    cfg = load_config(
        None,
        small(
            tmp_path,
            "trainer.total_steps=4",
            "gkd.use_rl_loss=true",
            "gkd.rl_loss_coef=0.1",
            f"custom_reward_function.path={reward}",
            "custom_reward_function.name=score",
            "custom_reward_function.timeout_s=1",
            f"pipeline.redis_url={redis_server.url}",
            f"pipeline.run_id={names.run_id}",
        ),
    )
    summary = run_pipeline(cfg)
    assert summary["step"] == 4
    steps, sample_ids = trained(summary["run_dir"])
    assert steps == [1, 2, 3, 4] and len(sample_ids) == len(set(sample_ids)) == 4 * 2 * 2
    reasons = dead_reasons(client, names)
    assert any("outside the vocabulary" in r for r in reasons)
    assert any("rollout.max_new_tokens=8" in r for r in reasons)
    assert any("the group has 1 samples; this run samples 2 per prompt" in r for r in reasons)
    assert any("raised ValueError: boom" in r for r in reasons), reasons
    assert any("did not return within 1s" in r for r in reasons)
    assert any("process ended (exit code 7)" in r for r in reasons)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [Pipeline, ThreadedPipeline])
def test_a_stage_that_fails_to_start_reports_its_own_error(ray_session, redis_server, tmp_path, names, launcher):
    cfg = load_config(None, small(tmp_path, f"model.teacher={tmp_path / 'no-teacher'}"))
    ctx = RunContext(cfg, redis_server.url, names.run_id, tmp_path / names.run_id)  # no preflight on purpose
    ctx.run_dir.mkdir()
    ctx.set_state(RunState.running())
    start = time.monotonic()
    pipeline = launcher(ctx)
    try:
        with pytest.raises(ModelLoadError, match="no-teacher"):
            pipeline.wait()
    finally:
        pipeline.shutdown()
    assert time.monotonic() - start < 60
    # The stage's traceback is in its log, where the error points: the run's one file with threads, the
    # teacher's own under Ray.
    (log,) = (ctx.run_dir / "logs").glob("stages-*.log" if launcher is ThreadedPipeline else "teacher-*.log")
    failed = [json.loads(line) for line in log.read_text().splitlines() if "stage failed" in line]
    assert failed[0]["role"] == "teacher" and "ModelLoadError: " in failed[0]["exception"]
    assert "Traceback" in failed[0]["exception"]


def gkd_async(*args, **environment):
    env = {**os.environ, "PYTHONPATH": str(REPO), **environment}
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_a_missing_data_file_fails_before_redis_and_ray_start(tmp_path):
    start = time.monotonic()
    proc = gkd_async("run", f"data.train_files=[{tmp_path / 'missing.jsonl'}]", f"logging.dir={tmp_path}")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "missing.jsonl" in err and "Traceback" not in err
    assert time.monotonic() - start < 30
    assert not any(tmp_path.iterdir())  # no run directory: nothing was started


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ray", "threads"])
def test_sigterm_checkpoints_ends_everything_and_resume_trains_each_step_once(tmp_path, launcher):
    sync = ["pipeline.mode=sync", f"pipeline.launcher={launcher}", "logging.wandb=true", "logging.run_name=sigterm"]
    wandb_offline = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # W&B's own files, no server
    proc = gkd_async(
        "run", *small(tmp_path, "trainer.total_steps=30", "checkpoint.save_every=0", *sync), **wandb_offline
    )
    run_dir, client = wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert f"gkd-async resume {run_dir}" in err and "Traceback" not in err
    with pytest.raises(redis.ConnectionError):  # the private redis-server is gone
        client.ping()
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert oct((run_dir / "redis_url").stat().st_mode & 0o777) == "0o600"
    if launcher == "threads":  # every stage ran in the command's own process, and logged to its one file
        stage_log = run_dir / "logs" / f"stages-{proc.pid}.log"
        roles = {json.loads(line).get("role") for line in stage_log.read_text().splitlines()}
        assert {"rollout", "teacher", "learner"} <= roles and os.listdir(run_dir / "logs") == [stage_log.name]

    resumed = gkd_async("resume", str(run_dir), **wandb_offline)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    steps, sample_ids = trained(run_dir)
    assert steps == list(range(1, 31)) and len(sample_ids) == len(set(sample_ids)) == 30 * 2 * 2
    # The resumed run logged to the same W&B run: two sessions under the one id kept in the run directory.
    sessions = sorted((run_dir / "wandb").glob("offline-run-*"))
    wandb_id = (run_dir / "wandb_run_id").read_text()
    assert len(sessions) == 2 and all(p.name.endswith(f"-{wandb_id}") for p in sessions), sessions
    # Everything the run wrote (Redis URL, config, logs, checkpoints, final/) is its user's alone. W&B's service
    # writes its files 0644 whatever the umask: the 0700 directories above them keep them private.
    ours = [p for p in [run_dir, *run_dir.rglob("*")] if "wandb" not in p.relative_to(run_dir).parts[:1]]
    shared = [p for p in ours if not p.is_symlink() and p.stat().st_mode & 0o077]
    assert not shared, [f"{p.relative_to(run_dir)} {oct(p.stat().st_mode & 0o777)}" for p in shared][:10]
    assert oct((run_dir / "wandb").stat().st_mode & 0o777) == "0o700"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ray", "threads"])
def test_sigterm_while_the_stages_start_ends_the_run_in_seconds(tmp_path, launcher):
    """A stop asked for before the learner runs is not overwritten by the learner's start: the run ends at
    step 0 with a checkpoint, instead of training on while the launcher waits two minutes for one. (With
    threads the stages start within milliseconds, so the stop may come before, during or after.)"""
    proc = gkd_async("run", *small(tmp_path, "trainer.total_steps=2000", f"pipeline.launcher={launcher}"))
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob("*/logs/*.log")):  # a stage has begun to start; the learner is not running yet
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 60, err
    assert "interrupted" in err and "Traceback" not in err
    if launcher == "ray":  # seconds between the first stage's start and the learner's: the stop came first
        assert "interrupted at step 0, checkpoint saved" in err and "gkd-async resume" in err


def wait_for_step(proc, logging_dir, step, timeout_s=180):
    """The run directory and a client of the private Redis of a `gkd-async run` once it trained `step`."""
    deadline = time.monotonic() + timeout_s
    run_dir = client = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        runs = [p for p in logging_dir.iterdir() if (p / "redis_url").is_file()]
        if runs and client is None:
            run_dir = runs[0]
            client = redis.Redis.from_url((run_dir / "redis_url").read_text().strip())
        progress = f"gkd:{run_dir.name}:progress" if run_dir else None
        if client is not None and float(client.hget(progress, "training/global_step") or 0) >= step:
            return run_dir, client
        time.sleep(0.1)
    raise AssertionError(f"the run did not reach step {step} in {timeout_s}s")


def test_resume_of_a_run_without_a_checkpoint_says_so(tmp_path):
    (tmp_path / "config.yaml").write_text("{}\n")
    proc = gkd_async("resume", str(tmp_path))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "has no checkpoint to resume from" in err
    assert f"gkd-async run {tmp_path / 'config.yaml'}" in err.replace("\n", "")


@pytest.mark.slow
def test_a_long_run_keeps_redis_bounded(ray_session, redis_server, tmp_path, names):
    client = connect_redis(redis_server.url)
    streams = (names.prompts, names.rollouts, names.scored)
    early = []

    def stream_bytes():
        return sum(client.memory_usage(s) or 0 for s in streams)

    def watch(progress):
        if progress.get("training/global_step", 0) >= 40 and not early:
            early.append(stream_bytes())

    cfg = load_config(
        None,
        small(
            tmp_path,
            "trainer.total_steps=160",
            "pipeline.max_staleness=1",
            f"pipeline.redis_url={redis_server.url}",
            f"pipeline.run_id={names.run_id}",
        ),
    )
    summary = run_pipeline(cfg, watch)
    assert summary["step"] == 160
    # At most what admission lets be in flight is left in each stream: staleness 1 is two batches of two.
    for stream in streams:
        assert client.xlen(stream) <= 4, stream
    # Flat: the streams hold no more at step 160 than at step 40 (give or take one in-flight batch).
    assert early and stream_bytes() <= 1.5 * early[0] + 16 * 1024


@pytest.mark.slow
def test_kill_9_of_the_only_rollout_worker_loses_no_admitted_group(redis_server, tmp_path, names):
    """The worker dies holding prompts; one started later reclaims them and every admitted group is trained
    once: in sync mode that is exactly the first groups the cursor gave out."""
    config = tmp_path / "cfg.yaml"
    cfg = load_config(
        None, small(tmp_path, "trainer.total_steps=8", "pipeline.mode=sync", "pipeline.claim_timeout_s=1")
    )
    config.write_text(json.dumps(cfg.model_dump(mode="json")))

    def worker(role):
        args = ["worker", role, "--config", str(config), "--run-id", names.run_id]
        env = {**os.environ, "PYTHONPATH": str(REPO), "GKD_REDIS_URL": redis_server.url}
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    client = connect_redis(redis_server.url)
    procs = [worker("teacher"), worker("learner"), worker("rollout")]
    try:
        deadline = time.monotonic() + 180
        while float(client.hget(names.progress, "training/global_step") or 0) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        procs[2].send_signal(signal.SIGKILL)
        procs[2].wait()
        procs.append(worker("rollout"))
        assert procs[1].wait(timeout=180) == 0, procs[1].stderr.read()
    finally:
        for proc in procs:
            proc.kill()
    steps, sample_ids = trained(tmp_path / names.run_id)
    assert steps == list(range(1, 9)) and len(sample_ids) == len(set(sample_ids)) == 8 * 2 * 2
    assert {sid.rsplit("/", 1)[0] for sid in sample_ids} == {f"0:{i}" for i in range(16)}


@pytest.mark.slow
def test_kill_9_of_the_learner_under_run_is_one_message_with_the_resume_hint(tmp_path):
    proc = gkd_async("run", *small(tmp_path, "trainer.total_steps=200", "checkpoint.save_every=2"))
    run_dir, client = wait_for_step(proc, tmp_path, 3)
    beats = {k: json.loads(v) for k, v in client.hgetall(f"gkd:{run_dir.name}:heartbeats").items()}
    [learner_pid] = [b["pid"] for b in beats.values() if b["role"] == "learner"]
    os.kill(learner_pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    *_, error, hint = err.strip().splitlines()  # what comes before is Ray's and transformers' own chatter
    assert error.startswith("error: the learner process died") and "Traceback" not in err
    assert hint == f"the run has a checkpoint: continue it with  gkd-async resume {run_dir}"
