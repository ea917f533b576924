"""Stopping cleanly: SIGINT/SIGTERM and time budgets end the run between batches.

The first signal asks the job to stop after the batch in flight commits (or rolls back);
a second one raises Stopped at once, and the open transaction rolls back with it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import structlog

from reembed.errors import EXIT_SIGINT, EXIT_SIGTERM, EXIT_TIME_BUDGET, Stopped

log = structlog.get_logger()

_EXIT = {"SIGINT": EXIT_SIGINT, "SIGTERM": EXIT_SIGTERM, "time_budget": EXIT_TIME_BUDGET,
         "throttle_critical": EXIT_TIME_BUDGET}


class StopSignal:
    """Shared by the job's threads: why (and whether) to stop."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        self._callbacks: list[Callable[[], None]] = []
        self._timer: threading.Timer | None = None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.event.set()
        for callback in list(self._callbacks):
            # On a thread of its own: this may run inside a signal handler, on a thread that
            # holds the very locks the callback takes.
            threading.Thread(target=callback, name="reembed-stop", daemon=True).start()

    def on_request(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` when a stop is requested (at once if it already was); returns the
        function that unregisters it."""
        self._callbacks.append(callback)
        if self.event.is_set():
            callback()
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def deadline(self, at: float | None) -> None:
        """Request a stop ("time_budget") at monotonic time `at` (None: no window)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if at is None:
            return
        self._timer = threading.Timer(max(0.0, at - time.monotonic()), self._time_is_up)
        self._timer.daemon = True
        self._timer.start()

    def _time_is_up(self) -> None:
        if not self.event.is_set():
            log.warning("time_budget_reached", detail="committing the batch in flight, then stopping")
            self.request("time_budget")

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    @property
    def exit_code(self) -> int:
        return _EXIT.get(self.reason or "", 1)

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True if a stop was requested meanwhile."""
        deadline = time.monotonic() + seconds
        while not self.event.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.event.wait(min(left, 0.2))
        return self.event.is_set()

    def install(self) -> None:
        """Route SIGINT/SIGTERM here (main thread only; a no-op elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def close(self) -> None:
        self.deadline(None)
        self._callbacks.clear()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.event.is_set() and self.reason in ("SIGINT", "SIGTERM"):
            raise Stopped(signum)
        self.request(name)
        log.warning(
            "stop_requested",
            signal=name,
            detail="finishing the batch in flight, then stopping; signal again to stop at once",
        )
