"""torch.distributed for the learner's ranks: how they meet."""

from __future__ import annotations

import re
import time

import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from gkd_async.train.fsdp import process_group_backend
from gkd_async.transport.network import listening_store, node_address, redis_host
from workers.common import RunContext, RunFailedError


def join_learner_group(
    ctx: RunContext, device: str, rank: int, world_size: int, init_method: str | None = None
) -> None:
    """One rank alone meets nobody: its store is in-process (no port opened); several meet at
    `init_method`, or at the store rank 0 opens and announces (see `rendezvous_store`)."""
    backend = process_group_backend(device)
    if world_size == 1 and init_method is None:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif init_method is not None:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    else:
        store = rendezvous_store(ctx, rank)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


RENDEZVOUS_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


def rendezvous_store(ctx: RunContext, rank: int) -> dist.TCPStore:
    """The store the learner's ranks meet at when started without an init method: rank 0 opens it on its
    own node's address only (not every interface) and announces tcp://ADDRESS:PORT in Redis; the other ranks,
    wherever Ray placed them, connect to what `announced_rendezvous` read there. The launcher clears the key
    before it starts the ranks."""
    if rank == 0:
        host = node_address(toward=redis_host(ctx.client))
        store = listening_store(host, default_pg_timeout)
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address in brackets
        ctx.client.set(ctx.names.rendezvous, f"tcp://{shown}:{store.port}")
        return store
    host, port = announced_rendezvous(ctx, rank)
    return dist.TCPStore(host, port, is_master=False, timeout=default_pg_timeout)


def announced_rendezvous(ctx: RunContext, rank: int, timeout_s: float = 300.0) -> tuple[str, int]:
    """Host and port of rank 0's store as announced in Redis, taken only in the form tcp://HOST:PORT (a
    `file://` path would be written to, an `env://` would read this process's environment)."""
    deadline = time.monotonic() + timeout_s
    while (value := ctx.client.get(ctx.names.rendezvous)) is None:
        if time.monotonic() > deadline:
            raise RunFailedError(
                f"learner rank {rank}: rank 0 did not announce its address in Redis ({ctx.names.rendezvous}) "
                f"within {timeout_s:.0f}s; is rank 0 running?"
            )
        time.sleep(0.1)
    address = value.decode(errors="replace")
    match = RENDEZVOUS_ADDRESS.fullmatch(address)
    if match is None:
        raise RunFailedError(
            f"learner rank {rank}: the rendezvous address in Redis ({ctx.names.rendezvous}) is {address[:100]!r}, "
            "not tcp://HOST:PORT; something other than rank 0 wrote it: check who can write the run's Redis"
        )
    return match.group(1).strip("[]"), int(match.group(2))
