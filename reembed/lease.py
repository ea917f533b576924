"""The table's advisory lock, the whole story: taking it, naming its holder, keeping it for
the run, proving we are alive, breaking a stale holder, and the one fenced write.

A run holds a session-level advisory lock on the table (its own dedicated connection) from
before prepare until the end: exclusively while it coordinates (prepare, finalize: catch-up,
cut-over, the registry), shared while it is a worker embedding ranges (reembed.worker) beside
other workers, each holding it shared. Any coordinator step waits until no worker holds it, and
no worker starts while a coordinator does: `share()` goes from the first to the second with no
gap, `coordinate()` back (only once every other worker has let go).

A LockKeeper thread checks every few seconds that it is still held (a lost connection, a
server restart or pg_terminate_backend drops it), takes it again when it can (in the same
mode), and records a heartbeat on the job row (and a worker's claims); if another run took it
meanwhile, the job stops with exit 3.

The keeper only notices at its next tick, so every transaction that writes goes through
`Lease.write()`: retry on transient faults, one transaction, optional lock_timeout, and,
just before the commit, the fence: in that same transaction, does our lock's backend hold
the lock right now? If not, the lock is taken again (and the commit goes on) or LockHeld is
raised (the transaction rolls back). Statements that cannot run in a transaction (CREATE
INDEX CONCURRENTLY) go through `Lease.outside_transaction()`, which checks first.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, TypeVarTuple

import psycopg
import structlog

from reembed import checkpoint as ckpt
from reembed import db, retry
from reembed.background import Background
from reembed.errors import DatabaseError, LockHeld
from reembed.queries import query
from reembed.signals import StopSignal

log = structlog.get_logger()

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

CHECK_EVERY = 2.0
HEARTBEAT_EVERY = 10.0
BEAT_LOCK_TIMEOUT = "2s"
_LOCK_NAMESPACE = 0x7265656D  # 'reem'


def lock_key(table_oid: int) -> int:
    return (_LOCK_NAMESPACE << 32) | (table_oid & 0xFFFFFFFF)


@dataclass
class TableLock:
    """The session-level advisory lock for one table, held on its own connection."""

    conn: psycopg.Connection[Any]
    key: int
    shared: bool = False  # held shared (a worker beside others), else exclusively

    def release(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.conn.execute(query("release_lock_shared" if self.shared else "release_lock"), {"key": self.key})
        with contextlib.suppress(psycopg.Error):
            self.conn.close()

    def alive(self) -> bool:
        """Do we still hold it? False if the connection was lost (the server dropped the lock)."""
        try:
            return self.held_as_seen_from(self.conn)
        except psycopg.Error:
            return False

    def held_as_seen_from(self, conn: psycopg.Connection[Any]) -> bool:
        """Asked on `conn` (inside its transaction, if one is open): does this lock's backend hold it now?"""
        try:
            pid = self.conn.info.backend_pid  # libpq's copy: no round trip
        except psycopg.Error:  # closed (the keeper is swapping it for a fresh one)
            return False
        row = conn.execute(query("lock_held_by"), {"pid": pid, "key": self.key}).fetchone()
        return bool(row and row["n"])


def describe_holder(row: dict[str, Any] | None) -> str:
    """Who holds the lock, from a `lock_holder` row: host and pid (in the application name), since when."""
    if row is None:
        return "another run (it let go just now)"
    app = row["application_name"] or "unknown"
    since = row["backend_start"].isoformat(timespec="seconds") if row["backend_start"] else "?"
    where = f" from {row['client_addr']}" if row["client_addr"] else ""
    return f"{app!r} (backend pid {row['pid']}{where}, since {since})"


def holder_of(conn: psycopg.Connection[Any], table_oid: int) -> dict[str, Any] | None:
    return conn.execute(query("lock_holder"), {"key": lock_key(table_oid)}).fetchone()


