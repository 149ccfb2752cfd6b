"""Progress of a long phase (weights streamed into an export, a checkpoint written, calibration block by block)
with the time left, for a user who watches a 20-minute job: a tqdm bar on a terminal, and otherwise (logs, CI,
`nohup`) one line at most every `interval_s` seconds through the build's `log`, e.g.

    planner: weights 45% (13.4 of 29.8 GB), 1 min 10 s in, about 1 min 25 s left
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    """Counts ``total`` units of work (bytes by default) for ``label``; `update(n)` after each piece."""

    def __init__(self, label: str, total: int, log: Callable[[str], None] | None = print, interval_s: float = 30.0,
                 unit_bytes: bool = True):
        self.label, self.total, self.log, self.interval_s = label, max(int(total), 1), log, interval_s
        self.unit_bytes = unit_bytes
        self.done = 0
        self.started = self._last = time.perf_counter()
        self._bar = None
        if log is not None and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=label, unit="B" if unit_bytes else "it", unit_scale=True,
                             leave=False)

    def update(self, n: int) -> None:
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(int(n))
            return
        now = time.perf_counter()
        if self.log is not None and now - self._last >= self.interval_s and self.done < self.total:
            self._last = now
            self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        """``label: 45% (13.4 of 29.8 GB), 1 min 10 s in, about 1 min 25 s left``."""
        elapsed = (now or time.perf_counter()) - self.started
        share = min(self.done / self.total, 1.0)
        amount = (f"{self.done / 1e9:.1f} of {self.total / 1e9:.1f} GB" if self.unit_bytes
                  else f"{self.done} of {self.total}")
        left = f", about {_clock(elapsed * (1 - share) / share)} left" if share > 0 else ""
        return f"{self.label}: {share:.0%} ({amount}), {_clock(elapsed)} in{left}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
