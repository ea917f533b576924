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

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import psycopg
import structlog

from reembed import capture
from reembed import checkpoint as ckpt
from reembed.batches import DEFAULT_WRITE_PATH
from reembed.context import Hold, RunContext, Strategy
from reembed.errors import DatabaseError, InternalError, Interrupted, first_line
from reembed.progress import Pace
from reembed.queries import query
from reembed.signals import StopSignal
from reembed.signature import Signature

log = structlog.get_logger()

T = TypeVar("T")

# The cut-over gives up its locks as soon as it waits on the application (capture.hold_writers);
# it then tries again soon, not after the long waits an outage gets: yielding costs it a retry.
CUT_OVER_BACKOFF = 0.5
# How long the hold's locks may be refused in a row (each request waiting --cut-over-lock-timeout,
# the backlog settled between tries) before the cut-over gives up, nothing committed.
PATIENCE = 300.0
_MARGIN = 1.25  # the predicted hold, padded: the pace is a moving average, the write rate a constant


class Reader(Protocol):
    """body(conn) with no transaction open, retried on transient faults."""

    def __call__(self, body: Callable[[psycopg.Connection[Any]], T]) -> T: ...


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
            record: Callable[[psycopg.Connection[Any], float], None], patience: float = PATIENCE,
            landed: Callable[[psycopg.Connection[Any]], float | None] | None = None) -> Held:
        """Catch up and swap. `read(body)`: body(conn) with no transaction open (the backlog);
        `transaction(body)`: body(conn) in one transaction (retried on transient faults); `swap(conn)`
        runs last under the hold and `record(conn, secs held)` right after it, in the same
        transaction. A hold whose locks are not granted in time is rolled back and tried again after
        the backlog is written and settled with no lock (the application's changes are kept caught
        up, and its captured rows few, however long the locks are held elsewhere); after `patience`
        seconds of locks refused in a row it gives up (a DatabaseError naming who held them).
        `landed(conn)`: the secs held recorded by a cut-over that committed already (a retry after
        a lost acknowledgement), else None; asked under the hold, where a commit still in flight has
        ended, and before writing ahead."""
        progress = _Convergence(bound.max_writers_held)
        refused = _Refusals(source, read, patience)
        while True:
            if stop.requested:
                raise Interrupted(f"stopped ({stop.reason}) during the cut-over's catch-up; nothing of it was "
                                  "committed; re-run to finish", exit_code=stop.exit_code)
            work = read(lambda conn: source.backlog(conn, self._ahead))  # no lock: writers go on
            if work.predicted_secs(self._pace.value, self.writes.value) * _MARGIN > bound.catch_up:
                progress.again(work, self._pace.value)
                if work.unencoded:
                    self._encode_ahead(source, work)
                # the writes alone would run long, or the rest does not shrink (an application editing a hot
                # set as fast as it is encoded): what was encoded is written and settled now, no lock held, so
                # the rest is what changes meanwhile, and the captured rows stay few (encoding ahead alone,
                # they grew by one per edit, 100,000 for 300 keys, and each read of them slowed down)
                if work.write_secs(self.writes.value) * _MARGIN > bound.catch_up / 2 or progress.stalled >= 2:
                    if not read(lambda conn: _writes_blocked(conn, source)):
                        self._write_ahead(source, work)
                    elif stop.wait(refused.again(None)):  # kept off as the application is: as a refused lock
                        raise Interrupted(f"stopped ({stop.reason}) while the cut-over waited for its locks; "
                                          "nothing of it was committed; re-run to finish", exit_code=stop.exit_code)
                continue
            try:
                secs, rows, caught = transaction(lambda conn: self._hold(conn, source, bound, swap, record, landed))
            except _OverBound as over:
                refused.granted()
                progress.again(over.work, self._pace.value, under_lock=True)
                continue
            except _NotGranted as not_granted:
                if landed is not None and (secs_landed := read(landed)) is not None:
                    log.info("cut_over_landed", detail="the commit landed before the connection went; not done again")
                    return Held(secs_landed, 0, 0.0, progress.tries + refused.total + 1)
                wait = refused.again(not_granted.error)  # past its patience: raises
                work = read(lambda conn: source.backlog(conn, self._ahead))
                # settled while the locks are held elsewhere (the next try's rest stays small), unless the
                # holder keeps the application's writers off too: then nothing piles up, and a write would wait
                if work.keys and not read(lambda conn: _writes_blocked(conn, source)):
                    if work.unencoded:
                        self._encode_ahead(source, work)  # (the write's pace measured on writes alone)
                    self._write_ahead(source, work)
                if stop.wait(wait):
                    raise Interrupted(f"stopped ({stop.reason}) while the cut-over waited for its locks; nothing "
                                      "of it was committed; re-run to finish", exit_code=stop.exit_code) from None
                continue
            except Landed as landed:  # a retry found the first try's commit landed: it is done
                log.info("cut_over_landed", detail="the commit landed before the connection went; not done again")
                return Held(landed.secs, 0, 0.0, progress.tries + refused.total + 1)
            held = Held(secs, rows, caught, progress.tries + refused.total + 1)
            log.info("cut_over", writers_held_secs=round(secs, 3), rows_caught_up=rows,
                     final_catch_up_secs=round(caught, 4), max_writers_held_secs=bound.max_writers_held,
                     tries=held.tries)
            return held

    def _hold(self, conn: psycopg.Connection[Any], source: capture.Source, bound: Bound,
              swap: Callable[[psycopg.Connection[Any]], None],
              record: Callable[[psycopg.Connection[Any], float], None],
              landed: Callable[[psycopg.Connection[Any]], float | None] | None) -> tuple[float, int, float]:
        """One try, inside its transaction: the locks, the backlog under them, the last catch-up if
        it fits the bound (else _OverBound: the transaction rolls back and the locks go), the swap."""
        try:
            began = source.hold(conn)
        except psycopg.errors.LockNotAvailable as exc:  # the transaction rolls back; tried again after a catch-up
            raise _NotGranted(exc) from exc
        if landed is not None and (secs := landed(conn)) is not None:
            raise Landed(secs)
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

    def landed(conn: psycopg.Connection[Any]) -> float | None:
        now = ckpt.reload(conn, job)
        return (now.writers_held_secs or 0.0) if "cut_over" in now.steps else None

    return cut.run(
        capture.JobSource(ctx, rewrite=rewrite), bound=Bound(ctx.opts.max_writers_held, tail), stop=ctx.stop,
        read=lambda body: ctx.lease.read(body, on=ctx.control, what="cut_over_backlog"),
        transaction=lambda body: ctx.lease.write(body, on=ctx.control, what="cut_over",
                                                 lock_timeout=ctx.opts.cut_over_lock_timeout,
                                                 patient=True, max_backoff=CUT_OVER_BACKOFF),
        swap=swap, record=recorded, patience=max(ctx.lease.max_outage, PATIENCE), landed=landed)


