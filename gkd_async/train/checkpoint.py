"""Sharded checkpoints (torch.distributed.checkpoint): model and optimizer state per rank, plus the
trainer's own state (step, data cursor, counters) as JSON. Every function here is a collective."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from gkd_async.config.model_data import ModelSection
from gkd_async.errors import GKDError
from gkd_async.models.loading import tied_aliases

TRAINER_STATE = "trainer_state.json"
# A checkpoint holds what training changes: with LoRA (model.lora) the adapters and their optimizer state, the
# frozen base being the student's own weights, loaded from model.student again; without it, every weight.
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)
# Loading them leaves the frozen weights as they are (dcp.load still refuses a checkpoint that lacks a trained one).
INTO_TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


class CheckpointError(GKDError):
    """A checkpoint to resume from is missing or incomplete."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def save_checkpoint(
    root: Path, step: int, model, optimizer, trainer_state: dict[str, Any], keep_last: int | None = None
) -> Path:
    """Save the step's checkpoint, point `latest` at it, and delete all but the newest `keep_last`."""
    path = step_dir(root, step)
    model_sd, optim_sd = _trained_state(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    if dist.get_rank() == 0:
        (path / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}))
        tmp = root / ".latest.tmp"
        tmp.write_text(path.name)
        tmp.replace(root / "latest")
        if keep_last is not None:
            prune_checkpoints(root, keep_last, path)
    dist.barrier()
    return path


def _trained_state(model, optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model and optimizer entries a checkpoint holds (see TRAINED_ONLY)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=TRAINED_ONLY)
    return _without_frozen_aliases(model, model_sd), optim_sd


def _without_frozen_aliases(model, model_sd: dict[str, Any]) -> dict[str, Any]:
    """torch filters frozen weights by parameter, once each, so a frozen tied output layer would stay under
    its alias: it goes too."""
    for alias, source in tied_aliases(model).items():
        if source not in model_sd:
            model_sd.pop(alias, None)
    return model_sd


def prune_checkpoints(root: Path, keep_last: int, current: Path) -> list[Path]:
    """Delete the step directories other than `current` and the newest `keep_last - 1` before it.

    Steps after `current` belong to updates a resume rolled back, so they go too.
    """
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name <= current.name)
    keep = set(steps[-keep_last:]) | {current}
    removed = [p for p in root.glob("step_*") if p.is_dir() and p not in keep]
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return removed


STEP_NAME = re.compile(r"step_\d{7}")


def resolve_checkpoint(path: Path) -> Path:
    """A step directory, or a checkpoint root whose `latest` names one (a `step_NNNNNNN` directory in it:
    nothing else, so a tampered pointer cannot lead a resume out of the checkpoint root)."""
    if (path / "latest").is_file():
        name = (path / "latest").read_text(errors="replace").strip()
        if not STEP_NAME.fullmatch(name):
            raise CheckpointError(
                f"{path / 'latest'} names {name[:80]!r}, not a step directory of {path} (step_NNNNNNN); pass the "
                "step directory to resume from (checkpoint.resume=<root>/step_NNNNNNN)"
            )
        path = path / name
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"{path} is not a gkd-async checkpoint (no {TRAINER_STATE}); pass a checkpoint directory "
            "(<run dir>/checkpoints) or one of its step_* folders to checkpoint.resume"
        )
    return path


def load_checkpoint(path: Path, model, optimizer) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    model_sd, optim_sd = _trained_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=INTO_TRAINED
    )
    return json.loads((path / TRAINER_STATE).read_text())


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0's CPU (empty on the other ranks)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def iter_full_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The unsharded weights one tensor at a time, on the CPU, under the names `full_state_dict` gives, a
    tied weight once (under its first name, as `save_pretrained` writes it: see `tied_aliases`).

    A collective per sharded tensor: every rank must run the iterator to its end (the other ranks' copies
    can be dropped at once). Whoever consumes it holds one tensor at a time, not the model.
    """
    aliases = tied_aliases(model)
    for name, value in model.state_dict().items():
        if name in aliases:
            continue
        full = value.full_tensor() if isinstance(value, DTensor) else value.detach().clone()
        yield name, full.detach().cpu()


def export_checkpoint(path: Path, model: ModelSection, out: Path) -> Path:
    """The student weights of a sharded checkpoint (a step directory, or a checkpoint root whose `latest` names
    one) as a `save_pretrained` directory with the tokenizer, in one process: the student is built as the run's
    `model` section says (with its LoRA adapters, then merged, when model.lora is on) and the checkpoint's model
    entries are read into it; the optimizer's are not read. Like resume, it reads the checkpoint's metadata
    with torch's unpickler: export only checkpoints you trust."""
    from gkd_async.models.loading import load_model, load_tokenizer
    from gkd_async.models.lora import load_trainable_student, lora_scalings, merge_lora

    step = resolve_checkpoint(path)
    student = load_trainable_student(model)
    state = {"model": _without_frozen_aliases(student, get_model_state_dict(student, options=TRAINED_ONLY))}
    try:
        dcp.load(state, checkpoint_id=str(step), no_dist=True)
    except Exception as exc:  # DCP raises its own kinds for a checkpoint of another model
        raise CheckpointError(
            f"{step} does not hold the weights of {model.student!r} (the run's model.student"
            f"{', with model.lora' if model.lora.enabled else ''}): {str(exc).splitlines()[0]}"
        ) from None
    student.load_state_dict(state["model"], strict=False)
    plain = student
    if model.lora.enabled:  # the adapters merged into a plain model of the student's shape
        plain = load_model(model.student, "float32", model.trust_remote_code)
        plain.load_state_dict(dict(merge_lora(student.state_dict().items(), lora_scalings(student))))
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    load_tokenizer(model.student, model.trust_remote_code).save_pretrained(out)
    return step
