"""Progress an operator can read: a tqdm bar on a terminal, a `progress` log event at a
fixed interval otherwise (JSON-log mode, cron, systemd)."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from reembed import logs

log = structlog.get_logger()

_WINDOW_SECS = 300.0  # the rate is measured over the last five minutes


class Pace:
    """Rows/s of a stage: a moving average of its measurements (None until the first one of at
    least `at_least` rows)."""

    def __init__(self, *, at_least: int = 1) -> None:
        self.value: float | None = None
        self.at_least = at_least

    def measured(self, rows: int, secs: float) -> None:
        if rows < self.at_least or secs <= 0:
            return
        rate = rows / secs
        self.value = rate if self.value is None else 0.5 * self.value + 0.5 * rate


class Progress:
    def __init__(self, *, total: int | None, done: int, interval: float, bar: bool | None = None,
                 listener: Callable[[], None] | None = None) -> None:
        self.total = total
        self.listener = listener  # called at every progress event (--metrics-file), bar or not
        self.done = done
        self.interval = interval
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), done)])
        self._last_event = time.monotonic()
        use_bar = sys.stderr.isatty() if bar is None else bar
        self._bar: Any = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit="rows", dynamic_ncols=True, file=sys.stderr)
            logs.bar_drawn(True)  # log lines go through the bar from now on, each whole

    @property
    def rate(self) -> float | None:
        """Rows per second over the recent window."""
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 and n1 > n0 else None

    @property
    def eta_secs(self) -> float | None:
        rate = self.rate
        if not rate or self.total is None:
            return None
        return max(self.total - self.done, 0) / rate

    def advance(self, rows: int) -> None:
        now = time.monotonic()
        self.done += rows
        self._samples.append((now, self.done))
        while len(self._samples) > 2 and now - self._samples[0][0] > _WINDOW_SECS:
            self._samples.popleft()
        if self._bar is not None:
            self._bar.update(rows)
        if now - self._last_event >= self.interval:
            self._last_event = now
            if self._bar is None:
                self.emit()
            if self.listener is not None:
                self.listener()

    def emit(self) -> None:
        rate, eta = self.rate, self.eta_secs
        log.info(
            "progress",
            rows_done=self.done,
            rows_total=self.total,
            percent=round(100.0 * self.done / self.total, 1) if self.total else None,
            rows_per_sec=round(rate, 1) if rate else None,
            eta_secs=round(eta) if eta is not None else None,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            logs.bar_drawn(False)
