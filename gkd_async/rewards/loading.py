"""Custom reward functions (`custom_reward_function.path` / `.name`), loaded from the user's Python file.

Signature: `fn(prompt: str, response: str, **extra) -> float`, where `extra` holds the data row's other
fields (for example `answer`; nested ones such as verl's `reward_model` as dicts). The response is decoded
without special tokens.

A verl reward module works unchanged: a function with verl's signature `compute_score(data_source,
solution_str, ground_truth, extra_info=None)` is recognised by its parameter names and called with the row's
`data_source`, the response, `reward_model["ground_truth"]` (or a top-level `ground_truth`) and `extra_info`;
a dict it returns gives its `score`.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections.abc import Callable, Collection, Iterable
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
    return as_verl_reward(fn) if is_verl_compute_score(fn) else fn


VERL_PARAMETERS = ("data_source", "solution_str", "ground_truth")


def is_verl_compute_score(fn: Callable[..., Any]) -> bool:
    """Whether `fn` has verl's reward signature: compute_score(data_source, solution_str, ground_truth, ...)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(name in parameters for name in VERL_PARAMETERS)


def as_verl_reward(fn: Callable[..., Any]) -> RewardFn:
    """A verl `compute_score` as a reward function of ours: arguments taken from the row's fields."""
    takes_extra_info = "extra_info" in inspect.signature(fn).parameters

    def reward(prompt: str, response: str, **fields: Any) -> Any:
        judged = fields.get("reward_model")
        truth = judged.get("ground_truth") if isinstance(judged, dict) else None
        truth = fields.get("ground_truth") if truth is None else truth
        kwargs = {"data_source": fields.get("data_source"), "solution_str": response, "ground_truth": truth}
        if takes_extra_info:
            kwargs["extra_info"] = fields.get("extra_info")
        value = fn(**kwargs)
        return value["score"] if isinstance(value, dict) and "score" in value else value

    reward.__name__ = getattr(fn, "__name__", "compute_score")
    reward.verl_compute_score = True  # type: ignore[attr-defined]
    return reward


RESERVED_PREFIX = "gkd_"  # fields gkd-async adds to a record's data (gkd_prompt, gkd_row), not the data's own


def check_reward_takes_fields(fn: RewardFn, field_sets: Iterable[Collection[str]]) -> None:
    """Refuse at start a reward function that cannot be called as fn(prompt, response, **fields) with the fields
    of the data's rows (each distinct set of names once), instead of dead-lettering every group at run time."""
    name = getattr(fn, "__name__", "reward function")
    if getattr(fn, "verl_compute_score", False):
        for fields in field_sets:
            if "reward_model" not in fields and "ground_truth" not in fields:
                raise RewardError(
                    f"the reward function {name} has verl's signature (data_source, solution_str, ground_truth, "
                    "extra_info) but a row of the data has neither reward_model.ground_truth nor ground_truth: give "
                    "every row one, or a reward function of the signature (prompt, response, **fields)"
                )
        return
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a callable without a signature: its first call tells
        return
    for fields in {frozenset(f for f in fields if not f.startswith(RESERVED_PREFIX)) for fields in field_sets}:
        try:
            signature.bind("prompt", "response", **dict.fromkeys(fields))
        except TypeError as exc:
            shown = ", ".join(sorted(fields)) or "none"
            raise RewardError(
                f"the reward function {name}{signature} cannot be called as {name}(prompt, response, **fields) "
                f"with the data's fields ({shown}): {exc}. Give it the parameters (prompt, response, **extra), or "
                "name each field it takes as a parameter"
            ) from None


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
