"""Memory readers shared by training summaries and the bench: the process's resident set on CPU, the CUDA
allocator's peak on GPU."""

from __future__ import annotations

import os
import platform
import threading

import torch


def resident_bytes() -> int | None:
    """Current resident set size of this process (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def maxrss_bytes() -> int:
    """Lifetime peak RSS of the process from getrusage (kilobytes on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if platform.system() == "Darwin" else int(rss) * 1024


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak memory so far in MiB, what it is): CUDA max allocated on GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return maxrss_bytes() / 2**20, "cpu_peak_rss"


class PeakMemory:
    """Peak memory while the ``with`` block runs.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak (tensors only, weights included).
    CPU: the process's resident set size polled every 5 ms from /proc/self/statm (weights, activations and
    allocator slack included); where /proc is missing, getrusage's lifetime ``ru_maxrss``.
    """

    POLL_SECONDS = 0.005

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def method(self) -> str:
        """One line naming what ``peak`` measures (goes into the report)."""
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated during sampling (weights included)"
        if resident_bytes() is not None:
            return "peak process RSS during sampling, polled every 5 ms from /proc/self/statm (weights included)"
        return "process lifetime peak RSS (resource.getrusage ru_maxrss; weights included)"

    def _poll(self) -> None:
        while not self._stop.wait(self.POLL_SECONDS):
            self.peak = max(self.peak, resident_bytes() or 0)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        elif resident_bytes() is not None:
            self.baseline = self.peak = resident_bytes() or 0
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        else:
            self.baseline = maxrss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, resident_bytes() or 0)
        else:
            self.peak = maxrss_bytes()
