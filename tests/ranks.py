"""torch.distributed (gloo) ranks for the tests, each a process of its own, that end without tripping gloo.

A rank function is `fn(rank, world, init_file, *args)`: it calls `join_group` first, writes what it has to
report, and ends with `leave_group`. Gloo has aborted ranks on the way out (SIGABRT, "terminate called
without an active exception") twice in CI, once with a rank left alone while its peer had gone and once
after every rank had met at a barrier. So ranks meet before any tears the group down, then leave without
the interpreter's finalisation (where gloo's threads and the tensors they hold are destroyed), and a rank
that still dies after every rank recorded its work as done is a teardown crash, not a failed test: what the
test asserts was written before it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def join_group(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _done_marker(init_file: str, rank: int) -> Path:
    return Path(f"{init_file}.done{rank}")


def leave_group(rank: int, init_file: str) -> NoReturn:
    _done_marker(init_file, rank).touch()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn: Callable[..., None], world: int, init_file: str, *args) -> None:
    """Run `fn` on `world` ranks and wait for them; a rank's exception fails the caller as mp.spawn does."""
    try:
        mp.spawn(fn, args=(world, init_file, *args), nprocs=world, join=True)
    except mp.ProcessExitedException:
        if all(_done_marker(init_file, rank).exists() for rank in range(world)):
            print(f"a rank died tearing its gloo group down after all {world} had finished", file=sys.stderr)
            return
        raise
