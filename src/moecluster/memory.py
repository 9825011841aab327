"""Resident memory of this process, split as the kernel accounts it, sampled in the background.

RssAnon is the process's own memory (weights, KV cache, activations, the interpreter); RssFile is pages of
mapped files (shared libraries, and memory-mapped checkpoints if anything maps one). ru_maxrss only gives
their peak sum, so a thread reads /proc/self/status every `period_s` and keeps each peak.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path

STATUS = Path("/proc/self/status")


@dataclass
class MemoryPeaks:
    anon_bytes: int = 0  # peak RssAnon
    file_bytes: int = 0  # peak RssFile
    total_bytes: int = 0  # peak of RssAnon + RssFile + RssShmem in one sample
    base_bytes: int = 0  # RssAnon + RssFile when sampling started (the runtime before loading)
    base_file_bytes: int = 0  # RssFile then (shared libraries: MPI, torch, ...)
    samples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def read_status() -> dict[str, int]:
    """RssAnon, RssFile, RssShmem in bytes (empty where /proc is not available)."""
    out = {}
    try:
        for line in STATUS.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class MemorySampler:
    """A daemon thread that samples this process's resident memory every period_s and keeps the peaks."""

    def __init__(self, period_s: float = 0.02):
        self.period_s = period_s
        self.peaks = MemoryPeaks()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> MemorySampler:
        if self._thread is None:
            status = read_status()
            self.peaks.base_bytes = status.get("RssAnon", 0) + status.get("RssFile", 0)
            self.peaks.base_file_bytes = status.get("RssFile", 0)
            self.sample()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="moecluster-memory", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> MemoryPeaks:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.snapshot()

    def sample(self) -> None:
        status = read_status()
        anon, file = status.get("RssAnon", 0), status.get("RssFile", 0)
        with self._lock:
            p = self.peaks
            p.anon_bytes, p.file_bytes = max(p.anon_bytes, anon), max(p.file_bytes, file)
            p.total_bytes = max(p.total_bytes, anon + file + status.get("RssShmem", 0))
            p.samples += 1

    def snapshot(self) -> MemoryPeaks:
        """The peaks so far (including a sample taken now)."""
        self.sample()
        with self._lock:
            return MemoryPeaks(**asdict(self.peaks))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()


SAMPLER = MemorySampler()  # one per process: started when an engine is opened, read by the reports
