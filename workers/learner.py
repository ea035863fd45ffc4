"""Learner: FSDP2 ranks that train the student on scored groups.

Rank 0 also talks to Redis through the intake (workers/intake.py: admission, acceptance, settlement and
commit, the whole staleness and exactly-once contract): it fills the global batch, broadcasts the raw
records to the other ranks, and after the optimiser step commits them. Every rank decodes the records
itself with the validating codec. A stop request (`gkd-async run` got SIGINT or SIGTERM) makes every rank
save a checkpoint and return.
"""

from __future__ import annotations

import os
import re
import time
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from gkd_async.checkpoint import full_state_dict, iter_full_tensors, load_checkpoint, save_checkpoint
from gkd_async.collective_weights import CollectiveWeights
from gkd_async.data import PromptCursor, load_prompts
from gkd_async.errors import GKDError
from gkd_async.evaluation import Evaluator
from gkd_async.lora import load_trainable_student, lora_scalings, merge_lora, save_lora_final
from gkd_async.metrics import MetricsWriter
from gkd_async.models import GLOBAL_RNG_LOCK, load_model, load_tokenizer, model_vocab_size, tied_aliases, without_tied
from gkd_async.network import listening_store, node_address, redis_host
from gkd_async.plan import RunPlan
from gkd_async.preflight import check_scored_dataset, check_teacher_routes
from gkd_async.process_settings import release_free_memory
from gkd_async.records import RecordLimits, ScoredRecord
from gkd_async.rewards import load_reward_function
from gkd_async.run_state import RunState
from gkd_async.streams import Heartbeats, StreamProducer
from gkd_async.training import (
    StepAccumulator,
    lr_multiplier,
    move_optimizer_state,
    process_group_backend,
    samples_of,
    shard_model,
)
from workers.common import Liveness, RunContext, RunFailedError, consumer_name, teacher_role
from workers.intake import GROUP, Accepted, Admission, Intake, IntakeSettings, decode_for_learner

ROLE = "learner"


class Chunk(IntEnum):
    """What rank 0 broadcasts with each chunk of a step's groups (an int in the header tensor)."""

    MORE = 0  # more chunks follow
    FAILED = 1  # rank 0 failed: every rank drops the step and stops
    HALT = 2  # a stop was asked for: every rank drops the step and returns
    LAST = 3  # the chunk completes the batch


class _Halt(Exception):
    """A stop was requested: checkpoint and return."""


