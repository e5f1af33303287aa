"""Resident-memory readings for the training summary, the planner's cross-check and the benchmark.

The peak is the kernel's high-water mark (VmHWM). It can be reset (Linux `clear_refs` 5), so a stage
that runs after another in the same process (training after the reference pass) reports its own peak.
"""

from __future__ import annotations

import resource
from pathlib import Path

GIB = 1024 ** 3


def reset_peak() -> bool:
    """Restart the high-water marks (resident memory, and the CUDA allocator's where there is a GPU)
    from the current use; False where the kernel does not allow the resident one."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (kB) in bytes; None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_bytes() -> int:
    """This process's peak resident memory since start or the last reset_peak()."""
    peak = _status_bytes("VmHWM")
    # ru_maxrss is in KiB on Linux and never resets: an upper bound where /proc is missing.
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_bytes() -> int | None:
    """The CUDA allocator's peak on this rank's device since the last reset_peak() (what the planner
    estimates per GPU, less the CUDA context and allocator slack); None without a GPU."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.max_memory_allocated()


def current_bytes() -> int:
    return _status_bytes("VmRSS") or 0


_libc_trim = None


def release_free_heap() -> bool:
    """Hand the allocator's free heap pages back to the kernel (glibc ``malloc_trim(0)``); False
    where libc has no such call.

    On the CPU, tensors under glibc's mmap threshold (up to 32 MiB) live in its heap, and a freed
    block goes back to the heap, not the kernel. A backward pass frees the activations as it goes,
    so by its end the process still holds their pages besides the gradients it is making: the
    resident peak is both at once. Called when the activations are gone, this makes the peak what
    is actually live.
    """
    global _libc_trim
    if _libc_trim is None:
        try:
            import ctypes

            _libc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _libc_trim = False
    if _libc_trim:
        _libc_trim(0)
    return bool(_libc_trim)
