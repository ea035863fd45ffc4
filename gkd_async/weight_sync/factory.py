"""The run's weight transport, from `pipeline.weight_transport`: the one place that chooses it."""

from __future__ import annotations

from pathlib import Path

import redis

from gkd_async.config.schema import GKDConfig
from gkd_async.weight_sync.base import WeightTransport
from gkd_async.weight_sync.collective import CollectiveWeights
from gkd_async.weight_sync.files import WeightStore
from gkd_async.weight_sync.in_process import InProcessWeights
from gkd_async.weight_sync.ray_objects import RayWeights
from gkd_async.weight_sync.redis_buckets import RedisWeights


def open_weight_transport(
    config: GKDConfig, client: redis.Redis, key: str, run_id: str, run_dir: Path, shown_url: str, ray_namespace: str
) -> WeightTransport:
    """Both ends open the same transport: `key` is the run's announcement key in Redis, `shown_url` the
    Redis URL as errors show it (no password), `ray_namespace` where the `ray` transport's hub actor lives."""
    pipeline = config.pipeline
    if pipeline.weight_transport == "in_process":
        return InProcessWeights(client, key, shown_url)
    if pipeline.weight_transport == "file":
        return WeightStore(client, key, run_dir / "weights", shown_url)
    if pipeline.weight_transport == "ray":
        hub = f"{run_id}/weights"  # started by the launcher, found here by name
        return RayWeights(client, key, hub, ray_namespace, shown_url, pipeline.weight_bucket_mb)
    if pipeline.weight_transport == "collective":
        return CollectiveWeights(
            client,
            key,
            shown_url,
            pipeline.weight_bucket_mb,
            pipeline.weight_collective_backend,
            pipeline.weight_collective_timeout_s,
        )
    return RedisWeights(client, key, shown_url, pipeline.weight_bucket_mb)
