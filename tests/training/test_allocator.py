"""certkd.training.allocator: glibc keeps freed memory (issue #20); harmless elsewhere."""
import platform

import torch

from certkd.training.allocator import keep_freed_memory


def test_keep_freed_memory_is_idempotent_and_allocation_still_works():
    first = keep_freed_memory()
    assert keep_freed_memory() is first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first
    big = torch.ones(64 * 1024 * 1024 // 4)  # above the default mmap threshold
    assert float(big.sum()) == big.numel()
