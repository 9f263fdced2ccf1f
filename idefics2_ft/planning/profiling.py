"""How long each phase of a run took and how much memory it held at its peak: ``phases.json``.

Why and how: ``docs/memory.md#how-memory-is-measured``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from idefics2_ft.hardware import GB
from idefics2_ft.run_folder import atomic_write_text

STATUS = Path("/proc/self/status")


def memory_status() -> dict[str, float] | None:
    """VmHWM, VmRSS and RssAnon of this process in GB (``None`` off Linux)."""
    if not STATUS.is_file():
        return None
    wanted = ("VmHWM", "VmRSS", "RssAnon")
    values = {}
    for line in STATUS.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in wanted:
            values[key] = int(rest.split()[0]) * 1024 / GB  # kB
    return values if len(values) == len(wanted) else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS of this process to its current RSS; False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # a kernel control file, not an output
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Tracks the largest ``RssAnon`` seen while running."""

    def __init__(self, interval_s: float = 0.02) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.interval_s = interval_s
        self.peak = 0.0
        self.rss_peak = 0.0
        self._done = threading.Event()

    def sample(self) -> bool:
        status = memory_status()
        if status is None:
            return False
        self.peak = max(self.peak, status["RssAnon"])
        self.rss_peak = max(self.rss_peak, status["VmRSS"])
        return True

    def run(self) -> None:
        while self.sample():
            if self._done.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.sample()


class Phases:
    """Named phases of a run, each with its wall time and memory peaks; written as ``phases.json``.

    >>> phases = Phases()
    >>> with phases("load") as record:
    ...     record["shards"] = 9  # anything the phase wants to add
    """

    def __init__(self, path: str | Path | None = None) -> None:
        # rewritten after each phase: a crash keeps the phases before it
        self.path = Path(path) if path is not None else None
        self.records: dict[str, dict[str, Any]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {}
        kernel_peak = reset_peak_rss()
        sampler = _Sampler()
        sampler.start()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        status = memory_status()
        if status is not None:
            record["rss_start_gb"] = round(status["VmRSS"], 3)
        start = time.perf_counter()
        try:
            yield record
        finally:
            record["wall_s"] = round(time.perf_counter() - start, 3)
            sampler.stop()
            status = memory_status()
            if status is not None:
                record["rss_end_gb"] = round(status["VmRSS"], 3)
                record["rss_peak_gb"] = round(status["VmHWM"] if kernel_peak else sampler.rss_peak, 3)
                record["rss_anon_peak_gb"] = round(sampler.peak, 3)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                record["cuda_max_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
                record["cuda_max_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 3)
            self.records[name] = record
            if self.path is not None:
                self.write(self.path)

    def peak_gb(self, name: str, since: str = "load") -> float | None:
        """The peak of phase ``name`` above what the process held as phase ``since`` began: on the
        CPU, the memory the model and its training added (what a plan predicts)."""
        record, start = self.records.get(name, {}), self.records.get(since, {})
        if "cuda_max_allocated_gb" in record:
            return record["cuda_max_allocated_gb"]
        if "rss_peak_gb" in record and "rss_start_gb" in start:
            return round(record["rss_peak_gb"] - start["rss_start_gb"], 3)
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "memory": "RSS: the kernel's peak per phase (VmHWM, reset as each phase starts); CUDA: allocator peaks",
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "phases": self.records,
        }

    def write(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.summary(), indent=2) + "\n")

    def line(self) -> str:
        """One line for the log: ``load 212 s (9.80 GB), fit 395 s (15.3 GB), ...``."""
        parts = []
        for name, r in self.records.items():
            peak = r.get("cuda_max_allocated_gb", r.get("rss_peak_gb"))
            parts.append(f"{name} {r['wall_s']:.0f} s" + (f" (peak {peak:.2f} GB)" if peak is not None else ""))
        return ", ".join(parts)
