"""What the job needs from a model, and how its input reaches the device: the `Embedder` and
`Feed` protocols, the feed every embedder has (`BatchFeed`), and the one out-of-memory halving.

Implementations live above this module and import it (reembed.embedder: sentence-transformers;
reembed.feed: the tokenizer processes and token-budget batches); nothing here imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import structlog

from reembed.settings import RunOptions
from reembed.signals import StopSignal
from reembed.signature import Signature

log = structlog.get_logger()


Upcoming = Callable[[], Sequence[Any] | None]  # the next window's pending transactions, if queued


class Feed(Protocol):
    """Transactions' texts in, their vectors out, keeping the device busy."""

    window_rows: int  # rows of transactions gathered before sorting (1: one transaction at a time)

    @property
    def overlapped(self) -> bool:
        """Tokenisation runs beside the device (in other processes), not in turn with it."""
        ...

    def submit(self, texts: Sequence[str]) -> Any:
        """Start tokenising one transaction's texts; what `encode` takes back."""
        ...

    def encode(self, pending: Sequence[Any], stop: StopSignal, *, upcoming: Upcoming | None = None,
               ) -> list[np.ndarray] | None:
        """Each transaction's vectors, in its texts' order; None when a stop came first.
        `upcoming`: the next window's pending transactions if they are already queued (never
        waits), so that a feed can stage its first batch before reading this window's last."""
        ...

    def close(self, *, now: bool = False) -> None: ...


class Embedder(Protocol):
    """What the job needs from a model, as two stages. Implementations must be deterministic
    per text. `tokenize` must be picklable with what it returns, so that it can run in
    another thread or process; `forward` runs where the model is (the device).

    A class that subclasses this protocol explicitly inherits `feed` (its own stages, one
    transaction at a time); a model with a faster way to its device overrides it."""

    signature: Signature

    @property
    def device(self) -> str:
        """Where `forward` runs: cpu, cuda, cuda:N or mps."""
        return "cpu"

    def tokenize(self, texts: Sequence[str]) -> Any:
        """The model's input for `texts` (token ids, or whatever `forward` takes)."""
        ...

    def forward(self, features: Any) -> np.ndarray:
        """float32 array of shape (len(texts), signature.dimension), in the texts' order."""
        ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """forward(tokenize(texts))."""
        ...

    def feed(self, *, workers: int | None = None, max_batch_tokens: int | None = None,
             window_rows: int | None = None) -> Feed:
        """The feed that brings this model its input (the options are hints a feed may ignore)."""
        return BatchFeed(self)


class BatchFeed:
    """Any Embedder's own stages, one transaction at a time: tokenize in a thread, forward here."""

    window_rows = 1
    overlapped = False  # its tokenizer thread shares this process's GIL with the forward

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="reembed-tokenize")

    def submit(self, texts: Sequence[str]) -> Any:
        return self._executor.submit(self.embedder.tokenize, texts)

    def encode(self, pending: Sequence[Any], stop: StopSignal, *, upcoming: Upcoming | None = None,
               ) -> list[np.ndarray] | None:
        return [self.embedder.forward(p.result()) for p in pending]

    def close(self, *, now: bool = False) -> None:
        self._executor.shutdown(wait=not now, cancel_futures=True)


def feed_for(embedder: Embedder, opts: RunOptions) -> Feed:
    """The embedder's feed, sized by the run's options."""
    return embedder.feed(workers=opts.tokenizer_workers, max_batch_tokens=opts.max_batch_tokens,
                         window_rows=opts.window_rows)


NON_FINITE = "the model gave a non-finite vector (NaN or Inf); not written"

_DEVICE_FAULTS = ("CUDA error", "CUBLAS_STATUS", "cuBLAS", "CUDNN_STATUS", "cuDNN error", "NCCL error",
                  "device-side assert", "illegal memory access", "an illegal instruction", "unspecified launch failure")


def is_device_fault(exc: BaseException) -> bool:
    """A device or driver failure (an illegal memory access, a device-side assert, a cuBLAS or NCCL
    error): not the rows' fault, and sticky on CUDA (every later call fails too). Out of memory is
    not one (the budget is halved instead)."""
    if is_oom(exc):
        return False
    import torch

    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(exc, accelerator):
        return True
    return isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in _DEVICE_FAULTS)


HALF_MAX = 65504.0  # the largest finite float16: a halfvec column takes nothing beyond it
OUT_OF_HALF = "the model gave a value beyond halfvec's range (+-65504); not written"


def finite_rows(vectors: np.ndarray, limit: float | None = None) -> np.ndarray:
    """Per row of `vectors`: are all its values finite (pgvector takes no NaN or Inf), and within
    +-`limit` when one is given (a halfvec column)?"""
    if not len(vectors):
        return np.ones(0, dtype=bool)
    fits: np.ndarray = np.isfinite(vectors) if limit is None else np.abs(vectors) <= limit  # NaN: False
    return np.asarray(fits.all(axis=1))


def is_oom(exc: BaseException) -> bool:
    """Is this the device running out of memory?"""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom)


def halved(budget: int, error: str, *, device: str, event: str, field: str) -> int:
    """Out of device memory (`error`, its first line): the cache emptied, one warning, and half of
    `budget` (at least 1), which the caller keeps for the rest of the run. Call it after the
    `except` block, not in it: the traceback holds the failed pass's tensors until then."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    smaller = max(1, budget // 2)
    log.warning(event, **{field: smaller}, was=budget, error=error,
                detail="out of GPU memory; this size is kept for the rest of the run")
    return smaller

