"""The bounded cut-over's tries when its locks are refused (reembed.cutover, no database needed):
between refused tries the backlog is written and settled with no lock; after its patience it
gives up with one error that names who held the locks, nothing of it committed."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from reembed import capture
from reembed.cutover import Bound, CutOver
from reembed.errors import DatabaseError
from reembed.signals import StopSignal


class _Rows:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def fetchall(self) -> list[dict[str, Any]]:
        return self.rows

    def fetchone(self) -> dict[str, Any]:
        return self.rows[0]


class _Conn:
    """Answers the refusals' queries: whether writes are blocked (no), and who holds the locks."""

    def execute(self, statement: Any, params: Any = None) -> _Rows:
        if "rewrite" not in (params or {}):
            return _Rows([{"blocked": False}])
        return _Rows([{"pid": 4242, "backend_type": "autovacuum worker", "state": "active", "open_secs": 431.5,
                       "mode": "ShareUpdateExclusiveLock", "relation": "knowledge_nodes",
                       "query": "autovacuum: VACUUM public.knowledge_nodes"}])


class _Source:
    """A backlog of two keys; the hold refused `refusals` times, then granted."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.holds = self.written_ahead = self.finals = 0

    def backlog(self, conn: Any, ahead: capture.Encoded) -> capture.Backlog:
        return capture.Backlog(2, 0, [])

    def encode_ahead(self, work: capture.Backlog, known: capture.Encoded) -> tuple[capture.Encoded, int]:
        return {}, 0

    def write_ahead(self, work: capture.Backlog, ahead: capture.Encoded) -> int:
        self.written_ahead += 1
        return work.keys

    def final(self, conn: Any, ahead: capture.Encoded, work: capture.Backlog) -> int:
        self.finals += 1
        return work.keys

    def hold(self, conn: Any) -> float:
        self.holds += 1
        if self.holds <= self.refusals:
            raise psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")
        return time.monotonic()

    def locked(self) -> list[tuple[int, bool]]:
        return [(16384, False)]


def _cut(source: _Source, patience: float, landed: Any = None) -> Any:
    swapped: list[bool] = []
    held = CutOver().run(source, bound=Bound(1.0), stop=StopSignal(), read=lambda body: body(_Conn()),
                         transaction=lambda body: body(_Conn()), swap=lambda conn: swapped.append(True),
                         record=lambda conn, secs: None, patience=patience, landed=landed)
    return held, swapped


def test_a_cut_over_that_landed_already_is_found_under_the_hold_and_not_done_again() -> None:
    """A retry after a lost acknowledgement: the first try's commit may still be in flight when the
    retry starts (not visible yet), so it is asked for under the hold, and after a refused try."""
    answers = iter([None, 0.4])  # not visible after the refusal; visible under the next try's hold
    source = _Source(refusals=1)
    held, swapped = _cut(source, patience=60.0, landed=lambda conn: next(answers))
    assert held.secs == 0.4 and held.rows == 0 and swapped == [] and source.finals == 0 and source.holds == 2


def test_refused_locks_are_tried_again_after_the_backlog_is_written_with_no_lock() -> None:
    source = _Source(refusals=3)
    held, swapped = _cut(source, patience=60.0)
    assert source.holds == 4 and source.written_ahead == 3  # one write ahead after each refusal
    assert source.finals == 1 and swapped == [True] and held.tries == 4


def test_locks_refused_past_the_patience_give_up_naming_the_holder_with_nothing_swapped() -> None:
    source = _Source(refusals=10**6)
    with pytest.raises(DatabaseError) as raised:
        _cut(source, patience=0.5)
    message = str(raised.value)
    assert "not granted" in message and "pid 4242 (autovacuum worker" in message, message
    assert "ShareUpdateExclusiveLock on knowledge_nodes" in message and "nothing of it was committed" in message
    assert not raised.value.retryable and isinstance(raised.value.__cause__, psycopg.errors.LockNotAvailable)
    assert source.finals == 0 and source.holds >= 2 and source.written_ahead == source.holds - 1


class _HotSource(_Source):
    """An application editing 300 hot keys as fast as they are read: every read finds them all changed
    (unencoded), until what was encoded is written and settled; the writes are slow (an index on the
    column written)."""

    def __init__(self) -> None:
        super().__init__(refusals=0)
        self.reads = 0

    def backlog(self, conn: Any, ahead: capture.Encoded) -> capture.Backlog:
        self.reads += 1
        if self.reads > 50:
            raise AssertionError("the cut-over encoded ahead 50 times and never wrote: the backlog cannot shrink")
        return capture.Backlog(5, 0, []) if self.written_ahead else capture.Backlog(300, 300, [])

    def encode_ahead(self, work: capture.Backlog, known: capture.Encoded) -> tuple[capture.Encoded, int]:
        return {}, work.unencoded


def test_a_hot_set_edited_faster_than_the_backlog_settles_is_written_ahead_not_only_encoded() -> None:
    source = _HotSource()
    cut = CutOver()
    for _ in range(4):
        cut.writes.measured(300, 3.0)  # the catch-up's commits: 100 rows/s
    held = cut.run(source, bound=Bound(1.0), stop=StopSignal(), read=lambda body: body(_Conn()),
                   transaction=lambda body: body(_Conn()), swap=lambda conn: None, record=lambda conn, secs: None)
    assert source.written_ahead >= 1 and source.finals == 1 and held.rows == 5


class _BlockedConn(_Conn):
    """Another session holds a lock that keeps writers off (SHARE or stronger)."""

    def execute(self, statement: Any, params: Any = None) -> _Rows:
        if "rewrite" not in (params or {}):
            return _Rows([{"blocked": True}])
        return super().execute(statement, params)


class _BigSource(_Source):
    """A backlog whose writes alone run past the bound, its rows all encoded ahead."""

    def __init__(self) -> None:
        super().__init__(refusals=0)
        self.reads = 0

    def backlog(self, conn: Any, ahead: capture.Encoded) -> capture.Backlog:
        self.reads += 1
        return capture.Backlog(100_000, 0, [])


def test_writers_kept_off_by_another_lock_are_waited_for_as_a_refused_lock_not_spun_on() -> None:
    source = _BigSource()
    with pytest.raises(DatabaseError, match="writers kept off by another session's lock"):
        CutOver().run(source, bound=Bound(1.0), stop=StopSignal(), read=lambda body: body(_BlockedConn()),
                      transaction=lambda body: body(_BlockedConn()), swap=lambda conn: None,
                      record=lambda conn, secs: None, patience=1.0)
    assert source.written_ahead == 0 and source.holds == 0
    assert source.reads < 60, source.reads  # paused between reads (it read 17,220 times a second)
