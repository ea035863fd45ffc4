"""What a learner rank is built from: the student and its optimiser on every rank, and the services of rank 0
(the intake's feed, metrics, weights, evaluation, run state) or the null ones of the other ranks. The only place
that asks which rank this is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gkd_async.config.plan import RunPlan
from gkd_async.data.cursor import PromptCursor
from gkd_async.data.prompts import load_prompts
from gkd_async.models.hidden_signal import OutputHead, load_output_head
from gkd_async.models.loading import load_model, model_vocab_size, tied_aliases
from gkd_async.models.lora import load_trainable_student, lora_scalings
from gkd_async.preflight.checks import check_scored_dataset, check_teacher_routes
from gkd_async.rewards.loading import load_reward_function
from gkd_async.run_state import RunState
from gkd_async.train.evaluation import Evaluator
from gkd_async.train.fsdp import lr_multiplier, shard_model
from gkd_async.train.metrics import MetricsWriter
from gkd_async.transport.limits import RecordLimits
from gkd_async.transport.streams import StreamProducer
from workers.common import Liveness, RunContext, consumer_name
from workers.learner.checkpointing import final_model_writer, write_nothing
from workers.learner.feed import ChunkWire, FollowerFeed, LeaderFeed
from workers.learner.guards import StageWatchdog
from workers.learner.intake import GROUP, Admission, Intake, IntakeSettings
from workers.learner.publisher import NullSink, WeightSink
from workers.learner.reporter import NullReporter, StepReporter

ROLE = "learner"


def build_student(ctx: RunContext, device: str) -> tuple[torch.nn.Module, dict]:
    """The student, sharded (FSDP2) and in training mode, and its LoRA scalings (empty without model.lora)."""
    cfg = ctx.config
    model = load_trainable_student(cfg.model, cfg.trainer.seed)
    model.config.use_cache = False
    scalings = lora_scalings(model)
    t = cfg.trainer
    sharded = shard_model(
        model.to(device), cfg.model.dtype, t.param_offload, device, activation_checkpointing=t.activation_checkpointing
    )
    sharded.train()
    return sharded, scalings


def build_optimizer(model: torch.nn.Module, ctx: RunContext):
    """AdamW over the trained parameters and its learning-rate schedule."""
    t = ctx.config.trainer
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, t.warmup, t.total_steps, t.lr_schedule, t.min_lr_ratio)
    )
    return optimizer, scheduler


def build_teacher_head(ctx: RunContext, plan: RunPlan, device: str) -> OutputHead | None:
    """gkd.teacher_signal=hidden: the teacher's output layer, frozen, over the student's vocabulary, loaded once
    (whole on every rank: [V, H] in float32, the size of one student's tied embedding at the teacher's width)."""
    if not plan.hidden_signal or not plan.distill_on:
        return None
    cfg = ctx.config
    vocab = model_vocab_size(cfg.model.student, cfg.model.trust_remote_code)
    return load_output_head(cfg.model.teacher, vocab, cfg.model.trust_remote_code).to(device)


def intake_settings(ctx: RunContext, plan: RunPlan, teacher_head: OutputHead | None = None) -> IntakeSettings:
    cfg = ctx.config
    return IntakeSettings(
        run_id=ctx.run_id,
        batch_size=cfg.trainer.train_batch_size,
        max_staleness=cfg.pipeline.max_staleness,
        on_policy=plan.on_policy,
        teacher_on=cfg.gkd.enable_teacher,
        k=plan.topk,
        temperature=cfg.gkd.distill_temperature,
        max_record_bytes=ctx.max_record_bytes,
        reweight_stale=plan.reweight_stale,
        token_logprobs=plan.opd_on,
        max_dead_groups_in_a_row=cfg.pipeline.max_dead_groups_in_a_row,
        teacher_hidden_size=None if teacher_head is None else teacher_head.hidden_size,
        limits=RecordLimits.for_run(cfg, model_vocab_size(cfg.model.student, cfg.model.trust_remote_code)),
    )


class RunStatus:
    """Rank 0 writes the run's state: running, then done, stopped at a step, or failed."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def begin(self) -> None:
        # Not over a stop asked for while the stages started (Ctrl-C during start-up): this learner would train
        # on while the launcher waits for its checkpoint.
        if not self.ctx.state().stop_requested:
            self.ctx.set_state(RunState.running())

    def end(self, step: int, stopped: bool) -> None:
        self.ctx.set_state(RunState.stopped_at(step) if stopped else RunState.done())

    def fail(self, exc: BaseException) -> None:
        if self.ctx.state().is_running:
            self.ctx.set_state(RunState.failed(f"learner: {exc}"))


