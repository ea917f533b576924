"""Connections, vector registration, and psycopg error translation.

Every connection of a run is opened here. The work (the coordinator's statements, the reader,
the writer, the index build) runs on a psycopg_pool ConnectionPool whose `configure=` makes
each new connection ready (vectors, the writer's session settings, its staging table) and
whose `check=` replaces a connection that broke; a connection taken for a role carries the
role in its application_name. The session-level advisory lock lives on a dedicated plain
connection (reembed.lease), as does `reembed status`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import structlog
from psycopg import errors as pgerrors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from reembed.errors import ConfigError, DatabaseError
from reembed.queries import query

log = structlog.get_logger()

# Every session of reembed's, whatever the server's, the database's or the role's defaults:
# - server-side keepalives: a holder that lost power is dropped within ~2 minutes, which releases
#   its advisory lock (60 s idle + 6 probes x 10 s);
# - READ COMMITTED: under a default of repeatable read, the cut-over's snapshot would predate its
#   locks, and a write committed while it waited would be missed (the row left stale);
# - row_security off: a policy that hid rows from the job makes PostgreSQL raise instead of
#   filtering (the pre-flight refuses such a table first, target.check_row_security);
# - idle_in_transaction_session_timeout: a stopped (SIGSTOP) process cannot hold the application's
#   rows forever (no transaction of reembed's waits on anything but the database that long);
# - one text form of keys: DateStyle, TimeZone, IntervalStyle and extra_float_digits fixed, as the
#   capture trigger's function fixes them, so that a timestamp or float key reads back as itself.
SESSION_SETTINGS = {
    "tcp_keepalives_idle": "60", "tcp_keepalives_interval": "10", "tcp_keepalives_count": "6",
    "default_transaction_isolation": "read committed", "row_security": "off",
    "idle_in_transaction_session_timeout": "60s",
    # a role's or database's statement_timeout would cancel an index build or a batch (retried, and
    # failed late); reembed bounds its own waits (lock_timeout where it asks for one)
    "statement_timeout": "0", "lock_timeout": "0",
    "DateStyle": "ISO, YMD", "TimeZone": "UTC", "IntervalStyle": "postgres", "extra_float_digits": "3",
    "bytea_output": "hex",
}
# PostgreSQL 17 and newer only (an unknown setting in the startup options refuses the connection):
# set after connecting, where the server has it.
_SINCE_17 = {"transaction_timeout": "0"}


def _options(settings: dict[str, str]) -> str:
    """libpq's `options`: `-c name=value` each, spaces and backslashes escaped."""
    return " ".join("-c {}={}".format(k, v.replace("\\", "\\\\").replace(" ", "\\ ")) for k, v in settings.items())


_SESSION_OPTIONS = _options(SESSION_SETTINGS)
_GETCONN_TIMEOUT = 10.0

RETRYABLE = (
    pgerrors.SerializationFailure,
    pgerrors.DeadlockDetected,
    pgerrors.LockNotAvailable,
    pgerrors.QueryCanceled,  # statement_timeout / lock_timeout surface here too
    pgerrors.IdleInTransactionSessionTimeout,  # the server ended a transaction left waiting: tried again
    pgerrors.AdminShutdown,
    pgerrors.CrashShutdown,
    pgerrors.CannotConnectNow,
    pgerrors.ConnectionException,
)


def host_name() -> str:
    return socket.gethostname()


def process_id() -> int:
    return os.getpid()


def holder_name() -> str:
    return f"{host_name()}:{process_id()}"


def app_name(role: str) -> str:
    return f"reembed {role} {holder_name()}"


def _connect_kwargs(role: str) -> dict[str, Any]:
    return {
        "row_factory": dict_row,
        "application_name": app_name(role),
        "options": _SESSION_OPTIONS,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "connect_timeout": 10,
    }


def connect(conninfo: str, *, role: str, vectors: bool = True, autocommit: bool = False) -> psycopg.Connection[Any]:
    """A dedicated connection (the lock's, `status`'s, the first look at the target).
    Raises ConfigError if the server cannot be reached."""
    try:
        conn = psycopg.connect(conninfo, autocommit=autocommit, **_connect_kwargs(role))
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot connect to PostgreSQL ({first}); check --dsn, $REEMBED_DSN or the PG* variables"
        ) from exc
    with translated():
        settle_session(conn)
    if vectors:
        register_vectors(conn)
    return conn


def settle_session(conn: psycopg.Connection[Any]) -> None:
    """The session settings once more, as statements (a pooler may drop the startup options), and
    those the startup options cannot carry to an older server (transaction_timeout)."""
    wanted = {**SESSION_SETTINGS, **(_SINCE_17 if conn.info.server_version >= 170000 else {})}
    wanted = {k: v for k, v in wanted.items() if not k.startswith("tcp_")}
    conn.execute(query("settle_session"), {"names": list(wanted), "values": list(wanted.values())})
    if not conn.autocommit:
        conn.commit()


def reconnect(conninfo: str, *, role: str, vectors: bool = True, autocommit: bool = False) -> psycopg.Connection[Any]:
    """Like connect(), but a failure is a transient DatabaseError (the server was reachable before)."""
    try:
        return connect(conninfo, role=role, vectors=vectors, autocommit=autocommit)
    except ConfigError as exc:
        raise DatabaseError(str(exc), retryable=True) from exc.__cause__


