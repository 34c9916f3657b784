"""Test-wide settings.

One torch thread per test process: the suite's models are tiny, and on a shared 2-core
machine two intra-op threads made small ops 10-100x slower through contention. The CLI's
default ``--threads`` reads $CERTKD_THREADS, so commands run in-process (and subprocesses)
keep one thread too.
"""
import os

import torch

os.environ.setdefault("CERTKD_THREADS", "1")
torch.set_num_threads(1)
