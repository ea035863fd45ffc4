"""Reward functions shipped with gkd-async; point custom_reward_function.path at this file to use them."""

from __future__ import annotations


def exact_match(prompt: str, response: str, answer: str | None = None, **extra: object) -> float:
    """1.0 when the response, stripped, is the reference answer; else 0.0."""
    return float(answer is not None and response.strip() == str(answer).strip())
