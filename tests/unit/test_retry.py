"""Transient database faults are retried up to their bound and then surface; permanent ones are not
retried (reembed.retry, no database needed)."""

from __future__ import annotations

import psycopg
import pytest

from reembed import retry
from reembed.errors import DatabaseError


@pytest.mark.parametrize(
    "exc",
    [psycopg.errors.SerializationFailure("x"), psycopg.errors.DeadlockDetected("x"),
     psycopg.errors.LockNotAvailable("x"), psycopg.OperationalError("server closed the connection")],
    ids=["serialization", "deadlock", "lock-timeout", "connection-lost"],
)
def test_transient_errors_are_retried_up_to_the_bound_then_surface(exc: Exception) -> None:
    calls = {"n": 0}

    def always() -> None:
        calls["n"] += 1
        raise exc

    with pytest.raises(DatabaseError) as raised:
        retry.call(always, what="x", max_retries=2, initial=0.001, maximum=0.01)
    assert calls["n"] == 3 and raised.value.retryable and raised.value.__cause__ is exc


def test_a_permanent_error_is_not_retried() -> None:
    calls = {"n": 0}

    def broken() -> None:
        calls["n"] += 1
        raise psycopg.errors.UndefinedTable("nope")

    with pytest.raises(DatabaseError) as raised:
        retry.call(broken, what="x", max_retries=5, initial=0.001)
    assert calls["n"] == 1 and not raised.value.retryable
