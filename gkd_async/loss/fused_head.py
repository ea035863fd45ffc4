"""The student's losses straight from its last hidden states and LM head, a chunk of positions at a time.

Materialising the logits costs B x T x V fp32 numbers, and as many again for their gradient: 2.5 GB each
per 4,096 positions at V = 151,936. Here the forward pass takes each chunk of *valid* positions (prompt
and padding positions never reach the head), computes its logits in fp32, the loss terms, and their
gradient with respect to those logits, folds that gradient into the gradients of the hidden states and
of the head (two matrix products, the same work as the unfused backward) and drops the chunk. The
backward pass only scales what the forward pass kept. Extra memory: a few chunks of logits plus the
head's gradient, whatever B x T.

The terms are those of `loss.topk.distill_loss` (teacher top-k divergence; or, given the teacher's hidden
states and output layer, `loss.full_vocab.full_vocab_divergence` over the teacher's logits computed chunk by
chunk) and `loss.policy.policy_loss` (PPO-clip), each position's term multiplied by its weight (how the loss is
aggregated), the two added with their coefficients; gradients equal the materialised path's within fp32
rounding (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from gkd_async.loss.full_vocab import full_vocab_divergence
from gkd_async.loss.policy import ppo_clip_terms, stale_token_weights
from gkd_async.loss.topk import CHUNK_ELEMENTS, LOSS_TYPES, topk_divergence


@dataclass(frozen=True)
class HeadLoss:
    """What to compute: a coefficient of 0 turns its term off."""

    distill_coef: float = 1.0
    loss_type: str = "forward_kl"
    distill_temperature: float = 1.0
    jsd_beta: float = 0.5
    rl_coef: float = 0.0
    opd_coef: float = 0.0
    rollout_temperature: float = 1.0
    clip_ratio: float = 0.2
    stale_weight_clip: float = 0.0  # > 0: rows marked `reweighted` get truncated importance weights (policy.py)
    chunk_elements: int | None = None  # logits per chunk; None: `head_chunk_rows` picks from the head's shape


@dataclass
class HeadTargets:
    """Per valid position (N rows): the teacher's top-k [N, k] and the RL inputs [N]."""

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tokens: torch.Tensor
    behaviour_logprobs: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor | None = None
    opd_advantages: torch.Tensor | None = None  # [N]: teacher minus behaviour log-prob of each sampled token
    reweighted: torch.Tensor | None = None  # [N] bool: the row's sample is past the staleness bound, reweighted
    # gkd.teacher_signal=hidden: the teacher's last hidden states [N, H_T] and its output layer [V, H_T] (+ bias),
    # which stand for the top-k: the teacher's logits are computed a chunk at a time, never [N, V] at once.
    teacher_hidden: torch.Tensor | None = None
    teacher_weight: torch.Tensor | None = None
    teacher_bias: torch.Tensor | None = None


