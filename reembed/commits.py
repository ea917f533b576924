"""One batch's commit, and several writers' order of commits.

`commit_batch` is the one shape of a batch's transaction, whoever writes it (the main pass,
a catch-up pass, the retry of failed rows): the vectors where each row is unchanged since the
read, the captured keys it settles forgotten, the keys that changed under it recorded for
catch-up, the rows the model could not take recorded (and those it now could, forgotten), then
the caller's cursor advance. All inside the caller's one transaction: a crash anywhere leaves
all of it or none.

Several writers:

One connection writes ~15,000 vectors a second (768-d, binary COPY + UPDATE); a GPU encodes
more. `Writers` runs each batch's transaction on one of `count` connections at once (the
COPY and the UPDATE, the slow part, overlap), but a batch advances the range's cursor and
commits only after every batch before it committed (`Turns`): the checkpoint never names a
row whose vector is not committed. The batches' rows are disjoint key ranges, so the writers
never wait on each other's row locks; a batch waiting for its turn holds only its own rows.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg

from reembed import checkpoint as ckpt
from reembed import db
from reembed.batches import Batch, Writer
from reembed.checkpoint import Job
from reembed.errors import DatabaseError, InternalError
from reembed.queries import query

NULL_IN_NOT_NULL = ("its text is NULL and {column} is NOT NULL: give it text and --retry-failed, or run with "
                    "--null-content empty")


def fail_null_vectors(batch: Batch, writer: Writer) -> None:
    """For a NOT NULL column: each row the batch has no vector for (its text is NULL) is a failed row."""
    if batch.vectors is None or not writer.not_null:
        return
    for i, vec in enumerate(batch.vectors):
        if vec is None and i not in batch.failed:
            batch.failed[i] = NULL_IN_NOT_NULL.format(column=writer.info.column)


@dataclass(frozen=True)
class Written:
    """What one batch's commit wrote."""

    keys: set[str]  # the text form of the keys whose vector (or NULL) was written
    changed: list[str]  # keys that changed under the batch: not written, recorded for catch-up
    encoded: list[str]  # keys written with the model's vector, or NULL for NULL content
    rows: int  # of those, the rows with content
    skipped: int  # the rows written NULL for NULL content


def commit_batch(conn: psycopg.Connection[Any], job: Job, writer: Writer, batch: Batch, *,
                 settles: Sequence[str] = (), write_failed: bool = True, forget_failed: Sequence[str] | None = None,
                 advance: Callable[[psycopg.Connection[Any], Written], None] | None = None) -> Written:
    """One batch, inside the caller's transaction (see the module's docstring).

    `settles`: captured keys this batch re-embeds, forgotten before the keys that changed again
    are recorded anew. `write_failed`: the rows the model could not take are written NULL (a
    retry leaves them as they are). `forget_failed`: rows leave reembed_failed_rows once encoded,
    with these keys besides (None: the main pass, whose rows were never there). `advance`: the
    caller's cursor, moved last."""
    if batch.vectors is None:
        raise InternalError(f"batch {batch.seq} reached its commit unencoded")
    if writer.not_null:  # a NOT NULL column takes no NULL: a row without a vector fails, and is not written
        fail_null_vectors(batch, writer)
        write_failed = False
    if write_failed or not batch.failed:  # every row (the main pass): no copies on the hot path
        rows: Sequence[int] = range(len(batch.ids))
        keys = writer.write(conn, batch.ids, batch.vectors, batch.xmins, id_texts=batch.id_texts)
    else:
        rows = [i for i in range(len(batch.ids)) if i not in batch.failed]
        keys = writer.write(conn, [batch.ids[i] for i in rows], [batch.vectors[i] for i in rows],
                            [batch.xmins[i] for i in rows], id_texts=[batch.id_texts[i] for i in rows])
    gone: list[str] = []  # settled keys whose rows were deleted when read: forgotten if still gone
    if settles:  # (the main pass settles nothing: no work on its path)
        read = set(batch.id_texts)
        gone = [key for key in settles if key not in read]
        present = [key for key in settles if key in read]
        if present:
            conn.execute(query("forget_changes"), {"job_id": job.id, "row_ids": present})
        if gone:
            conn.execute(writer.info.statement("forget_changes_if_gone"), {"job_id": job.id, "row_ids": gone})
    changed = [batch.id_texts[i] for i in rows if batch.id_texts[i] not in keys]
    ckpt.record_changed(conn, job, changed)
    if batch.failed:
        ckpt.record_failed(conn, job, {batch.id_texts[i]: why for i, why in batch.failed.items()})
    encoded = [t for i, t in enumerate(batch.id_texts) if t in keys and i not in batch.failed]
    if forget_failed is not None:  # and the keys gone when read: a row deleted is no failed row of the job
        ckpt.forget_failed(conn, job, encoded + list(forget_failed) + gone)
    written = Written(
        keys=keys, changed=changed, encoded=encoded,
        rows=sum(1 for i, t in enumerate(batch.id_texts)
                 if t in keys and batch.texts[i] is not None and i not in batch.failed),
        skipped=sum(1 for i, t in enumerate(batch.id_texts) if t in keys and batch.texts[i] is None),
    )
    if advance is not None:
        advance(conn, written)
    return written