def for_strategy(cut: CutOver, ctx: RunContext, strategy: Strategy) -> Held:
    """A one-table job's cut-over through its strategy: the hold it asks for, its swap and the
    registry flipped in the hold's transaction, its record of the hold (for_job's bounds)."""
    hold = strategy.hold(ctx)

    def swap(conn: psycopg.Connection[Any]) -> None:
        strategy.swap(ctx, conn, rewrite=hold.rewrite)
        flip_registry(conn, ctx.info.registry, ctx.signature)

    return for_job(cut, ctx, rewrite=hold.rewrite, swap=swap, tail=hold.tail,
                   record=lambda conn, secs: strategy.swapped(ctx, conn, secs))


def flip_registry(conn: psycopg.Connection[Any], registry: tuple[str, ...], signature: Signature) -> None:
    """The registry row names `signature`, and the news (in the cut-over's transaction, last)."""
    conn.execute(query("upsert_registry", registry=registry), signature.as_dict())
    conn.execute(query("notify_model_changed"), {"payload": json.dumps(signature.as_dict())})


def for_group(cut: CutOver, ctxs: Sequence[RunContext], holds: Sequence[Hold], *,
              swap: Callable[[psycopg.Connection[Any]], None],
              record: Callable[[psycopg.Connection[Any], float], None]) -> Held:
    """A job over several tables (reembed.group): ONE cut-over for all of them, when each is ready.
    Every table's captured keys are caught up as one backlog (the bound is the whole hold's); the
    hold takes the registry row, then every table's lock in the order of their oids, in one round trip,
    each request waiting at most --cut-over-lock-timeout; `swap(conn)` swaps every table and flips
    the registry once. It runs on the first table's coordinator connection, fenced by every table's
    lease, and records the step on every job in the same transaction (a retry after a lost
    acknowledgement finds it recorded: `Landed`)."""
    first = ctxs[0]
    first.lease.read(capture.check_lock_timeout, first.opts.cut_over_lock_timeout, on=first.control,
                     what="cut_over_settings")
    tables = [(ctx.info, hold.rewrite) for ctx, hold in zip(ctxs, holds, strict=True)]
    # on the first table's connection the others' rows are written by unnest (its staging table is the first's)
    source = Several([capture.JobSource(ctx, rewrite=hold.rewrite, path=DEFAULT_WRITE_PATH if i == 0 else "unnest")
                      for i, (ctx, hold) in enumerate(zip(ctxs, holds, strict=True))],
                     hold=lambda conn: capture.hold_tables(conn, first.info.registry, tables))

    def recorded(conn: psycopg.Connection[Any], secs: float) -> None:
        for ctx in ctxs:
            conn.execute(query("record_writers_held"), {"secs": secs, "job_id": ctx.active.id})
        record(conn, secs)
        for ctx in ctxs:
            ckpt.record_step(conn, ctx.active, "cut_over")
        for ctx in ctxs[1:]:  # the first table's lease fences the transaction itself (Lease.write)
            ctx.lease.fence(conn)

    def landed(conn: psycopg.Connection[Any]) -> float | None:
        now = ckpt.reload(conn, first.active)
        return (now.writers_held_secs or 0.0) if "cut_over" in now.steps else None

    return cut.run(
        source, bound=Bound(first.opts.max_writers_held, sum(h.tail for h in holds)), stop=first.stop,
        read=lambda body: first.lease.read(body, on=first.control, what="cut_over_backlog"),
        transaction=lambda body: first.lease.write(body, on=first.control, what="cut_over",
                                                   lock_timeout=first.opts.cut_over_lock_timeout,
                                                   patient=True, max_backoff=CUT_OVER_BACKOFF),
        swap=swap, record=recorded, patience=max(first.lease.max_outage, PATIENCE), landed=landed)