STAT_NAMES = (
    "distill", "teacher_topk_mass", "student_topk_mass", "entropy", "pg", "ratio", "clipped", "opd",
    "is_weight", "reweighted", "is_clipped",  # over reweighted rows: importance weights, rows, truncated ones
)  # fmt: skip
STAT = {name: index for index, name in enumerate(STAT_NAMES)}


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: HeadTargets,
    spec: HeadLoss,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`distill_coef * sum(w * divergence) + rl_coef * sum(w * ppo_clip(A)) + opd_coef * sum(w *
    ppo_clip(A_opd))` over the rows of `hidden` [N, H], with logits `hidden @ weight.T + bias` ([V, H] head)
    never held for more than a chunk of rows.

    Returns the loss (0-dim, differentiable in `hidden`, `weight` and `bias`) and, without gradient, the
    sums over rows named by `STAT_NAMES`: the unscaled weighted terms, the teacher's and the student's
    mass on the teacher's top-k, the student's entropy (at the distillation temperature when distilling,
    else at the rollout temperature), the PPO ratio and the clipped count (of the RL term, else of OPD's).
    """
    if spec.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {spec.loss_type!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        shapes = f"{tuple(hidden.shape)}, {tuple(weight.shape)}"
        raise ValueError(f"hidden [N, H] and head weight [V, H] expected, got {shapes}")
    if spec.distill_coef and targets.teacher_hidden is not None:
        expected = (weight.shape[0], targets.teacher_hidden.shape[1])
        if targets.teacher_weight is None or tuple(targets.teacher_weight.shape) != expected:
            given = None if targets.teacher_weight is None else tuple(targets.teacher_weight.shape)
            raise ValueError(f"the teacher's output layer must be {list(expected)} for its hidden states, got {given}")
    elif spec.distill_coef and targets.topk_ids.numel():
        low, high = int(targets.topk_ids.min()), int(targets.topk_ids.max())
        if low < 0 or high >= weight.shape[0]:
            raise ValueError(f"teacher top-k ids must lie in [0, {weight.shape[0]}), the student's vocabulary")
    return _FusedHeadLoss.apply(hidden, weight, bias, targets, spec)


@contextmanager
def head_bypassed(model: torch.nn.Module) -> Iterator[torch.nn.Linear]:
    """Within the block, the model's forward returns its last hidden states where it would return logits.

    The model is still called as a whole, so FSDP2's root hooks gather the root's parameters (the head's
    among them) and, since the root does not reshard after forward, leave them gathered for the loss; the
    head's gradient is reduce-scattered with the root's in the backward pass.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the fused loss needs a linear LM head, got {type(head).__name__}")
    head.forward = _identity  # an instance attribute: nn.Module.__call__ looks it up before the class's
    try:
        yield head
    finally:
        del head.forward


def supports_fused_head(model: torch.nn.Module) -> bool:
    """A plain linear head with no logit transform after it (Gemma-2's soft-capping would be skipped)."""
    config = getattr(model, "config", None)
    return (
        isinstance(model.get_output_embeddings(), torch.nn.Linear)
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) in (None, 1.0)
    )


