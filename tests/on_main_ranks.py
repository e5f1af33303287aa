"""What dist.on_main gives each rank: rank 0's result, or rank 0's error raised on every rank (one
that does not survive pickling and a KeyboardInterrupt as a RuntimeError with its text; a result
that does not pickle as the error pickling it raised). Prints one JSON line per rank and case.
Launched by tests/test_distributed.py under torchrun for 2 ranks."""

import json
import os
import threading

from dpo_dist import dist
from dpo_dist.config import ConfigError


def returns_rank() -> int:
    return dist.read_env().rank


def refuses() -> None:
    raise ConfigError("train.checkpoint_dir: rank 0 refused")


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def unpicklable() -> None:
    raise Unpicklable()


class TwoArguments(Exception):
    """Pickles, but does not unpickle: pickling stores args, the message, not (path, why)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}")


def does_not_unpickle() -> None:
    raise TwoArguments("/runs/x", "broken")


def unpicklable_result() -> threading.Lock:
    return threading.Lock()


def stopped() -> None:
    raise KeyboardInterrupt()


if __name__ == "__main__":
    dist.init()
    for case in (returns_rank, refuses, unpicklable, does_not_unpickle, unpicklable_result, stopped):
        try:
            got = {"value": dist.on_main(case)}
        except BaseException as e:  # noqa: BLE001 -- what each rank raised is the result
            got = {"error": type(e).__name__, "message": str(e)}
        # One write per line: print() writes the text and its newline apart, and two ranks share stdout.
        os.write(1, ("ON_MAIN " + json.dumps({"rank": dist.read_env().rank, "case": case.__name__, **got}) + "\n").encode())
    dist.shutdown()
