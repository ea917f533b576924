"""The bounded cut-over both strategies end with: the last catch-up and the strategy's swap in
one transaction, writers held off at most --max-writers-held.

The rows still captured are encoded ahead, without a lock, until what is left to encode under
the lock fits the bound at the encoder's measured pace; under the lock the backlog is read
again, and if it no longer fits, the locks are let go (a savepoint) and the catch-up goes on
outside. Every lock is asked for up front (capture.hold_writers), each with a short
lock_timeout: when the cut-over waits on the application it is the cut-over that yields.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
import structlog

from reembed import capture
from reembed.context import RunContext
from reembed.errors import Interrupted
from reembed.progress import Pace
from reembed.queries import query

log = structlog.get_logger()

# The cut-over gives up its locks as soon as it waits on the application (capture.hold_writers);
# it then tries again soon, not after the long waits an outage gets: yielding costs it a retry.
CUT_OVER_BACKOFF = 0.5
_MARGIN = 1.25  # the predicted hold, padded: the pace is a moving average, the write rate a constant


class CutOver:
    """One job's cut-over, kept across its tries: the rows encoded ahead and the encoder's pace."""

    def __init__(self) -> None:
        self._lock_timeout_checked = False
        self._ahead: capture.Encoded = {}  # the cut-over's rows encoded ahead, kept across its tries
        self._pace = Pace(at_least=8)  # rows/s of the cut-over's encoding ahead
        self.writes = Pace(at_least=8)  # rows/s of the catch-up's commits (the writes under the lock)

    def run(self, ctx: RunContext, conn: psycopg.Connection[Any], *, rewrite: bool,
            swap: Callable[[psycopg.Connection[Any]], None], tail: float = 0.0) -> float:
        """The last catch-up and `swap`, writers held off (readers too when `rewrite`), inside
        the caller's transaction; `tail`: what `swap` itself takes, kept within the bound.
        Returns how long writers were held."""
        if not self._lock_timeout_checked:
            capture.check_lock_timeout(conn, ctx.opts.cut_over_lock_timeout)
            self._lock_timeout_checked = True
        bound = max(ctx.opts.max_writers_held - tail, ctx.opts.max_writers_held / 2)
        progress = _Convergence(ctx.opts.max_writers_held)
        while True:
            if ctx.stop.requested:
                raise Interrupted(f"stopped ({ctx.stop.reason}) during the cut-over's catch-up; nothing of it was "
                                  "committed; re-run to finish", exit_code=ctx.stop.exit_code)
            work = capture.backlog(ctx, conn, self._ahead)  # no lock: writers go on
            if work.predicted_secs(self._pace.value, self.writes.value) * _MARGIN > bound:
                progress.again(work, self._pace.value)
                if work.predicted_secs(None, self.writes.value) * _MARGIN > bound / 2 and not work.unencoded:
                    self._write_ahead(ctx, work)  # the writes are what would run long: write them now
                else:
                    self._encode_ahead(ctx, work)
                continue
            try:
                with conn.transaction():  # a savepoint: let go of the locks if the hold would run long
                    began = capture.hold_writers(ctx, conn, rewrite=rewrite)
                    work = capture.backlog(ctx, conn, self._ahead)
                    if work.predicted_secs(self._pace.value, self.writes.value) * _MARGIN > \
                            bound - (time.monotonic() - began):
                        raise _OverBound
                    caught = time.monotonic()
                    rows = capture.final_catch_up(ctx, conn, self._ahead, work)
                    caught = time.monotonic() - caught
                    self.writes.measured(work.keys, caught)
                    swap(conn)
                    held = time.monotonic() - began
            except _OverBound:
                progress.again(work, self._pace.value, under_lock=True)
                continue
            break
        conn.execute(query("record_writers_held"), {"secs": held, "job_id": ctx.active.id})
        log.info("cut_over", writers_held_secs=round(held, 3), rows_caught_up=rows,
                 final_catch_up_secs=round(caught, 4), max_writers_held_secs=ctx.opts.max_writers_held,
                 tries=progress.tries + 1)
        return held

    def _write_ahead(self, ctx: RunContext, work: capture.Backlog) -> None:
        """The backlog committed without the cut-over's locks (on a connection of its own: the
        cut-over's transaction holds no lock yet), and the write pace measured on it."""
        held = ctx.connections.hold("cut-over-write")
        try:
            started = time.monotonic()
            rows = capture.write_ahead(ctx, work, self._ahead, on=held)
            self.writes.measured(work.keys, time.monotonic() - started)
        finally:
            held.release()
        log.debug("cut_over_wrote_ahead", keys=work.keys, rows=rows)

    def _encode_ahead(self, ctx: RunContext, work: capture.Backlog) -> None:
        """The backlog encoded without a lock (what is known at its version kept), and the
        encoder's pace measured on what was encoded now."""
        started = time.monotonic()
        self._ahead, encoded = capture.encode_ahead(ctx, work, self._ahead)
        self._pace.measured(encoded, time.monotonic() - started)


class _OverBound(Exception):
    """Under the lock, the rest would hold writers past the bound: let go and catch up again."""


class _Convergence:
    """The cut-over's tries at a backlog that fits the bound; says so when the application
    changes rows faster than the job encodes them (the backlog does not shrink)."""

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self.tries = 0
        self.started = time.monotonic()
        self.smallest: int | None = None
        self.stalled = 0
        self.said = 0.0

    def again(self, work: capture.Backlog, pace: float | None, *, under_lock: bool = False) -> None:
        self.tries += 1
        if self.smallest is None or work.unencoded < self.smallest:
            self.smallest, self.stalled = work.unencoded, 0
        else:
            self.stalled += 1
        log.debug("cut_over_catching_up", keys=work.keys, to_encode=work.unencoded, under_lock=under_lock,
                  predicted_secs=round(work.predicted_secs(pace), 3), tries=self.tries)
        now = time.monotonic()
        if self.stalled >= 3 and now - self.said >= 30.0:
            self.said = now
            secs = now - self.started
            log.warning(
                "catch_up_not_converging",
                application_changes_per_sec=round(work.unencoded / max(secs / self.tries, 1e-6), 1),
                encode_rows_per_sec=round(pace, 1) if pace else None,
                rows_to_encode=work.unencoded, max_writers_held_secs=self.bound,
                detail="the application changes rows faster than the job encodes them; catching up again "
                       "instead of holding writers longer (it cuts over once the rest fits the bound)")
