"""Attacks from outside a run's trust boundary, each failing against the real parts: a process on the network
that reaches a served teacher's traffic or the learner's ports, someone who can write the run's Redis keys,
files of the run read by other users, a tampered checkpoint pointer, secrets in what is shown."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gkd_async.config import load_config
from gkd_async.engines.served import ServedTeacherEngine
from gkd_async.errors import ConfigError, TeacherServerUnavailableError
from gkd_async.local_redis import free_port
from gkd_async.streams import StreamNames

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=REPO, timeout=120, env=env
    )


def served(base_url, *overrides):
    section = load_config(
        None,
        ["teacher.backend=openai", f"teacher.openai.base_url={base_url}", "teacher.openai.max_retries=0",
         "teacher.openai.timeout_s=1", *overrides],
    )  # fmt: skip
    return section.teacher.openai


def test_a_teacher_api_key_never_crosses_the_network_in_clear(monkeypatch):
    """Refused before any request: the would-be server never sees the key. https, loopback, no key or the
    explicit allow_insecure go on to connect (and, with nothing listening, fail to)."""
    monkeypatch.delenv("GKD_TEACHER_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-a-real-key-for-another-service")
    remote = "http://user:hunter2@192.0.2.7:8000/v1"  # TEST-NET: nothing answers there
    # no key of ours set: OPENAI_API_KEY is not read, so nothing is refused and nothing would be sent
    with pytest.raises(TeacherServerUnavailableError):
        ServedTeacherEngine(served(f"http://127.0.0.1:{free_port()}/v1"))
    monkeypatch.setenv("GKD_TEACHER_API_KEY", "sk-teacher")
    start = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"plain http:// to another machine.*teacher.openai.allow_insecure=true"
    ) as err:
        ServedTeacherEngine(served(remote))
    assert time.monotonic() - start < 0.5 and "hunter2" not in str(err.value)  # no request, no credentials shown
    for allowed in (f"http://127.0.0.1:{free_port()}/v1", f"http://localhost:{free_port()}/v1"):
        with pytest.raises(TeacherServerUnavailableError):
            ServedTeacherEngine(served(allowed))
    with pytest.raises(TeacherServerUnavailableError) as err:
        ServedTeacherEngine(served(remote, "teacher.openai.allow_insecure=true"))
    assert "hunter2" not in str(err.value)


def test_config_show_and_the_runs_config_hold_no_password():
    url = "rediss://:s3cret@redis.example:6380/0?ssl_password=k3y"
    shown = cli("config", "show", f"pipeline.redis_url={url}")
    assert shown.returncode == 0 and "redis.example:6380" in shown.stdout
    assert "s3cret" not in shown.stdout and "k3y" not in shown.stdout


def test_a_one_rank_learner_opens_no_port_to_the_network(tmp_path):
    """Its process group's store is in-process; gloo's own socket stays on loopback."""
    code = (
        "import psutil, torch, torch.distributed as dist\n"
        "from workers.learner import join_learner_group\n"
        "join_learner_group(None, 'cpu', 0, 1)\n"
        "t = torch.ones(2); dist.all_reduce(t); assert t.tolist() == [1.0, 1.0]\n"
        "print([c.laddr.ip for c in psutil.Process().net_connections('inet') if c.status == 'LISTEN'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    listening = eval(done.stdout.strip().splitlines()[-1])  # a list of addresses, printed by the child
    assert all(ip in ("127.0.0.1", "::1") for ip in listening), listening


@pytest.mark.parametrize("announced", ["file:///tmp/gkd-owned", "env://", "tcp://evil.example", "tcp://h:1/x"])
def test_learner_ranks_take_nothing_but_a_tcp_address_from_redis(redis_server, redis_client, names, announced):
    from workers.common import RunContext, RunFailedError
    from workers.learner import rendezvous

    ctx = RunContext(load_config(), redis_server.url, names.run_id, Path("/nonexistent"))
    redis_client.set(StreamNames(names.run_id).rendezvous, announced)
    with pytest.raises(RunFailedError, match="not tcp://HOST:PORT; something other than rank 0 wrote it"):
        rendezvous(ctx, 1, 2, timeout_s=1)
    redis_client.set(StreamNames(names.run_id).rendezvous, "tcp://10.0.0.3:29500")
    assert rendezvous(ctx, 1, 2, timeout_s=1) == "tcp://10.0.0.3:29500"


def test_inspect_writes_nothing_from_redis_to_the_terminal_but_text(redis_server, redis_client, names):
    """Consumer names, hosts and reasons are whatever was written to the run's keys: escapes and markup are
    shown inert, and heartbeats of the wrong shape as invalid."""
    hostile = "\x1b]0;owned\x07\x1b[2J[bold red]fake[/]"
    redis_client.hset(
        names.heartbeats,
        mapping={
            "rollout-a": '{"ts": 1, "role": "rollout", "host": "'
            + hostile.replace("\x1b", "\\u001b").replace("\x07", "\\u0007")
            + '"}',
            "teacher-b": "[1, 2]",
            "learner-c": '{"ts": "soon"}',
            hostile: "not json",
        },
    )
    redis_client.set(names.state, "running")
    result = cli(
        "inspect", "--redis-url", redis_server.url, "--run", names.run_id, env={**os.environ, "COLUMNS": "250"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "[bold red]fake[/]" in result.stdout.replace("\n", "")  # markup shown as text, not applied
    assert result.stdout.count("invalid heartbeat") == 3


@pytest.mark.parametrize("pointer", ["../../elsewhere", "/etc", "step_0000003/../../x"])
def test_resume_follows_latest_only_to_a_step_directory_of_its_own_root(tmp_path, pointer):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("{}\n")
    (run_dir / "checkpoints" / "latest").write_text(pointer)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "trainer_state.json").write_text("{}")  # a checkpoint it must not reach
    result = cli("resume", str(run_dir))
    assert result.returncode == 2 and "not a step directory" in result.stderr and "Traceback" not in result.stderr
