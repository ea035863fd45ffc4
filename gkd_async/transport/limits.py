"""What a record must fit in this run: the token ids the models have, the lengths the run allows, and the size
of a stream entry. The codec (records.py) checks a record's shape; these check it against the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gkd_async.config.plan import RunPlan
from gkd_async.errors import RecordError

if TYPE_CHECKING:
    from gkd_async.config.schema import GKDConfig
from gkd_async.transport.records import PromptRecord, RolloutRecord, ScoredRecord


@dataclass(frozen=True)
class RecordLimits:
    """What a record must fit: the token ids the models have and the lengths the run allows.

    The codec checks a record's shape; these limits check it against this run, so that a well-formed
    record with an out-of-range id or an oversized response fails alone instead of in a model.
    """

    vocab_size: int
    max_prompt_length: int
    max_new_tokens: int
    samples_per_group: int | None = None  # None: not checked
    total_steps: int | None = None  # None: not checked

    @classmethod
    def for_run(cls, config: GKDConfig, vocab_size: int) -> RecordLimits:
        """The limits of the run `config` describes, the one place they are derived from it: the lengths, the
        samples in each group (rollout.n; one per row when the rows are a scored data set) and the steps."""
        return cls(
            vocab_size,
            config.data.max_prompt_length,
            config.rollout.max_new_tokens,
            config.samples_per_group,
            config.trainer.total_steps,
        )


FIELDS_MARGIN = 16 * 2**20  # room for a row's own fields (reference answers, test cases) and the envelope


def largest_record_bytes(config: GKDConfig, teacher_hidden_size: int = 0) -> int:
    """The size cap of a stream entry in this run (unless pipeline.max_record_mb sets one): twice what its
    largest scored record can take (every sample of a group at the longest prompt and response, each token
    with its teacher top-k ids and log-probs, the student's top-k ids, its id, behaviour and teacher log-probs, and
    with gkd.teacher_signal=hidden the teacher's hidden state of `teacher_hidden_size` float32 numbers), plus room
    for the row's fields. A hostile entry is refused before it is decoded into that much memory."""
    tokens = config.data.max_prompt_length + config.rollout.max_new_tokens
    samples = config.samples_per_group
    plan = RunPlan.of(config)
    logprob_bytes = 2 if config.teacher.logprob_dtype == "float16" else 4
    per_token = plan.topk * (4 + logprob_bytes) + plan.student_topk * 4 + 3 * 4 + teacher_hidden_size * 4
    return 2 * samples * tokens * per_token + FIELDS_MARGIN


def check_prompt_within(prompt_ids: np.ndarray, limits: RecordLimits) -> None:
    if prompt_ids.shape[0] > limits.max_prompt_length:
        raise RecordError(
            f"the prompt has {prompt_ids.shape[0]} tokens, more than data.max_prompt_length={limits.max_prompt_length}"
        )
    _check_ids("prompt_ids", prompt_ids, limits.vocab_size)


def check_prompt_record_within(record: PromptRecord, limits: RecordLimits) -> None:
    """A prompt as the learner's admission writes it: within the lengths and vocabulary, its step within the
    run and the weights it waits for no newer than its own step (else a worker would wait for ever)."""
    check_prompt_within(record.prompt_ids, limits)
    if limits.total_steps is not None and record.step >= limits.total_steps:
        raise RecordError(
            f"the prompt is for step {record.step}, past the run's trainer.total_steps={limits.total_steps}"
        )
    if record.min_version > record.step:
        raise RecordError(
            f"the prompt asks for student weights of version {record.min_version} or newer for step {record.step}; "
            "admission never asks for weights newer than the prompt's own step"
        )


def check_rollout_within(record: RolloutRecord, limits: RecordLimits) -> None:
    check_prompt_within(record.prompt_ids, limits)
    samples = len(record.response_lengths)
    if limits.samples_per_group is not None and samples != limits.samples_per_group:
        raise RecordError(
            f"the group has {samples} samples; this run samples {limits.samples_per_group} per prompt (rollout.n)"
        )
    longest = int(record.response_lengths.max(initial=0))
    if longest > limits.max_new_tokens:
        raise RecordError(f"a response has {longest} tokens, more than rollout.max_new_tokens={limits.max_new_tokens}")
    _check_ids("response_ids", record.response_ids, limits.vocab_size)
    if record.student_topk_ids is not None:
        _check_ids("student_topk_ids", record.student_topk_ids, limits.vocab_size)


def check_scored_within(record: ScoredRecord, limits: RecordLimits) -> None:
    check_rollout_within(record.rollout, limits)
    _check_ids("topk_ids", record.topk_ids, limits.vocab_size)


def _check_ids(name: str, ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise RecordError(
            f"{name} holds token id {int(ids.max()) if ids.max() >= vocab_size else int(ids.min())}, outside the "
            f"vocabulary of {vocab_size} tokens"
        )
