"""Transient database faults, retried with exponential backoff and jitter (tenacity).

What counts as transient is decided once, in reembed.db.translate(). Each attempt is
logged with its number; past --max-retries the last error surfaces (exit 1, checkpoint
intact, a re-run resumes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import psycopg
import structlog
from psycopg_pool import PoolTimeout
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from reembed.db import translate
from reembed.errors import DatabaseError

log = structlog.get_logger()

T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, DatabaseError):
        return exc.retryable
    if isinstance(exc, (psycopg.Error, PoolTimeout)):
        return translate(exc).retryable
    return False


def call(
    fn: Callable[[], T],
    *,
    what: str,
    max_retries: int,
    on_retry: Callable[[BaseException], None] | None = None,
    initial: float = 0.5,
    maximum: float = 30.0,
) -> T:
    """fn(), retried on transient errors up to max_retries times; psycopg errors come out translated."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "transient_error_retrying",
            step=what,
            attempt=state.attempt_number,
            max_retries=max_retries,
            sleep_secs=round(state.upcoming_sleep, 2),
            error=str(exc).splitlines()[0] if exc else None,
        )
        if on_retry is not None and exc is not None:
            on_retry(exc)

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(max_retries + 1),
        wait=wait_random_exponential(multiplier=initial, max=maximum),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(fn)
    except (psycopg.Error, PoolTimeout) as exc:
        raise translate(exc) from exc
