"""Samples from scored records, micro-batches within the OOM knobs, and their tensors: padded rows of one sample
each, or (trainer.pack_sequences) rows of several samples end to end, their position ids restarting at each one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from gkd_async.loss.policy import grpo_advantages
from gkd_async.models.hidden_signal import hidden_from_wire
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
    reweighted: bool = False  # past the staleness bound with pipeline.stale_policy=reweight: importance-weighted
    teacher_hidden: np.ndarray | None = None  # [R, H] (gkd.teacher_signal=hidden): float32 or bfloat16 bit patterns

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def samples_of(record: ScoredRecord, teacher_key: str | None = None, reweighted: bool = False) -> list[TrainSample]:
    """The samples of one group; with rewards, each gets its GRPO advantage within the group. With several
    teachers, `teacher_key` is the data field that names the group's teacher; `reweighted` marks a group kept
    past the staleness bound (config.plan.Staleness.REWEIGHTED)."""
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
                reweighted=reweighted,
                teacher_hidden=None if record.teacher_hidden is None else record.teacher_hidden[a:b],
            )
        )
    return out


def micro_batches(
    samples: Sequence[TrainSample], max_count: int, max_tokens: int, packed: bool = False
) -> list[list[TrainSample]]:
    """Padded: a greedy split in order, at most `max_count` samples and `max_tokens` padded tokens per
    micro-batch. Packed: the samples, longest first, each into the first row with room for it within
    `max_tokens` tokens (first-fit decreasing; `max_count` does not apply), a row a micro-batch.

    A sample longer than `max_tokens` gets a micro-batch of its own.
    """
    if packed:
        rows: list[list[TrainSample]] = []
        room: list[int] = []
        for sample in sorted(samples, key=lambda s: s.length, reverse=True):
            fits = next((i for i, left in enumerate(room) if sample.length <= left), None)
            if fits is None:
                rows.append([sample])
                room.append(max_tokens - sample.length)
            else:
                rows[fits].append(sample)
                room[fits] -= sample.length
        return rows
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
    attention_mask: torch.Tensor | None  # [B, L]; None when packed (the position ids say where samples start)
    response_mask: torch.Tensor  # [B, L - 1] bool: logits position j predicts a response token
    topk_ids: torch.Tensor  # [B, L - 1, k]
    topk_logprobs: torch.Tensor  # [B, L - 1, k]
    behaviour_logprobs: torch.Tensor  # [B, L - 1]
    advantages: torch.Tensor  # [B, L - 1]
    opd_advantages: torch.Tensor  # [B, L - 1]: teacher log-prob - behaviour log-prob of each response token
    reweighted: torch.Tensor  # [B, L - 1] bool: a response token of a sample kept past the staleness bound
    response_lengths: torch.Tensor  # [B, L - 1]: at a response position, its sample's response length; else 0
    position_ids: torch.Tensor | None = None  # [B, L] when packed: each sample's positions from 0
    teacher_hidden: torch.Tensor | None = None  # [B, L - 1, H] float32 (gkd.teacher_signal=hidden): zeros off responses

    @property
    def targets(self) -> torch.Tensor:
        return self.input_ids[:, 1:]

    def model_inputs(self) -> dict[str, torch.Tensor | bool | None]:
        """What the model is called with: the padding mask, or (packed) the position ids, from which transformers
        keeps each sample's attention within the sample (only without a KV cache: hence use_cache=False, which
        training wants anyway)."""
        if self.position_ids is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}

    def to(self, device: str) -> MicroBatch:
        if device == "cpu":
            return self
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return MicroBatch(**{name: None if t is None else t.to(device) for name, t in moved.items()})


def collate(samples: Sequence[TrainSample], pad_id: int, k: int, packed: bool = False) -> MicroBatch:
    """Padded: a row per sample, right-padded to the longest. Packed: one row, the samples end to end."""
    starts = np.cumsum([0] + [s.length for s in samples])[:-1] if packed else np.zeros(len(samples), np.int64)
    rows = 1 if packed else len(samples)
    width = int(starts[-1]) + samples[-1].length if packed else max(s.length for s in samples)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.long)
    response_mask = torch.zeros((rows, width - 1), dtype=torch.bool)
    topk_ids = torch.zeros((rows, width - 1, k), dtype=torch.long)
    topk_logprobs = torch.zeros((rows, width - 1, k), dtype=torch.float32)
    behaviour = torch.zeros((rows, width - 1), dtype=torch.float32)
    advantages = torch.zeros((rows, width - 1), dtype=torch.float32)
    opd = torch.zeros((rows, width - 1), dtype=torch.float32)
    reweighted = torch.zeros((rows, width - 1), dtype=torch.bool)
    lengths = torch.zeros((rows, width - 1), dtype=torch.float32)
    hidden = None
    if samples[0].teacher_hidden is not None:
        hidden = torch.zeros((rows, width - 1, samples[0].teacher_hidden.shape[1]), dtype=torch.float32)
    for i, s in enumerate(samples):
        row, at = (0, int(starts[i])) if packed else (i, 0)
        p, r = len(s.prompt_ids), len(s.response_ids)
        input_ids[row, at : at + p] = torch.from_numpy(s.prompt_ids.astype(np.int64))
        input_ids[row, at + p : at + p + r] = torch.from_numpy(s.response_ids.astype(np.int64))
        attention[row, at : at + p + r] = 1
        positions[row, at : at + p + r] = torch.arange(p + r)
        span = slice(at + p - 1, at + p - 1 + r)  # the logits positions that predict the response tokens
        response_mask[row, span] = True
        topk_ids[row, span] = torch.from_numpy(s.topk_ids.astype(np.int64))
        topk_logprobs[row, span] = torch.from_numpy(s.topk_logprobs.astype(np.float32))
        behaviour[row, span] = torch.from_numpy(s.behaviour_logprobs.astype(np.float32))
        advantages[row, span] = s.advantage
        reweighted[row, span] = s.reweighted
        lengths[row, span] = r
        if hidden is not None:
            hidden[row, span] = hidden_from_wire(s.teacher_hidden)
        if s.teacher_token_logprobs is not None:
            opd[row, span] = torch.from_numpy(
                s.teacher_token_logprobs.astype(np.float32) - s.behaviour_logprobs.astype(np.float32)
            )
    return MicroBatch(
        input_ids,
        None if packed else attention,
        response_mask,
        topk_ids,
        topk_logprobs,
        behaviour,
        advantages,
        opd,
        reweighted,
        lengths,
        positions if packed else None,
        hidden,
    )


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
        reweighted=torch.zeros((1, 1), dtype=torch.bool),
        response_lengths=torch.zeros((1, 1)),
    )
