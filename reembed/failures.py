"""Rows the model cannot take.

An exception while encoding a batch is narrowed down by splitting the batch until the
offending rows stand alone; those are recorded in reembed_failed_rows (in the same
transaction as the batch, their embedding NULL) and skipped, and the rest proceed. The job
finalizes only once every failed row is either encoded by `--retry-failed` or accepted by
`--accept-failed` (their embedding stays NULL, and the run says so).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import psycopg
import structlog

from reembed.batches import Batch, Writer
from reembed.checkpoint import Job
from reembed.commits import commit_batch
from reembed.context import RunContext
from reembed.encoding import HALF_MAX, NON_FINITE, OUT_OF_HALF, Embedder, finite_rows, is_device_fault
from reembed.errors import DeviceFailed, ReembedError, first_line
from reembed.queries import query
from reembed.target import TableInfo

log = structlog.get_logger()


class RowsFailed(ReembedError):
    """Some rows could not be encoded; finalize waits for --retry-failed or --accept-failed."""


def encode_isolating(
    embedder: Embedder,
    texts: Sequence[str | None],
    indices: list[int],
    out: list[np.ndarray | None],
    failed: dict[int, str],
    *,
    limit: float | None = None,
) -> None:
    """Encode texts[indices] into out[...]; a failing group is split in halves down to single rows.
    A non-finite vector fails its row; a device fault fails the run (DeviceFailed), no row."""
    try:
        encoded = embedder.encode([cast(str, texts[i]) for i in indices])  # indices name rows with content
    except Exception as exc:
        if is_device_fault(exc):
            raise device_failed(exc) from exc
        if len(indices) == 1:
            failed[indices[0]] = f"{type(exc).__name__}: {exc}"[:500]
            return
        middle = len(indices) // 2
        encode_isolating(embedder, texts, indices[:middle], out, failed, limit=limit)
        encode_isolating(embedder, texts, indices[middle:], out, failed, limit=limit)
        return
    place(encoded, indices, out, failed, limit=limit)


def place(encoded: np.ndarray, slots: Sequence[int], out: list[np.ndarray | None], failed: dict[int, str], *,
          limit: float | None = None) -> None:
    """encoded[k] into out[slots[k]]; a non-finite vector (pgvector refuses NaN and Inf), or one
    beyond `limit` (a halfvec column's range), fails its row, with the reason, and stays out."""
    for slot, vec, fits in zip(slots, encoded, finite_rows(encoded, limit), strict=True):
        if fits:
            out[slot] = vec
        else:
            failed[slot] = OUT_OF_HALF if limit is not None and np.isfinite(vec).all() else NON_FINITE


def value_limit(info: TableInfo) -> float | None:
    """The largest value the column takes: halfvec's range, or None (any finite float32)."""
    return HALF_MAX if info.column_type == "halfvec" else None


def device_failed(exc: BaseException) -> DeviceFailed:
    return DeviceFailed(f"the device failed ({first_line(exc)}); nothing of the rows in flight was written and no "
                        "row was marked failed: check the GPU (nvidia-smi, the kernel log), then re-run to resume")


def pending(conn: psycopg.Connection[Any], job: Job) -> int:
    row = conn.execute(query("failed_rows_pending"), {"job_id": job.id}).fetchone()
    return int(row["n"]) if row else 0


def settle(ctx: RunContext) -> str:
    """Before finalize: retry or accept the failed rows as told; refuse to finalize past them otherwise.
    Returns a note for the report ('' when there were none)."""
    job, opts = ctx.active, ctx.opts
    waiting = ctx.lease.read(pending, job, on=ctx.control, what="count_failed_rows")
    if not waiting:
        return ""
    if opts.retry_failed:
        _retry(ctx)
        waiting = ctx.lease.read(pending, job, on=ctx.control, what="count_failed_rows")
        if not waiting:
            log.info("failed_rows_recovered")
            return "every previously failed row was encoded on retry"
    if opts.accept_failed and ctx.info.not_null:
        raise RowsFailed(
            f"{waiting} rows could not be encoded, and {ctx.info.column} is NOT NULL: they cannot be accepted "
            "without a vector; fix them (see `reembed status` and reembed_failed_rows) and run again with "
            "--retry-failed (a NULL text: --null-content empty)")
    if opts.accept_failed:
        ctx.lease.write(_accept, job, on=ctx.control, what="accept_failed_rows")
        log.warning("failed_rows_accepted", count=waiting, detail="their embedding stays NULL")
        return f"{waiting} rows that the model could not encode were accepted: their embedding is NULL"
    raise RowsFailed(
        f"{waiting} rows could not be encoded (see `reembed status` and reembed_failed_rows); fix them and "
        "run again with --retry-failed, or finalize without them with --accept-failed (their embedding stays NULL)"
    )


def _accept(conn: psycopg.Connection[Any], job: Job) -> None:
    conn.execute(query("accept_failed_rows"), {"job_id": job.id})


def _failed_ids(conn: psycopg.Connection[Any], job: Job) -> list[str]:
    return [r["row_id"] for r in conn.execute(query("failed_row_ids"), {"job_id": job.id}).fetchall()]


def _rows(conn: psycopg.Connection[Any], select: Any, row_ids: list[str]) -> list[dict[str, Any]]:
    return conn.execute(select, {"ids": row_ids}).fetchall()


def _retry(ctx: RunContext) -> None:
    job, info, batch_size = ctx.active, ctx.info, ctx.opts.batch_size
    ids = ctx.lease.read(_failed_ids, job, on=ctx.control, what="failed_row_ids")
    writer = Writer(info, column=ctx.strategy.column(ctx))
    select = info.statement("rows_by_ids")
    for start in range(0, len(ids), batch_size):
        wanted = ids[start: start + batch_size]
        batch = Batch.of(-1, None, ctx.lease.read(_rows, select, wanted, on=ctx.control, what="read_failed_rows"))
        vectors: list[np.ndarray | None] = [None] * len(batch.ids)
        encode_isolating(ctx.embedder, batch.texts, batch.present, vectors, batch.failed, limit=value_limit(info))
        batch.vectors = vectors
        fixed = [t for i, t in enumerate(batch.id_texts) if i not in batch.failed]
        gone = sorted(set(wanted) - set(batch.id_texts))  # deleted since: nothing to encode
        # the rows that still fail stay as they are; those changed since are caught up, not failed
        commit = functools.partial(commit_batch, write_failed=False, forget_failed=fixed + gone)
        ctx.lease.write(commit, job, writer, batch, on=ctx.control, what="retry_failed_rows")
        log.info("failed_rows_retried", fixed=len(fixed), still_failing=len(batch.failed))
