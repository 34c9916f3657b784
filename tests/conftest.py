"""Test-wide settings.

One torch thread per test process: the suite's models are tiny, and on a shared 2-core
machine two intra-op threads made small ops 10-100x slower through contention.
"""
import torch

torch.set_num_threads(1)
