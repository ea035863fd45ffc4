"""The `trainer.*`, `logging.*` and `checkpoint.*` sections: the learner's optimisation, its logs and checkpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gkd_async.config.base import _Section


class TrainerSection(_Section):
    total_steps: int = Field(20, ge=1, description="optimiser steps")
    train_batch_size: int = Field(4, ge=1, description="prompt groups per step")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clip")
    stream_batches: bool = Field(
        True,
        description=(
            "train each chunk of newly scored groups as it arrives (the same update within float rounding); "
            "`false` waits for the whole batch and trains it in group order, so a sync-mode run is bitwise "
            "reproducible"
        ),
    )
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = Field(
        "token-mean",
        description=(
            "how the loss is averaged over the global batch: `token-mean` (every response token weighs the same),"
            " `seq-mean-token-mean` (every sequence weighs the same, its tokens averaged), `seq-mean-token-sum` "
            "(sequences averaged, tokens summed); the names are verl's"
        ),
    )
    ppo_mini_batch_size: int | None = Field(
        None,
        ge=1,
        description=(
            "prompt groups per optimiser step: each global batch of `trainer.train_batch_size` groups is split, in "
            "the order it arrived, into mini-batches of this many (it must divide the batch), one optimiser step "
            "each, every mini-batch normalised by its own tokens; unset: the whole batch, one step (verl's name)"
        ),
    )
    ppo_epochs: int = Field(
        1,
        ge=1,
        description=(
            "passes over each global batch's mini-batches, in the same order; later passes (and later mini-batches)"
            " are off-policy, which the RL and sampled-token terms' PPO ratio against the behaviour log-probs "
            "corrects as it does for stale samples (verl's name)"
        ),
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="warm-up as a fraction of `trainer.total_steps` (when `trainer.warmup_steps` is 0; not both)",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="after warm-up: `constant`, or `cosine` decay to `trainer.min_lr_ratio` x lr at "
        "`trainer.total_steps`",
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="where the cosine decay ends, as a fraction of `trainer.lr`"
    )
    sync_every: int = Field(1, ge=1, description="steps between weight publications to the rollout workers")
    eval_every: int = Field(
        0,
        ge=0,
        description=(
            "steps between greedy evaluations of `data.val_files` with the reward function (`val/reward_mean`); 0: off"
        ),
    )
    max_nonfinite_steps: int = Field(
        3,
        ge=1,
        description=(
            "steps in a row whose loss or gradient norm is not finite (each skipped, no update) before the run fails"
        ),
    )
    seed: int = Field(0, description="seed of the learner and the samplers")
    # The seed's out-of-memory knobs.
    ppo_micro_batch_size_per_gpu: int = Field(4, ge=1, description="sequences per micro-batch (out-of-memory knob)")
    ppo_max_token_len_per_gpu: int = Field(16384, ge=1, description="tokens per micro-batch (out-of-memory knob)")
    pack_sequences: bool = Field(
        False,
        description=(
            "pack each micro-batch's samples end to end into one row of up to `trainer.ppo_max_token_len_per_gpu` "
            "tokens (first-fit, longest first; `trainer.ppo_micro_batch_size_per_gpu` does not apply), their position "
            "ids restarting at each sample so that attention stays within it: no padding (same loss and gradients "
            "within fp32 rounding; see [packed batches](training.md#packed-batches))"
        ),
    )
    param_offload: bool = Field(False, description="keep FSDP parameters on the CPU (out-of-memory knob)")
    optimizer_offload: bool = Field(False, description="keep optimizer state on the CPU (out-of-memory knob)")
    activation_checkpointing: bool = Field(
        False,
        description=(
            "recompute each decoder layer in the backward pass instead of keeping its activations (out-of-memory "
            "knob; about one more forward pass)"
        ),
    )
    fused_lm_head: bool = Field(
        True,
        description=(
            "compute the losses from the last hidden states and the LM head a chunk of response positions at a "
            "time, never holding `[batch, tokens, vocab]` logits (out-of-memory knob; same gradients within fp32 "
            "rounding; `false`: full logits). Models with a non-linear head or logit soft-capping always use full"
            " logits"
        ),
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainerSection:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set trainer.warmup_steps or trainer.warmup_ratio, not both")
        return self

    @model_validator(mode="after")
    def _mini_batches_divide_the_batch(self) -> TrainerSection:
        mini = self.ppo_mini_batch_size
        if mini is not None and self.train_batch_size % mini:
            raise ValueError(
                f"trainer.ppo_mini_batch_size={mini} does not divide trainer.train_batch_size={self.train_batch_size}"
                "; set it to a divisor of the batch (or leave it unset for one optimiser step per batch)"
            )
        return self

    @property
    def warmup(self) -> int:
        """Warm-up steps, from trainer.warmup_steps or trainer.warmup_ratio of the total."""
        return self.warmup_steps or round(self.warmup_ratio * self.total_steps)


class LoggingSection(_Section):
    dir: str = Field("runs", description="run directories go here")
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="`debug`, `info`, `warning`, `error`"
    )
    tensorboard: bool = Field(True, description="write TensorBoard events")
    wandb: bool = Field(False, description="log to Weights & Biases")
    wandb_project: str = Field("gkd-async", description="W&B project")
    wandb_entity: str | None = Field(
        None,
        description=(
            "W&B team or user; unset: W&B's default for the API key (`WANDB_API_KEY` or `wandb login`, never the "
            "config)"
        ),
    )
    run_name: str | None = Field(
        None,
        description=(
            "the run's name in W&B; unset: the run id. The W&B run's id is kept in the run directory "
            "(`wandb_run_id`), so `gkd-async resume` logs to the same W&B run"
        ),
    )


class CheckpointSection(_Section):
    dir: str | None = Field(None, description="unset: `<logging.dir>/<run_id>/checkpoints`")
    save_every: int = Field(
        50, ge=0, description="steps between checkpoints; 0: only at the end and when the run is stopped by a signal"
    )
    keep_last: int = Field(2, ge=1, description="checkpoints kept; older ones are deleted")
    resume: str | None = Field(None, description="a checkpoint directory to continue from")
