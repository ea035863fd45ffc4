"""FSDP2 sharding of the student, the process-group backend, the optimiser state's device and the learning-rate
schedule.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def process_group_backend(device: str) -> str:
    """NCCL for the model's collectives on GPUs, gloo for the step's bookkeeping, which stays on the CPU."""
    return "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"


def shard_model(
    model: torch.nn.Module,
    dtype: str,
    param_offload: bool,
    device_type: str = "cpu",
    activation_checkpointing: bool = False,
) -> torch.nn.Module:
    """FSDP2: each decoder layer, then the root, sharded over all ranks; fp32 master weights and reduction.

    With `activation_checkpointing`, each decoder layer keeps only its input for the backward pass and
    recomputes the rest (transformers' non-reentrant checkpointing): less memory, about one more forward.
    """
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=device_type != "cpu") if param_offload else OffloadPolicy()
    layers = getattr(getattr(model, "model", model), "layers", [])
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return model


def lr_multiplier(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then constant or a cosine decay to `min_ratio` at `total`."""
    ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if schedule == "cosine":
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
        return ramp * (min_ratio + (1.0 - min_ratio) * cosine)
    return ramp


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: str) -> None:
    """Optimizer offload: park the Adam moments on the CPU between steps, bring them back for the step."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device.type != device:
                state[key] = value.to(device, non_blocking=True)
