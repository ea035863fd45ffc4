"""End to end through real Ray actors, a real redis-server and real processes: the product works, the
modes agree, and failures lose no sample."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from safetensors.torch import load_file
from small_runs import joins, observe, small, trained_log
from transformers import AutoModelForCausalLM

from gkd_async.config.loading import load_config
from gkd_async.data.tasks import task_rows
from gkd_async.models.loading import load_model
from gkd_async.train.metrics import read_metrics
from gkd_async.transport.records import decode_rollout_record, decode_scored_record
from gkd_async.transport.redis_client import connect_redis
from gkd_async.transport.streams import StreamNames
from workers.launch.base import prepare_run
from workers.launch.ray_actors import Pipeline
from workers.launch.run import run_pipeline
from workers.learner.guards import TeacherUnavailableError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SEED_METRICS = ("actor/distill_loss", "actor/distill_coef", "actor/entropy", "training/global_step")


def produced_sample_ids(client, run_id):
    ids = []
    for _, fields in client.xrange(StreamNames(run_id).rollouts):
        ids += decode_rollout_record(fields[b"d"]).sample_ids
    return ids


def backends(name):
    return [f"rollout.backend={name}", f"teacher.backend={name}"]


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_run_trains_the_student_end_to_end(ray_session, tmp_path, backend):
    cfg = load_config(None, small(tmp_path, "trainer.total_steps=8", "pipeline.max_staleness=1", *backends(backend)))
    called = time.time()
    summary = run_pipeline(cfg)
    wall = time.time() - called
    assert summary["step"] == 8
    metrics = read_metrics(Path(summary["run_dir"]))
    assert [m["training/global_step"] for m in metrics] == list(range(1, 9))
    # start-up and per-step time reported apart: start-up ends before the steps, which fill most of the rest
    assert 0 < summary["startup_s"] < wall - 7 * summary["median_step_s"]
    assert summary["median_step_s"] == pytest.approx(np.median([m["timing/step_s"] for m in metrics]))
    for m in metrics:  # the step's phases add up to it
        parts = m["timing/wait_s"] + m["timing/train_s"] + m["timing/publish_s"] + m["timing/other_s"]
        assert m["timing/other_s"] >= 0 and parts == pytest.approx(m["timing/step_s"], abs=1e-6)
    assert sum(m["timing/load_weights_s"] for m in metrics) > 0  # the rollout's reloads are reported
    for name in SEED_METRICS:
        assert all(name in m for m in metrics), name
    losses = [m["actor/distill_loss"] for m in metrics]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # the student moves towards the teacher
    assert all(m["staleness/max"] <= 1 for m in metrics)

    ids = [sid for line in trained_log(summary["run_dir"]) for sid in line["sample_ids"]]
    assert len(ids) == len(set(ids)) == 8 * 2 * 2

    final = AutoModelForCausalLM.from_pretrained(summary["final_dir"])  # plain transformers
    initial = load_model("tiny:student").state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in final.state_dict().items())
    assert (Path(summary["run_dir"]) / "checkpoints" / "latest").read_text() == "step_0000008"
    assert not (Path(summary["run_dir"]) / "weights").exists()  # the weights went through Redis, not the disk
    assert "lm_head.weight" not in load_file(str(Path(summary["final_dir"]) / "model.safetensors"))  # tied, once
    if backend == "hf":  # the sharded checkpoint exported as save_pretrained: the final student, tokenizer too
        exported = tmp_path / "exported"
        cli = [sys.executable, "-m", "cli.main", "export", summary["run_dir"], "--out", str(exported)]
        done = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "step_0000008" in done.stdout, done.stderr
        again = AutoModelForCausalLM.from_pretrained(exported)
        assert all(torch.equal(v, final.state_dict()[k]) for k, v in again.state_dict().items())
        assert (exported / "tokenizer.json").is_file()


def test_learner_ranks_meet_at_rank_0s_announced_address(ray_session, redis_server, tmp_path, names):
    """Two learner ranks under Ray, reserved together by a packed placement group: rank 0 announces
    tcp://<its node's address>:<port> in Redis (not 127.0.0.1, which another node could not reach), the
    other rank joins there, and the run trains."""
    import ray

    client = redis.Redis.from_url(redis_server.url)
    client.set(names.rendezvous, "tcp://192.0.2.255:1")  # a stale address from an earlier start: cleared
    cfg = load_config(
        None,
        small(
            tmp_path,
            "trainer.total_steps=3",
            "pipeline.num_learner_ranks=2",
            "ray.learner.num_cpus=0.25",  # a non-empty request: the ranks get a placement group
            f"pipeline.redis_url={redis_server.url}",
            f"pipeline.run_id={names.run_id}",
        ),
    )
    summary = run_pipeline(cfg)
    assert summary["step"] == 3 and summary["trained_samples"] == 3 * 2 * 2
    assert client.get(names.rendezvous).decode().startswith(f"tcp://{ray.util.get_node_ip_address()}:")
    (group,) = [g for g in ray.util.placement_group_table().values() if g["name"] == f"{names.run_id}/learner"]
    assert group["strategy"] == "PACK" and list(group["bundles"].values()) == [{"CPU": 0.25}] * 2
    assert group["state"] == "REMOVED"  # withdrawn with the run


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_sync_mode_equals_async_mode_at_zero_staleness(ray_session, tmp_path, backend):
    """Bitwise with whole batches (trainer.stream_batches=false); streamed (the default, HF here), the
    chunks follow arrival timing, so the same within float rounding. Bitwise too with the weights sent by
    learner rank 0 over gloo (pipeline.weight_transport=collective) instead of through Redis: the rollout
    workers sampled from exactly the learner's weights; and with every stage a thread of this process
    (pipeline.launcher=threads, HF)."""
    modes = {
        "sync": ["pipeline.mode=sync", "trainer.stream_batches=false"],
        "async": ["pipeline.mode=async", "pipeline.max_staleness=0", "trainer.stream_batches=false"],
        "collective": ["pipeline.mode=sync", "trainer.stream_batches=false", "pipeline.weight_transport=collective"],
    }
    if backend == "hf":  # the threads launcher runs HF engines only
        modes["streamed"] = ["pipeline.mode=sync"]
        modes["threads"] = ["pipeline.mode=sync", "trainer.stream_batches=false", "pipeline.launcher=threads"]
    runs = {}
    for mode, extra in modes.items():
        cfg = load_config(None, small(tmp_path / mode, "trainer.total_steps=4", *extra, *backends(backend)))
        runs[mode] = run_pipeline(cfg)
    metrics = {mode: read_metrics(Path(summary["run_dir"])) for mode, summary in runs.items()}
    weights = {mode: load_file(str(Path(s["final_dir"]) / "model.safetensors")) for mode, s in runs.items()}
    losses = {mode: [m["actor/distill_loss"] for m in metrics[mode]] for mode in modes}
    assert losses["sync"] == losses["async"] == losses["collective"]
    assert all(m["staleness/max"] == 0 for mode in modes for m in metrics[mode])
    for key in weights["sync"]:
        assert torch.equal(weights["sync"][key], weights["async"][key]), key
        assert torch.equal(weights["sync"][key], weights["collective"][key]), key
    assert not (Path(runs["collective"]["run_dir"]) / "weights").exists()
    if "threads" in modes:  # the same stages as threads of this process: the same training
        assert losses["threads"] == losses["sync"]
        assert all(torch.equal(weights["threads"][key], weights["sync"][key]) for key in weights["sync"])
    if "streamed" in modes:
        # Adam divides by the root of the second moment, so a parameter whose gradient is near 0 turns a
        # rounding-level difference into a step-sized one: a few such elements may move by up to lr a step.
        assert losses["streamed"] == pytest.approx(losses["sync"], rel=1e-4)
        diffs = torch.cat([(weights["streamed"][k] - weights["sync"][k]).abs().flatten() for k in weights["sync"]])
        assert float((diffs <= 1e-5).float().mean()) > 0.999 and float(diffs.max()) <= 4 * 3e-3


def test_async_samples_never_exceed_the_staleness_bound(ray_session, tmp_path):
    cfg = load_config(
        None, small(tmp_path, "trainer.total_steps=6", "pipeline.max_staleness=2", "pipeline.num_rollout_workers=2")
    )
    summary = run_pipeline(cfg)
    metrics = read_metrics(Path(summary["run_dir"]))
    assert max(m["staleness/max"] for m in metrics) <= 2
    assert max(m["staleness/max"] for m in metrics) >= 1  # the overlap is real: stale samples were trained


def test_kill_9_of_a_teacher_loses_and_duplicates_nothing(ray_session, redis_server, tmp_path, names):
    cfg = load_config(
        None,
        small(
            tmp_path,
            "trainer.total_steps=8",
            "pipeline.mode=sync",
            "pipeline.num_teacher_scorers=2",
            "pipeline.claim_timeout_s=1.5",
            *joins(redis_server, names),
        ),
    )
    ctx, _ = prepare_run(cfg)
    observe(ctx.client, names.rollouts)
    pipeline = Pipeline(ctx)
    try:
        victim = pipeline.pids("teacher")[0]
        deadline = time.monotonic() + 120
        while float(pipeline.progress().get("training/global_step", 0)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(victim, signal.SIGKILL)
        summary = pipeline.wait()
    finally:
        pipeline.shutdown()
    assert summary["step"] == 8
    trained = [sid for line in trained_log(ctx.run_dir) for sid in line["sample_ids"]]
    produced = produced_sample_ids(ctx.client, names.run_id)
    assert len(trained) == len(set(trained))  # none twice
    assert sorted(trained) == sorted(produced)  # none lost


def test_no_teacher_fails_fast_with_the_seed_message(ray_session, redis_server, tmp_path, names):
    cfg = load_config(
        None,
        small(
            tmp_path,
            "trainer.total_steps=2",
            "pipeline.num_teacher_scorers=0",
            "pipeline.teacher_timeout_s=3",
            *joins(redis_server, names),
        ),
    )
    start = time.monotonic()
    with pytest.raises(TeacherUnavailableError) as err:
        run_pipeline(cfg)
    assert time.monotonic() - start < 60
    msg = str(err.value)
    assert "Teacher request failed" in msg and redis_server.address in msg
    assert f"gkd-async worker teacher --config {tmp_path / names.run_id / 'config.yaml'}" in msg
    assert redis_server.password not in msg


def test_malformed_entry_is_dead_lettered_shown_by_inspect_and_the_run_goes_on(
    ray_session, redis_server, redis_client, tmp_path, names
):
    redis_client.xadd(names.rollouts, {b"d": b"\x93not a record"})
    cfg = load_config(
        None,
        small(
            tmp_path,
            "trainer.total_steps=3",
            *joins(redis_server, names),
        ),
    )
    assert run_pipeline(cfg)["step"] == 3
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "inspect", "--redis-url", redis_server.url, "--run", names.run_id, "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    [snapshot] = json.loads(out.stdout)
    [dead] = snapshot["dead_letters"]
    assert dead["from"] == names.rollouts and "RecordError" in dead["reason"]
    assert snapshot["state"] == "done" and snapshot["trained_samples"] == 3 * 2 * 2
    groups = {g["name"]: g for g in snapshot["streams"]["scored"]["groups"]}
    assert groups["learner"]["pending"] == 0


def test_learner_killed_and_resumed_trains_no_sample_twice(redis_server, tmp_path, names):
    config_path = tmp_path / "cfg.yaml"
    cfg = load_config(
        None,
        small(
            tmp_path,
            "trainer.total_steps=6",
            "pipeline.mode=sync",
            "checkpoint.save_every=2",
            "pipeline.claim_timeout_s=1.5",
        ),
    )
    config_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def worker(role, *extra):
        args = [
            sys.executable,
            "-m",
            "cli.main",
            "worker",
            role,
            "--config",
            str(config_path),
            "--redis-url",
            redis_server.url,
            "--run-id",
            names.run_id,
            *extra,
        ]
        return subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    client = connect_redis(redis_server.url)
    helpers = [worker("rollout"), worker("teacher")]
    try:
        learner = worker("learner")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            step = client.hget(names.progress, "training/global_step")
            if step is not None and float(step) >= 3:
                break
            assert learner.poll() is None, learner.stderr.read()
            time.sleep(0.05)
        learner.send_signal(signal.SIGKILL)
        learner.wait()
        before = trained_log(tmp_path / names.run_id)
        resumed = worker("learner", f"checkpoint.resume={tmp_path / names.run_id / 'checkpoints'}")
        assert resumed.wait(timeout=180) == 0, resumed.stderr.read()
        for helper in helpers:
            assert helper.wait(timeout=60) == 0, helper.stderr.read()
    finally:
        for proc in helpers:
            proc.kill()
    assert before[-1]["step"] >= 3
    # The steps after the checkpoint were rolled back: their log lines and trained marks are gone, and
    # every admitted group (those in flight at the checkpoint included) is trained exactly once.
    final = trained_log(tmp_path / names.run_id)
    assert [line["step"] for line in final] == [1, 2, 3, 4, 5, 6]
    trained = [sid for line in final for sid in line["sample_ids"]]
    assert len(trained) == len(set(trained)) == 6 * 2 * 2
    # Redis keeps the marks of the newest steps only (sync mode: max_staleness 0 + MARKED_STEPS = 2), as the log
    marks = {step: {k.decode() for k in client.smembers(names.trained_at(step))} for step in range(1, 10)}
    assert {step: m for step, m in marks.items() if m} == {line["step"]: set(line["sample_ids"]) for line in final[-2:]}
    # Sync mode drops nothing, so the groups trained are exactly the first twelve the cursor gave out.
    assert {sid.rsplit("/", 1)[0] for sid in trained} == {f"0:{i}" for i in range(12)}


def test_supervised_kd_trains_on_the_teachers_samples(ray_session, redis_server, tmp_path, names):
    from gkd_async.engines.hf import HFRolloutEngine
    from gkd_async.models.loading import load_tokenizer
    from workers.common import group_seed

    cfg = load_config(
        None,
        small(
            tmp_path,
            "trainer.total_steps=3",
            "rollout.source=teacher",
            "pipeline.max_staleness=1",
            *joins(redis_server, names),
        ),
    )
    observe(connect_redis(redis_server.url), names.rollouts)
    assert run_pipeline(cfg)["step"] == 3
    tok = load_tokenizer("tiny:teacher")
    teacher = HFRolloutEngine("tiny:teacher", "float32", tok.pad_token_id, tok.eos_token_id)
    client = connect_redis(redis_server.url)
    records = [decode_rollout_record(f[b"d"]) for _, f in client.xrange(names.rollouts)]
    assert len(records) >= 3 * 2
    for record in records:
        assert record.policy_version == 0
        expected = teacher.generate(record.prompt_ids, 2, 1.0, 1.0, 8, group_seed(cfg.trainer.seed, record.group_id))
        for i, sample in enumerate(expected):
            np.testing.assert_array_equal(record.response(i), sample.response_ids)


def test_sampled_token_distillation_runs_with_nothing_but_token_log_probs_on_the_wire(
    ray_session, redis_server, tmp_path, names
):
    """gkd.opd_coef with gkd.teacher_topk=0 through `run`: scored records carry no top-k, only each sampled
    token's teacher log-prob, and the student moves towards the teacher (the reverse-KL estimate falls)."""
    cfg = load_config(
        None,
        small(
            tmp_path,
            "trainer.total_steps=30",
            "gkd.teacher_topk=0",
            "gkd.distill_loss_coef=0",
            "gkd.opd_coef=1",
            "gkd.distill_temperature=0.3",  # a sharpened teacher: far from the random student, a clear signal
            "rollout.n=4",
            "trainer.train_batch_size=4",
            "pipeline.mode=sync",  # deterministic: the reverse-KL estimate is noisy, so no run-to-run luck
            "trainer.stream_batches=false",
            *joins(redis_server, names),
        ),
    )
    client = connect_redis(redis_server.url)
    observe(client, names.scored)
    summary = run_pipeline(cfg)
    assert summary["step"] == 30
    records = [decode_scored_record(f[b"d"]) for _, f in client.xrange(names.scored)]
    assert records and all(r.k == 0 and r.token_logprobs.shape == (r.rollout.num_response_tokens,) for r in records)
    metrics = read_metrics(Path(summary["run_dir"]))
    kl = [m["actor/teacher_reverse_kl"] for m in metrics]
    assert all(m["actor/opd_coef"] == 1 and m["actor/distill_loss"] == 0 for m in metrics)
    assert np.mean(kl[-8:]) < 0.9 * np.mean(kl[:8]), kl


