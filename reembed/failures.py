"""Rows the model cannot take.

An exception while encoding a batch is narrowed down by splitting the batch until the
offending rows stand alone; those are recorded in reembed_failed_rows (in the same
transaction as the batch, their embedding NULL) and skipped, and the rest proceed. The job
finalizes only once every failed row is either encoded by `--retry-failed` or accepted by
`--accept-failed` (their embedding stays NULL, and the run says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
import structlog

from reembed import checkpoint as ckpt
from reembed.batches import Batch, Writer
from reembed.checkpoint import Job
from reembed.embedder import Embedder
from reembed.errors import ReembedError
from reembed.queries import query

if TYPE_CHECKING:
    from reembed.context import RunContext

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
            query("record_failed_rows"),
            [{"job_id": job.id, "row_id": batch.id_texts[i], "error": err} for i, err in batch.failed.items()],
        )


def pending(conn: psycopg.Connection[Any], job: Job) -> int:
    row = conn.execute(query("failed_rows_pending"), {"job_id": job.id}).fetchone()
    return int(row["n"]) if row else 0


def settle(ctx: RunContext) -> str:
    """Before finalize: retry or accept the failed rows as told; refuse to finalize past them otherwise.
    Returns a note for the report ('' when there were none)."""
    job, opts = ctx.active, ctx.opts
    waiting = ctx.lease.read(lambda conn: pending(conn, job), on=ctx.control, what="count_failed_rows")
    if not waiting:
        return ""
    if opts.retry_failed:
        _retry(ctx)
        waiting = ctx.lease.read(lambda conn: pending(conn, job), on=ctx.control, what="count_failed_rows")
        if not waiting:
            log.info("failed_rows_recovered")
            return "every previously failed row was encoded on retry"
    if opts.accept_failed:
        ctx.lease.write(lambda conn: conn.execute(query("accept_failed_rows"), {"job_id": job.id}),
                        on=ctx.control, what="accept_failed_rows")
        log.warning("failed_rows_accepted", count=waiting, detail="their embedding stays NULL")
        return f"{waiting} rows that the model could not encode were accepted: their embedding is NULL"
    raise RowsFailed(
        f"{waiting} rows could not be encoded (see `reembed status` and reembed_failed_rows); fix them and "
        "run again with --retry-failed, or finalize without them with --accept-failed (their embedding stays NULL)"
    )


def _retry(ctx: RunContext) -> None:
    job, info, batch_size = ctx.active, ctx.info, ctx.opts.batch_size
    ids = [r["row_id"] for r in ctx.lease.read(
        lambda conn: conn.execute(query("failed_row_ids"), {"job_id": job.id}).fetchall(),
        on=ctx.control, what="failed_row_ids")]
    writer = Writer(info, column=ctx.strategy.column(ctx))
    select = info.statement("rows_by_ids")
    for start in range(0, len(ids), batch_size):
        wanted = ids[start: start + batch_size]
        rows = ctx.lease.read(lambda conn: conn.execute(select, {"ids": wanted}).fetchall(),  # noqa: B023
                              on=ctx.control, what="read_failed_rows")
        batch = Batch.of(-1, None, rows)
        vectors: list[np.ndarray | None] = [None] * len(rows)
        encode_isolating(ctx.embedder, batch.texts, batch.present, vectors, batch.failed)
        fixed = [i for i in range(len(rows)) if i not in batch.failed]
        gone = set(wanted) - set(batch.id_texts)  # deleted since: nothing to encode

        def body(conn: psycopg.Connection[Any]) -> None:
            written = writer.write(conn, [batch.ids[i] for i in fixed], [vectors[i] for i in fixed],  # noqa: B023
                                   [batch.xmins[i] for i in fixed])  # noqa: B023
            changed = [batch.id_texts[i] for i in fixed if batch.id_texts[i] not in written]  # noqa: B023
            ckpt.record_changed(conn, job, changed)  # changed since: catch-up re-embeds them
            conn.execute(query("forget_failed_rows"),
                         {"job_id": job.id, "row_ids": [batch.id_texts[i] for i in fixed] + sorted(gone)})  # noqa: B023
            if batch.failed:  # noqa: B023
                record(conn, job, batch)  # noqa: B023

        ctx.lease.write(body, on=ctx.control, what="retry_failed_rows")
        log.info("failed_rows_retried", fixed=len(fixed), still_failing=len(batch.failed))