@dataclass
class _Parts(capture.Backlog):
    """Several sources' backlogs, as one (their sums) for the bound."""

    parts: list[capture.Backlog] = field(default_factory=list)


class Several:
    """Several sources caught up under one hold (a job over several tables, a rollback of one): a
    `capture.Source` whose backlog is theirs summed, so that the bound is the whole hold's. The
    rows each encodes ahead are kept apart by its place (two tables may share a key and an xmin)."""

    def __init__(self, parts: Sequence[capture.Source], *, hold: Callable[[psycopg.Connection[Any]], float]) -> None:
        self.parts = list(parts)
        self._hold = hold

    def backlog(self, conn: psycopg.Connection[Any], ahead: capture.Encoded) -> capture.Backlog:
        found = [p.backlog(conn, _mine(ahead, i)) for i, p in enumerate(self.parts)]
        return _Parts(sum(b.keys for b in found), sum(b.unencoded for b in found), [],
                      sum(b.refused for b in found), found)

    def encode_ahead(self, work: capture.Backlog, known: capture.Encoded) -> tuple[capture.Encoded, int]:
        out: capture.Encoded = {}
        encoded = 0
        for i, (p, part) in enumerate(zip(self.parts, _split(work), strict=True)):
            done, n = p.encode_ahead(part, _mine(known, i))
            out.update(_tagged(done, i))
            encoded += n
        return out, encoded

    def write_ahead(self, work: capture.Backlog, ahead: capture.Encoded) -> int:
        return sum(p.write_ahead(part, _mine(ahead, i))
                   for i, (p, part) in enumerate(zip(self.parts, _split(work), strict=True)))

    def final(self, conn: psycopg.Connection[Any], ahead: capture.Encoded, work: capture.Backlog) -> int:
        return sum(p.final(conn, _mine(ahead, i), part)
                   for i, (p, part) in enumerate(zip(self.parts, _split(work), strict=True)))

    def hold(self, conn: psycopg.Connection[Any]) -> float:
        return self._hold(conn)

    def locked(self) -> list[tuple[int, bool]]:
        strongest: dict[int, bool] = {}
        for part in self.parts:
            for oid, rewrite in part.locked():
                strongest[oid] = strongest.get(oid, False) or rewrite
        return sorted(strongest.items())


