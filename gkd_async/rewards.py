"""Custom reward functions (`custom_reward_function.path` / `.name`), loaded from the user's Python file.

Signature: `fn(prompt: str, response: str, **extra) -> float`, where `extra` holds the data row's other
scalar fields (for example `answer`). The response is decoded without special tokens.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gkd_async.errors import GKDError

RewardFn = Callable[..., float]


class RewardError(GKDError):
    """The reward function could not be loaded, raised, or returned something that is not a number."""


def load_reward_function(path: str, name: str) -> RewardFn:
    file = Path(path).expanduser()
    if not file.is_file():
        raise RewardError(f"custom_reward_function.path={path} does not exist; give the path of a Python file")
    spec = importlib.util.spec_from_file_location(f"gkd_reward_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise RewardError(f"custom_reward_function.path={path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise RewardError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")]
        what = "is not a function" if fn is not None else "is not defined"
        raise RewardError(
            f"custom_reward_function.name={name} {what} in {path}; functions there: {', '.join(found) or 'none'}"
        )
    return fn


RESERVED_PREFIX = "gkd_"  # fields gkd-async adds to a record's data (gkd_prompt, gkd_row), not the data's own


def compute_reward(fn: RewardFn, prompt: str, response: str, extra: dict[str, Any]) -> float:
    name = getattr(fn, "__name__", "reward function")
    try:
        value = fn(prompt, response, **{k: v for k, v in extra.items() if not k.startswith(RESERVED_PREFIX)})
    except Exception as exc:
        raise RewardError(f"the reward function {name} raised {type(exc).__name__}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise RewardError(
            f"the reward function {name} returned {value!r} ({type(value).__name__}); it must return a number"
        )
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(f"the reward function {name} returned {value}; it must be finite")
    return value


class TimedReward:
    """Calls a reward function with a time limit, in a daemon thread, so that a hung function fails its own
    group instead of the worker: `on_wait` runs while it waits (the worker's heartbeat). A call that timed
    out keeps its thread until it returns; nothing waits for it at exit."""

    def __init__(self, fn: RewardFn, timeout_s: float, on_wait: Callable[[], None] = lambda: None) -> None:
        self.fn, self.timeout_s, self.on_wait = fn, timeout_s, on_wait

    def __call__(self, prompt: str, response: str, extra: dict[str, Any]) -> float:
        outcome: dict[str, Any] = {}

        def call() -> None:
            try:
                outcome["value"] = compute_reward(self.fn, prompt, response, extra)
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc

        thread = threading.Thread(target=call, name="reward", daemon=True)
        thread.start()
        deadline = time.monotonic() + self.timeout_s
        while thread.is_alive():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                name = getattr(self.fn, "__name__", "reward function")
                raise RewardError(
                    f"the reward function {name} did not return within {self.timeout_s:g}s "
                    "(custom_reward_function.timeout_s)"
                )
            thread.join(min(0.5, remaining))
            if thread.is_alive():
                self.on_wait()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]
