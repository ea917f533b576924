"""The peak memory a piece of work takes on this host's device, measured while it runs.

- CUDA: torch's own count, `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`,
  less what was allocated before: the model's weights and the largest batch's activations
  (the caching allocator's reserve on top of it is not counted).
- CPU (and MPS): the process's resident set, read from /proc/self/statm every 5 ms by a thread,
  its peak less its size before: weights, activations and the tokenizer's buffers in this
  process (not the tokenizer processes'). Where /proc is missing, getrusage's lifetime peak: a
  lower bound of the work's own (it only shows a peak above every earlier one).
The result says which it is (`kind`).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from dataclasses import dataclass
from types import TracebackType

_EVERY = 0.005
_STATM = "/proc/self/statm"


@dataclass
class Peak:
    bytes: int = 0
    kind: str = "rss"  # cuda_allocated | rss | maxrss

    def as_dict(self) -> dict[str, object]:
        return {"bytes": self.bytes, "kind": self.kind}


def _rss() -> int | None:
    try:
        with open(_STATM) as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value) if sys.platform == "darwin" else int(value) * 1024  # bytes there, kB on Linux


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.result` (a Peak)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.result = Peak()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0
        self._high = 0

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = int(torch.cuda.memory_allocated(self.device))
            self.result.kind = "cuda_allocated"
            return self
        rss = _rss()
        if rss is None:
            self._base, self.result.kind = _maxrss(), "maxrss"
            return self
        self._base = self._high = rss
        self._thread = threading.Thread(target=self._sample, name="reembed-peak-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(_EVERY):
            self._high = max(self._high, _rss() or 0)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.result.kind == "cuda_allocated":
            import torch

            torch.cuda.synchronize(self.device)
            self.result.bytes = max(0, int(torch.cuda.max_memory_allocated(self.device)) - self._base)
        elif self.result.kind == "maxrss":
            self.result.bytes = max(0, _maxrss() - self._base)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._high = max(self._high, _rss() or 0)
            self.result.bytes = max(0, self._high - self._base)