def try_lock(conninfo: str, table_oid: int, *, table: str, again: bool = False, shared: bool = False,
             join: bool = False) -> TableLock:
    """Take the table's advisory lock on a dedicated autocommit connection, or raise LockHeld.
    `again`: we held it before, so a server that does not answer is a transient fault. `shared`:
    as a worker, beside others. `join`: exclusively if nobody holds it, else shared if only
    workers do."""
    conn = (db.reconnect if again else db.connect)(conninfo, role="lock", vectors=False, autocommit=True)
    key = lock_key(table_oid)
    with db.translated():
        for mode in ((True,) if shared else (False, True) if join else (False,)):
            got = conn.execute(query("try_lock_shared" if mode else "try_lock"), {"key": key}).fetchone()
            if got and got["got"]:
                return TableLock(conn=conn, key=key, shared=mode)
        row = holder_of(conn, table_oid)
    conn.close()
    raise LockHeld(
        f"{table} is being re-embedded by {describe_holder(row)}; wait for it, or stop it first",
        holder=row["pid"] if row else None,
    )


def break_stale(conn: psycopg.Connection[Any], *, table: str, column: str, holder_pid: int | None,
                stale_after: float) -> None:
    """Terminate the lock holder's backend if, and only if, its job heartbeat is stale."""
    row = (
        conn.execute(query("job_heartbeat_age"), {"table": table, "column": column}).fetchone()
        if ckpt.schema_present(conn) else None
    )
    if holder_pid is None:
        raise LockHeld(f"{table}: the lock's holder let go or cannot be seen; run again")
    if row is None or row["age"] is None:
        raise LockHeld(
            f"{table} is locked by backend {holder_pid}, which has no job heartbeat to judge; "
            "not breaking a lock that may be live"
        )
    if float(row["age"]) < stale_after:
        raise LockHeld(
            f"{table} is locked by {row['holder']} (backend {holder_pid}), whose heartbeat is "
            f"{float(row['age']):.0f} s old: it is alive; not breaking its lock"
        )
    log.warning("breaking_stale_lock", holder=row["holder"], backend_pid=holder_pid,
                heartbeat_age_secs=round(float(row["age"])))
    conn.execute(query("terminate_backend"), {"pid": holder_pid})