class TurnTimedOut(DatabaseError):
    """A batch waited too long for its turn with its rows locked: rolled back, tried again."""


class TurnCancelled(Exception):
    """Another writer failed or the run stopped at once: this batch's transaction rolls back."""


class Turns:
    """Batch `seq` may commit once batches ..seq-1 did."""

    def __init__(self, first: int = 0) -> None:
        self._next = first
        self._cond = threading.Condition()
        self._cancelled = False

    def wait(self, seq: int, *, timeout: float | None = None) -> None:
        """Until batch `seq` may commit. `timeout`: a batch that waits holding its rows (inside its
        transaction) gives up after this long (TurnTimedOut, transient: its transaction rolls back,
        its rows are free again, and it is tried again, waiting its turn first with nothing held):
        an application transaction that holds a row of an earlier batch and waits for one of this
        batch's is never stuck behind reembed for longer."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._next != seq and not self._cancelled:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TurnTimedOut(f"batch {seq} waited {timeout:g} s for its turn holding its rows; "
                                       "letting them go and trying again", retryable=True)
                self._cond.wait(left)
            if self._cancelled:
                raise TurnCancelled(f"batch {seq}: an earlier batch failed")

    def done(self, seq: int) -> None:
        with self._cond:
            self._next = seq + 1
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()


class Writers:
    """`count` writer connections; `submit` returns once fewer than `count` batches are in flight."""

    def __init__(self, connections: db.Connections, count: int) -> None:
        self.count = count
        self.conns = [connections.hold("writer" if i == 0 else f"writer-{i}") for i in range(count)]
        self._free: queue.SimpleQueue[db.Held] = queue.SimpleQueue()
        for conn in self.conns:
            self._free.put(conn)
        self._executor = ThreadPoolExecutor(count, thread_name_prefix="reembed-write") if count > 1 else None
        self._inflight: deque[Future[None]] = deque()
        self.turns = Turns()

    @property
    def primary(self) -> db.Held:
        """The connection of the worker's own statements (claims, range ends)."""
        return self.conns[0]

    def start(self, first: int = 0) -> None:
        self.turns = Turns(first)

    def submit(self, commit: Callable[[Any, db.Held], None], batch: Any) -> None:
        if self._executor is None:
            commit(batch, self.primary)
            return
        self._inflight.append(self._executor.submit(self._on_a_free_connection, commit, batch))
        while len(self._inflight) >= self.count:
            self._inflight.popleft().result()

    def drain(self) -> None:
        """Wait for every batch in flight; the first failure is raised."""
        while self._inflight:
            self._inflight.popleft().result()

    def abort(self) -> None:
        """A failure or a second Ctrl-C: every open transaction rolls back, none waits for a turn."""
        self.turns.cancel()
        for conn in self.conns:
            conn.cancel()
        while self._inflight:
            try:
                self._inflight.popleft().result()
            except Exception:  # noqa: BLE001 - the first failure is the one reported
                pass

    def release(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        for conn in self.conns:
            conn.release()

    def _on_a_free_connection(self, commit: Callable[[Any, db.Held], None], batch: Any) -> None:
        conn = self._free.get()
        try:
            commit(batch, conn)
        finally:
            self._free.put(conn)
