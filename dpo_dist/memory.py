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


# The parts of a training step train.py measures inside the loop, in the order they run: the
# forward pass and loss, engine.backward, engine.step.
STEP_PARTS = ("forward", "backward", "step")


class PhasePeaks:
    """One process's peak memory per phase (loading the model, the training loop, checkpoint saves):
    each phase's high-water marks are read and reset at its end, so a save's copy of the optimizer
    states does not pass for the loop's peak, nor loading for either. Where the kernel refuses the
    reset, every later phase would carry the earlier ones' peak: those read as unknown (None).

        phases = PhasePeaks()        # from now: "setup"
        ...; phases.end("setup")
        ...; phases.end("loop"); save(); phases.end("save")

    A phase can sit within another: ``end("backward", within="loop")`` counts the backward pass's
    peak for both, so the loop's peak stays the largest of its parts. Peaks are totals, not
    increments: a backward's includes the activations its forward left alive.

    On a GPU the device peaks are torch's allocator counts in the host's program order: memory a
    side stream still uses after its free, allocator fragmentation, the CUDA context and NCCL's
    buffers are not in them (what meets the card's limit is max_memory_reserved plus those).
    Neither reset syncs the device, and the host one (clear_refs 5) resets a counter without walking
    page tables, so reading them three times per micro-batch costs microseconds.
    """

    ALL = "all"  # every phase together: the stage's peak, known even where the resets are refused

    def __init__(self) -> None:
        self.peaks: dict[str, tuple[int | None, int | None]] = {}  # phase -> (host bytes, device bytes)
        self.reset_ok = reset_peak()

    def end(self, phase: str, within: str | None = None) -> None:
        """Close ``phase``; ``within``: a phase it is part of (a step's forward, backward and optimizer
        step within the loop), whose peak then includes it."""
        host, device = peak_bytes(), device_peak_bytes()
        known = host if self.reset_ok else None
        for key, h in ((phase, known), *(((within, known),) if within else ()), (self.ALL, host)):
            old_h, old_d = self.peaks.get(key, (None, None))
            self.peaks[key] = (_larger(old_h, h), _larger(old_d, device))
        self.reset_ok = reset_peak() and self.reset_ok


def _larger(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def phase_summary(per_rank: list[dict[str, tuple[int | None, int | None]]], phases: tuple[str, ...]) -> dict:
    """summary.json's memory fields from each rank's PhasePeaks.peaks: the stage's peak (all phases,
    host and device) and each phase's, in GiB per rank (None: unknown, absent, or no GPU)."""
    gib = lambda b: None if b is None else round(b / GIB, 3)  # noqa: E731
    out = {"peak_rss_gib_per_rank": [gib(p.get(PhasePeaks.ALL, (None, None))[0]) for p in per_rank],
           "peak_gpu_gib_per_rank": [gib(p.get(PhasePeaks.ALL, (None, None))[1]) for p in per_rank]}
    for phase in phases:
        out[f"{phase}_peak_rss_gib_per_rank"] = [gib(p.get(phase, (None, None))[0]) for p in per_rank]
        out[f"{phase}_peak_gpu_gib_per_rank"] = [gib(p.get(phase, (None, None))[1]) for p in per_rank]
    return out


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
