"""Distillation losses against a teacher that sends only its top-k log-probs.

Per response position, with the teacher's top-k set S and log-probs l_T, and the student's
log q = log_softmax(z / T) over the full vocabulary, both distributions are reduced to k + 1 categories:
the k tokens of S and a tail bucket holding the rest of the mass, P = (p_S, 1 - sum p_S) and
Q = (q_S, 1 - sum q_S). The divergences are taken between P and Q. They equal the full-vocabulary
divergences when k = V and are lower bounds of them otherwise (merging categories never increases an
f-divergence).

A teacher log-prob of -inf marks an entry as absent (a teacher of another tokenizer whose mapped top-k has
fewer than k tokens, or none where its tokens do not line up with the student's): its token is not a
category of its own, the student's mass on it stays in the tail, and a row with every entry absent
contributes exactly 0.

Memory: the only [B, T, V]-sized tensors are the student's logits and their gradient. The forward pass
works over chunks of valid positions and keeps nothing; the backward pass recomputes each chunk and
writes its gradient straight into one preallocated buffer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd")
_TAIL_EPS = 1e-20  # keeps log(tail) finite when the top-k set covers the whole vocabulary
_TEACHER_LOGPROB_FLOOR = -1e4  # a -inf teacher log-prob (p = 0) would make 0 * inf = nan
CHUNK_ELEMENTS = 1 << 23  # vocabulary-sized rows are handled at most this many logits at a time: 32 MB in fp32


def distill_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_elements: int = CHUNK_ELEMENTS,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """Sum over valid positions of the per-token divergence between teacher and student, each position's
    term multiplied by `weights` [B, T] when given (how the loss is aggregated over tokens and sequences).

    Shapes: logits [B, T, V]; ids and log-probs [B, T, k]; mask [B, T] bool. The teacher's log-probs must
    already be at `temperature`. Returns (sum of divergences as a 0-dim tensor, number of valid tokens,
    diagnostics). The caller divides by the valid tokens of the whole global batch, so the loss does not
    depend on micro-batch size or world size. Diagnostics are sums over valid tokens, without gradient:
    `teacher_topk_mass`, `student_topk_mass` (the student's mass on the teacher's top-k) and
    `student_entropy` (of the student at `temperature`).
    """
    _check_inputs(student_logits, teacher_topk_ids, teacher_topk_logprobs, mask, loss_type, temperature, beta)
    vocab = student_logits.shape[-1]
    k = teacher_topk_ids.shape[-1]
    rows = mask.reshape(-1).nonzero().squeeze(1)
    valid_ids = teacher_topk_ids.reshape(-1, k).index_select(0, rows)
    if valid_ids.numel() and (valid_ids.min() < 0 or valid_ids.max() >= vocab):
        raise ValueError(f"teacher top-k ids at valid positions must lie in [0, {vocab}), the student's vocabulary")
    chunk_rows = max(1, chunk_elements // vocab)
    row_weights = None if weights is None else weights.reshape(-1).index_select(0, rows).detach()
    total, stats = _TopKDivergence.apply(
        student_logits.reshape(-1, vocab),
        rows,
        teacher_topk_ids.reshape(-1, k),
        teacher_topk_logprobs.reshape(-1, k),
        row_weights,
        (loss_type, float(temperature), float(beta), chunk_rows),
    )
    diagnostics = {"teacher_topk_mass": stats[0], "student_topk_mass": stats[1], "student_entropy": stats[2]}
    return total, int(rows.numel()), diagnostics


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    loss_type: str,
    temperature: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence for logits [N, V], ids and log-probs [N, k]; also the statistics [3] (no grad)."""
    z = student_logits.to(_compute_dtype(student_logits.dtype))
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    ids = teacher_topk_ids.long()
    present = teacher_topk_logprobs > float("-inf")
    gathered = z.gather(-1, ids)
    # Absent entries are no category: a floor on both sides (0 in every divergence, no gradient).
    log_q_top = torch.where(present, gathered - lse, _TEACHER_LOGPROB_FLOOR)
    # Mass outside S from the logits themselves (no 1 - sum cancellation); a finite fill keeps the
    # gradient finite when S covers the vocabulary. An absent entry's logit stays in the rest, unless the same
    # id is also present (the student's top-k beside the teacher's): the smaller value wins whatever the order.
    fill = torch.full_like(gathered, torch.finfo(z.dtype).max).masked_fill(present, torch.finfo(z.dtype).min / 4)
    rest = z.scatter_reduce(-1, ids, fill, reduce="amin", include_self=True)
    log_q_tail = torch.logaddexp(torch.logsumexp(rest, dim=-1, keepdim=True), lse + math.log(_TAIL_EPS)) - lse

    log_p_top = teacher_topk_logprobs.to(z.dtype).clamp(min=_TEACHER_LOGPROB_FLOOR)
    p_top_mass = log_p_top.exp().sum(-1, keepdim=True)
    log_p_tail = torch.log((1.0 - p_top_mass).clamp(min=0.0) + _TAIL_EPS)

    log_p = torch.cat([log_p_top, log_p_tail], dim=-1)
    log_q = torch.cat([log_q_top, log_q_tail], dim=-1)
    per_row = divergence(log_p, log_q, loss_type, beta)

    with torch.no_grad():
        probs = (z - lse).exp()
        entropy = (lse.squeeze(-1) - (probs * z).sum(-1)).sum()
        stats = torch.stack([p_top_mass.sum(), log_q_top.exp().sum(), entropy])
    return per_row, stats


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, loss_type: str, beta: float) -> torch.Tensor:
    """Per row, between the teacher's log-probs `log_p` and the student's `log_q` over the same categories:
    KL(p || q), KL(q || p), or the generalized JSD with teacher weight `beta`."""
    if loss_type == "forward_kl":
        return _kl(log_p, log_q)
    if loss_type == "reverse_kl":
        return _kl(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunks(rows: torch.Tensor, size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, rows.numel(), size):
        yield start, rows[start : start + size]


def _weighted_sum(per_row: torch.Tensor, row_weights: torch.Tensor | None, start: int) -> torch.Tensor:
    if row_weights is None:
        return per_row.sum()
    return (per_row * row_weights[start : start + per_row.shape[0]].to(per_row.dtype)).sum()


class _TopKDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows, ids, logprobs, row_weights, params):  # type: ignore[override]
        loss_type, temperature, beta, chunk_rows = params
        dtype = _compute_dtype(logits.dtype)
        total = torch.zeros((), dtype=dtype, device=logits.device)
        stats = torch.zeros(3, dtype=dtype, device=logits.device)
        for start, chunk in _chunks(rows, chunk_rows):
            per_row, chunk_stats = topk_divergence(
                logits.index_select(0, chunk), ids[chunk], logprobs[chunk], loss_type, temperature, beta
            )
            total += _weighted_sum(per_row, row_weights, start)
            stats += chunk_stats
        ctx.save_for_backward(logits, rows, ids, logprobs, row_weights)
        ctx.params = params
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, grad_total, _grad_stats):  # type: ignore[override]
        logits, rows, ids, logprobs, row_weights = ctx.saved_tensors
        loss_type, temperature, beta, chunk_rows = ctx.params
        grad = torch.zeros_like(logits)
        for start, chunk in _chunks(rows, chunk_rows):
            with torch.enable_grad():
                z = logits.index_select(0, chunk).detach().requires_grad_(True)
                per_row, _ = topk_divergence(z, ids[chunk], logprobs[chunk], loss_type, temperature, beta)
                (chunk_grad,) = torch.autograd.grad(_weighted_sum(per_row, row_weights, start), z)
            grad.index_copy_(0, chunk, (chunk_grad * grad_total).to(grad.dtype))
        return grad, None, None, None, None, None


def _check_inputs(logits, ids, logprobs, mask, loss_type, temperature, beta) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(logits.shape)}")
    batch, steps, vocab = logits.shape
    if ids.dim() != 3 or ids.shape[:2] != (batch, steps) or logprobs.shape != ids.shape:
        raise ValueError(
            f"teacher ids {tuple(ids.shape)} and log-probs {tuple(logprobs.shape)} must both be [{batch}, {steps}, k]"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"teacher_topk_ids must be an integer tensor, got {ids.dtype}")
    if mask.shape != (batch, steps) or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape [{batch}, {steps}], got {mask.dtype} {tuple(mask.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if loss_type == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
