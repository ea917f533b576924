"""The bounded cut-over: the last catch-up and a swap in one transaction, writers held off at
most --max-writers-held. Both strategies end with it, and rollback's swap back.

The rows still to catch up (a `capture.Source`: the job's captured keys, or the keys written after
a shadow swap) are read and encoded ahead with no transaction open and no lock held, until what is
left to encode under the lock fits the bound at the encoder's measured pace (or, when the writes
themselves would run long, written ahead). Only then is a transaction opened, for the hold: every
lock asked for up front (each with a short lock_timeout: when the cut-over waits on the application,
it is the cut-over that yields, and tries again), the backlog read again under the lock; if it no
longer fits, the transaction is rolled back (the locks let go) and the catch-up goes on outside.
Otherwise the last catch-up, the swap and its record commit together.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import structlog

from reembed import capture
from reembed import checkpoint as ckpt
from reembed.context import RunContext
from reembed.errors import Interrupted
from reembed.progress import Pace
from reembed.queries import query
from reembed.signals import StopSignal

log = structlog.get_logger()

T = TypeVar("T")

# The cut-over gives up its locks as soon as it waits on the application (capture.hold_writers);
# it then tries again soon, not after the long waits an outage gets: yielding costs it a retry.
CUT_OVER_BACKOFF = 0.5
_MARGIN = 1.25  # the predicted hold, padded: the pace is a moving average, the write rate a constant

Reader = Callable[[Callable[[psycopg.Connection[Any]], capture.Backlog]], capture.Backlog]
Transaction = Callable[[Callable[[psycopg.Connection[Any]], T]], T]


@dataclass(frozen=True)
class Bound:
    """How long writers may be held (`tail`: what the swap itself takes, within it)."""

    max_writers_held: float
    tail: float = 0.0

    @property
    def catch_up(self) -> float:
        return max(self.max_writers_held - self.tail, self.max_writers_held / 2)


@dataclass(frozen=True)
class Held:
    """What one cut-over did under its hold."""

    secs: float  # writers held, from the first lock request
    rows: int  # rows caught up under the hold
    catch_up_secs: float
    tries: int


class CutOver:
    """One cut-over, kept across its tries (and a run's finalize steps): the rows encoded ahead and
    the paces measured."""

    def __init__(self) -> None:
        self._ahead: capture.Encoded = {}  # rows encoded ahead, by (key, xmin), kept across tries
        self._pace = Pace(at_least=8)  # rows/s of the encoding ahead
        self.writes = Pace(at_least=8)  # rows/s of the catch-up's commits (the writes under the lock)

    def run(self, source: capture.Source, *, bound: Bound, stop: StopSignal, read: Reader,
            transaction: Transaction[tuple[float, int, float]],
            swap: Callable[[psycopg.Connection[Any]], None],
            record: Callable[[psycopg.Connection[Any], float], None]) -> Held:
        """Catch up and swap. `read(body)`: body(conn) with no transaction open (the backlog);
        `transaction(body)`: body(conn) in one transaction, retried when a lock is not granted in
        time; `swap(conn)` runs last under the hold and `record(conn, secs held)` right after it,
        in the same transaction."""
        progress = _Convergence(bound.max_writers_held)
        while True:
            if stop.requested:
                raise Interrupted(f"stopped ({stop.reason}) during the cut-over's catch-up; nothing of it was "
                                  "committed; re-run to finish", exit_code=stop.exit_code)
            work = read(lambda conn: source.backlog(conn, self._ahead))  # no lock: writers go on
            if work.predicted_secs(self._pace.value, self.writes.value) * _MARGIN > bound.catch_up:
                progress.again(work, self._pace.value)
                if work.predicted_secs(None, self.writes.value) * _MARGIN > bound.catch_up / 2 \
                        and not work.unencoded:
                    self._write_ahead(source, work)  # the writes are what would run long: write them now
                else:
                    self._encode_ahead(source, work)
                continue
            try:
                secs, rows, caught = transaction(lambda conn: self._hold(conn, source, bound, swap, record))
            except _OverBound as over:
                progress.again(over.work, self._pace.value, under_lock=True)
                continue
            except Landed as landed:  # a retry found the first try's commit landed: it is done
                log.info("cut_over_landed", detail="the commit landed before the connection went; not done again")
                return Held(landed.secs, 0, 0.0, progress.tries + 1)
            held = Held(secs, rows, caught, progress.tries + 1)
            log.info("cut_over", writers_held_secs=round(secs, 3), rows_caught_up=rows,
                     final_catch_up_secs=round(caught, 4), max_writers_held_secs=bound.max_writers_held,
                     tries=held.tries)
            return held

    def _hold(self, conn: psycopg.Connection[Any], source: capture.Source, bound: Bound,
              swap: Callable[[psycopg.Connection[Any]], None],
              record: Callable[[psycopg.Connection[Any], float], None]) -> tuple[float, int, float]:
        """One try, inside its transaction: the locks, the backlog under them, the last catch-up if
        it fits the bound (else _OverBound: the transaction rolls back and the locks go), the swap."""
        began = source.hold(conn)
        work = source.backlog(conn, self._ahead)
        if work.predicted_secs(self._pace.value, self.writes.value) * _MARGIN > \
                bound.catch_up - (time.monotonic() - began):
            raise _OverBound(work)
        caught = time.monotonic()
        rows = source.final(conn, self._ahead, work)
        caught = time.monotonic() - caught
        self.writes.measured(work.keys, caught)
        swap(conn)
        held = time.monotonic() - began
        record(conn, held)
        return held, rows, caught

    def _write_ahead(self, source: capture.Source, work: capture.Backlog) -> None:
        """The backlog committed with no lock of the cut-over's (its pace measured on it)."""
        started = time.monotonic()
        rows = source.write_ahead(work, self._ahead)
        self.writes.measured(work.keys, time.monotonic() - started)
        log.debug("cut_over_wrote_ahead", keys=work.keys, rows=rows)

    def _encode_ahead(self, source: capture.Source, work: capture.Backlog) -> None:
        """The backlog encoded with no lock (what is known at its version kept), and the
        encoder's pace measured on what was encoded now."""
        started = time.monotonic()
        self._ahead, encoded = source.encode_ahead(work, self._ahead)
        self._pace.measured(encoded, time.monotonic() - started)


def for_job(cut: CutOver, ctx: RunContext, *, rewrite: bool, swap: Callable[[psycopg.Connection[Any]], None],
            record: Callable[[psycopg.Connection[Any], float], None] | None = None, tail: float = 0.0) -> Held:
    """A job's cut-over (the finalize step `cut_over`, which it records in its own transaction):
    its captured keys caught up into the column its strategy writes, on the coordinator's
    connection, fenced by its lease; `rewrite`: readers are held off too (ACCESS EXCLUSIVE)."""
    ctx.lease.read(capture.check_lock_timeout, ctx.opts.cut_over_lock_timeout, on=ctx.control,
                   what="cut_over_settings")
    job = ctx.active

    def recorded(conn: psycopg.Connection[Any], secs: float) -> None:
        conn.execute(query("record_writers_held"), {"secs": secs, "job_id": job.id})
        if record is not None:
            record(conn, secs)
        ckpt.record_step(conn, job, "cut_over")

    def unless_landed(conn: psycopg.Connection[Any], attempt: int,
                      body: Callable[[psycopg.Connection[Any]], tuple[float, int, float]]) -> tuple[float, int, float]:
        if attempt > 1:  # a retry after a lost connection: did the first try's commit land?
            now = ckpt.reload(conn, job)
            if "cut_over" in now.steps:
                raise Landed(now.writers_held_secs or 0.0)
        return body(conn)

    return cut.run(
        capture.JobSource(ctx, rewrite=rewrite), bound=Bound(ctx.opts.max_writers_held, tail), stop=ctx.stop,
        read=lambda body: ctx.lease.read(body, on=ctx.control, what="cut_over_backlog"),
        transaction=lambda body: ctx.lease.write_attempt(unless_landed, body, on=ctx.control, what="cut_over",
                                                         lock_timeout=ctx.opts.cut_over_lock_timeout,
                                                         patient=True, max_backoff=CUT_OVER_BACKOFF),
        swap=swap, record=recorded)


class Landed(Exception):
    """A retried cut-over whose first try's commit landed (its acknowledgement was lost)."""

    def __init__(self, secs: float) -> None:
        super().__init__("the cut-over committed already")
        self.secs = secs


class _OverBound(Exception):
    """Under the lock, the rest would hold writers past the bound: let go and catch up again."""

    def __init__(self, work: capture.Backlog) -> None:
        super().__init__("the rest would hold writers past the bound")
        self.work = work


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