class NullStatus:
    def begin(self) -> None:
        pass

    def end(self, step: int, stopped: bool) -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        pass


@dataclass
class RankServices:
    feed: LeaderFeed | FollowerFeed
    reporter: StepReporter | NullReporter
    sink: WeightSink | NullSink
    status: RunStatus | NullStatus
    write_final: Callable[[dict, Path], None]  # the final model (rank 0 writes it; the others, nothing)
    leave: Callable[[], None] | None = None  # rank 0's heartbeat removal

    def close(self) -> None:
        self.reporter.close()
        self.sink.close()
        if self.leave is not None:
            self.leave()


def rank_services(
    ctx: RunContext, plan: RunPlan, settings: IntakeSettings, rank: int, world: int, model, tokenizer
) -> RankServices:
    wire = ChunkWire(world)
    if rank != 0:
        return RankServices(FollowerFeed(settings, wire), NullReporter(), NullSink(), NullStatus(), write_nothing)
    cfg = ctx.config
    name = consumer_name(ROLE)
    if cfg.rollout.source == "dataset":  # the prompts of the rows the teacher scored, each naming its row
        prompts = check_scored_dataset(cfg).prompts()
    else:
        keep_source = cfg.teacher.cross_tokenizer  # the teacher templates and tokenizes the prompt itself
        prompts = load_prompts(cfg.data.train_files, tokenizer, cfg.data, keep_source)
        check_teacher_routes(cfg, prompts)
    cursor = PromptCursor(len(prompts), cfg.data.shuffle, cfg.data.seed)
    admission = Admission(
        prompts,
        cursor,
        StreamProducer(ctx.client, ctx.names.prompts, ctx.shown_url),
        ctx.run_id,
        cfg.trainer.train_batch_size,
        cfg.pipeline.max_staleness,
    )
    # Without a teacher the learner reads the rollouts themselves.
    input_stream = ctx.names.scored if cfg.gkd.enable_teacher else ctx.names.rollouts
    intake = Intake(
        ctx.client,
        ctx.names,
        ctx.consumer(input_stream, GROUP, name),
        admission,
        settings,
        ctx.run_dir / "trained_samples.jsonl",
        ctx.shown_url,
    )
    liveness = Liveness(ctx, ROLE, name)
    metrics = MetricsWriter(ctx.run_dir, cfg.logging, ctx.run_id, cfg.model_dump(mode="json"))
    reporter = StepReporter(ctx, plan, metrics, liveness, intake, cursor)
    return RankServices(
        feed=LeaderFeed(ctx, intake, liveness, StageWatchdog(ctx, plan), wire),
        reporter=reporter,
        sink=WeightSink(ctx.weights(), build_evaluator(ctx, tokenizer), reporter, tied_aliases(model)),
        status=RunStatus(ctx),
        write_final=final_model_writer(ctx, tokenizer),
        leave=liveness.leave,
    )


def build_evaluator(ctx: RunContext, tokenizer) -> Evaluator | None:
    cfg = ctx.config
    if not cfg.trainer.eval_every:
        return None
    reward = cfg.custom_reward_function
    return Evaluator(
        load_model(cfg.model.student, "float32", cfg.model.trust_remote_code),
        tokenizer,
        load_prompts(cfg.data.val_files, tokenizer, cfg.data),
        load_reward_function(reward.path, reward.name),
        cfg.rollout.max_new_tokens,
    )
