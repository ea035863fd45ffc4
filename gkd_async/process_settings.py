"""Process-wide settings of gkd-async's processes (the command's and each Ray stage's), made before the
stages start: files private to the user, and glibc's malloc kept compact.

`private_files`: a run's directory holds its Redis URL (with any password), weights, checkpoints and logs,
so everything the process creates is 0700 / 0600 (umask 077).

`compact_malloc`: by default glibc gives each thread that allocates an arena of its own and keeps freed
memory in them, and raises its mmap threshold as large blocks come and go, so that a freed logits or
weights buffer stays in the process rather than going back to the system. A process that runs several
stages as threads (and their gloo and tokenizer threads) then holds the high-water mark of each. With one
arena and blocks of 1 MiB and more mapped on their own (returned to the system as soon as they are freed),
the real-vocabulary run of `benchmarks/bench_vs_trl.py --real-vocab` with `pipeline.launcher=threads`
peaked at about 1.6 GB instead of 2.5 GB. `MALLOC_ARENA_MAX` or `MALLOC_MMAP_THRESHOLD_` in the
environment win over this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
M_ARENA_MAX = -8
MMAP_THRESHOLD = 1 << 20


def compact_malloc() -> bool:
    """Ask glibc for one malloc arena and mmap for blocks of 1 MiB or more; False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    done = True
    if "MALLOC_ARENA_MAX" not in os.environ:
        done &= mallopt(M_ARENA_MAX, 1) == 1
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        done &= mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return done


PRIVATE_UMASK = 0o077


def private_files() -> None:
    """Files and directories this process creates are its user's alone (0600 / 0700)."""
    os.umask(PRIVATE_UMASK)