class TeacherUnavailableError(GKDError):
    """No teacher scorer (or rollout worker) is alive, so no scored batch can arrive."""


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
        self.teacher_on = cfg.gkd.enable_teacher
        self.k = cfg.gkd.teacher_topk if self.teacher_on else 0
        model = load_trainable_student(cfg.model, cfg.trainer.seed)
        model.config.use_cache = False
        self.lora_scalings = lora_scalings(model)  # empty without model.lora: nothing to merge when publishing
        self.model = shard_model(
            model.to(self.device),
            cfg.model.dtype,
            cfg.trainer.param_offload,
            self.device,
            activation_checkpointing=cfg.trainer.activation_checkpointing,
        )
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=cfg.trainer.lr,
            weight_decay=cfg.trainer.weight_decay,
        )
        t = cfg.trainer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, t.warmup, t.total_steps, t.lr_schedule, t.min_lr_ratio)
        )
        self.step = 0
        self.published = -1
        self.saved = -1
        self.nonfinite_in_a_row = 0
        self.nonfinite_steps = 0
        self.pending_eval: dict[str, float] = {}
        self.settings = IntakeSettings(
            run_id=ctx.run_id,
            batch_size=cfg.trainer.train_batch_size,
            max_staleness=cfg.pipeline.max_staleness,
            on_policy=self.plan.on_policy,
            teacher_on=self.teacher_on,
            k=self.k,
            temperature=cfg.gkd.distill_temperature,
            max_record_bytes=ctx.max_record_bytes,
            token_logprobs=self.plan.opd_on,
            max_dead_groups_in_a_row=cfg.pipeline.max_dead_groups_in_a_row,
            limits=RecordLimits.for_run(cfg, model_vocab_size(cfg.model.student, cfg.model.trust_remote_code)),
        )
        self.checkpoint_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else ctx.run_dir / "checkpoints"
        if rank == 0:
            self._setup_rank0()

    def _setup_rank0(self) -> None:
        ctx, cfg = self.ctx, self.ctx.config
        self.name = consumer_name(ROLE)
        # Without a teacher the learner reads the rollouts themselves.
        input_stream = ctx.names.scored if self.teacher_on else ctx.names.rollouts
        if cfg.rollout.source == "dataset":  # the prompts of the rows the teacher scored, each naming its row
            prompts = check_scored_dataset(cfg).prompts()
        else:
            data = cfg.data
            keep_source = cfg.teacher.cross_tokenizer  # the teacher templates and tokenizes the prompt itself
            prompts = load_prompts(data.train_files, self.tokenizer, data, keep_source)
            check_teacher_routes(cfg, prompts)
        self.cursor = PromptCursor(len(prompts), cfg.data.shuffle, cfg.data.seed)
        admission = Admission(
            prompts,
            self.cursor,
            StreamProducer(ctx.client, ctx.names.prompts, ctx.shown_url),
            ctx.run_id,
            cfg.trainer.train_batch_size,
            cfg.pipeline.max_staleness,
        )
        self.intake = Intake(
            ctx.client,
            ctx.names,
            ctx.consumer(input_stream, GROUP, self.name),
            admission,
            self.settings,
            ctx.run_dir / "trained_samples.jsonl",
            ctx.shown_url,
        )
        self.weights = ctx.weights()
        self.liveness = Liveness(ctx, ROLE, self.name)
        self.metrics = MetricsWriter(ctx.run_dir, cfg.logging, ctx.run_id, cfg.model_dump(mode="json"))
        self.evaluator = None
        if cfg.trainer.eval_every:
            reward = cfg.custom_reward_function
            self.evaluator = Evaluator(
                load_model(cfg.model.student, "float32", cfg.model.trust_remote_code),
                self.tokenizer,
                load_prompts(cfg.data.val_files, self.tokenizer, cfg.data),
                load_reward_function(reward.path, reward.name),
                cfg.rollout.max_new_tokens,
            )

    # ---------------------------------------------------------------- main loop
    def run(self) -> dict[str, Any]:
        cfg = self.ctx.config
        stopped = False
        try:
            if self.rank == 0 and not self.ctx.state().stop_requested:
                # Not over a stop asked for while the stages started (Ctrl-C during start-up): this learner
                # would train on while the launcher waits for its checkpoint.
                self.ctx.set_state(RunState.running())
            if cfg.checkpoint.resume:
                self._resume(Path(cfg.checkpoint.resume))
            self._publish()
            ready_at, step_times = time.time(), []
            while self.step < cfg.trainer.total_steps:
                started = time.perf_counter()
                try:
                    accepted, records, stats, wait_s, train_s = self._stream_step()
                except _Halt:
                    stopped = True
                    break
                self.step += 1
                publish_s = 0.0
                if self.plan.publish_due(self.step):
                    t0 = time.perf_counter()
                    self._publish()
                    publish_s = time.perf_counter() - t0
                if self.rank == 0:
                    skipped = stats.get("actor/skipped_nonfinite", 0.0) > 0
                    self.intake.commit(self.step, accepted, **({"skipped_nonfinite": True} if skipped else {}))
                    step_s = time.perf_counter() - started
                    step_times.append(step_s)
                    self._log_step(records, stats, wait_s, train_s, publish_s, step_s)
                if self.plan.save_due(self.step):
                    self._save()
                release_free_memory()  # the step's freed buffers back to the system, not held for the next
            if self.saved != self.step:
                self._save()
            final_dir = None if stopped else self._save_final()
            if self.rank == 0:
                self.ctx.set_state(RunState.stopped_at(self.step) if stopped else RunState.done())
            where = {"device": self.device, "dist_backend": dist.get_backend()}
            counters = self.intake.counters if self.rank == 0 else {}
            return {
                "step": self.step,
                "stopped": stopped,
                "final_dir": None if final_dir is None else str(final_dir),
                "checkpoint": str(self.checkpoint_root) if self.saved >= 0 else None,
                "ready_at": ready_at,
                "median_step_s": float(np.median(step_times)) if step_times else None,
                **where,
                **counters,
            }
        except BaseException as exc:
            if self.rank == 0 and self.ctx.state().is_running:
                self.ctx.set_state(RunState.failed(f"learner: {exc}"))
            raise
        finally:
            if self.rank == 0:
                self.metrics.close()
                self.liveness.leave()
                if isinstance(self.weights, CollectiveWeights):
                    self.weights.close()
            if dist.is_initialized():
                dist.destroy_process_group()

    # ---------------------------------------------------------------- every rank: one streamed step
    def _stream_step(self) -> tuple[list[Accepted], list[ScoredRecord], dict[str, float], float, float]:
        """Train on the global batch as it arrives: rank 0 hands out each chunk of newly accepted groups as
        soon as it has one, every rank runs forward and backward on its share at once, and the optimiser
        steps when the batch is complete (training.StepAccumulator: the same update as the whole batch at
        once). A stop or failure arriving mid-batch drops the accumulated gradients; the step is not taken."""
        cfg = self.ctx.config
        step = StepAccumulator(
            self.model, self.optimizer, self.world, self.tokenizer.pad_token_id, self.k, cfg, self.device
        )
        batch: dict[str, Accepted] = {}
        trained: set[str] = set()
        accepted: list[Accepted] = []
        records: list[ScoredRecord] = []
        wait_s = train_s = 0.0
        status = Chunk.MORE
        while status is Chunk.MORE:
            t0 = time.perf_counter()
            chunk: list[Accepted] = []
            if self.rank == 0:
                try:
                    chunk = self._collect_chunk(batch, trained)
                    status = Chunk.LAST if len(batch) >= cfg.trainer.train_batch_size else Chunk.MORE
                except _Halt:
                    status = Chunk.HALT
                except BaseException:
                    self._broadcast_payloads([], Chunk.FAILED)
                    step.abandon()
                    raise
            payloads, status = self._broadcast_payloads([a.payload for a in chunk], status)
            if status in (Chunk.HALT, Chunk.FAILED):
                step.abandon()
                if status is Chunk.HALT:
                    raise _Halt()
                raise RunFailedError("rank 0 of the learner stopped the run")
            if self.rank == 0:
                mine = [a.record for a in chunk]
                trained.update(a.record.rollout.group_id for a in chunk)
            else:
                mine = [decode_for_learner(p, self.settings) for p in payloads]
            accepted += chunk
            records += mine
            t1 = time.perf_counter()
            step.add([s for record in mine[self.rank :: self.world] for s in samples_of(record, cfg.data.teacher_key)])
            wait_s += t1 - t0
            train_s += time.perf_counter() - t1
        t1 = time.perf_counter()
        move_optimizer_state(self.optimizer, self.device)
        stats = self._finish_step(step)
        return accepted, records, stats, wait_s, train_s + time.perf_counter() - t1

    # ---------------------------------------------------------------- rank 0: reading batches
    def _collect_chunk(self, batch: dict[str, Accepted], trained: set[str]) -> list[Accepted]:
        """Poll until the batch holds groups not yet handed out (or is complete); returns those, in group
        order. `batch` keeps every group accepted for this step."""
        cfg = self.ctx.config
        last_progress = time.monotonic()
        while len(batch) < cfg.trainer.train_batch_size:
            self.liveness.beat(step=self.step)
            state = self.ctx.state()
            if state.stop_requested:
                raise _Halt()
            if not state.is_running:
                raise RunFailedError(f"the run was stopped: {state}")
            read = self.intake.poll(
                self.step, self.published, cfg.trainer.total_steps, batch, cfg.pipeline.read_block_ms
            )
            if len(batch) > len(trained) and cfg.trainer.stream_batches:
                break
            if read:
                last_progress = time.monotonic()
            if time.monotonic() - last_progress > cfg.pipeline.teacher_timeout_s:
                self._check_liveness()
                last_progress = time.monotonic()
        return [batch[g] for g in sorted(batch) if g not in trained]

    def _check_liveness(self) -> None:
        cfg, ctx = self.ctx.config, self.ctx
        timeout = cfg.pipeline.teacher_timeout_s
        beats = Heartbeats(ctx.client, ctx.names.heartbeats, ctx.shown_url)
        config_path = ctx.run_dir / "config.yaml"
        roles = [("rollout", "rollout worker", "rollout")]
        if self.plan.teachers_score:  # a scored data set needs no scorer
            teachers = self.plan.teacher_roles
            roles[:0] = [
                (
                    teacher_role(t),
                    "teacher scorer" + (f" of teacher {t}" if t else ""),
                    "teacher" + (f" --teacher {t}" if t else ""),
                )
                for t in teachers
            ]
        for role, what, command in roles:
            if not beats.alive(role, timeout):
                raise TeacherUnavailableError(
                    f"{'Rollout' if role == 'rollout' else 'Teacher'} request failed: no {what} "
                    f"has sent a heartbeat for {timeout:.0f}s on Redis {ctx.shown_url} (run {ctx.run_id}), so no "
                    f"scored batch can arrive. Start one with: gkd-async worker {command} --config {config_path} "
                    f"--redis-url URL --run-id {ctx.run_id}  (the full URL is in {ctx.run_dir / 'redis_url'}; "
                    "pipeline.teacher_timeout_s sets this timeout)"
                )

    def _broadcast_payloads(self, payloads: list[bytes], status: Chunk) -> tuple[list[bytes], Chunk]:
        if self.world == 1:
            return payloads, status
        header = torch.tensor([status, len(payloads), sum(map(len, payloads))], dtype=torch.int64)
        dist.broadcast(header, src=0)
        code, count, total = (int(x) for x in header)
        status = Chunk(code)
        if status not in (Chunk.MORE, Chunk.LAST):
            return [], status
        lengths = torch.tensor([len(p) for p in payloads] if self.rank == 0 else [0] * count, dtype=torch.int64)
        data = (
            torch.frombuffer(bytearray(b"".join(payloads)), dtype=torch.uint8)
            if self.rank == 0
            else torch.empty(total, dtype=torch.uint8)
        )
        dist.broadcast(lengths, src=0)
        dist.broadcast(data, src=0)
        if self.rank == 0:
            return payloads, status
        raw, out, offset = data.numpy().tobytes(), [], 0
        for length in lengths.tolist():
            out.append(raw[offset : offset + length])
            offset += length
        return out, status

    # ---------------------------------------------------------------- all ranks: training
    def _finish_step(self, step: StepAccumulator) -> dict[str, float]:
        cfg = self.ctx.config
        stats = step.finish()
        if stats.get("actor/skipped_nonfinite", 0.0) > 0:
            self.nonfinite_in_a_row += 1
            self.nonfinite_steps += 1
            limit = cfg.trainer.max_nonfinite_steps
            if self.nonfinite_in_a_row >= limit:
                raise RunFailedError(
                    f"the loss or gradient norm was not finite in {limit} steps in a row (the last at step "
                    f"{self.step + 1}), each skipped without an update; lower trainer.lr, check the data and "
                    "rewards, or raise trainer.max_nonfinite_steps"
                )
        else:
            self.nonfinite_in_a_row = 0
        stats["actor/skipped_steps"] = float(self.nonfinite_steps)
        self.scheduler.step()
        if cfg.trainer.optimizer_offload:
            move_optimizer_state(self.optimizer, "cpu")
        return {**stats, "actor/lr": self.scheduler.get_last_lr()[0]}

    # ---------------------------------------------------------------- rank 0: bookkeeping
    def _log_step(self, records, stats, wait_s, train_s, publish_s, step_s) -> None:
        staleness = [self.step - 1 - r.rollout.policy_version if self.plan.on_policy else 0 for r in records]
        tokens = stats.pop("tokens")
        metrics = {
            **stats,
            "training/global_step": self.step,
            "staleness/mean": float(np.mean(staleness)),
            "staleness/max": float(np.max(staleness)),
            "samples/dropped_stale": self.intake.counters["dropped_stale"],
            "samples/trained": self.intake.counters["trained_samples"],
            "samples/duplicates": self.intake.counters["duplicates"],
            "samples/dead_letters": self.intake.counters["dead_letters"],
            "samples/unadmitted": self.intake.counters["unadmitted"],
            **self._queue_depths(),
            "timing/step_s": step_s,
            "timing/wait_s": wait_s,
            "timing/train_s": train_s,
            "timing/publish_s": publish_s,
            "timing/generate_s": float(np.mean([r.rollout.timing.get("generate_s", 0.0) for r in records])),
            "timing/score_s": float(np.mean([r.timing.get("score_s", 0.0) for r in records])),
            "perf/tokens_per_s": tokens / step_s,
            "perf/learner_wait_fraction": wait_s / step_s,
        }
        metrics["training/epoch"] = self.cursor.epoch
        rewards = [float(x) for r in records if r.rollout.rewards is not None for x in r.rollout.rewards]
        if rewards:
            metrics["reward/mean"] = float(np.mean(rewards))
            metrics["reward/std"] = float(np.std(rewards))
        metrics.update(self.pending_eval)
        self.pending_eval = {}
        self.metrics.log(self.step, metrics)
        self.liveness.log.info(
            "step",
            step=self.step,
            distill_loss=metrics.get("actor/distill_loss"),
            pg_loss=metrics.get("actor/pg_loss"),
            step_s=step_s,
            wait_s=wait_s,
        )
        self.ctx.client.hset(
            self.ctx.names.progress,
            mapping={"total_steps": self.ctx.config.trainer.total_steps, **metrics},
        )

    def _queue_depths(self) -> dict[str, float]:
        """Entries waiting in each stream (unread or unacknowledged); rollouts summed over the teachers' streams,
        and each teacher's apart."""
        names = self.ctx.names
        depths = {"queue/prompts": self._depth(names.prompts), "queue/scored": self._depth(names.scored)}
        per_teacher = {t: self._depth(names.rollouts_for(t)) for t in names.teachers}
        depths["queue/rollouts"] = sum(per_teacher.values()) if per_teacher else self._depth(names.rollouts)
        depths.update({f"queue/rollouts/{t}": depth for t, depth in per_teacher.items()})
        return depths

    def _depth(self, stream: str) -> float:
        groups = self.ctx.client.xinfo_groups(stream) if self.ctx.client.exists(stream) else []
        return float(max((int(g.get("lag") or 0) + int(g.get("pending") or 0) for g in groups), default=0))

    # ---------------------------------------------------------------- weights and checkpoints
    def _publish(self) -> None:
        evaluate = self.plan.evaluate_due(self.step)  # the same on every rank
        if not evaluate and self.ctx.config.pipeline.weight_transport != "file":
            # Streamed a tensor at a time into the transport's buckets: no full copy of the model on rank 0.
            tensors = iter_full_tensors(self.model)
            if self.rank == 0:
                self.weights.publish(merge_lora(tensors, self.lora_scalings), self.step)
            else:
                for _ in tensors:  # each tensor's gather is a collective
                    pass
            self.published = self.step
            return
        state = dict(merge_lora(full_state_dict(self.model).items(), self.lora_scalings))
        if self.rank == 0:
            self.weights.publish(without_tied(state, tied_aliases(self.model)), self.step)
            if evaluate:
                self.pending_eval = self.evaluator.evaluate(state)
                if self.published < 0:  # before the first step of this run: a line of its own
                    self.metrics.log(self.step, {"training/global_step": self.step, **self.pending_eval})
                    self.pending_eval = {}
        self.published = self.step

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "intake": self.intake.state(),
            "scheduler": self.scheduler.state_dict(),
            "nonfinite_steps": self.nonfinite_steps,
        }

    def _save(self) -> None:
        state = self._trainer_state() if self.rank == 0 else {}
        keep = self.ctx.config.checkpoint.keep_last
        save_checkpoint(self.checkpoint_root, self.step, self.model, self.optimizer, state, keep)
        self.saved = self.step

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, self.model, self.optimizer)
        self.step = self.saved = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        if self.rank == 0:
            if "intake" not in state:  # a checkpoint written before the intake had a state of its own
                state["intake"] = {"admission": {"cursor": state["cursor"]}, "counters": state["counters"]}
            self.intake.restore(state["intake"], self.step)
            self.liveness.log.info("resumed", step=self.step, checkpoint=str(path))

    def _save_final(self) -> Path:
        state = full_state_dict(self.model)
        final = self.ctx.run_dir / "final"
        if self.rank == 0:
            student = self.ctx.config.model
            if student.lora.enabled:
                save_lora_final(state, student, final)
            else:
                model = load_model(student.student, "float32", student.trust_remote_code)
                model.load_state_dict(state)
                model.save_pretrained(final)
            self.tokenizer.save_pretrained(final)
        dist.barrier()
        return final


