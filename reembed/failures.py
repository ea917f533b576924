"""Rows the model cannot take.

An exception while encoding a batch is narrowed down by splitting the batch until the
offending rows stand alone; those are recorded in reembed_failed_rows (in the same
transaction as the batch, their embedding NULL) and skipped, and the rest proceed. The job
finalizes only once every failed row is either encoded by `--retry-failed` or accepted by
`--accept-failed` (their embedding stays NULL, and the run says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
import structlog
from psycopg import sql

from reembed import db, retry
from reembed.checkpoint import Job
from reembed.embedder import Embedder
from reembed.errors import ReembedError
from reembed.lease import LockKeeper
from reembed.settings import RunOptions
from reembed.target import TableInfo
from reembed.writer import Batch, Writer

log = structlog.get_logger()


class RowsFailed(ReembedError):
    """Some rows could not be encoded; finalize waits for --retry-failed or --accept-failed."""


def encode_isolating(
    embedder: Embedder,
    texts: Sequence[str | None],
    indices: list[int],
    out: list[np.ndarray | None],
    failed: dict[int, str],
) -> None:
    """Encode texts[indices] into out[...]; a failing group is split in halves down to single rows."""
    try:
        encoded = embedder.encode([texts[i] for i in indices])  # type: ignore[misc]
    except Exception as exc:  # noqa: BLE001 - any model error is narrowed down to its rows
        if len(indices) == 1:
            failed[indices[0]] = f"{type(exc).__name__}: {exc}"[:500]
            return
        middle = len(indices) // 2
        encode_isolating(embedder, texts, indices[:middle], out, failed)
        encode_isolating(embedder, texts, indices[middle:], out, failed)
        return
    for slot, vec in zip(indices, encoded, strict=True):
        out[slot] = vec


def record(conn: psycopg.Connection[Any], job: Job, batch: Batch) -> None:
    """Inside the batch's transaction."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO reembed_failed_rows (job_id, row_id, error) VALUES (%s, %s, %s)"
            " ON CONFLICT (job_id, row_id) DO UPDATE SET attempts = reembed_failed_rows.attempts + 1,"
            " error = EXCLUDED.error, last_seen = now()",
            [(job.id, batch.id_texts[i], err) for i, err in batch.failed.items()],
        )


def pending(conn: psycopg.Connection[Any], job: Job) -> int:
    row = conn.execute(
        "SELECT count(*) AS n FROM reembed_failed_rows WHERE job_id = %s AND NOT accepted", (job.id,)
    ).fetchone()
    return int(row["n"]) if row else 0


def settle(
    control: db.Session,
    info: TableInfo,
    job: Job,
    embedder: Embedder,
    opts: RunOptions,
    keeper: LockKeeper,
    *,
    batch_size: int = 256,
) -> str:
    """Before finalize: retry or accept the failed rows as told; refuse to finalize past them otherwise.
    Returns a note for the report ('' when there were none)."""
    waiting = retry.call(lambda: pending(control.get(), job), what="count_failed_rows", max_retries=opts.max_retries)
    if not waiting:
        return ""
    if opts.retry_failed:
        session = db.Session(control.conninfo, role="retry-failed")  # vectors registered, unlike control's
        try:
            _retry_on(session.get(), info, job, embedder, keeper, batch_size)
        finally:
            session.close()
        waiting = pending(control.get(), job)
        if not waiting:
            log.info("failed_rows_recovered")
            return "every previously failed row was encoded on retry"
    if opts.accept_failed:
        conn = control.get()
        with conn.transaction():
            conn.execute("UPDATE reembed_failed_rows SET accepted = true WHERE job_id = %s AND NOT accepted", (job.id,))
            keeper.fence(conn)
        log.warning("failed_rows_accepted", count=waiting, detail="their embedding stays NULL")
        return f"{waiting} rows that the model could not encode were accepted: their embedding is NULL"
    raise RowsFailed(
        f"{waiting} rows could not be encoded (see `reembed status` and reembed_failed_rows); fix them and "
        "run again with --retry-failed, or finalize without them with --accept-failed (their embedding stays NULL)"
    )


def _retry_on(
    conn: psycopg.Connection[Any], info: TableInfo, job: Job, embedder: Embedder, keeper: LockKeeper, batch_size: int
) -> None:
    ids = [r["row_id"] for r in conn.execute(
        "SELECT row_id FROM reembed_failed_rows WHERE job_id = %s AND NOT accepted ORDER BY row_id", (job.id,)
    ).fetchall()]
    select = sql.SQL(
        "SELECT {id} AS id, {id}::text AS id_text, {content} AS content FROM {table}"
        " WHERE {id} = ANY(CAST(%s AS {id_type}[])) ORDER BY {id}"
    ).format(**info.ids())
    writer = Writer(conn, info)
    for start in range(0, len(ids), batch_size):
        rows = conn.execute(select, (ids[start: start + batch_size],)).fetchall()
        batch = Batch(seq=-1, after=None, ids=[r["id"] for r in rows], id_texts=[r["id_text"] for r in rows],
                      texts=[r["content"] for r in rows])
        vectors: list[np.ndarray | None] = [None] * len(rows)
        present = [i for i, t in enumerate(batch.texts) if t is not None]
        encode_isolating(embedder, batch.texts, present, vectors, batch.failed)
        fixed = [i for i in range(len(rows)) if i not in batch.failed]
        gone = set(ids[start: start + batch_size]) - set(batch.id_texts)  # deleted since: nothing to encode
        with conn.transaction():
            writer.write([batch.ids[i] for i in fixed], [vectors[i] for i in fixed])
            conn.execute(
                "DELETE FROM reembed_failed_rows WHERE job_id = %s AND row_id = ANY(%s)",
                (job.id, [batch.id_texts[i] for i in fixed] + sorted(gone)),
            )
            if batch.failed:
                record(conn, job, batch)
            keeper.fence(conn)
        log.info("failed_rows_retried", fixed=len(fixed), still_failing=len(batch.failed))
