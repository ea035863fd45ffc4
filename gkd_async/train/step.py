"""The optimiser step over a global batch: the distillation, sampled-token and RL terms of each micro-batch
(fused head or full logits), their named sums across micro-batches and ranks, and the update.

Alignment: a sample is prompt + response with P prompt tokens; the student's logits at position P + t - 1
and the teacher's row t both describe response token t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from gkd_async.config.plan import RunPlan
from gkd_async.config.schema import GKDConfig
from gkd_async.loss.fused_head import (
    STAT_NAMES,
    HeadLoss,
    HeadTargets,
    fused_head_loss,
    head_bypassed,
    supports_fused_head,
)
from gkd_async.loss.policy import policy_loss, stale_token_weights
from gkd_async.loss.topk import distill_loss
from gkd_async.models.hidden_signal import OutputHead
from gkd_async.train.batching import MicroBatch, TrainSample, collate, dummy_micro_batch, micro_batches

# What a step sums over its micro-batches (and ranks), by name: the loss statistics both loss paths produce
# (`fused_head.STAT_NAMES`), then the sum of behaviour - teacher log-probs over response tokens (the
# sampled-token estimate of KL(student || teacher)). SUM: each name's index.
SUM_NAMES = (*STAT_NAMES, "reverse_kl")
SUM = {name: index for index, name in enumerate(SUM_NAMES)}
DISTILL_STATS = ("distill", "teacher_topk_mass", "student_topk_mass", "entropy")  # what distill_loss reports


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
        teacher_head: OutputHead | None = None,
    ) -> None:
        """`teacher_head` (gkd.teacher_signal=hidden): the teacher's output layer, on `device`."""
        self.model, self.optimizer, self.world_size = model, optimizer, world_size
        self.pad_id, self.k, self.config, self.device = pad_id, k, config, device
        gkd, plan = config.gkd, RunPlan.of(config)
        self.distill_on, self.rl_on, self.opd_on = plan.distill_on, plan.rl_on, plan.opd_on
        self.fused = config.trainer.fused_lm_head and supports_fused_head(model)
        self.teacher_head = teacher_head if self.distill_on and plan.hidden_signal else None
        if plan.hidden_signal and self.distill_on and (teacher_head is None or not self.fused):
            raise ValueError(
                "gkd.teacher_signal=hidden computes the teacher's logits in the fused LM-head loss: it needs the "
                "teacher's output layer and a student whose head can be fused (a linear head without soft-capping)"
            )
        self.head_loss = HeadLoss(
            distill_coef=gkd.distill_loss_coef if self.distill_on else 0.0,
            loss_type=gkd.distill_loss_type,
            distill_temperature=gkd.distill_temperature,
            jsd_beta=gkd.jsd_beta,
            rl_coef=gkd.rl_loss_coef if self.rl_on else 0.0,
            opd_coef=gkd.opd_coef if self.opd_on else 0.0,
            rollout_temperature=config.rollout.temperature,
            clip_ratio=gkd.rl_clip_ratio,
            stale_weight_clip=config.pipeline.stale_weight_clip if plan.reweight_stale else 0.0,
        )
        self.reweight_stale = plan.reweight_stale
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
            budget = trainer.ppo_micro_batch_size_per_gpu, trainer.ppo_max_token_len_per_gpu
            for batch in micro_batches(mine, *budget, packed=trainer.pack_sequences):
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
            packed = self.config.trainer.pack_sequences
            mb = collate(batch, self.pad_id, self.k, packed) if batch else dummy_micro_batch(self.pad_id, self.k)
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
            hidden = self.model(**mb.model_inputs()).logits[:, :-1]
        rows = mb.response_mask.reshape(-1).nonzero().squeeze(1)

        def valid(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]).index_select(0, rows)  # k may be 0

        weights = self._token_weights(mb)
        targets = HeadTargets(
            topk_ids=valid(mb.topk_ids),
            topk_logprobs=valid(mb.topk_logprobs),
            tokens=valid(mb.targets),
            behaviour_logprobs=valid(mb.behaviour_logprobs),
            advantages=valid(mb.advantages),
            weights=None if weights is None else valid(weights),
            opd_advantages=valid(mb.opd_advantages),
            reweighted=valid(mb.reweighted) if self._any_reweighted(mb) else None,
        )
        if self.teacher_head is not None:  # a rank's dummy micro-batch has no rows, and no hidden states
            size = self.teacher_head.hidden_size
            hidden_rows = hidden.new_zeros((0, size)) if mb.teacher_hidden is None else valid(mb.teacher_hidden)
            targets.teacher_hidden = hidden_rows
            targets.teacher_weight, targets.teacher_bias = self.teacher_head.weight, self.teacher_head.bias
        terms, stats = fused_head_loss(valid(hidden), head.weight, head.bias, targets, self.head_loss)
        self.sums[: len(STAT_NAMES)] += stats.double().cpu()
        self.sums[SUM["reverse_kl"]] -= float(targets.opd_advantages.double().sum())
        return hidden.sum() * 0.0 + terms  # every parameter in the graph, even with no valid position

    def _materialised_loss(self, mb: MicroBatch) -> torch.Tensor:
        """Both terms from the full [B, T, V] logits (`trainer.fused_lm_head=false`, or a head it can't fuse)."""
        gkd = self.config.gkd
        logits = self.model(**mb.model_inputs()).logits[:, :-1]
        weights = self._token_weights(mb)
        behaviour = mb.behaviour_logprobs
        if self._any_reweighted(mb):
            stale = mb.reweighted & mb.response_mask
            is_weights, behaviour, truncated = stale_token_weights(
                logits, mb.targets, behaviour, stale, self.config.rollout.temperature, self.head_loss.stale_weight_clip
            )
            weights = is_weights if weights is None else weights * is_weights
            self.sums[SUM["is_weight"]] += float(is_weights[stale].double().sum())
            self.sums[SUM["reweighted"]] += float(stale.sum())
            self.sums[SUM["is_clipped"]] += float(truncated.sum())
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
                behaviour,
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

    def _any_reweighted(self, mb: MicroBatch) -> bool:
        """Whether the micro-batch holds samples kept past the staleness bound (their weights cost a log-softmax)."""
        return bool(self.head_loss.stale_weight_clip) and bool(mb.reweighted.any())

    def _token_weights(self, mb: MicroBatch) -> torch.Tensor | None:
        """seq-mean-token-mean: each response token weighs 1 / its sample's response length."""
        if self.config.trainer.loss_agg_mode != "seq-mean-token-mean":
            return None
        return mb.response_mask.float() / mb.response_lengths.clamp(min=1)

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
        if self.reweight_stale:  # the tokens of samples kept past the staleness bound, and their weights
            reweighted = sums["reweighted"]
            metrics["staleness/reweighted_tokens"] = reweighted
            metrics["staleness/is_weight_mean"] = sums["is_weight"] / reweighted if reweighted else 1.0
            metrics["staleness/is_clipped_fraction"] = sums["is_clipped"] / reweighted if reweighted else 0.0
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
    teacher_head: OutputHead | None = None,
) -> dict[str, float]:
    """One optimiser step on this rank's share of the whole global batch; a collective over all ranks."""
    step = StepAccumulator(model, optimizer, world_size, pad_id, k, config, device, teacher_head)
    step.add(samples)
    return step.finish()
