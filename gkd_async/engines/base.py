"""The two engine interfaces every backend implements, and the sample they exchange.

A rollout engine samples n responses per prompt group from the student's current weights and takes new
weights in place; a teacher engine returns the teacher's top-k log-probs for every response token. The
workers see only these interfaces; `gkd_async.engines.make_rollout_engine` / `make_teacher_engine` pick
the backend named in the config.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Sample:
    """One sampled response and the behaviour log-prob of each of its tokens.

    The behaviour log-prob is the token's log-prob under the distribution it was drawn from:
    softmax(logits / temperature), renormalised over the top-p nucleus when top_p < 1. At top_p = 1
    that is exactly the log_softmax(z / T) the learner's PPO ratio is computed against.
    """

    response_ids: np.ndarray  # int32 [R]
    logprobs: np.ndarray  # float32 [R]
    topk_ids: np.ndarray | None = None  # int32 [R, k]: the policy's top-k ids at each position, when asked for


def sample_seed(group_seed: int, index: int) -> int:
    """The seed of sample `index` of a group: each sample draws from its own stream, so what a sample gets
    does not depend on n, on the other groups of the call, or on which worker runs it."""
    digest = hashlib.sha256(f"{group_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class RolloutEngine(ABC):
    """Sampling from the student. `version` is the weights version loaded (0: the initial weights)."""

    version: int = 0

    @abstractmethod
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Take new weights (HF parameter names) in place; weights that do not fit must raise and leave the
        engine as it was."""

    @abstractmethod
    def generate_groups(
        self,
        prompts: Sequence[np.ndarray],
        seeds: Sequence[int],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        topk: int = 0,
    ) -> list[list[Sample]]:
        """n samples for each prompt, each group's sampling seeded by its own seed; a response ends after
        and including the end-of-sequence token, or at `max_new_tokens`. With `topk`, each sample also
        carries the ids of the policy's `topk` most likely tokens at each of its positions."""

    def groups_per_call(self, prompt_lengths: Sequence[int], n: int, max_new_tokens: int) -> int:
        """How many of these groups (in order) to hand to one `generate_groups` call: all by default."""
        return len(prompt_lengths)

    def generate(
        self, prompt_ids: np.ndarray, n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> list[Sample]:
        return self.generate_groups([prompt_ids], [seed], n, temperature, top_p, max_new_tokens)[0]


class TeacherEngine(ABC):
    """Scoring with the teacher."""

    def available(self) -> bool:
        """Whether the teacher answers now; a teacher in the scorer's own process always does."""
        return True

    @abstractmethod
    def score(
        self,
        pairs: Sequence[tuple[np.ndarray, np.ndarray]],
        k: int,
        temperature: float,
        batch_size: int,
        vocab_limit: int | None = None,
        sampled: bool = False,
        extra_ids: Sequence[np.ndarray] | None = None,
    ) -> list[tuple[np.ndarray, ...]]:
        """For each (prompt ids, response ids): top-k ids int32 [R, k] and log-probs float32 [R, k] of
        log_softmax(logits / temperature) over the first `vocab_limit` ids (all when None); k may be 0.
        With `sampled`, a third array: the log-prob of each response token itself, float32 [R].
        With `extra_ids` (one int32 [R, k_s] per pair: the student's own top-k, gkd.topk_source), the ids
        and log-probs are [R, k + k_s]: the top-k, then the teacher's log-prob at each extra id, -inf where
        that id is already among the top-k (absent: counted once). Only engines that see the whole
        distribution can; the others raise."""
