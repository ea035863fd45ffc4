"""What the learner benchmarks share: one FSDP2 learner rank on its own (gloo on the CPU with one thread, NCCL on
a GPU in bf16) with AdamW, and scored samples made up at random (a step's cost does not depend on their values)."""

from __future__ import annotations

import tempfile

import numpy as np
import torch
import torch.distributed as dist

from gkd_async.models.loading import load_model
from gkd_async.train.batching import TrainSample
from gkd_async.train.fsdp import process_group_backend, shard_model


def one_rank_learner(model_spec: str, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, str]:
    """The sharded student in training mode, its optimiser and the dtype it trains in."""
    if device == "cpu":
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(0)
    with tempfile.NamedTemporaryFile() as init:
        dist.init_process_group(process_group_backend(device), init_method=f"file://{init.name}", rank=0, world_size=1)
    dtype = "bfloat16" if device == "cuda" else "float32"
    model = shard_model(load_model(model_spec).to(device), dtype, False, device_type=device)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5), dtype


def random_sample(rng: np.random.Generator, name: str, prompt_ids: np.ndarray, response: int, vocab: int, k: int):
    """A sample of `response` random tokens after `prompt_ids`, with a random teacher top-k (descending)."""
    descending = np.sort(np.log(rng.dirichlet(np.ones(k, np.float32), response)), axis=1)[:, ::-1]
    return TrainSample(
        name,
        name.split("/")[0],
        0,
        prompt_ids,
        rng.integers(1, vocab, response).astype(np.int32),
        rng.integers(1, vocab, (response, k)).astype(np.int32),
        descending.astype(np.float32).copy(),
        np.full(response, -2.0, np.float32),
    )
