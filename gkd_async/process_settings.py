"""Process-wide settings of gkd-async's processes (the command's and each Ray stage's), made before the
stages start: files private to the user, and glibc's malloc kept compact.

`private_files`: a run's directory holds its Redis URL (with any password), weights, checkpoints and logs,
so everything the process creates is 0700 / 0600 (umask 077).

`compact_malloc`: by default glibc gives each thread that allocates an arena of its own and keeps freed
memory in it, so a process that runs several stages as threads (and their gloo and tokenizer threads) holds
the high-water mark of each. One arena, and `release_free_memory` after each learner step, keep it to one:
measured on the real-vocabulary run of `benchmarks/bench_vs_trl.py --real-vocab` with
`pipeline.launcher=threads` (see the README). `MALLOC_ARENA_MAX` in the environment wins over this;
`GKD_ASYNC_COMPACT_MALLOC=0` turns both off. Mapping every block over 1 MiB on its own (`MALLOC_MMAP_THRESHOLD_`)
held less still, but made a step about 45% slower (each large buffer faulted in anew), so it is not done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
PRIVATE_UMASK = 0o077


def _glibc():
    if not sys.platform.startswith("linux") or os.environ.get("GKD_ASYNC_COMPACT_MALLOC") == "0":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def compact_malloc() -> bool:
    """Ask glibc for one malloc arena for the whole process; False where that is not glibc, or not wanted."""
    if _LIBC is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return _LIBC.mallopt(M_ARENA_MAX, 1) == 1


def release_free_memory() -> None:
    """Hand the memory glibc holds free back to the system (malloc_trim), after a step's large buffers."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def private_files() -> None:
    """Files and directories this process creates are its user's alone (0600 / 0700)."""
    os.umask(PRIVATE_UMASK)
