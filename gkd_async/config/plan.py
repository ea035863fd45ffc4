"""RunPlan: the facts a run derives from its validated config, each worked out here and nowhere else, so that
the config checks, the preflight, the launchers, the learner and the loss cannot disagree about them: which
loss terms are on, whether samples are on-policy, whether teacher scorers run and for which teachers, and at
which steps the learner publishes, evaluates and saves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gkd_async.config.schema import GKDConfig


@dataclass(frozen=True)
class RunPlan:
    distill_on: bool  # the teacher top-k divergence (gkd.distill_loss_coef, gkd.teacher_topk)
    rl_on: bool  # the RL policy loss (gkd.use_rl_loss, gkd.rl_loss_coef)
    opd_on: bool  # sampled-token distillation (gkd.opd_coef): the teacher's log-prob of each sampled token
    on_policy: bool  # the student samples (rollout.source=student): samples carry the policy version
    rollouts_run: bool  # rollout workers generate (not a scored data set standing in for them)
    teachers_score: bool  # teacher scorers run (a scored data set stands in for them too)
    teacher_names: tuple[str, ...]  # model.teachers, sorted; empty: the one teacher, model.teacher
    topk: int  # the teacher's top-k each scored record carries (0 without a teacher)
    weights_streamed: bool  # the weight transport takes a tensor at a time (all but pipeline.weight_transport=file)
    total_steps: int
    sync_every: int  # trainer.sync_every: publish every this many steps (and after the last)
    eval_every: int  # trainer.eval_every: 0, never
    save_every: int  # checkpoint.save_every: 0, only at the end

    @classmethod
    def of(cls, config: GKDConfig) -> RunPlan:
        gkd, source = config.gkd, config.rollout.source
        return cls(
            distill_on=gkd.enable_teacher and gkd.distill_loss_coef > 0 and gkd.teacher_topk > 0,
            rl_on=gkd.rl_on,
            opd_on=gkd.enable_teacher and gkd.opd_coef > 0,
            on_policy=source == "student",
            rollouts_run=source != "dataset",
            teachers_score=gkd.enable_teacher and source != "dataset",
            teacher_names=tuple(sorted(config.model.teachers)),
            topk=gkd.teacher_topk if gkd.enable_teacher else 0,
            weights_streamed=config.pipeline.weight_transport != "file",
            total_steps=config.trainer.total_steps,
            sync_every=config.trainer.sync_every,
            eval_every=config.trainer.eval_every,
            save_every=config.checkpoint.save_every,
        )

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
