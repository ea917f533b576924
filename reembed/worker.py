"""A worker: claims a range of the job's key space, embeds it batch by batch, and advances
that range's cursor. Today one worker runs one range, in the coordinator's process; the
shape is the one several workers on several hosts will share (pgai's Executor: one worker
shape, many instances, no special first worker).

One batch's path, as a chain of stages (reembed.stages) with bounded channels:

    read (thread) -> tokenize (executor, results in order) -> forward (caller's thread,
    the device) -> write (thread)

The write commits each batch's vectors and the range's cursor advance in ONE fenced
transaction, strictly in key order, and the advance names this worker's claim (a range
claimed by someone else cannot be moved by us). So the checkpoint only ever names rows whose
vectors are committed, whatever dies when. At most depth x 3 + 3 batches are in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
import structlog

from reembed import checkpoint as ckpt
from reembed import db, failures
from reembed.batches import Batch, Reader, Writer
from reembed.errors import CheckpointConflict
from reembed.progress import Progress
from reembed.stages import Chain, Step

if TYPE_CHECKING:
    from reembed.context import RunContext

log = structlog.get_logger()

_DEPTH = 2


class Worker:
    def __init__(self, ctx: RunContext, *, number: int = 0) -> None:
        self.ctx = ctx
        self.name = f"{db.holder_name()}/{number}"
        self.rows_updated = 0
        self.rows_skipped = 0
        self.rows_failed = 0
        self.secs = 0.0  # wall time spent embedding in this run

    def run(self) -> None:
        """Claim ranges until none is left, the run is asked to stop, or a batch fails."""
        ctx = self.ctx
        started = time.monotonic()
        reader, writer = ctx.connections.hold("reader"), ctx.connections.hold("writer")
        progress: Progress | None = None
        try:
            while not ctx.stop.requested:
                rng = ctx.lease.write(lambda conn: ckpt.claim(conn, ctx.active, self.name),
                                      on=writer, what="claim_range")
                if rng is None:
                    return
                if progress is None:
                    progress = self._progress(writer)
                log.info("embedding_started", range_no=rng.range_no, last_id=rng.last_id, worker=self.name,
                         rows_done=progress.done, rows_total=progress.total)
                _RangeRun(self, rng, reader, writer, progress).run()
        finally:
            self.secs += time.monotonic() - started
            if progress is not None:
                progress.close()
            reader.release()
            writer.release()

    def _progress(self, writer: db.Held) -> Progress:
        ranges = self.ctx.lease.read(lambda conn: ckpt.ranges(conn, self.ctx.active), on=writer, what="read_ranges")
        done = sum(r.rows_done + r.rows_skipped for r in ranges)
        return Progress(total=self.ctx.active.rows_total, done=done, interval=self.ctx.opts.progress_interval)


class _RangeRun:
    """One claimed range, through the stages."""

    def __init__(self, worker: Worker, rng: ckpt.Range, reader: db.Held, writer: db.Held, progress: Progress):
        self.worker = worker
        self.ctx = worker.ctx
        self.rng = rng
        self.reader_conn = reader
        self.writer_conn = writer
        self.progress = progress
        self.reader = Reader(self.ctx.info, batch_size=self.ctx.opts.batch_size, upper=rng.upper_id)
        self.writer = Writer(self.ctx.info, column=self.ctx.strategy.column(self.ctx),
                             **({"path": self.ctx.write_path} if self.ctx.write_path else {}))

    def run(self) -> None:
        chain = Chain(self.ctx.stop, depth=_DEPTH)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reembed-tokenize") as tokenizers:
            source = self._source(tokenizers)
            steps = [Step("forward", self._forward, on_caller=True), Step("write", self._commit)]
            if self.ctx.opts.pipeline:
                chain.run(source, steps, on_end=self._finish, on_abort=self.writer_conn.cancel)
            else:
                chain.run_serial(source, steps, on_end=self._finish)
        if chain.errors:
            raise chain.errors[0]

    # --------------------------------------------------------------- stages

    def _source(self, tokenizers: Executor) -> Iterator[tuple[Batch, Future[Any] | None]]:
        after, seq = self.rng.last_id, 0
        while not self.ctx.stop.requested:
            batch = self.ctx.lease.read(lambda conn: self.reader.read(conn, after, seq),  # noqa: B023
                                        on=self.reader_conn, what="read_batch")
            log.debug("batch_read", seq=seq, rows=len(batch.ids) if batch else 0)
            if batch is None:
                return
            texts = [batch.texts[i] for i in batch.present]
            yield batch, tokenizers.submit(self.ctx.embedder.tokenize, texts) if texts else None
            after, seq = batch.last_id, seq + 1

    def _forward(self, item: tuple[Batch, Future[Any] | None]) -> Batch:
        batch, tokenized = item
        present = batch.present
        vectors: list[np.ndarray | None] = [None] * len(batch.texts)
        if tokenized is not None:
            try:
                encoded = self.ctx.embedder.forward(tokenized.result())
                for slot, vec in zip(present, encoded, strict=True):
                    vectors[slot] = vec
            except Exception:  # noqa: BLE001 - narrowed down to the rows the model cannot take
                failures.encode_isolating(self.ctx.embedder, batch.texts, present, vectors, batch.failed)
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
        """The batch's vectors where each row is unchanged since the read, the rows that changed
        recorded for catch-up (not counted as done), the failed rows, the cursor: one transaction."""
        assert batch.vectors is not None
        ctx, rng, worker = self.ctx, self.rng, self.worker
        started = time.monotonic()
        attempts = 0
        counts = (0, 0)

        def body(conn: psycopg.Connection[Any]) -> None:
            nonlocal attempts, counts
            attempts += 1
            if attempts > 1 and self._already_committed(conn, batch):
                # It landed before the connection went; what it wrote is not known here (the
                # rows that had changed are in reembed_changes either way): count it as read.
                counts = (len(batch.present) - len(batch.failed), batch.skipped)
                return
            written = self.writer.write(conn, batch.ids, batch.vectors, batch.xmins)  # type: ignore[arg-type]
            changed = [t for t in batch.id_texts if t not in written]
            ckpt.record_changed(conn, ctx.active, changed)
            if batch.failed:
                failures.record(conn, ctx.active, batch)
            rows = sum(1 for i, t in enumerate(batch.id_texts)
                       if t in written and batch.texts[i] is not None and i not in batch.failed)
            skipped = sum(1 for i, t in enumerate(batch.id_texts) if t in written and batch.texts[i] is None)
            ckpt.advance(conn, rng, to_id=batch.last_id, rows=rows, skipped=skipped, rate=self.progress.rate)
            counts = (rows, skipped)
            if changed:
                log.info("rows_changed_under_the_job", count=len(changed), ids=changed[:10],
                         detail="not overwritten; re-embedded by catch-up")

        ctx.lease.write(body, on=self.writer_conn, what="commit_batch")
        rows, skipped = counts
        rng.last_id = batch.last_id
        rng.rows_done += rows
        rng.rows_skipped += skipped
        worker.rows_updated += rows
        worker.rows_skipped += skipped
        worker.rows_failed += len(batch.failed)
        self.progress.advance(len(batch.ids))
        log.debug("batch_committed", seq=batch.seq, rows=rows, skipped=skipped, last_id=batch.last_id,
                  commit_secs=round(time.monotonic() - started, 4))

    def _finish(self) -> None:
        """Every row of the range is done: close it."""
        self.ctx.lease.write(lambda conn: ckpt.finish_range(conn, self.rng), on=self.writer_conn, what="finish_range")
        log.info("range_complete", range_no=self.rng.range_no, rows_done=self.rng.rows_done)

    def _already_committed(self, conn: psycopg.Connection[Any], batch: Batch) -> bool:
        """On a retry after a lost connection: did the commit land before the connection went?"""
        last = ckpt.committed_cursor(conn, self.rng)
        if last == batch.last_id:
            return True
        if last != self.rng.last_id:
            raise CheckpointConflict(self.rng.job_id, self.rng.last_id)
        return False
