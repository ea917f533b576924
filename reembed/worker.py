"""A worker: claims ranges of the job's key space, embeds each batch by batch, and advances
that range's cursor. Every process of a job — the first run, the `--workers N` it starts, a
`reembed run` on another host — runs one worker of this shape (pgai's Executor: one worker
shape, many instances, no special first worker), holding the table's lock shared.

Claims (reembed.checkpoint.claim): an unclaimed range first, else a stale claim — its holder's
lock backend is gone (the process died) or its heartbeat (the lease keeper beats the worker's
claims every 10 s) is older than the stale limit — taken over from its committed cursor. A
worker with nothing to claim asks the holder of the largest remaining range to split it, and
polls; the holder cuts it past what it has read (reembed.ranges). A worker whose claim was taken
over (ClaimLost: its commit found another name on the range) drops that range, having committed
nothing of the batch that found out, and claims another.

A window of batches (transactions) goes through a chain of stages (reembed.stages) with
bounded channels:

    read (thread; each batch's texts handed to the feed's tokenizers at once) -> encode
    (caller's thread, the device: reembed.feed sorts the window's rows by token length and
    cuts token-budget batches) -> write (thread)

The write commits each batch's vectors and the range's cursor advance in ONE fenced
transaction, strictly in key order, and the advance names this worker's claim (a range
claimed by someone else cannot be moved by us). So the checkpoint only ever names rows whose
vectors are committed, whatever dies when. A stop abandons the window being encoded (nothing
of it was written) and commits no more than the batch being written. At most depth x 3 + 3
windows are in memory.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import psycopg
import structlog

from reembed import checkpoint as ckpt
from reembed import db, failures, ranges
from reembed.batches import Batch, Reader, Writer
from reembed.commits import Turns, Writers, Written, commit_batch
from reembed.context import RunContext
from reembed.encoding import Feed, feed_for, is_device_fault
from reembed.errors import ClaimLost, ReembedError, first_line
from reembed.progress import Pace, Progress
from reembed.stages import Chain, Step

log = structlog.get_logger()

_DEPTH = 2
# A window (the rows sorted by length together) is closed at about this many seconds of the
# encoder's measured pace, and at --window-rows: on a slow device progress commits every few
# seconds (status moves, a stop loses little); on a fast one the windows stay large.
WINDOW_SECS = 2.0
DRY_POLL_SECS = 0.5  # a worker with nothing to claim looks again this often
TURN_WAIT_SECS = 5.0  # a batch waits for its turn this long at most with its rows locked
_PROCESS_TOKEN = secrets.token_hex(3)


class Worker:
    def __init__(self, ctx: RunContext, *, number: int = 0) -> None:
        self.ctx = ctx
        # host:pid and a token of this process: two containers on one host network may share a pid
        self.name = f"{db.holder_name()}.{_PROCESS_TOKEN}/{number}"
        self.rows_updated = 0
        self.rows_skipped = 0
        self.rows_failed = 0
        self.ranges = 0  # ranges claimed (taken over ones included)
        self.splits = 0  # splits made for other workers
        self.secs = 0.0  # wall time spent embedding in this run
        self.range_no: int | None = None  # the range held now
        self.state = "running"
        self.tokenizers: int | None = None  # --workers N: this host's share per worker (reembed.fleet)
        self._started = time.monotonic()

    @property
    def rate(self) -> float | None:
        secs = time.monotonic() - self._started
        return round(self.rows_updated / secs, 1) if secs > 0 else None

    def run(self) -> None:
        """Claim ranges until every range is done, the run is asked to stop, or a batch fails."""
        ctx = self.ctx
        started = self._started = time.monotonic()
        reader, writers = ctx.connections.hold("reader"), Writers(ctx.connections, ctx.writers)
        primary = writers.primary  # the connection of the worker's own statements
        progress: Progress | None = None
        feed: Feed | None = None
        clean = False
        ctx.lease.write(ckpt.join_worker, ctx.active.id, self.name, db.host_name(), db.process_id(),
                        str(ctx.embedder.device), on=primary, what="join_job")
        ctx.lease.on_beat(self._beat)
        structlog.contextvars.bind_contextvars(worker=self.name)
        try:
            while not ctx.stop.requested:
                rng = ctx.lease.write(self._claim, on=primary, what="claim_range")
                if rng is None:
                    if not self._dry(primary):
                        break
                    continue
                if progress is None or feed is None:
                    progress = self._progress(primary)
                    feed = feed_for(ctx.embedder, ctx.opts if self.tokenizers is None
                                    else replace(ctx.opts, tokenizer_workers=self.tokenizers))
                self.ranges += 1
                log.info("embedding_started", range_no=rng.range_no, last_id=rng.last_id, upper_id=rng.upper_id,
                         taken_over_from=rng.taken_from, rows_done=progress.done, rows_total=progress.total)
                try:
                    _RangeRun(self, rng, reader, writers, progress, feed).run()
                except ClaimLost as lost:
                    log.warning("claim_lost", range_no=rng.range_no, detail=str(lost) + "; claiming another")
                finally:
                    self.range_no = None
            clean = True
        finally:
            structlog.contextvars.unbind_contextvars("worker")
            if feed is not None:
                feed.close(now=not clean)  # a failure or a second Ctrl-C: no tokenizer process outlives us
            self.secs += time.monotonic() - started
            self.state = "done" if clean and not ctx.stop.requested else "stopped" if clean else "failed"
            self._leave(primary)
            if progress is not None:
                progress.close()
            reader.release()
            writers.release()

    def _claim(self, conn: psycopg.Connection[Any]) -> ckpt.Range | None:
        lease = self.ctx.lease
        rng = ckpt.claim(conn, self.ctx.active, self.name, pid=lease.backend_pid, key=lease.lock.key,
                         stale_secs=self.ctx.opts.stale_after)
        self.range_no = rng.range_no if rng is not None else None
        self.state = "running" if rng is not None else "dry"
        self._record(conn)
        return rng

    def _dry(self, conn: db.Held) -> bool:
        """Nothing to claim: False once every range is done; else ask for a split of the largest
        remaining range and wait a moment (True: claim again)."""
        ctx = self.ctx
        if not ctx.lease.read(ckpt.open_ranges, ctx.active, on=conn, what="open_ranges"):
            return False
        asked = ctx.lease.write(ckpt.request_split, ctx.active, 4 * ctx.opts.batch_size, on=conn,
                                what="request_split")
        if asked is not None:
            log.info("split_requested", range_no=asked)
        ctx.stop.wait(DRY_POLL_SECS)
        return True

    def _record(self, conn: psycopg.Connection[Any]) -> None:
        ckpt.beat_worker(conn, self.ctx.active.id, self.name, range_no=self.range_no, rows=self.rows_updated,
                         rate=self.rate, state=self.state)

    def _beat(self, conn: psycopg.Connection[Any], pid: int) -> None:
        """The lease keeper's heartbeat (every 10 s, on the lock's connection): our claims (with the
        backend that holds our lock now) and our row."""
        ckpt.beat_claims(conn, self.ctx.active.id, self.name, pid)
        self._record(conn)

    def _leave(self, conn: db.Held) -> None:
        """Best effort at the end: our claims let go (the cursors stay), our row's last state."""
        try:
            if self.ctx.lease.lost is None:
                self.ctx.lease.write(self._release, on=conn, what="release_claims")
        except ReembedError as exc:  # the claims go stale and are taken over anyway
            log.debug("claims_not_released", error=first_line(exc))

    def _release(self, conn: psycopg.Connection[Any]) -> None:
        ckpt.release_mine(conn, self.ctx.active.id, self.name)
        self._record(conn)

    def _progress(self, conn: db.Held) -> Progress:
        ranges = self.ctx.lease.read(ckpt.ranges, self.ctx.active, on=conn, what="read_ranges")
        done = sum(r.rows_done + r.rows_skipped for r in ranges)
        return Progress(total=self.ctx.active.rows_total, done=done, interval=self.ctx.opts.progress_interval,
                        listener=self.ctx.on_progress)


