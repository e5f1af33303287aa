"""dpo_dist.memory: what the training summary and the benchmark read, and the heap release train.py
calls once a micro-batch's activations are freed."""

import pytest
import torch

from dpo_dist import memory


def test_release_free_heap_gives_freed_blocks_back():
    # glibc serves blocks under its mmap threshold from its heap; freeing one mmapped 4 MiB block
    # raises the threshold above the 1 MiB blocks below, as a training step's first tensors do.
    del_me = torch.ones(1 << 20)
    del del_me
    blocks = [torch.ones(1 << 18) for _ in range(300)]  # 300 x 1 MiB, in the heap
    pin = torch.ones(1 << 10)  # above them, so freeing them leaves no free top for free() to trim
    before = memory.current_bytes()
    del blocks
    if not memory.release_free_heap():
        pytest.skip("no glibc malloc_trim here")
    after = memory.current_bytes()
    assert before - after > 200 * 2 ** 20, f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
    assert pin.sum() == 1 << 10
