"""A chain of stages joined by bounded channels: source -> step -> ... -> sink.

Each step runs on a thread of its own, except the one marked `on_caller` (the device stage,
on the caller's thread, where a second Ctrl-C lands). Channels block on a condition, never
poll; a stop request or a failure anywhere cancels them all, which wakes every waiter.
Items keep their order: every stage takes them one at a time, in order (a stage that fans
work out, like tokenisation in an executor, passes futures along and resolves them in order).
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from reembed.signals import StopSignal


class Channel:
    """A bounded FIFO that a producer can close (end of stream) and anyone can cancel."""

    def __init__(self, capacity: int) -> None:
        self._items: deque[Any] = deque()
        self._capacity = capacity
        self._cond = threading.Condition()
        self._closed = False
        self.cancelled = False

    def put(self, item: Any) -> bool:
        """Wait for room; False if the channel was cancelled meanwhile (the item is dropped)."""
        with self._cond:
            while len(self._items) >= self._capacity and not self.cancelled:
                self._cond.wait()
            if self.cancelled:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self.cancelled = True
            self._items.clear()
            self._cond.notify_all()

    def peek(self) -> Any | None:
        """The next item if one is queued, without taking it (never waits); None otherwise."""
        with self._cond:
            return self._items[0] if self._items and not self.cancelled else None

    def __iter__(self) -> Iterator[Any]:
        while True:
            with self._cond:
                while not self._items and not self._closed and not self.cancelled:
                    self._cond.wait()
                if self.cancelled or not self._items:
                    return
                item = self._items.popleft()
                self._cond.notify_all()
            yield item


@dataclass(frozen=True)
class Step:
    """`fn(item)`; with `lookahead`, `fn(item, peek)`, where `peek()` is the next item if it is
    already queued (None otherwise; it never waits and takes nothing)."""

    name: str
    fn: Callable[..., Any]
    on_caller: bool = False
    lookahead: bool = False

    def apply(self, item: Any, inbox: Channel | None) -> Any:
        if not self.lookahead:
            return self.fn(item)
        return self.fn(item, inbox.peek if inbox is not None else _nothing)


def _nothing() -> None:
    return None


class Chain:
    """Runs `source` through `steps`; the last step is the sink (its results are dropped).
    `on_end` runs on the sink's thread once every item went through, unless stopped or failed."""

    def __init__(self, stop: StopSignal, *, depth: int = 2) -> None:
        self.stop = stop
        self.depth = depth
        self.errors: list[BaseException] = []

    def run(
        self,
        source: Iterable[Any],
        steps: Sequence[Step],
        *,
        on_end: Callable[[], None],
        on_abort: Callable[[], None],
    ) -> None:
        channels = [Channel(self.depth) for _ in steps]

        def cancel_all() -> None:
            for c in channels:
                c.cancel()

        forget = self.stop.on_request(cancel_all)
        threads = [threading.Thread(target=self._guard, args=(self._feed, source, channels[0], cancel_all),
                                    name="reembed-source", daemon=True)]
        caller: Callable[[], None] | None = None
        for i, step in enumerate(steps):
            out = channels[i + 1] if i + 1 < len(steps) else None
            body: tuple[Any, ...] = (
                (self._drain, step, channels[i], on_end) if out is None else (self._pass, step, channels[i], out)
            )
            if step.on_caller:
                caller = functools.partial(self._guard, *body, cancel_all)
            else:
                threads.append(threading.Thread(target=self._guard, args=(*body, cancel_all),
                                                name=f"reembed-{step.name}", daemon=True))
        for t in threads:
            t.start()
        try:
            if caller is not None:
                caller()
            for t in threads:
                t.join()
        except BaseException:  # a second signal (Stopped), KeyboardInterrupt: leave at once
            cancel_all()
            on_abort()
            raise
        finally:
            forget()

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        *rest, cancel_all = args
        try:
            fn(*rest)
        except Exception as exc:  # noqa: BLE001 - handed to the caller, after the others stop
            self.errors.append(exc)
            cancel_all()

    def _feed(self, source: Iterable[Any], out: Channel) -> None:
        for item in source:
            if self.stop.requested or not out.put(item):
                return
        out.close()

    def _pass(self, step: Step, inbox: Channel, out: Channel) -> None:
        for item in inbox:
            if not out.put(step.apply(item, inbox)):
                return
        if not inbox.cancelled:
            out.close()

    def _drain(self, step: Step, inbox: Channel, on_end: Callable[[], None]) -> None:
        for item in inbox:
            step.apply(item, inbox)
            if self.stop.requested:
                return  # the item in flight is done; the rest stays for the next run
        if not inbox.cancelled and not self.stop.requested and not self.errors:
            on_end()

    def run_serial(self, source: Iterable[Any], steps: Sequence[Step], *, on_end: Callable[[], None]) -> None:
        """The same stages one after the other on the caller's thread (for comparison)."""
        for item in source:
            for step in steps:
                item = step.apply(item, None)
            if self.stop.requested:
                return
        if not self.stop.requested:
            on_end()
