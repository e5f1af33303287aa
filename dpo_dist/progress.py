"""Progress of a long stage, with the time left, on the main rank only.

    bar = Progress(len(pairs), "reference", unit="pair")
    for batch in batches:
        ...
        bar.update(len(batch), loss=0.31)
    bar.close()

On a terminal it is a tqdm bar. Anywhere else (a Slurm log, CI, ``> file``) a bar redrawn on every
update would fill the log with carriage-return lines, so it logs a line instead: at the first update
(an early estimate), then at most every ``every`` seconds, and at the end:

    train: 12/124 steps (10%), loss 0.612, 1m02s elapsed, eta 9m40s

The estimate is the mean rate since this process started (``initial`` work, a resumed run's earlier
steps, does not count towards it).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, TextIO

from dpo_dist import dist

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """45s, 6m12s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fields(fields: dict) -> dict[str, str]:
    return {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in fields.items()}


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "item", *, initial: int = 0, every: float = 30.0,
                 enabled: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.every, self.clock = total, desc, unit, every, clock
        self.initial = self.done = initial
        self.enabled = dist.is_main() if enabled is None else enabled
        self.fields: dict = {}
        self.started = self.last = clock()
        self._logged = False
        self._bar = None
        stream = stream or sys.stderr
        if self.enabled and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, mininterval=1.0,
                             dynamic_ncols=True)

    def update(self, n: int = 1, **fields) -> None:
        """``n`` more done; ``fields`` (loss=...) are shown with the count until replaced."""
        if not self.enabled:
            return
        self.done += n
        self.fields.update(fields)
        if self._bar is not None:
            if fields:
                self._bar.set_postfix(_fields(self.fields), refresh=False)
            self._bar.update(n)
            return
        now = self.clock()
        if not self._logged or now - self.last >= self.every or self.done >= self.total:
            self.last, self._logged = now, True
            log.info("%s", self.line(now))

    def eta(self, now: float) -> float | None:
        """Seconds left at the mean rate so far; None before anything is done."""
        done = self.done - self.initial
        if done <= 0:
            return None
        return max(self.total - self.done, 0) * (now - self.started) / done

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        eta = self.eta(now)
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k} {v}" for k, v in _fields(self.fields).items())
        return (f"{self.desc}: {self.done}/{self.total} {self.unit}s{pct}{extra}, {duration(now - self.started)} elapsed, "
                f"eta {'?' if eta is None else duration(eta)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
