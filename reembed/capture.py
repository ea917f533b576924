"""Live tables: capture what the application writes during a job, catch it up, cut over.

From prepare until the cut-over, two triggers named after the job record in reembed_changes
the keys of inserted rows and of rows whose content or embedding anyone but the job changed
(reembed's own connections carry `reembed.writer = on`, which the update trigger lets pass).
The job records, too, the rows that changed between its read and its write (their write is
skipped: no lost update). After the main pass, catch-up passes re-embed the captured
keys, deduplicated and in key order, each batch in one fenced transaction with the removal of
its keys, until what is left is under one batch or stops shrinking. The rest is re-embedded
inside the cut-over, which holds writers off (never readers) while it commits the last
catch-up, the strategy's swap and the registry together, and turns capture off.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import psycopg
import structlog
from psycopg import sql

from reembed import checkpoint as ckpt
from reembed import db, failures
from reembed.batches import DEFAULT_WRITE_PATH, Batch, Writer
from reembed.commits import Written, commit_batch, fail_null_vectors
from reembed.context import RunContext
from reembed.errors import ReembedError
from reembed.progress import Pace
from reembed.queries import query
from reembed.target import TableInfo

log = structlog.get_logger()

_OURS = re.compile(r"^reembed_capture_(\d+)_(ins|upd)$")


@dataclass(frozen=True)
class Capture:
    """The names of one job's capture objects."""

    job_id: int
    schema: str  # where reembed's tables (and so the function) live

    @property
    def prefix(self) -> str:
        return f"reembed_capture_{self.job_id}"

    def fill(self) -> dict[str, Any]:
        return {
            "function": (self.schema, self.prefix),
            "insert_trigger": f"{self.prefix}_ins",
            "update_trigger": f"{self.prefix}_upd",
        }


