import os
import tempfile
import uuid

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are built once per session into a private cache that subprocesses and Ray actors inherit.
os.environ["GKD_ASYNC_CACHE"] = tempfile.mkdtemp(prefix="gkd-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

from gkd_async.local_redis import LocalRedisServer  # noqa: E402
from gkd_async.redis_client import connect_redis  # noqa: E402
from gkd_async.streams import StreamNames  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def redis_server():
    """One private redis-server (free port, password, no persistence) for the whole session."""
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
    from workers.launcher import init_ray, stop_ray

    init_ray()
    yield
    stop_ray()