class _RangeRun:
    """One claimed range, through the stages."""

    def __init__(self, worker: Worker, rng: ckpt.Range, reader: db.Held, writers: Writers, progress: Progress,
                 feed: Feed) -> None:
        self.worker = worker
        self.feed = feed
        self.ctx = worker.ctx
        self.rng = rng
        self.reader_conn = reader
        self.writers = writers
        self.progress = progress
        self.reader = Reader(self.ctx.info, batch_size=self.ctx.opts.batch_size, upper=rng.upper_id)
        self.writer = Writer(self.ctx.info, column=self.ctx.strategy.column(self.ctx))
        self.pace = Pace()  # rows/s through the encode stage
        self.split_wanted = threading.Event()  # a dry worker asked (seen at a commit): cut at the next read
        if rng.split_wanted:
            self.split_wanted.set()

    def window_limit(self) -> int:
        """Rows that close the next window: about WINDOW_SECS of the measured pace, at most the
        feed's window; before any window was encoded, one transaction (the first commit comes
        soon whatever the device)."""
        if self.pace.value is None:
            return 1
        return max(1, min(self.feed.window_rows, int(self.pace.value * WINDOW_SECS)))

    def run(self) -> None:
        chain = Chain(self.ctx.stop, depth=_DEPTH)
        steps = [Step("encode", self._encode, on_caller=True, lookahead=True), Step("write", self._write)]
        self.writers.start(0)
        try:
            if self.ctx.opts.pipeline:
                chain.run(self._source(), steps, on_end=self._finish, on_abort=self.writers.abort)
            else:
                chain.run_serial(self._source(), steps, on_end=self._finish)
            if not chain.errors:
                self.writers.drain()  # a stop: the batches in flight commit, in order
        except BaseException:
            self.writers.abort()
            raise
        if chain.errors:
            self.writers.abort()
            raise chain.errors[0]

    # --------------------------------------------------------------- stages

    def _source(self) -> Iterator[list[tuple[Batch, Any]]]:
        """Windows of batches, each batch's texts already on their way through the tokenizers."""
        after, seq = self.rng.last_id, 0
        window: list[tuple[Batch, Any]] = []
        rows = 0
        while not self.ctx.stop.requested:
            if self.split_wanted.is_set():
                self._split(after)
            batch = self.ctx.lease.read(self.reader.read, after, seq, on=self.reader_conn, what="read_batch")
            log.debug("batch_read", seq=seq, rows=len(batch.ids) if batch else 0)
            if batch is None:
                break
            texts = batch.present_texts
            window.append((batch, self.feed.submit(texts) if texts else None))
            rows += len(texts)
            if rows >= self.window_limit():
                yield window
                window, rows = [], 0
            after, seq = batch.last_id, seq + 1
        if window and not self.ctx.stop.requested:
            yield window

    def _split(self, after: str | None) -> None:
        """Cut our range past everything read so far (`after`), for a worker that ran dry: we keep
        up to the median key of what is left, a new unclaimed range gets the rest."""
        self.split_wanted.clear()
        rng, info, min_rows = self.rng, self.ctx.info, 2 * self.ctx.opts.batch_size

        def body(conn: psycopg.Connection[Any], attempt: int) -> tuple[str, int, int | None] | None:
            if attempt > 1 and (landed := ckpt.split_landed(conn, rng)) is not None:
                return landed[0], landed[1], None  # the first attempt's commit landed: it is done
            at, left = ranges.split_point(conn, info, after=after, upper=rng.upper_id, min_rows=min_rows)
            if at is None:
                ckpt.decline_split(conn, rng, left=left)
                return None
            return at, ckpt.split(conn, rng, at=at, keep=left // 2, give=left - left // 2), left

        cut = self.ctx.lease.write_attempt(body, on=self.reader_conn, what="split_range")
        if cut is None:
            return
        at, new, left = cut
        log.info("range_split", range_no=rng.range_no, new_range_no=new, at=at, rows_left=left, after=after)
        rng.upper_id = self.reader.upper = at
        self.worker.splits += 1

    def _encode(self, window: list[tuple[Batch, Any]],
                peek: Callable[[], list[tuple[Batch, Any]] | None]) -> list[Batch] | None:
        pending = [p for _, p in window if p is not None]

        def upcoming() -> list[Any] | None:  # the next window, if the reader queued it already
            following = peek()
            return [p for _, p in following if p is not None] if following else None

        encoded: Sequence[np.ndarray | None] | None
        started = time.monotonic()
        try:
            encoded = self.feed.encode(pending, self.ctx.stop, upcoming=upcoming) if pending else []
            self.pace.measured(sum(len(batch.present) for batch, _ in window), time.monotonic() - started)
        except ReembedError:  # the run's own failures (a dead tokenizer process): not a row's fault
            raise
        except Exception as exc:
            if is_device_fault(exc):  # sticky: every row would fail after it
                raise failures.device_failed(exc) from exc
            log.debug("window_failed", error=first_line(exc))
            encoded = [None] * len(pending)
        if encoded is None:
            return None  # stopped: nothing of this window is written
        results = iter(encoded)
        for batch, tokenized in window:
            self._vectors(batch, next(results) if tokenized is not None else None)
        return [batch for batch, _ in window]

    def _vectors(self, batch: Batch, encoded: np.ndarray | None) -> None:
        present = batch.present
        vectors: list[np.ndarray | None] = [None] * len(batch.texts)
        if encoded is not None:
            failures.place(encoded, present, vectors, batch.failed, limit=failures.value_limit(self.ctx.info))
        elif present:
            failures.encode_isolating(self.ctx.embedder, batch.texts, present, vectors, batch.failed,
                                      limit=failures.value_limit(self.ctx.info))
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

    def _write(self, batches: list[Batch] | None) -> None:
        for batch in batches or []:
            if not self.ctx.throttle.admit(len(batch.ids)):  # held while the database is unwell; --max-rate
                return  # stopped while held: nothing more is handed over
            self.writers.submit(self._commit, batch)
            if self.ctx.stop.requested:
                return  # the batches in flight commit; the rest is encoded again by the next run

    def _commit(self, batch: Batch, conn: db.Held) -> None:
        """The batch's vectors where each row is unchanged since the read, the rows that changed
        recorded for catch-up (not counted as done), the failed rows, the cursor: one transaction."""
        started, turns = time.monotonic(), self.writers.turns
        rows, skipped = self.ctx.lease.write_attempt(self._commit_body, batch, turns, on=conn, what="commit_batch")
        rng, worker = self.rng, self.worker
        rng.last_id = batch.last_id
        rng.rows_done += rows
        rng.rows_skipped += skipped
        worker.rows_updated += rows
        worker.rows_skipped += skipped
        worker.rows_failed += len(batch.failed)
        self.progress.advance(len(batch.ids))
        log.debug("batch_committed", seq=batch.seq, rows=rows, skipped=skipped, last_id=batch.last_id,
                  commit_secs=round(time.monotonic() - started, 4))
        turns.done(batch.seq)

    def _commit_body(self, conn: psycopg.Connection[Any], attempt: int, batch: Batch,
                     turns: Turns) -> tuple[int, int]:
        """(rows, skipped) of one attempt at the batch's transaction."""
        if attempt > 1:
            turns.wait(batch.seq)  # the batches before this one are committed: the cursor is theirs
            if self._already_committed(conn, batch):
                # It landed before the connection went; what it wrote is not known here (the
                # rows that had changed are in reembed_changes either way): count it as read.
                return len(batch.present) - len(batch.failed), batch.skipped
        written = commit_batch(conn, self.ctx.active, self.writer, batch,
                               advance=functools.partial(self._advance, batch, turns))
        if written.changed:
            log.info("rows_changed_under_the_job", count=len(written.changed), ids=written.changed[:10],
                     detail="not overwritten; re-embedded by catch-up")
        return written.rows, written.skipped

    def _advance(self, batch: Batch, turns: Turns, conn: psycopg.Connection[Any], written: Written) -> None:
        """The range's cursor, in key order: once every earlier batch committed (waiting with this
        batch's rows locked at most TURN_WAIT_SECS: then they are let go and the batch tried again)."""
        turns.wait(batch.seq, timeout=TURN_WAIT_SECS)
        if ckpt.advance(conn, self.rng, to_id=batch.last_id, rows=written.rows, skipped=written.skipped,
                        rate=self.progress.rate):
            self.split_wanted.set()

    def _finish(self) -> None:
        """Every row of the range is done: close it."""
        self.writers.drain()
        self.ctx.lease.write(ckpt.finish_range, self.rng, on=self.writers.primary, what="finish_range")
        log.info("range_complete", range_no=self.rng.range_no, rows_done=self.rng.rows_done)

    def _already_committed(self, conn: psycopg.Connection[Any], batch: Batch) -> bool:
        """On a retry after a lost connection: did the commit land before the connection went?"""
        last = ckpt.committed_cursor(conn, self.rng)
        if last == batch.last_id:
            return True
        if last != self.rng.last_id:  # moved by someone else: a takeover during the outage, or a conflict
            ckpt.why_not_moved(conn, self.rng)
        return False
