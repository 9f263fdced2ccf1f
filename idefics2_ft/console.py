"""Console helpers: whether stdout is a terminal, durations, and a progress line for a plain loop.

Under SLURM and in CI stdout is a file, where a progress bar's ``\\r`` redraws pile up; there a
line every so often reads better.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


def on_a_terminal() -> bool:
    """True when stdout is a terminal (a progress bar can redraw in place)."""
    return sys.stdout.isatty()


def duration(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class LineTicker:
    """A progress line for a plain loop (the demo's stage 1): ``tick(step, loss)`` logs at most every ``every_s``."""

    def __init__(self, name: str, total: int, every_s: float = 30.0) -> None:
        self.name, self.total, self.every_s = name, total, every_s
        self._start = self._last = time.perf_counter()

    def tick(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        if step not in (1, self.total) and now - self._last < self.every_s:
            return
        self._last = now
        rate = step / (now - self._start) if now > self._start else 0.0
        eta = duration((self.total - step) / rate) if rate else "-"
        log.info("%s: step %d/%d  loss %.4f  %.2f steps/s  ETA %s", self.name, step, self.total, loss, rate, eta)
