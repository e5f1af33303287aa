"""Run training in this process, as the pipeline does before evaluating and before the next round
samples, and print (one JSON line per rank) how many bytes of tensors are still alive afterwards next
to the model's own size, and whether the signal handlers are the ones before training. Launched by
tests/test_release.py, under torchrun for 2 ranks."""

import gc
import json
import signal
import sys

import torch

from dpo_dist import dist, train
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


if __name__ == "__main__":
    cfg = compose(sys.argv[1:])
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]
    before = live_tensor_bytes()
    train.run(cfg)
    after = live_tensor_bytes()
    e = dist.read_env()
    restored = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] == handlers
    print("LIVE " + json.dumps({"rank": e.rank, "before": before, "after": after, "signals_restored": restored}),
          flush=True)
    dist.shutdown()
