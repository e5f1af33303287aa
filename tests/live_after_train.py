"""Run training in this process, as the pipeline does before evaluating and before the next round
samples, and print (one JSON line per rank) how many bytes of tensors are still alive afterwards next
to the model's own size, its exit code if it stopped (``--signal-during-export``: SIGUSR1 to rank 0
as the export begins), whether the signal handlers are the ones before training, and the metrics
training returned (``--summary-unseen-by-rank-1``: rank 1 does not see ``train/summary.json``, as a
node whose NFS attribute cache lags would not; ``--reference-unseen-by-rank-1``: the same for
``reference/manifest.json``; ``--pairs-fewer-on-rank-1`` / ``--pairs-text-differs-on-rank-1``: rank 1
reads the pairs file without its last record, or with that record's rejected answer changed, as if
it saw another version of the file; ``--pairs-change-before-training``: every rank reads that
changed version in training, after the reference pass). Launched by tests/test_release.py, under torchrun for
2 ranks."""

import gc
import json
import os
import pathlib
import signal
import sys

import torch

from dpo_dist import checkpoint, dist, reference, train
from dpo_dist.artifacts import DataError
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


def unseen_by_rank_1(folder: str, name: str) -> None:
    """On rank 1, ``<folder>/<name>`` does not exist as far as Path.is_file can tell."""
    if dist.read_env().rank != 1:
        return
    is_file = pathlib.Path.is_file

    def lagging(self, *args, **kwargs):
        return False if self.name == name and self.parent.name == folder else is_file(self, *args, **kwargs)

    pathlib.Path.is_file = lagging


def pairs_differ_on_rank_1(change) -> None:
    """Rank 1's reads of the pairs file (the reference pass's and training's) give ``change(records)``."""
    if dist.read_env().rank != 1:
        return
    load_pairs = reference.load_pairs
    reference.load_pairs = lambda *a, **k: change(load_pairs(*a, **k))


def pairs_change_before_training() -> None:
    """Every rank's second read of the pairs file (training's, after the reference pass) gives
    ``other_text``: the file rewritten in between."""
    load_pairs, reads = reference.load_pairs, []

    def read(*a, **k):
        reads.append(1)
        records = load_pairs(*a, **k)
        return other_text(records) if len(reads) > 1 else records

    reference.load_pairs = read


def half_written(records: list[dict]) -> list[dict]:
    raise DataError("pairs.jsonl:12: invalid JSON: Unterminated string (as a half-written file reads)")


def other_text(records: list[dict]) -> list[dict]:
    last = dict(records[-1], rejected=[{"role": "assistant", "content": "Another version of this answer."}])
    return [*records[:-1], last]


FLAGS = {"--signal-during-export": signal_during_export,
         "--summary-unseen-by-rank-1": lambda: unseen_by_rank_1("train", "summary.json"),
         "--reference-unseen-by-rank-1": lambda: unseen_by_rank_1("reference", "manifest.json"),
         "--pairs-fewer-on-rank-1": lambda: pairs_differ_on_rank_1(lambda records: records[:-1]),
         "--pairs-text-differs-on-rank-1": lambda: pairs_differ_on_rank_1(other_text),
         "--pairs-change-before-training": pairs_change_before_training,
         "--pairs-unreadable-on-rank-1": lambda: pairs_differ_on_rank_1(half_written)}


if __name__ == "__main__":
    args = sys.argv[1:]
    while args and args[0] in FLAGS:
        FLAGS[args.pop(0)]()
    cfg = compose(args)
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]
    before = live_tensor_bytes()
    metrics, exit_code, error = None, None, None
    try:
        metrics = train.run(cfg)
    except SystemExit as e:  # train.Preempted
        exit_code = e.code
    except Exception as e:  # noqa: BLE001 -- reported per rank: the tests compare the ranks' errors
        error = f"{type(e).__name__}: {e}"
    after = live_tensor_bytes()
    restored = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] == handlers
    # One write per line: print() writes the text and its newline apart, and two ranks share stdout.
    os.write(1, ("LIVE " + json.dumps({"rank": dist.read_env().rank, "before": before, "after": after,
                                       "exit": exit_code, "error": error, "signals_restored": restored,
                                       "metrics": metrics}) + "\n").encode())
    dist.shutdown()
