"""Keeping the table's lock for the whole run, and proving we are alive.

A LockKeeper thread checks every few seconds that our advisory lock is still held (a lost
connection, a server restart or pg_terminate_backend drops it), takes it again when it can,
and records a heartbeat on the job row. If another run took the lock meanwhile, the job
stops with exit 3.

The thread only notices a lost lock at its next tick, so every transaction that writes
(a batch and its checkpoint, a finalize step, the registry) is also *fenced*: just before
its commit, `fence(conn)` checks in that same transaction that the lock's backend still
holds the lock, and re-takes it or raises LockHeld (the transaction rolls back) if not.

`--break-stale-lock` terminates a holder whose heartbeat is older than the stale limit, and
only such a holder.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import structlog

from reembed import checkpoint as ckpt
from reembed import db
from reembed.background import Background
from reembed.errors import DatabaseError, LockHeld

log = structlog.get_logger()

CHECK_EVERY = 2.0
HEARTBEAT_EVERY = 10.0


class LockKeeper(Background):
    def __init__(self, lock: db.TableLock, conninfo: str, *, table_oid: int, table: str) -> None:
        super().__init__("reembed-lock-keeper", join_timeout=10)
        self.lock = lock
        self.conninfo = conninfo
        self.table_oid = table_oid
        self.table = table
        self.job_id: int | None = None
        self.lost: LockHeld | None = None
        self._since_beat = HEARTBEAT_EVERY
        self._mutex = threading.Lock()

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
            log.error("lock_lost", detail=str(exc))
            self.lost = exc
            raise

    def fence(self, conn: psycopg.Connection[Any]) -> None:
        """Inside a writing transaction, just before it commits: do we hold the lock right now?

        If our lock's backend is gone, take the lock again (and go on) or raise LockHeld
        because another run has it (the caller's transaction then rolls back)."""
        self.check()
        if self.lock.held_as_seen_from(conn):
            return
        self.ensure()
        if not self.lock.held_as_seen_from(conn):
            exc = LockHeld(f"{self.table}: the table's lock is no longer held by this run")
            log.error("lock_lost", detail=str(exc))
            self.lost = exc
            raise exc

    def _loop(self) -> None:
        while not self._stopped.wait(CHECK_EVERY):
            try:
                self._tick()
            except LockHeld as exc:
                log.error("lock_lost", detail=str(exc))
                self.lost = exc
                return
            except (psycopg.Error, DatabaseError) as exc:  # the server is away: try again at the next tick
                log.warning("lock_check_failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def _tick(self, *, beat: bool = True) -> None:
        with self._mutex:
            if not self.lock.alive():
                self.lock.release()
                fresh = db.try_lock(self.conninfo, self.table_oid, table=self.table, again=True)
                self.lock.conn, self.lock.key = fresh.conn, fresh.key
                log.warning("lock_reacquired", table=self.table)
                self._since_beat = HEARTBEAT_EVERY
            if beat:
                self._beat()

    def _beat(self) -> None:
        self._since_beat += CHECK_EVERY
        if self.job_id is not None and self._since_beat >= HEARTBEAT_EVERY:
            ckpt.heartbeat(self.lock.conn, self.job_id, db.holder_name())
            self._since_beat = 0.0


def break_stale(conn: psycopg.Connection[Any], *, table: str, column: str, holder_pid: int | None,
                stale_after: float) -> None:
    """Terminate the lock holder's backend if, and only if, its job heartbeat is stale."""
    row = conn.execute(
        "SELECT job_id, holder, extract(epoch FROM now() - heartbeat_at) AS age FROM reembed_checkpoint"
        " WHERE table_name = %s AND column_name = %s AND state IN ('embedding', 'finalizing')",
        (table, column),
    ).fetchone() if _has_checkpoint(conn) else None
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
    conn.execute("SELECT pg_terminate_backend(%s)", (holder_pid,))


def _has_checkpoint(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass('reembed_checkpoint') IS NOT NULL AS p").fetchone()
    return bool(row and row["p"])
