"""Samples from scored records, micro-batches within the OOM knobs, and their padded tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from gkd_async.loss.policy import grpo_advantages
from gkd_async.transport.records import ScoredRecord


@dataclass
class TrainSample:
    sample_id: str
    group_id: str
    policy_version: int
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    topk_ids: np.ndarray  # [R, k]
    topk_logprobs: np.ndarray  # [R, k]
    behaviour_logprobs: np.ndarray  # [R]
    reward: float | None = None
    advantage: float = 0.0
    teacher_token_logprobs: np.ndarray | None = None  # [R]: the teacher's log-prob of each response token
    teacher: str = ""  # with model.teachers: the teacher that scored it

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def samples_of(record: ScoredRecord, teacher_key: str | None = None) -> list[TrainSample]:
    """The samples of one group; with rewards, each gets its GRPO advantage within the group. With several
    teachers, `teacher_key` is the data field that names the group's teacher."""
    rollout = record.rollout
    teacher = str(rollout.extra.get(teacher_key, "")) if teacher_key else ""
    offsets = rollout.response_offsets()
    advantages = np.zeros(rollout.n, np.float32) if rollout.rewards is None else grpo_advantages(rollout.rewards)
    out = []
    for i, sample_id in enumerate(rollout.sample_ids):
        a, b = offsets[i], offsets[i + 1]
        out.append(
            TrainSample(
                sample_id=sample_id,
                group_id=rollout.group_id,
                policy_version=rollout.policy_version,
                prompt_ids=rollout.prompt_ids,
                response_ids=rollout.response_ids[a:b],
                topk_ids=record.topk_ids[a:b],
                topk_logprobs=record.topk_logprobs[a:b],
                behaviour_logprobs=rollout.behaviour_logprobs[a:b],
                reward=None if rollout.rewards is None else float(rollout.rewards[i]),
                advantage=float(advantages[i]),
                teacher_token_logprobs=None if record.token_logprobs is None else record.token_logprobs[a:b],
                teacher=teacher,
            )
        )
    return out


def micro_batches(samples: Sequence[TrainSample], max_count: int, max_tokens: int) -> list[list[TrainSample]]:
    """Greedy split in order: at most `max_count` samples and `max_tokens` padded tokens per micro-batch.

    A sample longer than `max_tokens` gets a micro-batch of its own.
    """
    batches: list[list[TrainSample]] = []
    current: list[TrainSample] = []
    width = 0
    for sample in samples:
        new_width = max(width, sample.length)
        if current and (len(current) >= max_count or new_width * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, new_width = [], sample.length
        current.append(sample)
        width = new_width
    if current:
        batches.append(current)
    return batches


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    response_mask: torch.Tensor  # [B, L - 1] bool: logits position j predicts a response token
    topk_ids: torch.Tensor  # [B, L - 1, k]
    topk_logprobs: torch.Tensor  # [B, L - 1, k]
    behaviour_logprobs: torch.Tensor  # [B, L - 1]
    advantages: torch.Tensor  # [B, L - 1]
    opd_advantages: torch.Tensor  # [B, L - 1]: teacher log-prob - behaviour log-prob of each response token

    @property
    def targets(self) -> torch.Tensor:
        return self.input_ids[:, 1:]

    def to(self, device: str) -> MicroBatch:
        if device == "cpu":
            return self
        return MicroBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


def collate(samples: Sequence[TrainSample], pad_id: int, k: int) -> MicroBatch:
    width = max(s.length for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    response_mask = torch.zeros((batch, width - 1), dtype=torch.bool)
    topk_ids = torch.zeros((batch, width - 1, k), dtype=torch.long)
    topk_logprobs = torch.zeros((batch, width - 1, k), dtype=torch.float32)
    behaviour = torch.zeros((batch, width - 1), dtype=torch.float32)
    advantages = torch.zeros((batch, width - 1), dtype=torch.float32)
    opd = torch.zeros((batch, width - 1), dtype=torch.float32)
    for row, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        input_ids[row, :p] = torch.from_numpy(s.prompt_ids.astype(np.int64))
        input_ids[row, p : p + r] = torch.from_numpy(s.response_ids.astype(np.int64))
        attention[row, : p + r] = 1
        response_mask[row, p - 1 : p - 1 + r] = True
        topk_ids[row, p - 1 : p - 1 + r] = torch.from_numpy(s.topk_ids.astype(np.int64))
        topk_logprobs[row, p - 1 : p - 1 + r] = torch.from_numpy(s.topk_logprobs.astype(np.float32))
        behaviour[row, p - 1 : p - 1 + r] = torch.from_numpy(s.behaviour_logprobs.astype(np.float32))
        advantages[row, p - 1 : p - 1 + r] = s.advantage
        if s.teacher_token_logprobs is not None:
            opd[row, p - 1 : p - 1 + r] = torch.from_numpy(
                s.teacher_token_logprobs.astype(np.float32) - s.behaviour_logprobs.astype(np.float32)
            )
    return MicroBatch(input_ids, attention, response_mask, topk_ids, topk_logprobs, behaviour, advantages, opd)


def dummy_micro_batch(pad_id: int, k: int) -> MicroBatch:
    """Two pad tokens and nothing to learn: keeps a rank with no data in step with FSDP's collectives."""
    return MicroBatch(
        input_ids=torch.full((1, 2), pad_id, dtype=torch.long),
        attention_mask=torch.ones((1, 2), dtype=torch.long),
        response_mask=torch.zeros((1, 1), dtype=torch.bool),
        topk_ids=torch.zeros((1, 1, k), dtype=torch.long),
        topk_logprobs=torch.zeros((1, 1, k)),
        behaviour_logprobs=torch.zeros((1, 1)),
        advantages=torch.zeros((1, 1)),
        opd_advantages=torch.zeros((1, 1)),
    )
