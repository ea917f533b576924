"""Connections, vector registration, the advisory lock, and psycopg error translation.

The job holds a few long-lived connections with distinct roles (the lock holder, the
reader, the writer), so each is a plain psycopg connection made here rather than a pool:
a pool would add nothing but indirection, and reconnecting is explicit (reembed.retry).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import errors as pgerrors
from psycopg.rows import dict_row

from reembed.errors import ConfigError, DatabaseError, LockHeld
from reembed.queries import query

log = structlog.get_logger()

# Server-side keepalives: a holder that lost power is dropped within ~2 minutes,
# which releases its advisory lock (60 s idle + 6 probes x 10 s).
_KEEPALIVE_OPTIONS = "-c tcp_keepalives_idle=60 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=6"
_LOCK_NAMESPACE = 0x7265656D  # 'reem'

RETRYABLE = (
    pgerrors.SerializationFailure,
    pgerrors.DeadlockDetected,
    pgerrors.LockNotAvailable,
    pgerrors.QueryCanceled,  # statement_timeout / lock_timeout surface here too
    pgerrors.AdminShutdown,
    pgerrors.CrashShutdown,
    pgerrors.CannotConnectNow,
    pgerrors.ConnectionException,
)


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def connect(conninfo: str, *, role: str, vectors: bool = True, autocommit: bool = False) -> psycopg.Connection[Any]:
    """A connection for one role of the job. Raises ConfigError if the server cannot be reached."""
    try:
        conn = psycopg.connect(
            conninfo,
            autocommit=autocommit,
            row_factory=dict_row,
            application_name=f"reembed {role} {holder_name()}",
            options=_KEEPALIVE_OPTIONS,
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
            connect_timeout=10,
        )
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot connect to PostgreSQL ({first}); check --dsn, $REEMBED_DSN or the PG* variables"
        ) from exc
    if vectors:
        register_vectors(conn)
    return conn


def reconnect(conninfo: str, *, role: str, vectors: bool = True, autocommit: bool = False) -> psycopg.Connection[Any]:
    """Like connect(), but a failure is a transient DatabaseError (the server was reachable before)."""
    try:
        return connect(conninfo, role=role, vectors=vectors, autocommit=autocommit)
    except ConfigError as exc:
        raise DatabaseError(str(exc), retryable=True) from exc.__cause__


class Session:
    """A connection for one role that comes back: get() reconnects when the last one broke."""

    def __init__(self, conninfo: str, *, role: str, vectors: bool = True, autocommit: bool = True) -> None:
        self.conninfo = conninfo
        self.role = role
        self.vectors = vectors
        self.autocommit = autocommit
        self._conn: psycopg.Connection[Any] | None = None

    def get(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                log.warning("reconnecting", role=self.role)
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
            self._conn = reconnect(self.conninfo, role=self.role, vectors=self.vectors, autocommit=self.autocommit)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None


def register_vectors(conn: psycopg.Connection[Any]) -> None:
    from pgvector.psycopg import register_vector

    register_vector(conn)


def translate(exc: psycopg.Error) -> DatabaseError:
    """One place that turns psycopg errors into ours, keeping the cause."""
    retryable = isinstance(exc, RETRYABLE) or isinstance(exc, psycopg.OperationalError)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    err = DatabaseError(f"database error: {first}", retryable=retryable)
    err.__cause__ = exc
    return err


@contextlib.contextmanager
def translated() -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc) from exc


def lock_key(table_oid: int) -> int:
    return (_LOCK_NAMESPACE << 32) | (table_oid & 0xFFFFFFFF)


@dataclass
class TableLock:
    """The session-level advisory lock for one table, held on its own connection."""

    conn: psycopg.Connection[Any]
    key: int

    def release(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
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
        row = conn.execute(
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
            " AND pid = %s AND classid = %s::bigint::oid AND objid = %s::bigint::oid",
            (pid, self.key >> 32, self.key & 0xFFFFFFFF),
        ).fetchone()
        return bool(row and row["n"])


def describe_holder(row: dict[str, Any] | None) -> str:
    """Who holds the lock, from a `lock_holder` row: host and pid (in the application name), since when."""
    if row is None:
        return "another run (it let go just now)"
    app = row["application_name"] or "unknown"
    since = row["backend_start"].isoformat(timespec="seconds") if row["backend_start"] else "?"
    where = f" from {row['client_addr']}" if row["client_addr"] else ""
    return f"{app!r} (backend pid {row['pid']}{where}, since {since})"


def try_lock(conninfo: str, table_oid: int, *, table: str, again: bool = False) -> TableLock:
    """Take the table's advisory lock on a dedicated autocommit connection, or raise LockHeld.
    `again`: we held it before, so a server that does not answer is a transient fault."""
    conn = (reconnect if again else connect)(conninfo, role="lock", vectors=False, autocommit=True)
    key = lock_key(table_oid)
    with translated():
        got = conn.execute("SELECT pg_try_advisory_lock(%s) AS got", (key,)).fetchone()
        if got and got["got"]:
            return TableLock(conn=conn, key=key)
        row = conn.execute(query("lock_holder"), {"key": key}).fetchone()
    conn.close()
    raise LockHeld(
        f"{table} is being re-embedded by {describe_holder(row)}; wait for it, or stop it first",
        holder=row["pid"] if row else None,
    )