def head_chunk_rows(shape: tuple[int, int] | torch.Size, chunk_elements: int | None = None) -> int:
    """Rows of logits computed at once from a [V, H] head: `chunk_elements` / V when given; else at most
    CHUNK_ELEMENTS logits (55 rows at V = 151,936) and at most H / 4 rows. A chunk's working set is about 15
    times its logits (log-softmax, probabilities, the mixture, the gradient). At a small hidden size the head's
    matmul is cheap beside the per-row softmax work, so fewer rows cost no time and save memory (H = 64: 16
    rows, a third of the peak, same speed); at a real one too few rows starve the matmul (H = 896: 13 rows
    took 1.5x the time of 55; `benchmarks/bench_head.py`)."""
    vocab, hidden = shape
    if chunk_elements is not None:
        return max(1, chunk_elements // vocab)
    return max(1, min(CHUNK_ELEMENTS // vocab, hidden // 4))


def _identity(x: torch.Tensor) -> torch.Tensor:
    # A copy, not the view transformers hands the head: FSDP2 hooks the root's output for the backward
    # pass and warns about views (B x T x H, small beside the logits it replaces).
    return x.clone()


def _row_chunks(rows: int, size: int) -> Iterator[slice]:
    for start in range(0, rows, size):
        yield slice(start, min(start + size, rows))


def _chunk_terms(
    logits: torch.Tensor, targets: HeadTargets, rows: slice, spec: HeadLoss
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's weighted, coefficient-scaled loss (differentiable in `logits`) and its statistics."""
    weights = None if targets.weights is None else targets.weights[rows].to(logits.dtype)
    stats = torch.zeros(len(STAT_NAMES), dtype=logits.dtype, device=logits.device)
    loss = logits.new_zeros(())
    behaviour = targets.behaviour_logprobs[rows]
    if spec.stale_weight_clip and targets.reweighted is not None:
        stale = targets.reweighted[rows]
        is_weights, behaviour, truncated = stale_token_weights(
            logits, targets.tokens[rows], behaviour, stale, spec.rollout_temperature, spec.stale_weight_clip
        )
        weights = is_weights if weights is None else weights * is_weights
        stats[STAT["is_weight"]] = is_weights[stale].sum()
        stats[STAT["reweighted"]], stats[STAT["is_clipped"]] = stale.sum(), truncated.sum()
    if spec.distill_coef and targets.teacher_hidden is not None:
        teacher = targets.teacher_hidden[rows].to(logits.dtype)
        bias = None if targets.teacher_bias is None else targets.teacher_bias.to(logits.dtype)
        teacher_logits = torch.nn.functional.linear(teacher, targets.teacher_weight.to(logits.dtype), bias)
        per_row, distill_stats = full_vocab_divergence(
            logits, teacher_logits, spec.loss_type, spec.distill_temperature, spec.jsd_beta
        )
    elif spec.distill_coef:
        per_row, distill_stats = topk_divergence(
            logits,
            targets.topk_ids[rows],
            targets.topk_logprobs[rows],
            spec.loss_type,
            spec.distill_temperature,
            spec.jsd_beta,
        )
    if spec.distill_coef:
        term = (per_row if weights is None else per_row * weights).sum()
        loss = loss + spec.distill_coef * term
        stats[0] = term.detach()
        stats[1:4] = distill_stats.to(stats.dtype)
    # The two PPO-clip terms (GRPO's advantages, the teacher's per-token ones) share the ratio; its statistics
    # come from the first term that is on.
    policy_terms = ((spec.rl_coef, targets.advantages, 4), (spec.opd_coef, targets.opd_advantages, 7))
    first = True
    for coef, advantages, slot in policy_terms:
        if not coef:
            continue
        per_token, ratio, clipped, entropy = ppo_clip_terms(
            logits,
            targets.tokens[rows],
            behaviour,
            advantages[rows],
            spec.rollout_temperature,
            spec.clip_ratio,
        )
        term = (per_token if weights is None else per_token * weights).sum()
        loss = loss + coef * term
        stats[slot] = term.detach()
        if first:
            stats[5], stats[6] = ratio.sum(), clipped.sum()
            if not spec.distill_coef:
                stats[3] = entropy.sum()
            first = False
    return loss, stats


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, spec):  # type: ignore[override]
        compute = torch.promote_types(hidden.dtype, torch.float32)
        w = weight.to(compute)
        b = None if bias is None else bias.to(compute)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(w)
        grad_bias = None if bias is None else torch.zeros_like(b)
        total = torch.zeros((), dtype=compute, device=hidden.device)
        stats = torch.zeros(len(STAT_NAMES), dtype=compute, device=hidden.device)
        chunk_rows = head_chunk_rows(weight.shape, spec.chunk_elements)
        for rows in _row_chunks(hidden.shape[0], chunk_rows):
            h = hidden[rows].to(compute)
            with torch.enable_grad():
                logits = torch.nn.functional.linear(h, w, b).requires_grad_(True)
                loss, chunk_stats = _chunk_terms(logits, targets, rows, spec)
                (grad_logits,) = torch.autograd.grad(loss, logits)
            total += loss.detach()
            stats += chunk_stats
            grad_hidden[rows] = (grad_logits @ w).to(grad_hidden.dtype)
            grad_weight.addmm_(grad_logits.T, h)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype), grad_bias)
        ctx.done = False
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, grad_total, _grad_stats):  # type: ignore[override]
        if ctx.done:
            raise RuntimeError("the fused LM-head loss supports one backward pass (no retain_graph)")
        ctx.done = True
        grads = ctx.saved_tensors
        if not bool(grad_total == 1):  # scaled in place: the saved gradients are this graph's alone
            for grad in grads:
                if grad is not None:
                    grad.mul_(grad_total.to(grad.dtype))
        grad_hidden, grad_weight, grad_bias = grads
        return grad_hidden, grad_weight, grad_bias, None, None
