import atexit
import os
import shutil
import tempfile
import uuid

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are built once per session into a private cache that subprocesses and Ray actors inherit.
os.environ["GKD_ASYNC_CACHE"] = tempfile.mkdtemp(prefix="gkd-test-cache-")


def _remove_cache(path: str = os.environ["GKD_ASYNC_CACHE"], owner: int = os.getpid()) -> None:
    """At the end of the session (not of a forked child's exit): the real-vocabulary models alone are 120 MB."""
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_remove_cache)

import pytest  # noqa: E402
import torch  # noqa: E402

from gkd_async.transport.local_redis import LocalRedisServer  # noqa: E402
from gkd_async.transport.redis_client import connect_redis  # noqa: E402
from gkd_async.transport.streams import StreamNames  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def redis_server():
    """One private redis-server (a Unix socket, a password, no persistence) for the whole session."""
    with LocalRedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    client = connect_redis(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def names():
    """Keys of a run of its own, so tests sharing the session's server never see each other's entries."""
    return StreamNames(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that launches a pipeline."""
    from workers.launch.ray_actors import init_ray, stop_ray

    init_ray()
    yield
    stop_ray()


def lay_into_hf_cache(hf_home, repo_id: str, source: str, revision: str = "a" * 40):
    """A model laid out as `huggingface_hub` caches a download: hub/models--ORG--NAME/snapshots/REVISION/ with
    refs/main naming it. Nothing here reaches the Hub, so Hub ids are tested against such a cache."""
    import shutil
    from pathlib import Path

    from gkd_async.models.loading import resolve_model_path

    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(resolve_model_path(source), snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An offline HF cache of the test's own, as HF_HOME: lay models into it with `lay_into_hf_cache`."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home
