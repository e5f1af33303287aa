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


GIB = memory.GIB


def _phases(monkeypatch, readings, resets):
    """PhasePeaks over scripted readings: ``readings`` the (host, device) high-water marks each end()
    reads, ``resets`` what each reset_peak() returns (the constructor's first)."""
    readings, resets = iter(readings), iter(resets)
    current = {}
    monkeypatch.setattr(memory, "reset_peak", lambda: next(resets))
    monkeypatch.setattr(memory, "peak_bytes", lambda: current["r"][0])
    monkeypatch.setattr(memory, "device_peak_bytes", lambda: current["r"][1])
    phases = memory.PhasePeaks()

    def end(phase, within=None):
        current["r"] = next(readings)
        phases.end(phase, within)
    return phases, end


@pytest.mark.parametrize("name,resets,readings,expect", [
    # Every reset works: each phase its own peak; the stage's peak is the save's here.
    ("resets work", [True] * 5, [(2, None), (3, None), (5, None), (4, None)],
     {"peak_rss": [5.0], "setup_peak_rss": [2.0], "loop_peak_rss": [4.0], "save_peak_rss": [5.0]}),
    # The kernel refuses the first reset: VmHWM then still holds the reference pass; no phase is known.
    ("refused from the start", [False] * 5, [(2, None), (3, None), (5, None), (6, None)],
     {"peak_rss": [6.0], "setup_peak_rss": [None], "loop_peak_rss": [None], "save_peak_rss": [None]}),
    # Refused after setup: setup is known, every later phase carries it and reads as unknown.
    ("refused after setup", [True, False, False, False, False], [(2, None), (3, None), (5, None), (4, None)],
     {"peak_rss": [5.0], "setup_peak_rss": [2.0], "loop_peak_rss": [None], "save_peak_rss": [None]}),
    # A GPU: each phase's device peak too (the CUDA reset is separate and always allowed).
    ("gpu", [True] * 5, [(2, 10), (3, 30), (3, 20), (3, 25)],
     {"peak_gpu": [30.0], "setup_peak_gpu": [10.0], "loop_peak_gpu": [30.0], "save_peak_gpu": [20.0]}),
])
def test_phase_peaks_read_each_phase_apart(monkeypatch, name, resets, readings, expect):
    phases, end = _phases(monkeypatch, [(h * GIB, d if d is None else d * GIB) for h, d in readings], resets)
    for phase in ("setup", "loop", "save", "loop"):  # a loop, a save, the loop again
        end(phase)
    summary = memory.phase_summary([phases.peaks], ("setup", "loop", "save"))
    for key, value in expect.items():
        assert summary[f"{key}_gib_per_rank"] == value, (name, key)
    if all(d is None for _, d in readings):
        assert summary["peak_gpu_gib_per_rank"] == [None]


def test_a_step_phase_counts_for_the_loop_too(monkeypatch):
    # Two steps: forward, backward, optimizer step each, within the loop; the loop's own remainder
    # (metrics, logging) closes as "loop". The loop's peak is the largest of all its parts.
    readings = [(2, None), (5, None), (7, None), (6, None), (3, None), (4, None), (8, None), (6, None), (3, None)]
    phases, end = _phases(monkeypatch, [(h * GIB, None) for h, _ in readings], [True] * 10)
    end("setup")
    for _ in range(2):
        for part in memory.STEP_PARTS:
            end(part, within="loop")
        end("loop")
    summary = memory.phase_summary([phases.peaks], ("setup", "loop", *memory.STEP_PARTS))
    assert summary["forward_peak_rss_gib_per_rank"] == [5.0]   # 5, then 4
    assert summary["backward_peak_rss_gib_per_rank"] == [8.0]  # 7, then 8
    assert summary["step_peak_rss_gib_per_rank"] == [6.0]      # 6, then 6
    assert summary["loop_peak_rss_gib_per_rank"] == [8.0]      # its parts' 8, not only its own 3s
    assert summary["peak_rss_gib_per_rank"] == [8.0]
