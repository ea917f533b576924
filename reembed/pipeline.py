"""The embedding phase: read the next batch, encode this one, commit the previous one.

Three stages, each on its own connection or device, overlap through bounded queues:

    reader thread --q(2)--> encoder (main thread) --q(2)--> writer thread

The writer commits batches strictly in key order, each as ONE transaction holding the
vector writes and the checkpoint advance. So the checkpoint only ever names rows whose
vectors are committed, whatever dies when. At most 2 + 2 + 3 batches are in memory.
With `pipeline=False` the same stages run one after the other in the main thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog

from reembed import checkpoint as ckpt
from reembed import db, retry
from reembed.checkpoint import Cursor, Job
from reembed.embedder import Embedder
from reembed.errors import CheckpointConflict, LockHeld
from reembed.progress import Progress
from reembed.settings import RunOptions
from reembed.signals import StopSignal
from reembed.target import TableInfo
from reembed.writer import Batch, Reader, Writer

log = structlog.get_logger()

_END = object()
_QUEUE_DEPTH = 2
_POLL = 0.1


class EmbedPhase:
    def __init__(
        self,
        conninfo: str,
        info: TableInfo,
        job: Job,
        embedder: Embedder,
        opts: RunOptions,
        stop: StopSignal,
        lock: db.TableLock,
        *,
        deadline: float | None = None,
        write_path: str | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.info = info
        self.job = job
        self.embedder = embedder
        self.opts = opts
        self.stop = stop
        self.lock = lock
        self.deadline = deadline
        self.write_path = write_path
        self.rows_updated = 0
        self.rows_skipped = 0
        self.rows_failed = 0
        self.completed = False
        self.secs = 0.0  # wall time of the embedding phase in this run
        self._errors: list[BaseException] = []
        self._abort = threading.Event()
        self._rate: float | None = None

    # ----------------------------------------------------------------- driver

    def run(self) -> None:
        control = db.connect(self.conninfo, role="cursor", autocommit=True)
        try:
            cursors = [c for c in ckpt.cursors(control, self.job) if not c.done]
            total = self.job.row["rows_total"]
            done = sum(c.rows_done + c.rows_skipped for c in ckpt.cursors(control, self.job))
        finally:
            control.close()
        if not cursors:
            self.completed = True
            return
        self.cursor = cursors[0]  # one range per job today; ranges are claimed in order
        self.progress = Progress(total=total, done=done, interval=self.opts.progress_interval)
        self.reader_conn = db.connect(self.conninfo, role="reader", autocommit=True)
        self.writer_conn = db.connect(self.conninfo, role="writer", autocommit=True)
        self.reader = Reader(self.reader_conn, self.info, batch_size=self.opts.batch_size, upper=self.cursor.upper_id)
        self.writer = self._make_writer()
        log.info("embedding_started", last_id=self.cursor.last_id, rows_done=done, rows_total=total)
        started = time.monotonic()
        try:
            if self.opts.pipeline:
                self._run_pipelined()
            else:
                self._run_serial()
        finally:
            self.secs = time.monotonic() - started
            self.progress.close()
            for conn in (self.reader_conn, self.writer_conn):
                conn.close()
        if self._errors:
            raise self._errors[0]

    def _make_writer(self) -> Writer:
        return Writer(self.writer_conn, self.info, **({"path": self.write_path} if self.write_path else {}))

    def _should_stop(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline and not self.stop.requested:
            log.warning("time_budget_reached", detail="committing the batch in flight, then stopping")
            self.stop.request("time_budget")
        return self.stop.requested or self._abort.is_set()

    # --------------------------------------------------------------- stages

    def _read(self, after: str | None, seq: int) -> Batch | None:
        def attempt() -> Batch | None:
            return self.reader.read(after, seq)

        batch = retry.call(attempt, what="read_batch", max_retries=self.opts.max_retries, on_retry=self._reconnect_reader)
        log.debug("batch_read", seq=seq, rows=len(batch.ids) if batch else 0)
        return batch

    def _encode(self, batch: Batch) -> Batch:
        present = [i for i, t in enumerate(batch.texts) if t is not None]
        vectors: list[np.ndarray | None] = [None] * len(batch.texts)
        if present:
            encoded = self.embedder.encode([batch.texts[i] for i in present])  # type: ignore[misc]
            for slot, vec in zip(present, encoded, strict=True):
                vectors[slot] = vec
        batch.vectors = vectors
        log.debug("batch_encoded", seq=batch.seq, rows=len(present))
        return batch

    def _commit(self, batch: Batch) -> None:
        assert batch.vectors is not None
        skipped = batch.skipped
        rows = len(batch.ids) - skipped
        started = time.monotonic()

        def attempt() -> None:
            if self._already_committed(batch):
                return
            with self.writer_conn.transaction():
                self.writer.write(batch.ids, batch.vectors)  # type: ignore[arg-type]
                ckpt.advance(self.writer_conn, self.cursor, to_id=batch.last_id, rows=rows, skipped=skipped, rate=self._rate)
                ckpt.heartbeat(self.writer_conn, self.job, db.holder_name())

        retry.call(attempt, what="commit_batch", max_retries=self.opts.max_retries, on_retry=self._reconnect_writer)
        self.cursor.last_id = batch.last_id
        self.cursor.rows_done += rows
        self.cursor.rows_skipped += skipped
        self.rows_updated += rows
        self.rows_skipped += skipped
        self.progress.advance(len(batch.ids))
        self._rate = self.progress.rate
        log.debug(
            "batch_committed",
            seq=batch.seq,
            rows=rows,
            skipped=skipped,
            last_id=batch.last_id,
            commit_secs=round(time.monotonic() - started, 4),
        )

    def _finish(self) -> None:
        """Every row is done: close the range and hand the job to finalize, in one transaction."""

        def attempt() -> None:
            with self.writer_conn.transaction():
                ckpt.finish_range(self.writer_conn, self.cursor)
                ckpt.set_state(self.writer_conn, self.job, to="finalizing", from_state="embedding")

        retry.call(attempt, what="finish_embedding", max_retries=self.opts.max_retries, on_retry=self._reconnect_writer)
        self.completed = True
        log.info("embedding_complete", rows_updated=self.rows_updated, rows_skipped=self.rows_skipped)

    # ------------------------------------------------------------ reconnects

    def _already_committed(self, batch: Batch) -> bool:
        """After a lost connection, did the commit land before the connection went?"""
        row = self.writer_conn.execute(
            "SELECT last_id FROM reembed_checkpoint_range WHERE job_id = %s AND range_no = %s",
            (self.cursor.job_id, self.cursor.range_no),
        ).fetchone()
        last = row["last_id"] if row else None
        if last == batch.last_id:
            return True
        if last != self.cursor.last_id:
            raise CheckpointConflict(self.cursor.job_id, self.cursor.last_id)
        return False

    def _reconnect_reader(self, exc: BaseException) -> None:
        if self.reader_conn.closed or self.reader_conn.broken:
            self.reader_conn = db.reconnect(self.conninfo, role="reader", autocommit=True)
            self.reader.conn = self.reader_conn

    def _reconnect_writer(self, exc: BaseException) -> None:
        if self.writer_conn.closed or self.writer_conn.broken:
            self.writer_conn = db.reconnect(self.conninfo, role="writer", autocommit=True)
            self.writer = self._make_writer()
            self._ensure_lock()

    def _ensure_lock(self) -> None:
        """After a reconnect the lock's connection may have gone too: take the lock again."""
        if self.lock.alive():
            return
        self.lock.release()
        try:
            fresh = db.try_lock(self.conninfo, self.info.oid, table=self.info.qualified)
        except LockHeld:
            log.error("lock_lost", detail="another run took the lock while we were disconnected")
            raise
        self.lock.conn, self.lock.key = fresh.conn, fresh.key
        log.warning("lock_reacquired")

    # ------------------------------------------------------------- schedules

    def _run_serial(self) -> None:
        after, seq = self.cursor.last_id, 0
        while not self._should_stop():
            batch = self._read(after, seq)
            if batch is None:
                self._finish()
                return
            self._commit(self._encode(batch))
            after, seq = batch.last_id, seq + 1

    def _run_pipelined(self) -> None:
        to_encode: queue.Queue[Any] = queue.Queue(_QUEUE_DEPTH)
        to_write: queue.Queue[Any] = queue.Queue(_QUEUE_DEPTH)
        reader = threading.Thread(target=self._guard, args=(self._reader_loop, to_encode), name="reembed-reader", daemon=True)
        writer = threading.Thread(target=self._guard, args=(self._writer_loop, to_write), name="reembed-writer", daemon=True)
        reader.start()
        writer.start()
        try:
            while True:
                if self._should_stop():
                    break
                item = self._get(to_encode)
                if item is None:
                    continue
                if item is _END:
                    self._put(to_write, _END)
                    break
                self._put(to_write, self._encode(item))
        except BaseException as exc:
            self._abort.set()
            if not isinstance(exc, Exception):
                # Stopped / KeyboardInterrupt: leave at once; cancel the writer's statement
                # so its open transaction rolls back (the checkpoint stays where it was).
                with contextlib.suppress(Exception):
                    self.writer_conn.cancel_safe()
                raise
            self._errors.append(exc)
        if self.stop.requested or self._abort.is_set():
            self._put(to_write, _END, force=True)
        writer.join()
        self._abort.set()  # the reader may be blocked on a full queue
        reader.join()

    def _guard(self, loop: Callable[[queue.Queue[Any]], None], q: queue.Queue[Any]) -> None:
        try:
            loop(q)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._errors.append(exc)
            self._abort.set()

    def _reader_loop(self, out: queue.Queue[Any]) -> None:
        after, seq = self.cursor.last_id, 0
        while not (self.stop.requested or self._abort.is_set()):
            batch = self._read(after, seq)
            if not self._put(out, _END if batch is None else batch):
                return
            if batch is None:
                return
            after, seq = batch.last_id, seq + 1

    def _writer_loop(self, inbox: queue.Queue[Any]) -> None:
        while True:
            try:
                item = inbox.get(timeout=_POLL)
            except queue.Empty:
                if self._abort.is_set():
                    return
                continue
            if item is _END:
                if not (self.stop.requested or self._abort.is_set()):
                    self._finish()
                return
            if self._abort.is_set():
                return
            self._commit(item)
            if self.stop.requested:
                return  # the batch in flight is committed; the rest stays for the next run

    def _get(self, q: queue.Queue[Any]) -> Any:
        try:
            return q.get(timeout=_POLL)
        except queue.Empty:
            return None

    def _put(self, q: queue.Queue[Any], item: Any, *, force: bool = False) -> bool:
        while True:
            if not force and (self._abort.is_set() or (self.stop.requested and item is not _END)):
                return False
            try:
                q.put(item, timeout=_POLL)
                return True
            except queue.Full:
                if force:
                    try:
                        q.get_nowait()  # drop an uncommitted batch to make room for the end mark
                    except queue.Empty:
                        pass
                continue