def test_stage_threads_are_consumers_of_their_own(redis_server, tmp_path, names):
    """pipeline.launcher=threads, async, two rollout workers and two teacher scorers in one process: each thread
    reads its stream as a consumer of its own name (one shared name would share one pending list and one
    heartbeat), and every admitted sample is trained once."""
    cfg = load_config(
        None,
        small(
            tmp_path,
            "trainer.total_steps=4",
            "pipeline.launcher=threads",
            "pipeline.num_rollout_workers=2",
            "pipeline.num_teacher_scorers=2",
            *joins(redis_server, names),
        ),
    )
    summary = run_pipeline(cfg)
    ids = [sid for line in trained_log(summary["run_dir"]) for sid in line["sample_ids"]]
    assert summary["step"] == 4 and len(ids) == len(set(ids)) == 4 * 2 * 2
    client = connect_redis(redis_server.url)
    for stream, group in ((names.prompts, "rollout"), (names.rollouts, "teacher")):
        consumers = sorted(c["name"].decode() for c in client.xinfo_consumers(stream, group))
        assert consumers == [f"{group}-{os.uname().nodename}-{os.getpid()}-{i}" for i in (0, 1)], consumers
    # one process for the memory ledger too: every stage reported this process's peak
    (row,) = summary["memory"]  # on the session's Redis: no private server in the ledger
    assert (
        row["processes_seen"] == 1
        and 0 < row["measured_bytes"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )


def test_weights_through_rays_object_store(ray_session, tmp_path):
    """pipeline.weight_transport=ray end to end: the student trains, nothing goes through the disk."""
    cfg = load_config(None, small(tmp_path, "trainer.total_steps=4", "pipeline.weight_transport=ray"))
    summary = run_pipeline(cfg)
    assert summary["step"] == 4 and summary["trained_samples"] == 4 * 2 * 2
    assert not (Path(summary["run_dir"]) / "weights").exists()
    losses = [m["actor/distill_loss"] for m in read_metrics(Path(summary["run_dir"]))]
    assert all(np.isfinite(losses))


def test_several_teachers_each_score_the_prompts_routed_to_them(
    ray_session, redis_server, redis_client, tmp_path, names
):
    """model.teachers + data.teacher_key: each prompt's group goes to its teacher's stream and scorers, every
    sample is trained once, and each teacher's loss is reported apart."""
    data = tmp_path / "routed.jsonl"
    rows = [row | {"domain": ("even", "odd")[i % 2]} for i, row in enumerate(task_rows("addition", count=64))]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = load_config(
        None,
        small(
            tmp_path,
            "trainer.total_steps=6",
            f"data.train_files=[{data}]",
            "model.teachers.even=tiny:teacher",
            "model.teachers.odd=tiny:student",
            "data.teacher_key=domain",
            *joins(redis_server, names),
        ),
    )
    observe(redis_client, names.scored)
    summary = run_pipeline(cfg)
    assert summary["step"] == 6
    ids = [sid for line in trained_log(summary["run_dir"]) for sid in line["sample_ids"]]
    assert len(ids) == len(set(ids)) == 6 * 2 * 2
    records = [decode_scored_record(f[b"d"]) for _, f in redis_client.xrange(names.scored)]
    assert {r.rollout.extra["domain"] for r in records} == {"even", "odd"}
    for record in records:  # scored by a scorer of the prompt's own teacher
        assert record.teacher_id.startswith(f"teacher:{record.rollout.extra['domain']}-"), record.teacher_id
    groups = {r.rollout.group_id: r.rollout for r in records}
    metrics = read_metrics(Path(summary["run_dir"]))
    for m, line in zip(metrics, trained_log(summary["run_dir"]), strict=True):
        tokens = {"even": 0, "odd": 0}  # each teacher's trained response tokens this step, from the records
        for sid in line["sample_ids"]:
            group, index = sid.rsplit("/", 1)
            tokens[groups[group].extra["domain"]] += int(groups[group].response_lengths[int(index)])
        assert (m["tokens/even"], m["tokens/odd"]) == (tokens["even"], tokens["odd"])
        assert np.isfinite(m["actor/distill_loss/even"]) and np.isfinite(m["actor/distill_loss/odd"])
    assert sum(m["tokens/even"] for m in metrics) > 0 and sum(m["tokens/odd"] for m in metrics) > 0


def test_the_students_own_top_k_reaches_the_learner(tmp_path):
    """gkd.topk_source through every stage (pipeline.launcher=threads): the rollout records the student's top-k
    ids, the teacher scores them, the learner trains on them. With the student's top-k the whole vocabulary, the
    support holds all of the teacher's mass; with the teacher's own top-16 it does not."""
    mass = {}
    for name, overrides in {
        "student": ["gkd.topk_source=student", "rollout.student_topk=320"],
        "teacher": ["gkd.teacher_topk=16"],
    }.items():
        cfg = load_config(
            None, small(tmp_path / name, "trainer.total_steps=2", "pipeline.launcher=threads", *overrides)
        )
        summary = run_pipeline(cfg)
        assert summary["step"] == 2 and summary["trained_samples"] == 2 * 2 * 2
        mass[name] = [m["actor/teacher_topk_mass"] for m in read_metrics(Path(summary["run_dir"]))]
    assert mass["student"] == pytest.approx([1.0, 1.0], abs=1e-4)
    assert max(mass["teacher"]) < 0.99


def test_the_teachers_hidden_states_reach_the_learner_as_the_whole_vocabulary(tmp_path):
    """gkd.teacher_signal=hidden through every stage (pipeline.launcher=threads, sync): the scorer sends the
    teacher's hidden states, the learner its output layer's logits from them; the distillation loss of each
    step (reverse KL at temperature 2) equals that over the student's own top-k when that top-k is the whole
    vocabulary (the teacher's log-probs at every id, the tail bucket empty) on the same samples."""
    losses = {}
    for name, overrides in {
        "hidden": ["gkd.teacher_signal=hidden"],
        "whole-vocabulary": ["gkd.topk_source=student", "rollout.student_topk=320"],
    }.items():
        objective = ["gkd.distill_loss_type=reverse_kl", "gkd.distill_temperature=2.0"]
        cfg = load_config(
            None, small(tmp_path / name, "trainer.total_steps=2", "pipeline.launcher=threads", *objective, *overrides)
        )
        summary = run_pipeline(cfg)
        assert summary["step"] == 2
        losses[name] = [m["actor/distill_loss"] for m in read_metrics(Path(summary["run_dir"]))]
    assert min(losses["hidden"]) > 0
    assert losses["hidden"] == pytest.approx(losses["whole-vocabulary"], rel=1e-4)
