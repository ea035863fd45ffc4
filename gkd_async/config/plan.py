"""RunPlan: the facts a run derives from its validated config, each worked out here and nowhere else, so that
the config checks, the preflight, the launchers, the learner and the loss cannot disagree about them: which
loss terms are on, whether samples are on-policy, whether teacher scorers run and for which teachers, and at
which steps the learner publishes, evaluates and saves."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gkd_async.config.schema import GKDConfig


class Staleness(Enum):
    """What the learner does with a sample, by how many policy versions it lags behind the learner."""

    FRESH = "fresh"  # within pipeline.max_staleness (or not the student's sample): trained as it is
    REWEIGHTED = "reweighted"  # older, with pipeline.stale_policy=reweight: trained, importance-weighted
    DROPPED = "dropped"  # older with `drop`, or newer than the learner (weights a resume rolled back)


def judge_staleness(staleness: int, max_staleness: int, on_policy: bool, reweight: bool) -> Staleness:
    """The one rule: which samples train as they are, which are reweighted, which are dropped."""
    if not on_policy or 0 <= staleness <= max_staleness:
        return Staleness.FRESH
    return Staleness.REWEIGHTED if reweight and staleness > max_staleness else Staleness.DROPPED


def record_topk(config: GKDConfig) -> int:
    """Log-probs per response row of a scored record: the teacher's top-k, the student's top-k ids
    (gkd.topk_source=student) or both side by side (union; an id of the student's already among the teacher's
    is marked absent there). None with gkd.teacher_signal=hidden: the teacher's hidden states stand for them."""
    gkd = config.gkd
    if not gkd.enable_teacher or gkd.teacher_signal == "hidden":
        return 0
    student = config.rollout.student_topk
    return {"teacher": gkd.teacher_topk, "student": student, "union": gkd.teacher_topk + student}[gkd.topk_source]


@dataclass(frozen=True)
class RunPlan:
    distill_on: bool  # the divergence from the teacher (gkd.distill_loss_coef; its top-k, or its hidden states)
    hidden_signal: bool  # gkd.teacher_signal=hidden: records carry the teacher's hidden states, the learner its head
    rl_on: bool  # the RL policy loss (gkd.use_rl_loss, gkd.rl_loss_coef)
    opd_on: bool  # sampled-token distillation (gkd.opd_coef): the teacher's log-prob of each sampled token
    on_policy: bool  # the student samples (rollout.source=student): samples carry the policy version
    rollouts_run: bool  # rollout workers generate (not a scored data set standing in for them)
    teachers_score: bool  # teacher scorers run (a scored data set stands in for them too)
    teacher_names: tuple[str, ...]  # model.teachers, sorted; empty: the one teacher, model.teacher
    topk: int  # the log-probs per row each scored record carries (0 without a teacher): see `record_topk`
    teacher_topk: int  # of them, the teacher's own top-k (gkd.teacher_topk; 0 with gkd.topk_source=student)
    student_topk: int  # the student's top-k ids each rollout record carries (rollout.student_topk)
    student_ids_scored: bool  # gkd.topk_source=student or union: the teacher scores at the student's top-k ids
    weights_streamed: bool  # the weight transport takes a tensor at a time (all but pipeline.weight_transport=file)
    max_staleness: int  # pipeline.max_staleness (0 in sync mode)
    reweight_stale: bool  # pipeline.stale_policy=reweight: samples past the bound are kept and reweighted
    total_steps: int
    update_groups: int  # prompt groups per optimiser step (trainer.ppo_mini_batch_size, else the whole batch)
    ppo_epochs: int  # passes over a global batch's mini-batches
    sync_every: int  # trainer.sync_every: publish every this many steps (and after the last)
    eval_every: int  # trainer.eval_every: 0, never
    save_every: int  # checkpoint.save_every: 0, only at the end

    @classmethod
    def of(cls, config: GKDConfig) -> RunPlan:
        gkd, source = config.gkd, config.rollout.source
        hidden = gkd.enable_teacher and gkd.teacher_signal == "hidden"
        return cls(
            distill_on=gkd.enable_teacher and gkd.distill_loss_coef > 0 and (record_topk(config) > 0 or hidden),
            hidden_signal=hidden,
            rl_on=gkd.rl_on,
            opd_on=gkd.enable_teacher and gkd.opd_coef > 0,
            on_policy=source == "student",
            rollouts_run=source != "dataset",
            teachers_score=gkd.enable_teacher and source != "dataset",
            teacher_names=tuple(sorted(config.model.teachers)),
            topk=record_topk(config),
            teacher_topk=0 if not gkd.enable_teacher or gkd.topk_source == "student" or hidden else gkd.teacher_topk,
            student_topk=config.rollout.student_topk,
            student_ids_scored=gkd.enable_teacher and gkd.topk_source != "teacher",
            weights_streamed=config.pipeline.weight_transport != "file",
            max_staleness=config.pipeline.max_staleness,
            reweight_stale=config.pipeline.stale_policy == "reweight",
            total_steps=config.trainer.total_steps,
            update_groups=config.trainer.ppo_mini_batch_size or config.trainer.train_batch_size,
            ppo_epochs=config.trainer.ppo_epochs,
            sync_every=config.trainer.sync_every,
            eval_every=config.trainer.eval_every,
            save_every=config.checkpoint.save_every,
        )

    def staleness(self, learner_step: int, policy_version: int) -> Staleness:
        """A sample made by `policy_version`, arriving at the learner's step `learner_step`."""
        return judge_staleness(learner_step - policy_version, self.max_staleness, self.on_policy, self.reweight_stale)

    def publish_due(self, step: int) -> bool:
        return step % self.sync_every == 0 or step == self.total_steps

    def evaluate_due(self, step: int) -> bool:
        """Evaluated with the weights published after `step` (step 0: before training)."""
        return self.eval_every > 0 and (step % self.eval_every == 0 or step == self.total_steps)

    def save_due(self, step: int) -> bool:
        """A checkpoint mid-run; the learner saves after its last step whatever this says."""
        return self.save_every > 0 and step % self.save_every == 0

    @property
    def teacher_roles(self) -> tuple[str | None, ...]:
        """One per teacher that scores: its name, or None for the one teacher."""
        return self.teacher_names or (None,)