def take(conn: psycopg.Connection[Any], conninfo: str, table_oid: int, *, table: str, column: str,
         break_stale_lock: bool, stale_after: float, join: bool = False, join_wait: float = 0.0) -> TableLock:
    """The lock, at once (exit 3 if held), or after terminating a stale holder when told to.
    `join`: held shared by the workers of an active job, it is taken shared, to join them.
    `join_wait`: held exclusively (another run prepares or finalizes the job), try again every
    second for this long (workers a scheduler starts together: one prepares, the others join)."""
    give_up = time.monotonic() + join_wait
    while True:
        try:
            return try_lock(conninfo, table_oid, table=table, join=join)
        except LockHeld as held:
            if break_stale_lock:
                break_stale(conn, table=table, column=column, holder_pid=held.holder, stale_after=stale_after)
                break
            if time.monotonic() >= give_up:
                raise
            log.debug("lock_held_waiting", detail=str(held))
            time.sleep(1.0)
    deadline = time.monotonic() + 15
    while True:  # the terminated backend lets go of the lock as it exits
        try:
            return try_lock(conninfo, table_oid, table=table, join=join)
        except LockHeld:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Lease(Background):
    """The run's hold on the table: the keeper thread, and every write fenced by it."""

    def __init__(self, lock: TableLock, connections: db.Connections, *, table_oid: int, table: str,
                 stop: StopSignal, max_outage: float = 120.0, max_retries: int | None = None) -> None:
        super().__init__("reembed-lock-keeper", join_timeout=10)
        self.lock = lock
        self.connections = connections
        self.conninfo = connections.conninfo
        self.table_oid = table_oid
        self.table = table
        self.max_retries = max_retries
        self.max_outage = max_outage
        self.stop_signal = stop
        self.job_id: int | None = None
        self.lost: LockHeld | None = None
        self._since_beat = HEARTBEAT_EVERY
        self._mutex = threading.Lock()
        self._beats: list[Callable[[psycopg.Connection[Any], int], None]] = []  # (a conn, the lock's backend pid)
        self._heartbeat: db.Held | None = None  # the beats' connection (never the lock's)
        self.released = False  # let go by coordinate(): nothing more may be written

    @property
    def shared(self) -> bool:
        return self.lock.shared

    @property
    def backend_pid(self) -> int:
        """The backend of the lock's connection (a worker's claims name it: a claim whose backend
        no longer holds the lock is stale)."""
        return int(self.lock.conn.info.backend_pid)

    def on_beat(self, beat: Callable[[psycopg.Connection[Any], int], None]) -> None:
        """Also run `beat(connection, the lock's backend pid)` at every heartbeat (a worker's claims),
        in the heartbeat's transaction."""
        with self._mutex:
            self._beats.append(beat)

    # ------------------------------------------------------------ the modes

    def share(self) -> None:
        """Exclusive -> shared, with no moment unlocked: the coordinator becomes a worker beside others."""
        with self._mutex:
            if self.lock.shared:
                return
            with db.translated():
                self.lock.conn.execute(query("lock_shared"), {"key": self.lock.key})  # ours: granted at once
                self.lock.conn.execute(query("release_lock"), {"key": self.lock.key})
            self.lock.shared = True
        log.debug("lock_shared")

    def coordinate(self) -> bool:
        """Shared -> exclusive, if no other worker holds the lock: the last worker out becomes the
        coordinator. Otherwise let go of it altogether and say False: another worker is still at
        work (or already coordinating), and will finalize (the last to let go and try again wins)."""
        with self._mutex:
            if not self.lock.shared:
                return True
            with db.translated():
                got = self.lock.conn.execute(query("try_lock"), {"key": self.lock.key}).fetchone()
                self.lock.conn.execute(query("release_lock_shared"), {"key": self.lock.key})
                if not (got and got["got"]):
                    got = self.lock.conn.execute(query("try_lock"), {"key": self.lock.key}).fetchone()
            if got and got["got"]:
                self.lock.shared = False
                log.debug("lock_exclusive")
                return True
            self.released = True
            self.lost = LockHeld(f"{self.table}: this worker let go of the table's lock; another one finalizes")
            return False

    # ---------------------------------------------------------- the writes

    def write(self, body: Callable[[psycopg.Connection[Any], *Ts], T], *args: *Ts, on: db.Kept, what: str,
              lock_timeout: str | None = None, patient: bool = False, max_backoff: float | None = None) -> T:
        """body(conn, *args) as one transaction on `on`'s connection, fenced, retried on transient
        faults (`patient`: DDL that backs off from application locks gets more tries;
        `max_backoff`: the longest wait between two tries, default 5 s)."""

        def once(conn: psycopg.Connection[Any], attempt: int) -> T:
            return body(conn, *args)

        return self._transaction(once, on=on, what=what, lock_timeout=lock_timeout, patient=patient,
                                 max_backoff=max_backoff)

    def write_attempt(self, body: Callable[[psycopg.Connection[Any], int, *Ts], T], *args: *Ts, on: db.Kept,
                      what: str, lock_timeout: str | None = None, patient: bool = False,
                      max_backoff: float | None = None) -> T:
        """Like write(), with the attempt's number (1, then 2, ... on each retry) handed to the
        body after the connection: body(conn, attempt, *args). A retry after a lost connection
        may find that the first attempt's commit landed: such a body asks."""

        def once(conn: psycopg.Connection[Any], attempt: int) -> T:
            return body(conn, attempt, *args)

        return self._transaction(once, on=on, what=what, lock_timeout=lock_timeout, patient=patient,
                                 max_backoff=max_backoff)

    def _transaction(self, body: Callable[[psycopg.Connection[Any], int], T], *, on: db.Kept, what: str,
                     lock_timeout: str | None, patient: bool, max_backoff: float | None = None) -> T:
        attempts = itertools.count(1)

        def attempt() -> T:
            self.check()
            conn = on.conn
            with conn.transaction():
                # The application's triggers (and event triggers) fire on what this transaction
                # writes, as on its own writes: with row security as for the application (its audit
                # table's policies apply), not off as for reembed's reads (db.SESSION_SETTINGS)
                conn.execute(query("write_transaction_settings"))
                if lock_timeout is not None:
                    conn.execute(query("set_lock_timeout"), {"value": lock_timeout})
                result = body(conn, next(attempts))
                self.fence(conn)
            return result

        return self._retried(attempt, what=what, patient=patient, max_backoff=max_backoff)

    def read(self, body: Callable[[psycopg.Connection[Any], *Ts], T], *args: *Ts, on: db.Kept, what: str) -> T:
        """body(conn, *args), retried on transient faults (no transaction of its own, no fence)."""

        def once() -> T:
            return body(on.conn, *args)

        return self._retried(once, what=what, patient=False)

    def outside_transaction(self, body: Callable[[psycopg.Connection[Any], *Ts], T], *args: *Ts, on: db.Kept,
                            what: str) -> T:
        """body(conn, *args) on `on`'s autocommit connection, for a statement that cannot run inside a
        transaction: the lock is verified just before."""

        def once() -> T:
            self.ensure()
            return body(on.conn, *args)

        return self._retried(once, what=what, patient=True)

    def _retried(self, fn: Callable[[], T], *, what: str, patient: bool, max_backoff: float | None = None) -> T:
        """`patient`: DDL backing off from an application's locks waits at least 5 minutes."""
        outage = max(self.max_outage, 300.0) if patient else self.max_outage
        retries = None if self.max_retries is None else max(self.max_retries, 8) if patient else self.max_retries
        return retry.call(fn, what=what, max_outage=outage, max_retries=retries, stop=self.stop_signal,
                          on_lost=self.connections.server_lost, maximum=max_backoff or 5.0)

    # ------------------------------------------------------------ the fence

    def check(self) -> None:
        """Raise LockHeld if another run took our lock while we were disconnected."""
        if self.lost is not None:
            raise self.lost

    def ensure(self) -> None:
        """Verify the lock now (after a reconnect elsewhere, the lock's connection is suspect too)."""
        self.check()
        try:
            self._tick(beat=False)
        except LockHeld as exc:
            self._lose(exc)
            raise

    def fence(self, conn: psycopg.Connection[Any]) -> None:
        """Inside a writing transaction, just before it commits: do we hold the lock right now?"""
        self.check()
        if self.lock.held_as_seen_from(conn):
            return
        self.ensure()
        if not self.lock.held_as_seen_from(conn):
            exc = LockHeld(f"{self.table}: the table's lock is no longer held by this run")
            self._lose(exc)
            raise exc

    def _lose(self, exc: LockHeld) -> None:
        log.error("lock_lost", detail=str(exc))
        self.lost = exc

    # ----------------------------------------------------------- the keeper

    def _loop(self) -> None:
        while not self._stopped.wait(CHECK_EVERY):
            try:
                self._tick()
            except LockHeld as exc:
                self._lose(exc)
                return
            except (psycopg.Error, DatabaseError) as exc:  # the server is away: try again at the next tick
                retry.OUTAGES.failed(retry.kind_of(exc, "lock_check"), what="lock_check", attempt=1, error=exc,
                                     sleep=CHECK_EVERY, max_outage=self.max_outage,
                                     on_lost=self.connections.server_lost)

    def _tick(self, *, beat: bool = True) -> None:
        # Under the mutex only statements that never wait on another session's lock (pg_locks, a try
        # of the advisory lock): a writer's fence waits for this mutex while it holds the rows of its
        # transaction, so nothing here may wait for those rows.
        with self._mutex:
            if self.released:
                return
            if not self.lock.alive():
                self.lock.release()
                fresh = try_lock(self.conninfo, self.table_oid, table=self.table, again=True, shared=self.lock.shared)
                self.lock.conn, self.lock.key = fresh.conn, fresh.key
                log.warning("lock_reacquired", table=self.table)
                self._since_beat = HEARTBEAT_EVERY
            pid = self.backend_pid
        if beat:
            self._beat(pid)

    def _beat(self, pid: int) -> None:
        """The heartbeat on the job row, the worker's claims and its row: on a connection of its own,
        outside the mutex, each statement waiting at most BEAT_LOCK_TIMEOUT for a row another
        transaction holds (a writer committing that range: itself a sign of life); such a beat is
        skipped, the next comes at the next tick."""
        self._since_beat += CHECK_EVERY
        if self.job_id is None or self._since_beat < HEARTBEAT_EVERY:
            return
        if self._heartbeat is None:
            self._heartbeat = self.connections.hold("heartbeat")
        conn = self._heartbeat.conn
        try:
            with conn.transaction():
                conn.execute(query("set_lock_timeout"), {"value": BEAT_LOCK_TIMEOUT})
                ckpt.heartbeat(conn, self.job_id, db.holder_name())
                for beat in list(self._beats):
                    beat(conn, pid)
        except psycopg.errors.LockNotAvailable:
            log.debug("heartbeat_skipped", detail="a row it beats is held by a transaction; next time")
            return
        self._since_beat = 0.0

    def release(self) -> None:
        self.stop()
        if self._heartbeat is not None:
            self._heartbeat.release()
        self.lock.release()