def tool_schema(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute(query("tool_schema")).fetchone()
    if row is None:
        raise ReembedError("reembed_changes is missing (dropped by hand?); re-run to create reembed's tables again")
    return str(row["schema"])


def install(ctx: RunContext, conn: psycopg.Connection[Any], job: ckpt.Job, *, column: str | None = None) -> None:
    """Inside prepare's transaction: the job's triggers and their function (watching the content
    and `column`, the column the job writes: by default the embedding column)."""
    cap = create(conn, ctx.info, job.id, column=column)
    conn.execute(query("set_capture_trigger"), {"name": cap.prefix, "job_id": job.id})


def create(conn: psycopg.Connection[Any], info: TableInfo, job_id: int, *, column: str | None = None) -> Capture:
    """The triggers and their function, for job `job_id` (reembed's tables must exist)."""
    cap = Capture(job_id, tool_schema(conn))
    conn.execute(info.statement("create_capture_function", changes=(cap.schema, "reembed_changes"),
                                job_id=sql.Literal(job_id), **cap.fill()))
    conn.execute(info.statement("create_capture_triggers", column=column or info.column, **cap.fill()))
    return cap


def remove(conn: psycopg.Connection[Any], info: TableInfo, job_id: int) -> None:
    """Drop a job's triggers and function, and forget what they captured."""
    cap = Capture(job_id, tool_schema(conn))
    conn.execute(info.statement("drop_capture", **cap.fill()))
    conn.execute(query("forget_job_changes"), {"job_id": job_id})
    conn.execute(query("set_capture_trigger"), {"name": None, "job_id": job_id})


def settle_others(ctx: RunContext, conn: psycopg.Connection[Any], job: ckpt.Job) -> None:
    """Capture triggers of other jobs on this table: those of a job that is no longer active
    (abandoned, done, or gone) are dropped; those of an active job on another column stay."""
    seen: set[int] = set()
    for row in conn.execute(query("capture_triggers"), {"table_oid": ctx.info.oid}).fetchall():
        match = _OURS.match(row["trigger_name"])
        if match is None or int(match.group(1)) in seen or int(match.group(1)) == job.id:
            continue
        other_id = int(match.group(1))
        seen.add(other_id)
        other = ckpt.find(conn, other_id)
        if other is not None and other.state in ckpt.ACTIVE:
            log.info("other_job_capturing", other_job_id=other_id, column=other.column_name,
                     detail="an active job on another column of this table keeps its own capture")
            continue
        log.warning("stale_capture_dropped", other_job_id=other_id,
                    state=other.state if other else "missing",
                    detail="its job is not active; its triggers would capture for nobody")
        remove(conn, ctx.info, other_id)


def owner(trigger_name: str) -> int | None:
    """The job whose capture trigger this is (by its name), or None for a trigger not ours."""
    match = _OURS.match(trigger_name)
    return int(match.group(1)) if match else None


def pending(conn: psycopg.Connection[Any], job: ckpt.Job) -> int:
    row = conn.execute(query("changes_pending"), {"job_id": job.id}).fetchone()
    return int(row["n"]) if row else 0


# --------------------------------------------------------------- catch-up passes


def catch_up(ctx: RunContext, *, until: int | None = None, writes: Pace | None = None) -> None:
    """Passes over the captured keys until fewer than `until` (default: a batch) are left or
    they stop shrinking; `writes`: the pace of the commits, measured (rows/s)."""
    job, lease, size = ctx.active, ctx.lease, ctx.opts.batch_size
    until = size if until is None else until
    if "cut_over" in job.steps:
        return
    writer = Writer(ctx.info, column=ctx.strategy.column(ctx))
    previous: int | None = None
    while not ctx.stop.requested:
        left = lease.read(pending, job, on=ctx.control, what="count_changes")
        if left < until or (previous is not None and left >= previous):
            log.info("catch_up_done", keys_left=left, shrinking=previous is None or left < previous,
                     detail="the rest is re-embedded inside the cut-over")
            return
        number = lease.read(ckpt.reload, job, on=ctx.control, what="reload_job").catchup_pass + 1
        lease.write(_pass_started, job, number, left, on=ctx.control, what="catch_up_pass")
        started, rows, keys = time.monotonic(), 0, 0
        log.info("catch_up_pass_started", catch_up_pass=number, keys=left)
        after: str | None = None
        while not ctx.stop.requested:
            page = lease.read(_page, ctx.info, job, after, size, on=ctx.control, what="read_changes")
            if not page:
                break
            if not ctx.throttle.admit(len(page)):
                break
            batch = lease.read(_read, ctx.info, page, on=ctx.control, what="read_changed_rows")
            _encode(ctx, batch)
            wrote = time.monotonic()
            written = lease.write(_write, job, writer, page, batch, on=ctx.control, what="commit_catch_up")
            if writes is not None:
                writes.measured(len(page), time.monotonic() - wrote)
            rows += written
            keys, after = keys + len(page), page[-1]
        log.info("catch_up_pass_done", catch_up_pass=number, keys=keys, rows=rows,
                 secs=round(time.monotonic() - started, 2))
        previous = left


def _pass_started(conn: psycopg.Connection[Any], job: ckpt.Job, number: int, pending_keys: int) -> None:
    conn.execute(query("catchup_pass_started"), {"pass": number, "pending": pending_keys, "job_id": job.id})


# Rows encoded ahead, by (key, xmin): the vector, or why the model could not take the row (so that a
# row the model refuses is not encoded again and again before the hold, as if never encoded: the
# last catch-up under the hold fails it, or writes it NULL with --accept-failed)
Encoded = dict[tuple[str, int], np.ndarray | str]


# What a write under the cut-over's lock costs, per row (the COPY write path runs at 15-40k
# rows/s here; the conservative end), for the prediction of the hold.
WRITE_ROWS_PER_SEC = 15_000.0


@dataclass
class Backlog:
    """The captured rows, read now: how many, and how many of them must be encoded again (not
    encoded ahead at their current version); each page of keys (as the source settles them) with
    its rows."""

    keys: int
    unencoded: int
    batches: list[tuple[list[Any], Batch]]
    refused: int = 0  # rows the model refused when encoded ahead: neither encoded nor written before the hold

    def predicted_secs(self, pace: float | None, write_rate: float | None = None) -> float:
        """The cut-over's work on it under the lock: the encoding at `pace` rows/s, the writes at
        `write_rate` (measured by the catch-up's commits; an index on the column written, as a
        shadow column has, makes them far slower than the constant)."""
        encode = self.unencoded / pace if pace else (0.0 if not self.unencoded else float("inf"))
        return encode + self.write_secs(write_rate)

    def write_secs(self, write_rate: float | None = None) -> float:
        """The writes alone (every row encoded). A refused row is not counted: no write ahead settles it,
        so counted it kept the rest over the bound for ever; under the hold it refuses the cut-over, or
        is written NULL (--accept-failed)."""
        return max(self.keys - self.refused, 0) / min(write_rate or WRITE_ROWS_PER_SEC, WRITE_ROWS_PER_SEC)


class Source(Protocol):
    """What a bounded cut-over (reembed.cutover) catches up and how: the job's captured keys into
    the column it writes (JobSource), or the keys written after a shadow swap into the previous
    column, for rollback's swap back (reembed.rollback)."""

    def backlog(self, conn: psycopg.Connection[Any], ahead: Encoded) -> Backlog:
        """Every key to catch up now, its row as it is now (no transaction of its own)."""
        ...

    def encode_ahead(self, work: Backlog, known: Encoded) -> tuple[Encoded, int]:
        """The backlog encoded, no lock held; those `known` at their version not again."""
        ...

    def write_ahead(self, work: Backlog, ahead: Encoded) -> int:
        """The backlog written and settled, no lock held, a page per transaction of its own."""
        ...

    def final(self, conn: psycopg.Connection[Any], ahead: Encoded, work: Backlog) -> int:
        """Inside the hold: every key still to catch up (`work`, read under the lock)."""
        ...

    def hold(self, conn: psycopg.Connection[Any]) -> float:
        """Every lock of the hold, asked for up front; when the hold began (monotonic)."""
        ...

    def locked(self) -> list[tuple[int, bool]]:
        """The tables the hold locks: (oid, whether against readers too)."""
        ...


class JobSource:
    """The job's captured keys, caught up into the column its strategy writes. `path`: how the
    last catch-up writes under the hold (a job over several tables holds them all on one table's
    connection, whose staging table is that table's: the others' rows go by unnest)."""

    def __init__(self, ctx: RunContext, *, rewrite: bool, path: str = DEFAULT_WRITE_PATH) -> None:
        self.ctx = ctx
        self.rewrite = rewrite
        self.path = path

    def backlog(self, conn: psycopg.Connection[Any], ahead: Encoded) -> Backlog:
        return backlog(self.ctx, conn, ahead)

    def encode_ahead(self, work: Backlog, known: Encoded) -> tuple[Encoded, int]:
        return encode_ahead(self.ctx, work, known)

    def write_ahead(self, work: Backlog, ahead: Encoded) -> int:
        held = self.ctx.connections.hold("cut-over-write")
        try:
            return write_ahead(self.ctx, work, ahead, on=held)
        finally:
            held.release()

    def final(self, conn: psycopg.Connection[Any], ahead: Encoded, work: Backlog) -> int:
        return final_catch_up(self.ctx, conn, ahead, work, path=self.path)

    def hold(self, conn: psycopg.Connection[Any]) -> float:
        return hold_writers(self.ctx, conn, rewrite=self.rewrite)

    def locked(self) -> list[tuple[int, bool]]:
        return [(self.ctx.info.oid, self.rewrite)]


def backlog(ctx: RunContext, conn: psycopg.Connection[Any], ahead: Encoded) -> Backlog:
    """Every key still captured, its row as it is now, and whether its vector is known."""
    size = ctx.opts.batch_size
    out = Backlog(0, 0, [])
    every = _page(conn, ctx.info, ctx.active, None, None)  # one scan of the captured rows, not one a page
    for start in range(0, len(every), size):
        page = every[start:start + size]
        batch = _read(conn, ctx.info, page)
        out.keys += len(page)
        known = [ahead.get((batch.id_texts[i], batch.xmins[i])) for i in batch.present]
        out.unencoded += sum(1 for vec in known if vec is None)
        out.refused += sum(1 for vec in known if isinstance(vec, str))
        out.batches.append((page, batch))
    return out


def encode_ahead(ctx: RunContext, work: Backlog, known: Encoded) -> tuple[Encoded, int]:
    """Before the cut-over takes its locks: the backlog's rows encoded, keyed by (key, xmin), so
    that only rows changed since are encoded while writers wait; those `known` at their version
    are not encoded again. Returns them, and how many were encoded now."""
    done: Encoded = {}
    for _, batch in work.batches:
        for i, vec in enumerate(_encode(ctx, batch, known)):
            if vec is not None:
                done[(batch.id_texts[i], batch.xmins[i])] = vec
        for i, why in batch.failed.items():
            done[(batch.id_texts[i], batch.xmins[i])] = why
    return done, work.unencoded


def write_ahead(ctx: RunContext, work: Backlog, ahead: Encoded, *, on: db.Kept) -> int:
    """Before the cut-over takes its locks, on a connection of its own: the backlog written, a
    page per transaction as a catch-up pass writes it (for when its writes alone would hold the
    application's writers past the bound: an index on the column written makes them slow)."""
    writer = Writer(ctx.info, column=ctx.strategy.column(ctx))
    rows = 0
    for page, batch in work.batches:
        _encode(ctx, batch, ahead)
        rows += ctx.lease.write(_write_ahead, ctx.active, writer, page, batch, on=on, what="cut_over_write_ahead")
    return rows


def _write_ahead(conn: psycopg.Connection[Any], job: ckpt.Job, writer: Writer, page: list[str], batch: Batch) -> int:
    """_write, except that a row the model cannot take (or, in a NOT NULL column, one with no text) is
    neither written nor settled: it stays captured for the last catch-up, under the hold, which
    refuses the cut-over for it (or writes it NULL with --accept-failed), as it would have."""
    fail_null_vectors(batch, writer)
    failed = {batch.id_texts[i] for i in batch.failed}
    if not failed:
        return _write(conn, job, writer, page, batch)
    settles = [key for key in page if key not in failed]
    written = commit_batch(conn, job, writer, batch, settles=settles, write_failed=False, forget_failed=(),
                           advance=functools.partial(_catch_up_advanced, job, len(settles)))
    return len(written.encoded)


def final_catch_up(ctx: RunContext, conn: psycopg.Connection[Any], ahead: Encoded, work: Backlog, *,
                   path: str = DEFAULT_WRITE_PATH) -> int:
    """Inside the cut-over's transaction, writers held off: every key still captured (`work`,
    read under the lock)."""
    writer = Writer(ctx.info, column=ctx.strategy.column(ctx), path=path)
    rows = accepted = 0
    for page, batch in work.batches:
        _encode(ctx, batch, ahead)
        fail_null_vectors(batch, writer)
        if batch.failed and (not ctx.opts.accept_failed or ctx.info.not_null):
            raise failures.RowsFailed(
                f"{len(batch.failed)} rows written by the application during the job cannot be encoded "
                f"(e.g. {batch.id_texts[next(iter(batch.failed))]}); the cut-over is rolled back. Fix them, or run "
                "again with --accept-failed to cut over with their embedding NULL"
            )
        accepted += len(batch.failed)
        rows += _write(conn, ctx.active, writer, page, batch)
    if ctx.opts.accept_failed:  # written NULL as --accept-failed says: accepted, as those found before were
        conn.execute(query("accept_failed_rows"), {"job_id": ctx.active.id})
    if accepted:
        log.warning("failed_rows_accepted", count=accepted, detail="written by the application during the "
                    "cut-over's catch-up; their embedding stays NULL")
    return rows


def _page(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job, after: str | None,
          size: int | None) -> list[str]:
    """The next `size` captured keys after `after`, in key order (size None: every one)."""
    rows = conn.execute(info.statement("pending_keys"), {"job_id": job.id, "after": after, "n": size}).fetchall()
    return [r["row_id"] for r in rows]


def _read(conn: psycopg.Connection[Any], info: TableInfo, row_ids: list[str]) -> Batch:
    return Batch.of(-1, None, conn.execute(info.statement("rows_by_ids"), {"ids": row_ids}).fetchall())


def _encode(ctx: RunContext, batch: Batch, ahead: Encoded | None = None) -> list[np.ndarray | None]:
    """The batch's vectors (those encoded ahead for the same row version reused), set on it."""
    vectors: list[np.ndarray | None] = [None] * len(batch.ids)
    todo = []
    for i in batch.present:
        known = ahead.get((batch.id_texts[i], batch.xmins[i])) if ahead else None
        if known is None:
            todo.append(i)
        elif isinstance(known, str):  # refused by the model when encoded ahead, at this version
            batch.failed[i] = known
        else:
            vectors[i] = known
    if todo:
        failures.encode_isolating(ctx.embedder, batch.texts, todo, vectors, batch.failed,
                                  limit=failures.value_limit(ctx.info))
    batch.vectors = vectors
    return vectors


def _write(conn: psycopg.Connection[Any], job: ckpt.Job, writer: Writer, page: list[str], batch: Batch) -> int:
    """The batch's vectors (where the row is unchanged since the read), its keys forgotten, the
    keys that changed again recorded anew; returns the rows re-embedded."""
    written = commit_batch(conn, job, writer, batch, settles=page, forget_failed=(),
                           advance=functools.partial(_catch_up_advanced, job, len(page)))
    return len(written.encoded)


def _catch_up_advanced(job: ckpt.Job, keys: int, conn: psycopg.Connection[Any], written: Written) -> None:
    conn.execute(query("catchup_advanced"), {"keys": keys, "rows": len(written.encoded), "job_id": job.id})


# ------------------------------------------------------------------- the cut-over


def hold_writers(ctx: RunContext, conn: psycopg.Connection[Any], *, rewrite: bool) -> float:
    """The registry row first (as the application's writers take it), then at once every lock
    the cut-over needs on the table: against writers, or against everyone when the column's type
    changes (`rewrite`; no lock is asked for later, with work done). Each request waits at most
    --cut-over-lock-timeout, well under the server's deadlock_timeout: when the cut-over waits on
    an application transaction that waits on it, the cut-over gives up first and retries (the
    application is never the deadlock's victim). Returns when the hold began (monotonic): from
    the first request, since writers queue behind a waiting request too."""
    return hold_tables(conn, ctx.info.registry, [(ctx.info, rewrite)])


def hold_tables(conn: psycopg.Connection[Any], registry: tuple[str, ...],
                tables: Sequence[tuple[TableInfo, bool]]) -> float:
    """hold_writers for several tables (a job over several tables under one registry): the registry
    row, then each table's lock in the order of the tables' oids, a fixed order whatever order they
    were named in (a table named twice, once: the stronger lock). While it waits for a later table's
    lock it holds the registry row and the earlier tables, so the waits together, not each, are
    bounded by the transaction's lock_timeout: each later request gets what is left of it. (Each
    with the whole timeout, an application transaction that holds the last table and then asks for
    the registry row waited for their sum, past deadlock_timeout with five tables, and PostgreSQL
    aborted it as the deadlock's victim.) The hold is counted from the first request."""
    strongest: dict[int, tuple[TableInfo, bool]] = {}
    for info, rewrite in tables:
        if info.oid in strongest:
            rewrite = rewrite or strongest[info.oid][1]
        strongest[info.oid] = (strongest.get(info.oid, (info, rewrite))[0], rewrite)
    locks = [info.statement("lock_for_rewrite" if rewrite else "lock_for_cut_over")
             for _, (info, rewrite) in sorted(strongest.items())]
    budget = 0
    if len(locks) > 1:
        row = conn.execute(query("current_lock_timeout_ms")).fetchone()
        budget = int(row["ms"]) if row else 0
    _cancel_autovacuum(conn, sorted(strongest))
    began = time.monotonic()
    conn.execute(sql.SQL("; ").join([query("lock_registry_row", registry=registry), locks[0]]))  # one round trip
    if budget > 0:
        for lock in locks[1:]:
            left = max(1, budget - int((time.monotonic() - began) * 1000))
            conn.execute(query("set_lock_timeout"), {"value": f"{left}ms"})
            conn.execute(lock)
        conn.execute(query("set_lock_timeout"), {"value": f"{budget}ms"})  # the hold's own statements
    else:
        for lock in locks[1:]:
            conn.execute(lock)
    return began


def _cancel_autovacuum(conn: psycopg.Connection[Any], oids: list[int]) -> None:
    """An autovacuum of one of the tables (not one against wraparound) holds a lock the cut-over's
    conflicts with, and may run for many minutes on a table with an HNSW index under constant edits:
    PostgreSQL cancels it for a request that waits deadlock_timeout (1 s), but the cut-over's request
    gives up first (200 ms), try after try, for as long as the vacuum runs (seen: a cut-over that
    never came while one ran for over 7 minutes). Cancel it, as PostgreSQL would; it runs again
    later. Best effort: a role that may not signal it (PostgreSQL 18: pg_signal_autovacuum_worker)
    leaves it alone."""
    try:
        with conn.transaction():  # a savepoint: a refusal must not end the hold's transaction
            rows = conn.execute(query("cancel_autovacuum"), {"oids": oids}).fetchall()
    except psycopg.Error as exc:
        log.debug("autovacuum_not_cancelled", error=str(exc).splitlines()[0])
        return
    for row in rows:
        log.info("autovacuum_cancelled", table=row["relation"], pid=row["pid"],
                 detail="it held a lock the cut-over needs; PostgreSQL would cancel it for a waiting request")


def check_lock_timeout(conn: psycopg.Connection[Any], lock_timeout: str) -> None:
    """Say so when the cut-over's lock timeout is not under the server's deadlock_timeout (then
    an application transaction may be the one PostgreSQL aborts)."""
    row = conn.execute(query("deadlock_timeout")).fetchone()
    deadlock_ms = int(row["ms"]) if row else 1000
    ours = conn.execute(query("lock_timeout_ms"), {"value": lock_timeout}).fetchone()
    if ours is not None and int(ours["ms"]) * 2 > deadlock_ms:
        log.warning("cut_over_lock_timeout_too_long", cut_over_lock_timeout=lock_timeout,
                    deadlock_timeout_ms=deadlock_ms,
                    detail="an application transaction that waits on the cut-over may be aborted as a deadlock "
                           "victim; keep --cut-over-lock-timeout under half the server's deadlock_timeout")


def stop_capturing(ctx: RunContext, conn: psycopg.Connection[Any]) -> None:
    """Inside the cut-over: the job's triggers off (dropped by the next step, which needs a
    lock that readers would wait for)."""
    if ctx.active.capture_trigger is None:  # a job started before capture existed
        return
    cap = Capture(ctx.active.id, tool_schema(conn))
    conn.execute(ctx.info.statement("disable_capture_triggers", **cap.fill()))


def drop(ctx: RunContext, conn: psycopg.Connection[Any]) -> None:
    remove(conn, ctx.info, ctx.active.id)
