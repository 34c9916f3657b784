"""CPU threads of the ``certkd`` commands (``--threads N``).

PyTorch's default uses every core. On a machine that other processes keep busy that is much
slower than fewer threads: on a shared 2-core machine, two threads made teacher epochs 15–30×
slower than one. The default here is therefore the number of cores left idle by the 1-minute
load average (at least 1, at most 4), or ``$CERTKD_THREADS`` when set. It depends on the load,
so pass ``--threads N`` explicitly when runs must be bit-identical across machines or times
(the intra-op thread count can change float summation order on CPU).

A requested count is capped at :func:`max_threads`, the larger of :data:`MAX_THREADS` and the usable
cores, with a one-line warning on stderr: asking OpenMP for 100000 threads crashes the process
(thread creation fails, or a segfault), and no count above the cores runs faster. Every count up to
:data:`MAX_THREADS` is kept as given on any machine, so ``--threads N`` still makes reruns identical.

Nothing here imports torch until :func:`apply_threads` is called (``certkd --help`` stays light).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from certkd.errors import CertkdError

MAX_DEFAULT_THREADS = 4
MAX_THREADS = 64


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """``$CERTKD_THREADS``, else min(4, usable cores − ⌊1-minute load average⌋), at least 1."""
    env = os.environ.get("CERTKD_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise CertkdError(f"CERTKD_THREADS must be a positive integer, got {env!r}; unset it or set e.g. 1")
        return n
    cores = usable_cores()
    try:
        busy = int(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average (Windows)
        busy = 0
    return max(1, min(MAX_DEFAULT_THREADS, cores - busy))


def max_threads() -> int:
    """The most threads certkd asks for: max(:data:`MAX_THREADS`, usable cores)."""
    return max(MAX_THREADS, usable_cores())


def capped_threads(threads: Optional[int]) -> int:
    """``threads`` (None: :func:`default_threads`) capped at :func:`max_threads`, saying so on stderr."""
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise CertkdError(f"--threads must be >= 1, got {n}")
    cap = max_threads()
    if n > cap:
        given = f"--threads {n}" if threads is not None else f"CERTKD_THREADS={n}"
        print(f"warning: {given} capped at {cap} threads (certkd uses at most max({MAX_THREADS}, usable cores); "
              f"this machine has {usable_cores()} usable cores)", file=sys.stderr, flush=True)
        n = cap
    return n


def apply_threads(threads: Optional[int]) -> int:
    """Set torch's intra-op threads to ``threads`` (None: :func:`default_threads`), capped at
    :func:`max_threads`; returns the number set."""
    import torch

    n = capped_threads(threads)
    torch.set_num_threads(n)
    return n
