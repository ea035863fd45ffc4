"""Attacks from outside a run's trust boundary, each failing against the real parts: a process on the network
that reaches a served teacher's traffic or the learner's ports, someone who can write the run's Redis keys,
files of the run read by other users, a tampered checkpoint pointer, secrets in what is shown."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import cli

from gkd_async.config.loading import load_config
from gkd_async.engines.served import ServedTeacherEngine
from gkd_async.errors import ConfigError, TeacherServerUnavailableError
from gkd_async.transport.local_redis import free_port
from gkd_async.transport.streams import StreamNames

REPO = Path(__file__).resolve().parents[1]


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
    # no key of ours set: OPENAI_API_KEY is not read, so there is no key to refuse sending (read, it would be
    # refused here in clear) and the engine goes on to connect
    with pytest.raises(TeacherServerUnavailableError):
        ServedTeacherEngine(served(remote))
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


def test_the_redis_url_shows_its_password_nowhere():
    """pipeline.redis_url is a SecretUrl: the config's repr and str, its YAML (config.yaml, trackers) and JSON
    (a Ray stage's arguments) dumps, a run context's repr and an f-string show *** for the password; only
    get_secret_value() has it, and a `${NAME}` reference, no secret, is kept as written."""
    from gkd_async.config.loading import dump_config
    from workers.common import RunContext

    url = "redis://:hunter2@redis.example:6379/0"
    cfg = load_config(None, [f"pipeline.redis_url={url}"])
    ctx = RunContext(cfg, cfg.pipeline.redis_url, "run-x", Path("runs/run-x"))
    shown = [
        repr(cfg), str(cfg), dump_config(cfg), json.dumps(cfg.model_dump(mode="json")), repr(ctx),
        f"{cfg.pipeline.redis_url}", ctx.shown_url, repr(RunContext(cfg, url, "run-x", Path("runs/run-x"))),
    ]  # fmt: skip
    assert all("hunter2" not in text and "redis.example:6379" in text for text in shown)
    assert cfg.pipeline.redis_url.get_secret_value() == url and ctx.url == url
    named = load_config(None, ["pipeline.redis_url=redis://:${GKD_REDIS_PASSWORD}@redis.example:6379/0"])
    assert "redis://:${GKD_REDIS_PASSWORD}@redis.example:6379/0" in dump_config(named)


def test_a_one_rank_learner_opens_no_port_to_the_network(tmp_path):
    """Its process group's store is in-process; gloo's own socket stays on loopback."""
    code = (
        "import psutil, torch, torch.distributed as dist\n"
        "from workers.learner.rendezvous import join_learner_group\n"
        "join_learner_group(None, 'cpu', 0, 1)\n"
        "t = torch.ones(2); dist.all_reduce(t); assert t.tolist() == [1.0, 1.0]\n"
        "import json\n"
        "print(json.dumps([c.laddr.ip for c in psutil.Process().net_connections('inet') if c.status == 'LISTEN']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    listening = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(ip in ("127.0.0.1", "::1") for ip in listening), listening


RANK_0 = """
import json, sys, psutil
from pathlib import Path
from gkd_async.weight_sync.collective import CollectiveWeights
from gkd_async.config.loading import load_config
from workers.common import RunContext
from workers.learner.rendezvous import rendezvous_store

ctx = RunContext(load_config(), sys.argv[1], sys.argv[2], Path("/nonexistent"))
store = rendezvous_store(ctx, 0)  # a learner of several ranks meets here
weights = CollectiveWeights(ctx.client, ctx.names.weights)
weights.serve()  # rollout workers meet here
learner = ctx.client.get(ctx.names.rendezvous).decode()
collective = json.loads(ctx.client.get(ctx.names.weights + ":collective"))
listening = [[c.laddr.ip, c.laddr.port] for c in psutil.Process().net_connections("inet") if c.status == "LISTEN"]
print(json.dumps({"learner": learner, "collective": collective, "listening": listening}))
"""


def test_rank_0_listens_on_the_address_it_announces_and_no_other(redis_server, names):
    """The learner's rendezvous store and the collective transport's store: given a host, torch's TCPStore
    would still listen on every interface ('::'); ours keep the one address they announce."""
    done = subprocess.run(
        [sys.executable, "-c", RANK_0, redis_server.url, names.run_id], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    shown = json.loads(done.stdout.strip().splitlines()[-1])
    learner_host, _, learner_port = shown["learner"].removeprefix("tcp://").rpartition(":")
    collective = shown["collective"]
    announced = {(learner_host.strip("[]"), int(learner_port)), (collective["host"], collective["port"])}
    listening = {(ip, port) for ip, port in shown["listening"]}
    assert announced <= listening, (announced, listening)
    hosts = {host for host, _ in announced}
    assert all(ip in hosts for ip, _ in listening), (hosts, listening)


@pytest.mark.parametrize("announced", ["file:///tmp/gkd-owned", "env://", "tcp://evil.example", "tcp://h:1/x"])
def test_learner_ranks_take_nothing_but_a_tcp_address_from_redis(redis_server, redis_client, names, announced):
    from workers.common import RunContext, RunFailedError
    from workers.learner.rendezvous import announced_rendezvous

    ctx = RunContext(load_config(), redis_server.url, names.run_id, Path("/nonexistent"))
    redis_client.set(StreamNames(names.run_id).rendezvous, announced)
    with pytest.raises(RunFailedError, match="not tcp://HOST:PORT; something other than rank 0 wrote it"):
        announced_rendezvous(ctx, 1, timeout_s=1)
    redis_client.set(StreamNames(names.run_id).rendezvous, "tcp://10.0.0.3:29500")
    assert announced_rendezvous(ctx, 1, timeout_s=1) == ("10.0.0.3", 29500)
    redis_client.set(StreamNames(names.run_id).rendezvous, "tcp://[fd00::3]:29500")
    assert announced_rendezvous(ctx, 1, timeout_s=1) == ("fd00::3", 29500)


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


def test_one_read_takes_no_more_entries_at_the_size_cap_than_fit_the_read_budget(redis_client, names):
    """Redis hands a read over whole, before any entry can be checked: with a cap of 300 MiB an entry, a read
    asked for 10 takes 3 (1 GiB at most, however large a hostile writer made them); small caps leave it be."""
    from gkd_async.transport.streams import READ_BUDGET_BYTES, StreamConsumer, StreamProducer

    StreamProducer(redis_client, names.rollouts).add([b"x"] * 10)
    capped = StreamConsumer(redis_client, names.rollouts, "big", "c", dead_stream=names.dead, max_entry_bytes=300 << 20)
    assert len(capped.read(10)) == READ_BUDGET_BYTES // (300 << 20) == 3
    small = StreamConsumer(redis_client, names.rollouts, "small", "c", dead_stream=names.dead, max_entry_bytes=1 << 20)
    assert len(small.read(10)) == 10


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


STRANGER = """
import sys, json, time
from datetime import timedelta
import torch.distributed as dist
from gkd_async.transport.redis_client import connect_redis

url, key, mode = sys.argv[1:4]
address = json.loads(connect_redis(url).get(key + ":collective"))  # where rank 0 listens (a port scan finds it)
store = dist.TCPStore(address["host"], int(address["port"]), is_master=False, timeout=timedelta(seconds=5))
slot = store.add("slots", 1) - 1
if mode == "silent":  # registers, then never answers
    time.sleep(60)
challenge = store.get(f"challenge{slot}").decode()
store.set(f"proof{slot}", "0" * 64)  # a guess: it lacks the run's secret
try:  # and tries to meet rank 0 as a pair did before the handshake existed
    dist.ProcessGroupGloo(dist.PrefixStore(f"pair{slot}", store), 1, 2, timedelta(seconds=5))
    print("paired")
except Exception as exc:
    print("refused", type(exc).__name__)
"""


@pytest.mark.parametrize("stranger", ["guessing", "silent"])
def test_a_stranger_on_the_weight_port_gets_nothing_and_stalls_nothing(redis_server, names, tmp_path, stranger):
    """pipeline.weight_transport=collective: a process that reaches rank 0's store but lacks the run's secret
    (it is in the run's Redis only) is never paired and never sent a weight; a real worker that registers
    after it still gets the next version at once."""
    from weight_workers import model_like, received, same, start_worker

    from gkd_async.transport.redis_client import connect_redis
    from gkd_async.weight_sync.collective import CollectiveWeights

    client = connect_redis(redis_server.url)
    learner = CollectiveWeights(client, names.weights, bucket_mb=1 / 1024)
    learner.publish(model_like(1), 1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    outsider = subprocess.Popen(
        [sys.executable, "-c", STRANGER, redis_server.url, names.weights, stranger], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    worker = None
    try:
        deadline = time.monotonic() + 30
        while int(learner._pairs.store.add("slots", 0)) < 1:  # the stranger has registered first
            assert time.monotonic() < deadline and outsider.poll() is None, outsider.communicate()
            time.sleep(0.05)
        start = time.monotonic()
        worker = start_worker(redis_server, names.weights, tmp_path / "w")
        assert same(received(tmp_path / "w", 1), model_like(1))
        assert time.monotonic() - start < 20  # not held behind the stranger's handshake
        learner.publish(model_like(2), 2)
        assert same(received(tmp_path / "w", 2), model_like(2))
        assert learner.connected_workers == 1  # the real worker alone
        if stranger == "guessing":
            out, err = outsider.communicate(timeout=60)
            assert out.startswith("refused"), (out, err[-2000:])
    finally:
        outsider.kill()
        if worker is not None:
            worker.kill()
            worker.wait()
        learner.close()


def test_a_weights_receiver_allocates_nothing_it_was_not_expecting(redis_server, names):
    """A description larger than any bucket's, or of a tensor the model does not have, is refused before a
    byte is allocated for it."""
    from datetime import timedelta

    import torch

    from gkd_async.transport.redis_client import connect_redis
    from gkd_async.weight_sync.collective import MAX_META_BYTES, _Receiver, allocate_bucket, describe_bucket

    class Sender:  # the other end of a pair, as a stream of tensors
        def __init__(self, *messages):
            self.messages = list(messages)

        def recv(self, tensors, src, tag):
            tensors[0].copy_(self.messages.pop(0))
            return self

        def wait(self):
            return True

    receiver = _Receiver(connect_redis(redis_server.url), names.weights, "gloo", timedelta(seconds=5))
    try:
        with pytest.raises(ValueError, match="a description of 1099511627776 bytes"):
            receiver._receive(Sender(torch.tensor([1, 2**40, 1])))
        model = {"w": (4, 4)}
        receiver.expected = model
        meta = describe_bucket({"w": torch.zeros(4, 4)})
        assert list(allocate_bucket(meta, expected=model)) == ["w"]
        huge = describe_bucket({"w": torch.zeros(0, 4)}).replace(b"[0, 4]", b"[1000000, 1000000]")
        header = torch.tensor([1, len(huge), 1])
        with pytest.raises(ValueError, match="is not one of the model's"):
            receiver._receive(Sender(header, torch.frombuffer(bytearray(huge), dtype=torch.uint8)))
        with pytest.raises(ValueError, match="is not one of the model's"):
            allocate_bucket(describe_bucket({"other": torch.zeros(4, 4)}), expected=model)
        assert MAX_META_BYTES < 2**40
    finally:
        receiver.close()


@pytest.mark.slow
def test_the_redis_password_is_in_no_file_log_output_or_command_line_of_a_run(redis_server, names, tmp_path):
    """A run on a password-protected Redis (named by a variable, as the README advises): the password is in no
    command line of any process the run starts (Ray's included), in no file of the run directory (its
    `redis_url` keeps the reference), and not in what the command prints."""
    import psutil

    password = redis_server.password
    url = redis_server.url.replace(password, "${GKD_TEST_REDIS_PASSWORD}")
    args = ["run", f"pipeline.redis_url={url}", f"pipeline.run_id={names.run_id}", "trainer.total_steps=3"]
    args += ["rollout.max_new_tokens=4", "logging.tensorboard=false", f"logging.dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "GKD_TEST_REDIS_PASSWORD": password}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen = set()
    while proc.poll() is None:
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for child in family:
            try:
                seen.add((child.pid, " ".join(child.cmdline())))
            except psutil.Error:
                continue
        time.sleep(0.2)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert len(seen) > 3  # the command, Ray's processes and the stage actors were looked at
    assert not [cmd for _, cmd in seen if password in cmd]
    assert password not in out + err
    run_dir = tmp_path / names.run_id
    assert not [p for p in run_dir.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
    assert "${GKD_TEST_REDIS_PASSWORD}" in (run_dir / "redis_url").read_text()  # resume resolves it again


def listeners_of_tree(root: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket listening in `root`'s process tree."""
    import psutil

    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for proc in procs:
        try:
            for conn in proc.net_connections("inet"):
                if conn.status == "LISTEN":
                    found.add((conn.laddr.ip, conn.laddr.port, proc.name()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ray", "threads"])
def test_a_one_machine_run_listens_on_loopback_only(tmp_path, launcher):
    """`gkd-async run` on its own machine, as a new user starts it: every process of the run (the driver, and with
    the Ray launcher Ray's GCS, raylets, agents and every stage actor's worker) listens on loopback or not at
    all, watched through the whole run. Ray alone would bind its servers to every interface or the routed address."""
    run = subprocess.Popen(
        [str(Path(sys.executable).parent / "gkd-async"), "run", "configs/default.yaml", f"pipeline.launcher={launcher}",
         "trainer.total_steps=6", f"logging.dir={tmp_path}", "logging.tensorboard=false"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: set[tuple[str, int, str]] = set()
    deadline = time.monotonic() + 240
    while run.poll() is None and time.monotonic() < deadline:
        seen |= listeners_of_tree(run.pid)
        time.sleep(0.3)
    assert run.wait(timeout=60) == 0, run.stderr.read()[-3000:]
    assert any(tmp_path.glob("*/final/config.json"))  # the run trained to its end
    names = {name for _, _, name in seen}
    if launcher == "ray":  # watched while Ray ran: its own servers and the stage actors' workers were seen
        assert {"gcs_server", "raylet"} <= names and any(name.startswith("ray::") for name in names), seen
    import ipaddress

    outside = {s for s in seen if not ipaddress.ip_address(s[0].removeprefix("::ffff:")).is_loopback}
    assert not outside, outside
