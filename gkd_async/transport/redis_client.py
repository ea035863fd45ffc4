"""Connecting to Redis: retries with backoff, and one clear error naming the URL when it stays unreachable."""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar
from urllib.parse import quote

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from gkd_async.errors import RedisUnavailableError
from gkd_async.redaction import ENV_REFERENCE, redact_url

P = ParamSpec("P")
R = TypeVar("R")


def resolve_url(url: str) -> str:
    """`url` with each `${NAME}` replaced by that environment variable, so that a config (and the copy of
    it in the run directory) can name a password without holding it: redis://:${GKD_REDIS_PASSWORD}@host/0."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise RedisUnavailableError(
                f"pipeline.redis_url {url!r} uses the environment variable {name}, which is not set here; "
                f"export {name} before starting gkd-async"
            )
        return quote(os.environ[name], safe="")

    return ENV_REFERENCE.sub(value, url)


def connect_redis(url: str, *, retries: int = 6, backoff_cap_s: float = 2.0) -> redis.Redis:
    """A binary-safe client for `url` (after `resolve_url`) that retries lost connections with backoff.

    Raises RedisUnavailableError when the server cannot be reached now.
    """
    try:
        client = redis.Redis.from_url(
            resolve_url(url),
            retry=Retry(ExponentialBackoff(cap=backoff_cap_s, base=0.05), retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            socket_connect_timeout=5,
            health_check_interval=30,
        )
    except ValueError as exc:
        raise RedisUnavailableError(
            f"pipeline.redis_url {redact_url(url)!r} is not a Redis URL ({exc}); "
            "use redis://[:password@]host:port/db, rediss:// for TLS, or unix:///path/to/redis.sock; "
            "percent-encode special characters in the password (@ as %40, # as %23, / as %2F)"
        ) from None
    with unavailable_as_error(url):
        client.ping()
    return client


@contextlib.contextmanager
def unavailable_as_error(url: str) -> Iterator[None]:
    """Turn redis-py's connection failures into a RedisUnavailableError that says what to do."""
    try:
        yield
    except redis.AuthenticationError as exc:
        raise RedisUnavailableError(
            f"Redis at {redact_url(url)} refused the credentials ({exc}); check the password in pipeline.redis_url"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailableError(
            f"cannot reach Redis at {redact_url(url)} ({exc}). Is the server running? Start one "
            "(e.g. 'redis-server --port 6379') or fix pipeline.redis_url; leave pipeline.redis_url unset "
            "to let gkd-async start a private local server."
        ) from None


def raises_unavailable(method: Callable[P, R]) -> Callable[P, R]:
    """Decorator for methods of objects with a `url` attribute: connection failures become clear errors."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with unavailable_as_error(args[0].url):  # type: ignore[attr-defined]
            return method(*args, **kwargs)

    return wrapper
