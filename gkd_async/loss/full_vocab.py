"""The distillation divergences over the whole vocabulary, from both models' logits: what gkd.teacher_signal=hidden
computes, a chunk of rows at a time, in the learner's fused head (the teacher's logits are its output layer applied
to the hidden states it sent). No tail bucket: exact, where the top-k losses (topk.py) are lower bounds.
"""

from __future__ import annotations

import torch

from gkd_async.loss.topk import divergence


def full_vocab_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_type: str,
    temperature: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence for logits [N, V] of each model (both divided by `temperature`); also the statistics
    [3] of `topk.topk_divergence` without gradient: the teacher's and the student's mass on the support (the whole
    vocabulary: 1 a row) and the student's entropy."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} differ"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    per_row = divergence(log_p, log_q, loss_type, beta)
    with torch.no_grad():
        rows = float(student_logits.shape[0])
        entropy = -(log_q.exp() * log_q).sum()
        stats = torch.stack([log_q.new_tensor(rows), log_q.new_tensor(rows), entropy])
    return per_row, stats