_TAG = "\x1f"  # between a part's place and a key's text form (never in a key's text: a control character)


def _tagged(encoded: capture.Encoded, place: int) -> capture.Encoded:
    return {(f"{place}{_TAG}{key}", xmin): vec for (key, xmin), vec in encoded.items()}


def _mine(encoded: capture.Encoded, place: int) -> capture.Encoded:
    prefix = f"{place}{_TAG}"
    return {(key[len(prefix):], xmin): vec for (key, xmin), vec in encoded.items() if key.startswith(prefix)}


def _split(work: capture.Backlog) -> list[capture.Backlog]:
    if not isinstance(work, _Parts):
        raise InternalError("a backlog of several sources was expected")
    return work.parts


class Landed(Exception):
    """A retried cut-over whose first try's commit landed (its acknowledgement was lost)."""

    def __init__(self, secs: float) -> None:
        super().__init__("the cut-over committed already")
        self.secs = secs


def _writes_blocked(conn: psycopg.Connection[Any], source: capture.Source) -> bool:
    """Does a session hold, or wait for, a lock on the tables that keeps the application's writes off?"""
    row = conn.execute(query("writes_blocked"), {"oids": [oid for oid, _ in source.locked()]}).fetchone()
    return bool(row and row["blocked"])


class _NotGranted(Exception):
    """A lock of the hold was not granted within --cut-over-lock-timeout."""

    def __init__(self, error: psycopg.Error) -> None:
        super().__init__(str(error))
        self.error = error


class _Refusals:
    """The hold's locks refused in a row: a growing pause between tries (at most CUT_OVER_BACKOFF),
    who holds the locks said once and every 30 s, and, after `patience` seconds of refusals, an
    error naming them (nothing of the cut-over was committed: a re-run tries again)."""

    def __init__(self, source: capture.Source, read: Reader, patience: float) -> None:
        self.source, self.read, self.patience = source, read, patience
        self.first: float | None = None
        self.tries = 0  # in a row
        self.total = 0
        self.said = 0.0

    def granted(self) -> None:
        self.first, self.tries = None, 0

    def again(self, error: psycopg.Error | None) -> float:
        """A refused try (`error`), or writers kept off by another session's lock (None): the pause
        before the next try; past the patience, the error."""
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.tries += 1
        self.total += 1
        waited = now - self.first
        if waited >= self.patience:
            holders = self._holders()
            err = DatabaseError(
                f"the cut-over's locks were not granted in {waited:.0f} s ({self.tries} tries, each waiting "
                f"--cut-over-lock-timeout, or writers kept off by another session's lock): "
                f"{holders or 'no holder seen at the end'}; nothing of it was committed "
                "(the job is kept, its captured changes written as they came): run again to try the cut-over "
                "again", retryable=False)
            err.__cause__ = error
            raise err
        if now - self.said >= 30.0 or self.tries == 1:
            self.said = now
            log.warning("cut_over_lock_not_granted", tries=self.tries, waited_secs=round(waited, 1),
                        gives_up_after_secs=self.patience, held_by=self._holders(),
                        detail="the hold is let go and tried again; the changes captured meanwhile are written "
                               "with no lock")
        return min(CUT_OVER_BACKOFF, 0.05 * 2.0 ** min(self.tries, 8)) * (0.5 + random.random() / 2)

    def _holders(self) -> str:
        """The longest-open transactions holding a lock the hold would wait for (best effort)."""
        locked = self.source.locked()
        rewrite = any(r for _, r in locked)
        try:
            rows = self.read(lambda conn: conn.execute(query("lock_holders"), {
                "oids": [oid for oid, _ in locked], "rewrite": rewrite}).fetchall())
        except Exception as exc:  # noqa: BLE001 - only for the message
            return f"(who holds them could not be read: {first_line(exc)})"
        return "; ".join(f"pid {r['pid']} ({r['backend_type']}, {r['state'] or 'no state'}, open {r['open_secs']} s) "
                         f"holds {r['mode']} on {r['relation']}: {r['query']}" for r in rows)


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
