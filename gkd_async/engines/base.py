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

    def score_branches(
        self,
        pairs: Sequence[tuple[np.ndarray, np.ndarray]],
        branches: Sequence[Sequence[tuple[int, int]]],
        k: int,
        temperature: float,
        batch_size: int,
        vocab_limit: int | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each pair and each (row, token) of its `branches`: the teacher's top-k ids int32 [m, k] and
        log-probs float32 [m, k] at the row after `token`, read in place of the response's own token at `row`
        (the context is the prompt, the response's first `row` tokens, then `token`). The cross-tokenizer
        mapping asks for them (`TokenBridge`): what follows a string the teacher's own rows never continue.

        Here one sequence per branch, scored whole (its last row); engines that can share the context override
        it (the HF teacher: one pass of tree attention per batch; the vLLM teacher: one generated token a branch,
        its context from the prefix cache)."""
        flat = [(i, row, token) for i, wanted in enumerate(branches) for row, token in wanted]
        extended = [
            (pairs[i][0], np.concatenate([pairs[i][1][:row], [token, token]]).astype(np.int32))
            for i, row, token in flat
        ]  # the second `token` is a placeholder: its row, the last, is the one wanted
        scored = self.score(extended, k, temperature, batch_size, vocab_limit) if extended else []
        out: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in pairs]
        for (i, _, _), (ids, logprobs) in zip(flat, scored, strict=True):
            out[i].append((ids[-1], logprobs[-1]))
        return stacked_rows(out, k)


def stacked_rows(rows: list[list[tuple[np.ndarray, np.ndarray]]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per pair, its branch rows' (ids [k], log-probs [k]) stacked as `score_branches` returns them ([m, k] each)."""
    return [
        (np.stack([ids for ids, _ in got]), np.stack([lps for _, lps in got]))
        if got
        else (np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
        for got in rows
    ]