def join_learner_group(
    ctx: RunContext, device: str, rank: int, world_size: int, init_method: str | None = None
) -> None:
    """torch.distributed for the learner's ranks. One rank alone meets nobody: its store is in-process (no
    port opened); several meet at `init_method`, or at the store rank 0 opens and announces (see
    `rendezvous_store`)."""
    backend = process_group_backend(device)
    if world_size == 1 and init_method is None:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif init_method is not None:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    else:
        store = rendezvous_store(ctx, rank)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


RENDEZVOUS_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


def rendezvous_store(ctx: RunContext, rank: int) -> dist.TCPStore:
    """The store the learner's ranks meet at when started without an init method: rank 0 opens it on its
    own node's address only (not every interface) and announces tcp://ADDRESS:PORT in Redis; the other ranks,
    wherever Ray placed them, connect to what `announced_rendezvous` read there. The launcher clears the key
    before it starts the ranks."""
    if rank == 0:
        host = node_address(toward=redis_host(ctx.client))
        store = listening_store(host, default_pg_timeout)
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address in brackets
        ctx.client.set(ctx.names.rendezvous, f"tcp://{shown}:{store.port}")
        return store
    host, port = announced_rendezvous(ctx, rank)
    return dist.TCPStore(host, port, is_master=False, timeout=default_pg_timeout)


def announced_rendezvous(ctx: RunContext, rank: int, timeout_s: float = 300.0) -> tuple[str, int]:
    """Host and port of rank 0's store as announced in Redis, taken only in the form tcp://HOST:PORT (a
    `file://` path would be written to, an `env://` would read this process's environment)."""
    deadline = time.monotonic() + timeout_s
    while (value := ctx.client.get(ctx.names.rendezvous)) is None:
        if time.monotonic() > deadline:
            raise RunFailedError(
                f"learner rank {rank}: rank 0 did not announce its address in Redis ({ctx.names.rendezvous}) "
                f"within {timeout_s:.0f}s; is rank 0 running?"
            )
        time.sleep(0.1)
    address = value.decode(errors="replace")
    match = RENDEZVOUS_ADDRESS.fullmatch(address)
    if match is None:
        raise RunFailedError(
            f"learner rank {rank}: the rendezvous address in Redis ({ctx.names.rendezvous}) is {address[:100]!r}, "
            "not tcp://HOST:PORT; something other than rank 0 wrote it: check who can write the run's Redis"
        )
    return match.group(1).strip("[]"), int(match.group(2))
