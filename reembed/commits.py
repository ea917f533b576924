"""Several writers, one order of commits.

One connection writes ~15,000 vectors a second (768-d, binary COPY + UPDATE); a GPU encodes
more. `Writers` runs each batch's transaction on one of `count` connections at once (the
COPY and the UPDATE, the slow part, overlap), but a batch advances the range's cursor and
commits only after every batch before it committed (`Turns`): the checkpoint never names a
row whose vector is not committed. The batches' rows are disjoint key ranges, so the writers
never wait on each other's row locks; a batch waiting for its turn holds only its own rows.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from reembed import db


class TurnCancelled(Exception):
    """Another writer failed or the run stopped at once: this batch's transaction rolls back."""


class Turns:
    """Batch `seq` may commit once batches ..seq-1 did."""

    def __init__(self, first: int = 0) -> None:
        self._next = first
        self._cond = threading.Condition()
        self._cancelled = False

    def wait(self, seq: int) -> None:
        with self._cond:
            while self._next != seq and not self._cancelled:
                self._cond.wait()
            if self._cancelled:
                raise TurnCancelled(f"batch {seq}: an earlier batch failed")

    def done(self, seq: int) -> None:
        with self._cond:
            self._next = seq + 1
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()


class Writers:
    """`count` writer connections; `submit` returns once fewer than `count` batches are in flight."""

    def __init__(self, connections: db.Connections, count: int) -> None:
        self.count = count
        self.conns = [connections.hold("writer" if i == 0 else f"writer-{i}") for i in range(count)]
        self._free: queue.SimpleQueue[db.Held] = queue.SimpleQueue()
        for conn in self.conns:
            self._free.put(conn)
        self._executor = ThreadPoolExecutor(count, thread_name_prefix="reembed-write") if count > 1 else None
        self._inflight: deque[Future[None]] = deque()
        self.turns = Turns()

    @property
    def primary(self) -> db.Held:
        """The connection of the worker's own statements (claims, range ends)."""
        return self.conns[0]

    def start(self, first: int = 0) -> None:
        self.turns = Turns(first)

    def submit(self, commit: Callable[[Any, db.Held], None], batch: Any) -> None:
        if self._executor is None:
            commit(batch, self.primary)
            return
        self._inflight.append(self._executor.submit(self._on_a_free_connection, commit, batch))
        while len(self._inflight) >= self.count:
            self._inflight.popleft().result()

    def drain(self) -> None:
        """Wait for every batch in flight; the first failure is raised."""
        while self._inflight:
            self._inflight.popleft().result()

    def abort(self) -> None:
        """A failure or a second Ctrl-C: every open transaction rolls back, none waits for a turn."""
        self.turns.cancel()
        for conn in self.conns:
            conn.cancel()
        while self._inflight:
            try:
                self._inflight.popleft().result()
            except Exception:  # noqa: BLE001, S110 - the first failure is the one reported
                pass

    def release(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        for conn in self.conns:
            conn.release()

    def _on_a_free_connection(self, commit: Callable[[Any, db.Held], None], batch: Any) -> None:
        conn = self._free.get()
        try:
            commit(batch, conn)
        finally:
            self._free.put(conn)
