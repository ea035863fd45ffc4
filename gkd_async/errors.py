"""The error types a user can act on. The CLI prints them as one clear message instead of a traceback."""

from __future__ import annotations


class GKDError(Exception):
    """Base of every error gkd-async raises on purpose; its message says what was wrong and how to fix it."""


class ConfigError(GKDError):
    """A config file or override is malformed: unknown key, wrong type, value out of range."""


class RecordError(GKDError):
    """Bytes read from a stream are not a valid record of the expected kind and schema version."""


class RedisUnavailableError(GKDError):
    """Redis could not be reached (or stopped answering) after retries."""


class RedisServerNotFoundError(GKDError):
    """A private local Redis was asked for but no redis-server binary is installed."""


class RayUnavailableError(GKDError):
    """The Ray cluster named by ray.address (or $RAY_ADDRESS) could not be joined."""


class TeacherServerUnavailableError(GKDError):
    """A served teacher (teacher.backend=openai) did not answer after retries: a dead or slow teacher, not a
    fault of the entries it was given, which therefore stay pending."""
