"""Run training in this process, as the pipeline does before evaluating and before the next round
samples, and print (one JSON line per rank) how many bytes of tensors are still alive afterwards next
to the model's own size, its exit code if it stopped (``--signal-during-export``: SIGUSR1 to rank 0
as the export begins), and whether the signal handlers are the ones before training. Launched by
tests/test_release.py, under torchrun for 2 ranks."""

import gc
import json
import os
import signal
import sys

import torch

from dpo_dist import checkpoint, dist, train
from dpo_dist.config import compose


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage still reachable from Python (the gc sees tensors)."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.is_meta:
                continue
            storage = obj.untyped_storage()
        except (ReferenceError, RuntimeError):
            continue
        if storage.data_ptr() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def signal_during_export() -> None:
    """SIGUSR1 (Slurm's warning before the time limit) to rank 0 only, as the export begins."""
    export = checkpoint.export_hf

    def signalled(*args, **kwargs):
        if dist.read_env().rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        return export(*args, **kwargs)

    checkpoint.export_hf = signalled


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--signal-during-export":
        signal_during_export()
        args = args[1:]
    cfg = compose(args)
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]
    before = live_tensor_bytes()
    try:
        train.run(cfg)
        exit_code = None
    except SystemExit as e:  # train.Preempted
        exit_code = e.code
    after = live_tensor_bytes()
    restored = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] == handlers
    print("LIVE " + json.dumps({"rank": dist.read_env().rank, "before": before, "after": after, "exit": exit_code,
                                "signals_restored": restored}), flush=True)
    dist.shutdown()