def register_vectors(conn: psycopg.Connection[Any]) -> None:
    from pgvector.psycopg import register_vector

    register_vector(conn)


def translate(exc: BaseException) -> DatabaseError:
    """One place that turns psycopg (and pool) errors into ours, keeping the cause."""
    if isinstance(exc, PoolTimeout):
        err = DatabaseError(f"database error: no connection could be had ({exc})", retryable=True)
    else:
        retryable = isinstance(exc, RETRYABLE) or isinstance(exc, psycopg.OperationalError)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        err = DatabaseError(f"database error: {first}", retryable=retryable)
    err.__cause__ = exc
    return err


@contextlib.contextmanager
def translated() -> Iterator[None]:
    try:
        yield
    except (psycopg.Error, PoolTimeout) as exc:
        raise translate(exc) from exc


class Connections:
    """The run's connections by role: taken from one pool, configured once each."""

    def __init__(
        self,
        conninfo: str,
        *,
        size: int = 6,
        configure: Callable[[psycopg.Connection[Any]], None] | None = None,
        reconnect_timeout: float = 300.0,
    ) -> None:
        self.conninfo = conninfo
        self._extra_configure = configure
        # Bumped when the server is found gone (server_lost): every connection kept from before
        # is replaced before its next use (it would fail once, and each role would report a
        # fresh outage).
        self.generation = 0
        # a wait for a pool connection is one attempt of a retried step: never longer than the
        # whole wait --max-outage allows (reconnect_timeout), so the bound holds
        self._getconn_timeout = min(_GETCONN_TIMEOUT, reconnect_timeout)
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=size,
            open=False,
            kwargs={"autocommit": True, **_connect_kwargs("pool")},
            configure=self._configure,
            check=ConnectionPool.check_connection,
            reconnect_timeout=reconnect_timeout,
            name="reembed",
        )
        self.pool.open()

    def server_lost(self) -> None:
        """The server was found gone: connections kept from before are replaced before their next use."""
        self.generation += 1

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        settle_session(conn)
        register_vectors(conn)
        if self._extra_configure is not None:
            self._extra_configure(conn)

    def take(self, role: str) -> psycopg.Connection[Any]:
        """A connection for `role`, out of the pool until given back with give()."""
        with translated():
            conn = self.pool.getconn(timeout=self._getconn_timeout)
            name = app_name(role)
            if conn.info.parameter_status("application_name") != name:
                conn.execute(query("set_application_name"), {"name": name})
        return conn

    def give(self, conn: psycopg.Connection[Any]) -> None:
        with contextlib.suppress(psycopg.Error):
            self.pool.putconn(conn)

    @contextlib.contextmanager
    def connection(self, role: str) -> Iterator[psycopg.Connection[Any]]:
        conn = self.take(role)
        try:
            yield conn
        finally:
            self.give(conn)

    def hold(self, role: str) -> Held:
        return Held(self, role)

    def dedicated(self, role: str, *, setup: Callable[[psycopg.Connection[Any]], None] | None = None) -> Dedicated:
        return Dedicated(self, role, setup=setup)

    def close(self) -> None:
        self.pool.close(timeout=5)


class Kept:
    """One connection kept by one role for a phase; `.conn` replaces it when it broke, or when
    the server was found gone since it was opened (`Connections.generation`)."""

    connections: Connections
    role: str
    _conn: psycopg.Connection[Any] | None = None
    _generation: int = 0

    @property
    def conn(self) -> psycopg.Connection[Any]:
        current = self.connections.generation
        if self._conn is not None and (self._conn.closed or self._conn.broken or self._generation != current):
            log.info("reconnecting", role=self.role)
            self.release()
        if self._conn is None:
            self._generation = current
            self._conn = self._open()
        return self._conn

    def cancel(self) -> None:
        """Cancel the statement running on this connection (its transaction then rolls back)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.cancel_safe()

    def release(self) -> None:
        if self._conn is not None:
            self._close(self._conn)
            self._conn = None

    def _open(self) -> psycopg.Connection[Any]:
        raise NotImplementedError

    def _close(self, conn: psycopg.Connection[Any]) -> None:
        raise NotImplementedError


class Held(Kept):
    """A pool connection kept by one role (the reader's, the writer's, the coordinator's)."""

    def __init__(self, connections: Connections, role: str) -> None:
        self.connections = connections
        self.role = role

    def _open(self) -> psycopg.Connection[Any]:
        return self.connections.take(self.role)

    def _close(self, conn: psycopg.Connection[Any]) -> None:
        self.connections.give(conn)


class Dedicated(Kept):
    """A plain autocommit connection of its own for one role, outside the pool (the index
    build's: its session settings die with it); `setup` runs on each new one."""

    def __init__(self, connections: Connections, role: str, *,
                 setup: Callable[[psycopg.Connection[Any]], None] | None = None) -> None:
        self.connections = connections
        self.role = role
        self.setup = setup

    def _open(self) -> psycopg.Connection[Any]:
        conn = reconnect(self.connections.conninfo, role=self.role, vectors=False, autocommit=True)
        if self.setup is not None:
            with translated():
                self.setup(conn)
        return conn

    def _close(self, conn: psycopg.Connection[Any]) -> None:
        with contextlib.suppress(psycopg.Error):
            conn.close()
