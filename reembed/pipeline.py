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
from reembed import db, failures, retry
from reembed.checkpoint import Job
from reembed.embedder import Embedder
from reembed.errors import CheckpointConflict
from reembed.lease import LockKeeper
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
        keeper: LockKeeper,
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
        self.keeper = keeper
        self.deadline = deadline
        self.write_path = write_path
        self.rows_updated = 0
        self.rows_skipped = 0
        self.rows_failed = 0
        self.secs = 0.0  # wall time of the embedding phase in this run
        self._errors: list[BaseException] = []
        self._abort = threading.Event()
        self._rate: float | None = None
        self._deadline_lock = threading.Lock()

    # ----------------------------------------------------------------- driver

    def run(self) -> None:
        self.reader_session = db.Session(self.conninfo, role="reader")
        self.writer_session = db.Session(self.conninfo, role="writer")
        self._reader: Reader | None = None
        self._writer: Writer | None = None
        cursors = ckpt.cursors(self.writer_session.get(), self.job)
        open_cursors = [c for c in cursors if not c.done]
        if not open_cursors:
            self.writer_session.close()
            return
        self.cursor = open_cursors[0]  # one range per job today; ranges are claimed in order
        total = self.job.row["rows_total"]
        done = sum(c.rows_done + c.rows_skipped for c in cursors)
        self.progress = Progress(total=total, done=done, interval=self.opts.progress_interval)
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
            self.reader_session.close()
            self.writer_session.close()
        if self._errors:
            raise self._errors[0]

    def reader(self) -> Reader:
        """The reader on a live connection (a new one after a lost connection)."""
        conn = self.reader_session.get()
        if self._reader is None or self._reader.conn is not conn:
            self._reader = Reader(conn, self.info, batch_size=self.opts.batch_size, upper=self.cursor.upper_id)
        return self._reader

    def writer(self) -> Writer:
        conn = self.writer_session.get()
        if self._writer is None or self._writer.conn is not conn:
            if self._writer is not None:  # reconnected: is the lock still ours?
                self.keeper.ensure()
            self._writer = Writer(conn, self.info, **({"path": self.write_path} if self.write_path else {}))
        return self._writer

    def _should_stop(self) -> bool:
        self._check_deadline()
        return self.stop.requested or self._abort.is_set()

    def _check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            with self._deadline_lock:  # the reader and the encoder both look
                if not self.stop.requested:
                    log.warning("time_budget_reached", detail="committing the batch in flight, then stopping")
                    self.stop.request("time_budget")

    # --------------------------------------------------------------- stages

    def _read(self, after: str | None, seq: int) -> Batch | None:
        def attempt() -> Batch | None:
            return self.reader().read(after, seq)

        batch = retry.call(attempt, what="read_batch", max_retries=self.opts.max_retries)
        log.debug("batch_read", seq=seq, rows=len(batch.ids) if batch else 0)
        return batch

    def _encode(self, batch: Batch) -> Batch:
        present = [i for i, t in enumerate(batch.texts) if t is not None]
        vectors: list[np.ndarray | None] = [None] * len(batch.texts)
        if present:
            failures.encode_isolating(self.embedder, batch.texts, present, vectors, batch.failed)
        if batch.failed:
            log.warning(
                "rows_failed_to_encode",
                ids=[batch.id_texts[i] for i in batch.failed][:20],
                count=len(batch.failed),
                error=next(iter(batch.failed.values())),
                detail="recorded in reembed_failed_rows and skipped; see `reembed status`",
            )
        batch.vectors = vectors
        log.debug("batch_encoded", seq=batch.seq, rows=len(present))
        return batch

    def _commit(self, batch: Batch) -> None:
        assert batch.vectors is not None
        skipped = batch.skipped
        failed = len(batch.failed)
        rows = len(batch.ids) - skipped - failed
        started = time.monotonic()

        attempts = 0

        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            self.keeper.check()
            writer = self.writer()
            conn = writer.conn
            if attempts > 1 and self._already_committed(conn, batch):
                return
            with conn.transaction():
                writer.write(batch.ids, batch.vectors)  # type: ignore[arg-type]
                if batch.failed:
                    failures.record(conn, self.job, batch)
                ckpt.advance(conn, self.cursor, to_id=batch.last_id, rows=rows, skipped=skipped, rate=self._rate)
                self.keeper.fence(conn)

        retry.call(attempt, what="commit_batch", max_retries=self.opts.max_retries)
        self.cursor.last_id = batch.last_id
        self.cursor.rows_done += rows
        self.cursor.rows_skipped += skipped
        self.rows_updated += rows
        self.rows_skipped += skipped
        self.rows_failed += failed
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
            conn = self.writer_session.get()
            with conn.transaction():
                ckpt.finish_range(conn, self.cursor)
                ckpt.set_state(conn, self.job, to="finalizing", from_state="embedding")
                self.keeper.fence(conn)

        retry.call(attempt, what="finish_embedding", max_retries=self.opts.max_retries)
        log.info("embedding_complete", rows_updated=self.rows_updated, rows_skipped=self.rows_skipped)

    # ------------------------------------------------------------ reconnects

    def _already_committed(self, conn: Any, batch: Batch) -> bool:
        """On a retry after a lost connection: did the commit land before the connection went?"""
        row = conn.execute(
            "SELECT last_id FROM reembed_checkpoint_range WHERE job_id = %s AND range_no = %s",
            (self.cursor.job_id, self.cursor.range_no),
        ).fetchone()
        last = row["last_id"] if row else None
        if last == batch.last_id:
            return True
        if last != self.cursor.last_id:
            raise CheckpointConflict(self.cursor.job_id, self.cursor.last_id)
        return False

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
                    if self._writer is not None:
                        self._writer.conn.cancel_safe()
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
            self._check_deadline()  # a writer held up by an application's lock must not hide the window's end
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

