"""Transient database faults, waited out for up to --max-outage (tenacity).

What counts as transient is decided once, in reembed.db.translate(). Waits grow
exponentially from 0.1 s to a cap of 5 s, with a little jitter (never near zero), so a
restart or a failover that takes a minute costs a minute, not a failed run. The stop signal
and the time window are honoured while waiting: a stop ends the wait at once (the transaction
in flight was rolled back with the connection; the checkpoint is intact). Each outage is
logged once when it begins and once when it ends, however many roles wait on it; past
--max-outage (or --max-retries, if given) the last error surfaces (exit 1, a re-run resumes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
import structlog
from psycopg import errors as pgerrors
from psycopg_pool import PoolTimeout
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    stop_never,
    wait_exponential_jitter,
)

from reembed.db import translate
from reembed.errors import DatabaseError, Interrupted, first_line
from reembed.signals import StopSignal

log = structlog.get_logger()

T = TypeVar("T")

_UNREACHABLE = (pgerrors.AdminShutdown, pgerrors.CrashShutdown, pgerrors.CannotConnectNow,
                pgerrors.ConnectionException, PoolTimeout)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, DatabaseError):
        return exc.retryable
    if isinstance(exc, (psycopg.Error, PoolTimeout)):
        return translate(exc).retryable
    return False


def kind_of(exc: BaseException, what: str) -> str:
    """'database' when the server cannot be reached (every role waits on the same outage);
    else the step's own name (a lock wait, a serialization failure)."""
    cause = exc.__cause__ if isinstance(exc, DatabaseError) and exc.__cause__ is not None else exc
    # a lost connection is a bare OperationalError; lock, cancel and rollback errors are subclasses
    unreachable = isinstance(cause, _UNREACHABLE) or type(cause) is psycopg.OperationalError
    return "database" if unreachable else what


class Outages:
    """One log line when a wait begins, one when it ends, per kind of wait, for all roles. When
    the database itself is found gone, `on_lost` is told (Connections.server_lost: every
    connection kept from before is replaced before its next use), so other roles do not each
    fail once more afterwards."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, float] = {}

    def failed(self, kind: str, *, what: str, attempt: int, error: BaseException, sleep: float,
               max_outage: float, on_lost: Callable[[], None] | None = None) -> None:
        with self._lock:
            first = kind not in self._open
            if first:
                self._open[kind] = time.monotonic()
        if first and kind == "database" and on_lost is not None:
            on_lost()
        line = first_line(error)
        if first:
            log.warning("transient_error_retrying", step=what, kind=kind, attempt=attempt, sleep_secs=round(sleep, 2),
                        max_outage_secs=max_outage, error=line,
                        detail="waiting it out; logged once until it ends")
        else:
            log.debug("transient_error_retrying", step=what, kind=kind, attempt=attempt, error=line)

    def recovered(self, kind: str) -> None:
        with self._lock:
            began = self._open.pop(kind, None)
        if began is not None:
            log.warning("transient_error_over", kind=kind, waited_secs=round(time.monotonic() - began, 1))


OUTAGES = Outages()


def call(
    fn: Callable[[], T],
    *,
    what: str,
    max_outage: float = 120.0,
    max_retries: int | None = None,
    stop: StopSignal | None = None,
    initial: float = 0.1,
    maximum: float = 5.0,
    on_lost: Callable[[], None] | None = None,
) -> T:
    """fn(), retried on transient errors for up to `max_outage` seconds (and `max_retries`
    retries, if given); psycopg errors come out translated. `on_lost`: told when this call
    finds the server gone first (see Outages)."""
    kinds: set[str] = set()

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if exc is None:
            return
        kind = kind_of(exc, what)
        kinds.add(kind)
        OUTAGES.failed(kind, what=what, attempt=state.attempt_number, error=exc, sleep=state.upcoming_sleep,
                       max_outage=max_outage, on_lost=on_lost)

    def sleep(seconds: float) -> None:
        if stop is None:
            time.sleep(seconds)
        elif stop.wait(seconds):
            raise Interrupted(f"stopped ({stop.reason}) while waiting for the database during {what}; "
                              "nothing more was committed; re-run to resume", exit_code=stop.exit_code)

    bound = stop_after_delay(max_outage)
    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=bound | (stop_after_attempt(max_retries + 1) if max_retries is not None else stop_never),
        wait=wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )
    try:
        result = retrying(fn)
    except (psycopg.Error, PoolTimeout) as exc:
        raise translate(exc) from exc
    for kind in kinds:
        OUTAGES.recovered(kind)
    return result
