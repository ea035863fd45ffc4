"""The learner's checkpoints: the sharded model and optimiser (every rank), the trainer's own state (the
schedule, the non-finite count and the intake's, written by rank 0), resume, and the final model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from gkd_async.models.loading import load_model
from gkd_async.models.lora import save_lora_final
from gkd_async.train.checkpoint import full_state_dict, load_checkpoint, save_checkpoint
from workers.common import RunContext


class Checkpointer:
    def __init__(self, ctx: RunContext, model, optimizer, scheduler, guard, feed, write_final) -> None:
        cfg = ctx.config
        self.root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else ctx.run_dir / "checkpoints"
        self.keep = cfg.checkpoint.keep_last
        self.final_dir = ctx.run_dir / "final"
        self.model, self.optimizer, self.scheduler, self.guard, self.feed = model, optimizer, scheduler, guard, feed
        self.write_final = write_final
        self.saved = -1

    def save(self, step: int) -> None:
        state = {**self.feed.state(), "scheduler": self.scheduler.state_dict(), "nonfinite_steps": self.guard.skipped}
        save_checkpoint(self.root, step, self.model, self.optimizer, state, self.keep)
        self.saved = step

    def resume(self, path: Path) -> int:
        """Loads the checkpoint at `path` into every part; returns its step."""
        state: dict[str, Any] = load_checkpoint(path, self.model, self.optimizer)
        step = self.saved = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.guard.skipped = int(state.get("nonfinite_steps", 0))
        self.feed.restore(state, step)
        return step

    def finish(self, step: int, stopped: bool) -> Path | None:
        """The last checkpoint (unless this step's is written) and, when training ran to its end, the final model."""
        if self.saved != step:
            self.save(step)
        if stopped:
            return None
        self.write_final(full_state_dict(self.model), self.final_dir)  # the gather is a collective
        dist.barrier()
        return self.final_dir

    @property
    def written(self) -> Path | None:
        return self.root if self.saved >= 0 else None


def final_model_writer(ctx: RunContext, tokenizer):
    """Rank 0's writer of the final model: the adapters with LoRA, else the whole student, and the tokenizer."""
    student = ctx.config.model

    def write(state: dict, final: Path) -> None:
        if student.lora.enabled:
            save_lora_final(state, student, final)
        else:
            model = load_model(student.student, "float32", student.trust_remote_code)
            model.load_state_dict(state)
            model.save_pretrained(final)
        tokenizer.save_pretrained(final)

    return write


def write_nothing(state: dict, final: Path) -> None:
    """Ranks other than 0: the final model is rank 0's to write."""
