"""Keep freed memory in the process instead of handing it back to the OS after every step (issue #20).

A training step allocates and frees the same large activation buffers many times. With glibc's
defaults, blocks above the mmap threshold (dynamic, at most 32 MiB: CNN7 activations at batch 128
are larger) are mapped and unmapped on every allocation, and the heap top is trimmed when more
than 128 KiB is free, so the next step page-faults its memory in again. Serving every block from
the heap and not trimming it makes the step reuse its own pages: the same arithmetic (the numbers
do not change), less kernel time; the price is that the process keeps its peak memory. Measured
with ``benchmarks/bench_step.py`` (``benchmarks/README.md``, issue #20 section). Does nothing
where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses larger values on 64-bit systems
_done = False


def keep_freed_memory() -> bool:
    """No mmap'd blocks, no heap trimming (glibc ``mallopt``), once per process; True where glibc accepted."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(p, v) == 1 for p, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
                                             (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 30),
                                             (M_TOP_PAD, 64 * 1024 * 1024)))
    _done = ok
    return ok
