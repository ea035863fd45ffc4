"""The learner's building blocks: FSDP2 sharding, samples from scored records, micro-batches, and the
distillation step over one micro-batch.

Alignment: a sample is prompt + response with P prompt tokens; the student's logits at position P + t - 1
and the teacher's row t both describe response token t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

from gkd_async.config import GKDConfig
from gkd_async.fused_head import (
    STAT_NAMES,
    HeadLoss,
    HeadTargets,
    fused_head_loss,
    head_bypassed,
    supports_fused_head,
)
from gkd_async.losses import distill_loss
from gkd_async.plan import RunPlan
from gkd_async.records import ScoredRecord
from gkd_async.rl import grpo_advantages, policy_loss

# What a step sums over its micro-batches (and ranks), by name: the loss statistics both loss paths produce
# (`fused_head.STAT_NAMES`), then the sum of behaviour - teacher log-probs over response tokens (the
# sampled-token estimate of KL(student || teacher)). SUM: each name's index.
SUM_NAMES = (*STAT_NAMES, "reverse_kl")
SUM = {name: index for index, name in enumerate(SUM_NAMES)}
DISTILL_STATS = ("distill", "teacher_topk_mass", "student_topk_mass", "entropy")  # what distill_loss reports


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


class StepAccumulator:
    """One optimiser step built from samples as they arrive, on every rank of the learner together.

    `add(samples)` runs forward and backward on this rank's share of a chunk of the global batch right
    away, accumulating gradients of the *unnormalised* loss (sums over tokens); `finish()` divides the
    gradients by the global batch's valid tokens, clips and steps. Gradients are linear in the loss, so
    the update equals that of the whole batch at once (`train_step`) within float rounding, whatever the
    chunks, the micro-batch size or the world size. Every rank calls `add` the same number of times (with
    an empty share when it has nothing) and runs as many micro-batches as the busiest rank, since each
    backward is a collective under FSDP.

    The loss is `distill_loss_coef * distillation + rl_loss_coef * policy loss` (each term on when its
    switch is), aggregated by `trainer.loss_agg_mode`: token-mean divides the sum over response tokens by
    the batch's tokens; seq-mean-token-mean averages each sequence's tokens, then the sequences;
    seq-mean-token-sum sums each sequence's tokens, then averages the sequences.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        world_size: int,
        pad_id: int,
        k: int,
        config: GKDConfig,
        device: str = "cpu",
    ) -> None:
        self.model, self.optimizer, self.world_size = model, optimizer, world_size
        self.pad_id, self.k, self.config, self.device = pad_id, k, config, device
        gkd, plan = config.gkd, RunPlan.of(config)
        self.distill_on, self.rl_on, self.opd_on = plan.distill_on, plan.rl_on, plan.opd_on
        self.fused = config.trainer.fused_lm_head and supports_fused_head(model)
        self.head_loss = HeadLoss(
            distill_coef=gkd.distill_loss_coef if self.distill_on else 0.0,
            loss_type=gkd.distill_loss_type,
            distill_temperature=gkd.distill_temperature,
            jsd_beta=gkd.jsd_beta,
            rl_coef=gkd.rl_loss_coef if self.rl_on else 0.0,
            opd_coef=gkd.opd_coef if self.opd_on else 0.0,
            rollout_temperature=config.rollout.temperature,
            clip_ratio=gkd.rl_clip_ratio,
        )
        self.tokens = self.sequences = 0
        self.sums = torch.zeros(len(SUM_NAMES), dtype=torch.float64)  # named by SUM_NAMES (index: SUM)
        # With model.teachers, per teacher: distill sum, opd sum, reverse-KL sum, tokens, sequences.
        self.teachers = list(plan.teacher_names)
        self.teacher_sums = torch.zeros(len(self.teachers), 5, dtype=torch.float64)

    def add(self, samples: Sequence[TrainSample]) -> None:
        trainer = self.config.trainer
        # Sorted by length, a micro-batch holds samples of similar length: less padding within the budget. With
        # several teachers, a micro-batch holds one teacher's samples, so its statistics are that teacher's.
        by_length = sorted(samples, key=lambda sample: sample.length)
        owners = [self.teachers.index(s.teacher) if s.teacher in self.teachers else -1 for s in by_length]
        batches: list[tuple[int, list[TrainSample]]] = []
        for owner in sorted(set(owners)):
            mine = [s for s, o in zip(by_length, owners, strict=True) if o == owner]
            for batch in micro_batches(mine, trainer.ppo_micro_batch_size_per_gpu, trainer.ppo_max_token_len_per_gpu):
                batches.append((owner, batch))
        steps = torch.tensor([len(batches)], dtype=torch.int64)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        self.tokens += sum(len(s.response_ids) for s in samples)
        self.sequences += len(samples)
        for sample, owner in zip(by_length, owners, strict=True):
            if owner >= 0:
                self.teacher_sums[owner, 3:] += torch.tensor([len(sample.response_ids), 1], dtype=torch.float64)
        for i in range(int(steps)):
            owner, batch = batches[i] if i < len(batches) else (-1, None)
            mb = collate(batch, self.pad_id, self.k) if batch is not None else dummy_micro_batch(self.pad_id, self.k)
            mb = mb.to(self.device)
            before = self.sums.clone()
            loss = self._fused_loss(mb) if self.fused else self._materialised_loss(mb)
            if owner >= 0:
                self.teacher_sums[owner, :3] += (self.sums - before)[[SUM["distill"], SUM["opd"], SUM["reverse_kl"]]]
            # FSDP averages gradients over ranks; scaling by the world size turns that average into the sum
            # over ranks, which finish() divides by the global tokens.
            (loss * self.world_size).backward()

    def _fused_loss(self, mb: MicroBatch) -> torch.Tensor:
        """Both terms from the last hidden states of the response positions and the LM head, in chunks."""
        with head_bypassed(self.model) as head:
            hidden = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
        rows = mb.response_mask.reshape(-1).nonzero().squeeze(1)

        def valid(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]).index_select(0, rows)  # k may be 0

        weights = self._token_weights(mb.response_mask)
        targets = HeadTargets(
            topk_ids=valid(mb.topk_ids),
            topk_logprobs=valid(mb.topk_logprobs),
            tokens=valid(mb.targets),
            behaviour_logprobs=valid(mb.behaviour_logprobs),
            advantages=valid(mb.advantages),
            weights=None if weights is None else valid(weights),
            opd_advantages=valid(mb.opd_advantages),
        )
        terms, stats = fused_head_loss(valid(hidden), head.weight, head.bias, targets, self.head_loss)
        self.sums[: len(STAT_NAMES)] += stats.double().cpu()
        self.sums[SUM["reverse_kl"]] -= float(targets.opd_advantages.double().sum())
        return hidden.sum() * 0.0 + terms  # every parameter in the graph, even with no valid position

    def _materialised_loss(self, mb: MicroBatch) -> torch.Tensor:
        """Both terms from the full [B, T, V] logits (`trainer.fused_lm_head=false`, or a head it can't fuse)."""
        gkd = self.config.gkd
        logits = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
        weights = self._token_weights(mb.response_mask)
        loss = logits.sum() * 0.0  # keeps every parameter in the graph, even with both terms off
        if self.distill_on:
            total, _count, diag = distill_loss(
                logits,
                mb.topk_ids,
                mb.topk_logprobs,
                mb.response_mask,
                gkd.distill_loss_type,
                gkd.distill_temperature,
                gkd.jsd_beta,
                weights=weights,
            )
            loss = loss + gkd.distill_loss_coef * total
            diags = [total.detach(), diag["teacher_topk_mass"], diag["student_topk_mass"], diag["student_entropy"]]
            self.sums[[SUM[name] for name in DISTILL_STATS]] += torch.stack(diags).double().cpu()
        policy_terms = (
            (self.head_loss.rl_coef, mb.advantages, SUM["pg"]),  # GRPO's advantages
            (self.head_loss.opd_coef, mb.opd_advantages, SUM["opd"]),  # the teacher's per-token ones
        )
        first = True  # the ratio's statistics come from the first term that is on, as in the fused path
        for coef, advantages, slot in policy_terms:
            if not coef:
                continue
            term, stats = policy_loss(
                logits,
                mb.targets,
                mb.behaviour_logprobs,
                advantages,
                mb.response_mask,
                self.config.rollout.temperature,
                gkd.rl_clip_ratio,
                weights=weights,
            )
            loss = loss + coef * term
            self.sums[slot] += float(term.detach())
            if first:
                self.sums[SUM["ratio"]] += float(stats["ratio"])
                self.sums[SUM["clipped"]] += float(stats["clipped"])
                if not self.distill_on:
                    self.sums[SUM["entropy"]] += float(stats["entropy"])
                first = False
        self.sums[SUM["reverse_kl"]] -= float(mb.opd_advantages[mb.response_mask].double().sum())
        return loss

    def _token_weights(self, response_mask: torch.Tensor) -> torch.Tensor | None:
        mode = self.config.trainer.loss_agg_mode
        if mode != "seq-mean-token-mean":
            return None
        lengths = response_mask.sum(dim=1, keepdim=True).clamp(min=1)
        return response_mask.float() / lengths

    def finish(self) -> dict[str, float]:
        trainer, gkd = self.config.trainer, self.config.gkd
        total = torch.tensor([self.tokens, self.sequences], dtype=torch.int64)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        global_tokens, global_sequences = int(total[0]), int(total[1])
        n = max(global_tokens if trainer.loss_agg_mode == "token-mean" else global_sequences, 1)
        for param in self.model.parameters():
            if param.grad is not None:
                param.grad.div_(n)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), trainer.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        dist.all_reduce(self.sums, op=dist.ReduceOp.SUM)
        sums = dict(zip(SUM_NAMES, self.sums.tolist(), strict=True))
        # The norm is global and the sums all-reduced, so every rank takes the same decision.
        finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(self.sums).all())
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The seed's metrics are in every step's record: a loss that is off is 0 with its coefficient 0. The
        # losses are as aggregated; the diagnostics are per-token means whatever the aggregation.
        per_token = max(global_tokens, 1)
        metrics = {
            "actor/distill_coef": gkd.distill_loss_coef if self.distill_on else 0.0,
            "actor/distill_loss": sums["distill"] / n,
            "actor/pg_loss": sums["pg"] / n,
            "actor/rl_coef": gkd.rl_loss_coef if self.rl_on else 0.0,
            "actor/entropy": sums["entropy"] / per_token,
            "actor/grad_norm": float(grad_norm),
            "actor/skipped_nonfinite": 0.0 if finite else 1.0,
            "tokens": global_tokens,
        }
        if self.distill_on:
            metrics["actor/teacher_topk_mass"] = sums["teacher_topk_mass"] / per_token
            metrics["actor/student_topk_mass"] = sums["student_topk_mass"] / per_token
        if self.rl_on or self.opd_on:
            metrics["actor/ppo_ratio_mean"] = sums["ratio"] / per_token
            metrics["actor/pg_clipfrac"] = sums["clipped"] / per_token
        if self.opd_on:
            metrics["actor/opd_coef"] = gkd.opd_coef
            metrics["actor/opd_loss"] = sums["opd"] / n
        if gkd.enable_teacher and not self.config.teacher.cross_tokenizer:  # no teacher log-prob of a student token
            metrics["actor/teacher_reverse_kl"] = sums["reverse_kl"] / per_token
        if self.teachers:
            metrics.update(self._per_teacher_metrics())
        return metrics

    def _per_teacher_metrics(self) -> dict[str, float]:
        """The distillation terms of each teacher's samples, aggregated over that teacher's tokens (or
        sequences) alone: how far the student is from each teacher."""
        sums = self.teacher_sums
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        metrics = {}
        for name, (distill, opd, reverse_kl, tokens, sequences) in zip(self.teachers, sums.tolist(), strict=True):
            n = max(tokens if self.config.trainer.loss_agg_mode == "token-mean" else sequences, 1)
            metrics[f"tokens/{name}"] = tokens
            if self.distill_on:
                metrics[f"actor/distill_loss/{name}"] = distill / n
            if self.opd_on:
                metrics[f"actor/opd_loss/{name}"] = opd / n
            if not self.config.teacher.cross_tokenizer:
                metrics[f"actor/teacher_reverse_kl/{name}"] = reverse_kl / max(tokens, 1)
        return metrics

    def abandon(self) -> None:
        """Drop what was accumulated (a stop arrived mid-batch): no update."""
        self.optimizer.zero_grad(set_to_none=True)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: Sequence[TrainSample],
    world_size: int,
    pad_id: int,
    k: int,
    config: GKDConfig,
    device: str = "cpu",
) -> dict[str, float]:
    """One optimiser step on this rank's share of the whole global batch; a collective over all ranks."""
    step = StepAccumulator(model, optimizer, world_size, pad_id, k, config, device)
    step.add(samples)
    return step.finish()


def process_group_backend(device: str) -> str:
    """NCCL for the model's collectives on GPUs, gloo for the step's bookkeeping, which stays on the CPU."""
    return "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"


def shard_model(
    model: torch.nn.Module,
    dtype: str,
    param_offload: bool,
    device_type: str = "cpu",
    activation_checkpointing: bool = False,
) -> torch.nn.Module:
    """FSDP2: each decoder layer, then the root, sharded over all ranks; fp32 master weights and reduction.

    With `activation_checkpointing`, each decoder layer keeps only its input for the backward pass and
    recomputes the rest (transformers' non-reentrant checkpointing): less memory, about one more forward.
    """
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=device_type != "cpu") if param_offload else OffloadPolicy()
    layers = getattr(getattr(model, "model", model), "layers", [])
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return model


def lr_multiplier(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then constant or a cosine decay to `min_ratio` at `total`."""
    ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if schedule == "cosine":
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
        return ramp * (min_ratio + (1.0 - min_ratio) * cosine)
    return ramp


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: str) -> None:
    """Optimizer offload: park the Adam moments on the CPU between steps, bring them back for the step."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device.type != device:
                state[key] = value.to(device, non_blocking=True)
