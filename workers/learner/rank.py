"""LearnerRank: one FSDP2 rank of the learner, and its loop.

Rank 0 also talks to Redis through the intake (intake.py: admission, acceptance, settlement and commit, the
whole staleness and exactly-once contract): it fills the global batch and hands each chunk of it to the other
ranks (feed.py), and after the optimiser step commits it. Every rank decodes the records itself with the
validating codec. A stop request (`gkd-async run` got SIGINT or SIGTERM) makes every rank save a checkpoint
and return. What differs between rank 0 and the others is decided once, in build.rank_services.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gkd_async.config.plan import RunPlan, Staleness
from gkd_async.models.loading import GLOBAL_RNG_LOCK, load_tokenizer
from gkd_async.process_settings import release_free_memory
from gkd_async.train.batching import TrainSample, samples_of
from gkd_async.train.fsdp import move_optimizer_state
from gkd_async.train.step import StepAccumulator
from gkd_async.train.updates import MiniBatchUpdate
from gkd_async.transport.records import ScoredRecord
from workers.common import RunContext
from workers.learner.build import build_optimizer, build_student, build_teacher_head, intake_settings, rank_services
from workers.learner.checkpointing import Checkpointer
from workers.learner.feed import FedChunk, Halted
from workers.learner.guards import NonFiniteGuard
from workers.learner.publisher import Publisher
from workers.learner.rendezvous import join_learner_group
from workers.learner.reporter import StepClock


class LearnerRank:
    def __init__(self, ctx: RunContext, rank: int = 0, world_size: int = 1, init_method: str | None = None) -> None:
        self.ctx, self.rank, self.world = ctx, rank, world_size
        cfg = ctx.config
        self.plan = RunPlan.of(cfg)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            # Under Ray each rank sees only its own GPU (index 0); under torchrun, LOCAL_RANK names it.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            join_learner_group(ctx, self.device, rank, world_size, init_method)
        with GLOBAL_RNG_LOCK:
            torch.manual_seed(cfg.trainer.seed)
        self.tokenizer = load_tokenizer(cfg.model.student, cfg.model.trust_remote_code)
        self.model, lora_scalings = build_student(ctx, self.device)
        self.optimizer, self.scheduler = build_optimizer(self.model, ctx)
        self.guard = NonFiniteGuard(cfg.trainer.max_nonfinite_steps)
        self.teacher_head = build_teacher_head(ctx, self.plan, self.device)
        self.settings = intake_settings(ctx, self.plan, self.teacher_head)
        self.services = rank_services(ctx, self.plan, self.settings, rank, world_size, self.model, self.tokenizer)
        self.publisher = Publisher(self.model, lora_scalings, self.plan, self.services.sink)
        self.checkpoints = Checkpointer(
            ctx, self.model, self.optimizer, self.scheduler, self.guard, self.services.feed, self.services.write_final
        )
        self.step = 0

    def run(self) -> dict[str, Any]:
        cfg, services = self.ctx.config, self.services
        stopped = False
        try:
            services.status.begin()
            if cfg.checkpoint.resume:
                self.step = self.checkpoints.resume(Path(cfg.checkpoint.resume))
            self.publisher.publish(self.step)
            ready_at = time.time()
            while self.step < cfg.trainer.total_steps:
                clock = StepClock()
                try:
                    fed, stats = self.train_step(clock)
                except Halted:
                    stopped = True
                    break
                self.step += 1
                if self.plan.publish_due(self.step):
                    with clock.phase("publish_s"):
                        self.publisher.publish(self.step)
                services.feed.commit(self.step, fed.accepted, stats.get("actor/skipped_nonfinite", 0.0) > 0)
                services.reporter.report(self.step, fed.records, stats, clock.stop())
                if self.plan.save_due(self.step):
                    self.checkpoints.save(self.step)
                release_free_memory()  # the step's freed buffers back to the system, not held for the next
            final_dir = self.checkpoints.finish(self.step, stopped)
            services.status.end(self.step, stopped)
            return self.summary(stopped, final_dir, ready_at)
        except BaseException as exc:
            services.status.fail(exc)
            raise
        finally:
            services.close()
            if dist.is_initialized():
                dist.destroy_process_group()

    def train_step(self, clock: StepClock) -> tuple[FedChunk, dict[str, float]]:
        """Train on the global batch as it arrives: every rank runs forward and backward on its share of each
        chunk at once, and the optimiser steps when the batch is complete (train.step.StepAccumulator: the same
        update as the whole batch at once), once per mini-batch and epoch with trainer.ppo_mini_batch_size and
        trainer.ppo_epochs (train.updates.MiniBatchUpdate). A stop or failure arriving mid-batch drops the
        accumulated gradients; no step is taken."""
        cfg = self.ctx.config
        update = MiniBatchUpdate(
            lambda: StepAccumulator(
                self.model,
                self.optimizer,
                self.world,
                self.tokenizer.pad_token_id,
                self.plan.topk,
                cfg,
                self.device,
                self.teacher_head,
            ),
            self.rank,
            self.world,
            self.plan.update_groups,
            self.plan.ppo_epochs,
            before_updates=lambda: move_optimizer_state(self.optimizer, self.device),
        )
        batch = FedChunk([], [])
        try:
            for chunk in clock.timed(self.services.feed.chunks(self.step, self.publisher.published), "wait_s"):
                with clock.phase("train_s"):
                    update.add([self.samples_of(record) for record in chunk.records])
                batch.records += chunk.records
                batch.accepted += chunk.accepted
        except BaseException:
            update.abandon()
            raise
        with clock.phase("train_s"):
            stats = update.finish()
            self.guard.check(stats, self.step + 1)
            self.scheduler.step()
            if cfg.trainer.optimizer_offload:
                move_optimizer_state(self.optimizer, "cpu")
        return batch, {**stats, "actor/lr": self.scheduler.get_last_lr()[0]}

    def samples_of(self, record: ScoredRecord) -> list[TrainSample]:
        """A group's samples, marked when the group is kept past the staleness bound to be reweighted."""
        stale = self.plan.staleness(self.step, record.rollout.policy_version) is Staleness.REWEIGHTED
        return samples_of(record, self.ctx.config.data.teacher_key, reweighted=stale)

    def summary(self, stopped: bool, final_dir: Path | None, ready_at: float) -> dict[str, Any]:
        checkpoint = self.checkpoints.written
        return {
            "step": self.step,
            "stopped": stopped,
            "final_dir": None if final_dir is None else str(final_dir),
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "ready_at": ready_at,
            "median_step_s": self.services.reporter.median_step_s,
            "device": self.device,
            "dist_backend": dist.get_backend(),
            **self.services.feed.counters,
        }
