"""Synthetic tasks built locally, with exact-match answers: data for the demo, the tests and benchmarks."""

from __future__ import annotations

import random
from typing import Any

TASKS = ("addition",)


def addition_rows(count: int, digits: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """`count` rows {"prompt": "12+34=", "answer": "46"} with operands of up to `digits` digits."""
    rng = random.Random(seed)
    top = 10**digits - 1
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, top), rng.randint(0, top)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def task_rows(name: str, count: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    if name == "addition":
        return addition_rows(count, seed=seed)
    raise KeyError(name)
