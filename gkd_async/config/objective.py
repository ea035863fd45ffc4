"""The `gkd.*` and `custom_reward_function.*` sections: what the student is trained toward (the seed's keys)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gkd_async.config.base import LossType, _Section


class GkdSection(_Section):
    """The seed's `gkd.*` keys, verbatim, with the seed's defaults."""

    enable_teacher: bool = Field(True, description="use the teacher (false: RL only)")
    teacher_ip: str | None = Field(
        None,
        description=(
            "the seed's teacher address; an error here, since teachers are reached through Redis: set "
            "`pipeline.redis_url` and start teachers with `gkd-async worker teacher`"
        ),
    )
    teacher_port: int | None = Field(
        None,
        description=(
            "the seed's teacher address; an error here, since teachers are reached through Redis: set "
            "`pipeline.redis_url` and start teachers with `gkd-async worker teacher`"
        ),
    )
    teacher_topk: int = Field(
        256,
        ge=0,
        description=(
            "log-probs per token the teacher sends; `0`: only each sampled token's (sampled-token distillation alone)"
        ),
    )
    topk_source: Literal["teacher", "student", "union"] = Field(
        "teacher",
        description=(
            "the tokens the divergence is taken over (plus the tail bucket): the teacher's top-k, the student's own "
            "top-k at each position (`rollout.student_topk`, the teacher's log-probs gathered there), or the union "
            "of both: the tokens where the student puts mass and the teacher does not, which reverse KL and JSD "
            "over the teacher's top-k miss (HF teacher; see [the student's top-k](teachers.md#the-students-own-top-k))"
        ),
    )
    teacher_signal: Literal["topk", "hidden"] = Field(
        "topk",
        description=(
            "what the teacher sends per response token: its top-k log-probs (`gkd.teacher_topk`), or its last hidden "
            "state (`hidden`: [H] numbers, `teacher.hidden_dtype`), from which the learner computes the teacher's "
            "logits with the teacher's own output layer and the divergence over the whole vocabulary, exact "
            "(HF teacher of the student's tokenizer; see [full-vocabulary distillation](teachers.md#exact-full-"
            "vocabulary-distillation))"
        ),
    )
    distill_loss_coef: float = Field(1.0, ge=0, description="weight of the distillation loss")
    distill_loss_type: LossType = Field(
        "forward_kl", description="`forward_kl` = KL(teacher ‖ student), `reverse_kl` = KL(student ‖ teacher), `jsd`"
    )
    distill_temperature: float = Field(1.0, gt=0, description="temperature of both distributions in the loss")
    jsd_beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description=(
            "teacher weight of the JSD mixture; 0 and 1 as TRL reads them: `jsd` at 0 is `forward_kl`, at 1 "
            "`reverse_kl` (the loss type is set so)"
        ),
    )
    use_rl_loss: bool = Field(False, description="add the RL (policy-gradient) loss")
    rl_loss_coef: float = Field(0.0, ge=0, description="weight of the RL loss")
    rl_clip_ratio: float = Field(
        0.2, gt=0, lt=1, description="PPO clip range of the importance ratio against the behaviour policy"
    )
    opd_coef: float = Field(
        0.0,
        ge=0,
        description=(
            "weight of sampled-token on-policy distillation: teacher minus behaviour log-prob of each sampled "
            "token as its advantage, PPO-clipped; `0`: off"
        ),
    )

    @property
    def rl_on(self) -> bool:
        """Whether the RL loss takes part: asked for, with a weight."""
        return self.use_rl_loss and self.rl_loss_coef > 0

    @model_validator(mode="after")
    def _pure_kls(self) -> GkdSection:
        """TRL's generalized JSD at beta 0 and 1 is the forward and the reverse KL (the mixture formula itself
        would be 0 there): the loss type says so, so that every reader of it computes the same loss."""
        if self.distill_loss_type == "jsd" and self.jsd_beta in (0.0, 1.0):
            self.distill_loss_type = "forward_kl" if self.jsd_beta == 0.0 else "reverse_kl"
        return self


class CustomRewardFunctionSection(_Section):
    path: str | None = Field(None, description="Python file with the reward function")
    name: str = Field("compute_score", description="function name in that file")
    timeout_s: float = Field(
        30.0,
        gt=0,
        description=(
            "a reward call running longer is killed (its process with it) and dead-letters its group; the worker "
            "goes on"
        ),
    )
    num_workers: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "processes per rollout worker that run the reward function (`python -m gkd_async.reward_pool`), a "
            "group's responses shared among them; one that dies (a crash, `os._exit`) fails its group only and is"
            " started again"
        ),
    )
