"""The reembed_checkpoint rows: create, find, claim, advance, finish.

A job is one row of reembed_checkpoint per (table, target signature); its cursors live in
reembed_checkpoint_range (the key space cut into ranges at prepare, reembed.ranges), each
claimed by one worker at a time. Every cursor move happens in the same transaction as the
vector writes it stands for, names the worker that claimed the range, and must match exactly
one row. reembed_worker holds one row per worker process, for `reembed status`.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from reembed.errors import CheckpointConflict, ClaimLost, InternalError, ReembedError
from reembed.queries import query, schema_sql
from reembed.signature import Signature
from reembed.target import TableInfo

ACTIVE = ("embedding", "finalizing")
_SCHEMA_LOCK = 0x7265656D00000000  # 'reem' << 32: serialises schema creation across runs
_SPLIT_NAMESPACE = 0x7265656E  # 'reen': one transaction-level lock per job serialises its splits


def split_key(job_id: int) -> int:
    return (_SPLIT_NAMESPACE << 32) | (job_id & 0xFFFFFFFF)

R = TypeVar("R")


@dataclass(frozen=True)
class Job:
    """A row of reembed_checkpoint (psycopg maps it by column name)."""

    job_id: int
    table_name: str
    column_name: str
    content_column: str
    id_column: str
    id_type: str
    state: str
    strategy: str
    target_model_name: str
    target_dimension: int
    target_hash: str
    source_model_name: str | None
    source_dimension: int | None
    source_hash: str | None
    source_typmod: int | None
    index_name: str | None
    index_def: dict[str, Any] | None
    index_dropped: bool
    rows_total: int | None
    finalize_steps: list[str]
    holder: str | None
    heartbeat_at: dt.datetime | None
    last_error: str | None
    started_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    capture_trigger: str | None = None
    catchup_pass: int = 0
    catchup_pass_total: int = 0
    catchup_pass_done: int = 0
    catchup_rows: int = 0
    writers_held_secs: float | None = None
    dependents: list[dict[str, Any]] | None = None  # the inventory (reembed.dependents); None: an older job
    throttle_reason: str | None = None  # while the job is held (reembed.throttle): the checks over their limits
    throttled_since: dt.datetime | None = None
    throttled_secs: float = 0.0
    shadow: dict[str, Any] | None = None  # --strategy shadow: its column and indexes (reembed.shadow)
    gate: dict[str, Any] | None = None  # the quality gate's figures
    swapped_at: dt.datetime | None = None
    previous_state: str | None = None  # after a shadow swap: kept | rolled_back | cleaned
    content_expr: str | None = None  # --content: the text as a SQL expression (None: content_column)
    null_content: str = "null"  # --null-content
    history: list[dict[str, Any]] | None = None  # samples of its progress (record_history), for reports
    partitions: list[dict[str, Any]] | None = None  # a partitioned table's partitions (reembed.partitions); None: none

    @property
    def id(self) -> int:
        return self.job_id

    @property
    def target(self) -> Signature:
        return Signature(self.target_model_name, self.target_dimension, self.target_hash)

    @property
    def source(self) -> Signature | None:
        if self.source_model_name is None:
            return None
        return Signature(self.source_model_name, int(self.source_dimension or 0), self.source_hash or "")

    def matches(self, sig: Signature) -> bool:
        return self.target == sig

    def matches_fingerprint(self, name: str, model_hash: str) -> bool:
        return self.target_model_name == name and self.target_hash == model_hash

    @property
    def steps(self) -> list[str]:
        return list(self.finalize_steps or [])


@dataclass
class Range:
    """A row of reembed_checkpoint_range: one key range's cursor, as last committed."""

    job_id: int
    range_no: int
    lower_id: str | None
    upper_id: str | None
    last_id: str | None
    rows_done: int
    rows_skipped: int
    rows_per_sec: float | None
    done: bool
    claimed_by: str | None
    updated_at: dt.datetime
    rows_estimate: int | None = None
    claimed_pid: int | None = None
    heartbeat_at: dt.datetime | None = None
    split_wanted: bool = False
    taken_from: str | None = None  # set by claim(): the stale claimant this claim took over from


@dataclass(frozen=True)
class WorkerRow:
    """A row of reembed_worker, with its heartbeat's age."""

    job_id: int
    worker: str
    host: str
    pid: int
    device: str | None
    range_no: int | None
    rows_done: int
    rows_per_sec: float | None
    state: str
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    heartbeat_age: float
    range_last_id: str | None


def _one(conn: psycopg.Connection[Any], cls: type[R], name: str, params: dict[str, Any]) -> R | None:
    with conn.cursor(row_factory=class_row(cls)) as cur:
        return cur.execute(query(name), params).fetchone()


def _all(conn: psycopg.Connection[Any], cls: type[R], name: str, params: dict[str, Any]) -> list[R]:
    with conn.cursor(row_factory=class_row(cls)) as cur:
        return cur.execute(query(name), params).fetchall()


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create reembed's own tables if missing (concurrent runs on other tables serialise here)."""
    with conn.transaction():
        conn.execute(query("schema_lock"), {"key": _SCHEMA_LOCK})
        conn.execute(schema_sql())


def schema_present(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(query("checkpoint_table_exists")).fetchone()
    return bool(row and row["present"])


def active_job(conn: psycopg.Connection[Any], info: TableInfo) -> Job | None:
    if not schema_present(conn):
        return None
    return _one(conn, Job, "active_job", {"table": info.qualified, "column": info.column})


def latest_job(conn: psycopg.Connection[Any], table: str, column: str) -> Job | None:
    if not schema_present(conn):
        return None
    return _one(conn, Job, "latest_job", {"table": table, "column": column})


def kept_previous(conn: psycopg.Connection[Any], table: str, column: str) -> Job | None:
    """The shadow job whose previous column is kept on (table, column), if any."""
    row = conn.execute(query("previous_state_exists")).fetchone()
    if not row or not row["present"]:  # no reembed tables, or of a version before the shadow strategy
        return None
    return _one(conn, Job, "kept_previous", {"table": table, "column": column})


def find(conn: psycopg.Connection[Any], job_id: int) -> Job | None:
    return _one(conn, Job, "job_by_id", {"job_id": job_id})


def reload(conn: psycopg.Connection[Any], job: Job) -> Job:
    fresh = _one(conn, Job, "job_by_id", {"job_id": job.id})
    if fresh is None:
        raise ReembedError(f"job {job.id} is gone from reembed_checkpoint (deleted by hand?); "
                           "run again to start a new job")
    return fresh


def create_job(
    conn: psycopg.Connection[Any],
    info: TableInfo,
    *,
    target: Signature,
    source: Signature | None,
    index: dict[str, Any] | None,
    index_name: str | None,
    source_typmod: int | None,
    rows_total: int | None,
    holder: str,
    dependents: list[dict[str, Any]] | None = None,
    strategy: str = "in_place",
    bounds: Sequence[str] = (),
) -> Job:
    """Insert the job and its ranges, cut at `bounds` (reembed.ranges: each range's inclusive upper
    key; the last range is unbounded). Call inside the caller's transaction."""
    job = _one(conn, Job, "insert_job", {
        "table": info.qualified,
        "column": info.column,
        "content_column": info.content_column,
        "id_column": ",".join(info.pk.columns),  # the key's columns (several for a composite key)
        "id_type": ",".join(info.pk.types),
        "target_model_name": target.name,
        "target_dimension": target.dimension,
        "target_hash": target.hash,
        "source_model_name": source.name if source else None,
        "source_dimension": source.dimension if source else None,
        "source_hash": source.hash if source else None,
        "source_typmod": source_typmod,
        "index_name": index_name,
        "index_def": Jsonb(index) if index is not None else None,
        "rows_total": rows_total,
        "holder": holder,
        "dependents": Jsonb(dependents) if dependents is not None else None,
        "strategy": strategy,
        "content_expr": info.content_sql,
        "null_content": info.null_content,
    })
    if job is None:
        raise InternalError("insert_job returned no row")
    edges: list[str | None] = [None, *bounds, None]
    estimate = (rows_total or 0) // (len(bounds) + 1) + 1
    with conn.cursor() as cur:
        cur.executemany(query("insert_range"), [
            {"job_id": job.id, "range_no": i, "lower_id": lower, "upper_id": upper, "estimate": estimate}
            for i, (lower, upper) in enumerate(itertools.pairwise(edges))])
    record_history(conn, job.id, now=True)
    return job


def ranges(conn: psycopg.Connection[Any], job: Job) -> list[Range]:
    return _all(conn, Range, "job_ranges", {"job_id": job.id})


def claim(conn: psycopg.Connection[Any], job: Job, worker: str, *, pid: int, key: int,
          stale_secs: float) -> Range | None:
    """The next range to work on — unclaimed, or a stale claim taken over from its cursor —
    claimed for `worker`, whose lock connection is backend `pid` (inside the caller's transaction)."""
    rng = _one(conn, Range, "claim_range", {"job_id": job.id, "key": key, "stale_secs": stale_secs,
                                            "worker": worker})
    if rng is None:
        return None
    conn.execute(query("mark_claimed"), {"job_id": job.id, "range_no": rng.range_no, "worker": worker, "pid": pid})
    rng.taken_from = rng.claimed_by if rng.claimed_by != worker else None
    rng.claimed_by, rng.claimed_pid, rng.split_wanted = worker, pid, False
    return rng


def release_claims(conn: psycopg.Connection[Any], job: Job) -> None:
    conn.execute(query("release_claims"), {"job_id": job.id})


def release_mine(conn: psycopg.Connection[Any], job_id: int, worker: str) -> None:
    conn.execute(query("release_my_claims"), {"job_id": job_id, "worker": worker})


def beat_claims(conn: psycopg.Connection[Any], job_id: int, worker: str, pid: int) -> None:
    conn.execute(query("beat_claims"), {"job_id": job_id, "worker": worker, "pid": pid})


def request_split(conn: psycopg.Connection[Any], job: Job, min_rows: int) -> int | None:
    """Ask the holder of the largest remaining range to split it; its number, or None."""
    row = conn.execute(query("request_split"), {"job_id": job.id, "min_rows": min_rows}).fetchone()
    return int(row["range_no"]) if row else None


def split(conn: psycopg.Connection[Any], rng: Range, *, at: str, keep: int, give: int) -> int:
    """Cut `rng` (ours) at `at`: it keeps (lower, at], a new unclaimed range gets (at, upper].
    The new range's number."""
    conn.execute(query("split_lock"), {"key": split_key(rng.job_id)})
    moved = conn.execute(query("split_range"), {
        "job_id": rng.job_id, "range_no": rng.range_no, "worker": rng.claimed_by, "at": at,
        "upper": rng.upper_id, "keep_estimate": rng.rows_done + rng.rows_skipped + keep}).rowcount
    if moved != 1:
        raise ClaimLost(rng)
    row = conn.execute(query("insert_split"), {"job_id": rng.job_id, "at": at, "upper": rng.upper_id,
                                               "estimate": give}).fetchone()
    if row is None:
        raise InternalError("insert_split returned no row")
    return int(row["range_no"])


def split_landed(conn: psycopg.Connection[Any], rng: Range) -> tuple[str, int] | None:
    """On a split's retry: had the first attempt's commit landed (the range cut at its new upper
    bound, a new range from there)? (where it was cut, the new range's number), or None."""
    row = conn.execute(query("split_landed"), {"job_id": rng.job_id, "range_no": rng.range_no,
                                               "upper": rng.upper_id}).fetchone()
    if row is None or row["new_range_no"] is None:
        return None
    return str(row["at"]), int(row["new_range_no"])


def decline_split(conn: psycopg.Connection[Any], rng: Range, *, left: int) -> None:
    conn.execute(query("split_declined"), {"job_id": rng.job_id, "range_no": rng.range_no, "worker": rng.claimed_by,
                                           "estimate": rng.rows_done + rng.rows_skipped + left})


def join_worker(conn: psycopg.Connection[Any], job_id: int, worker: str, host: str, pid: int, device: str) -> None:
    conn.execute(query("upsert_worker"), {"job_id": job_id, "worker": worker, "host": host, "pid": pid,
                                          "device": device})


def beat_worker(conn: psycopg.Connection[Any], job_id: int, worker: str, *, range_no: int | None, rows: int,
                rate: float | None, state: str) -> None:
    conn.execute(query("beat_worker"), {"job_id": job_id, "worker": worker, "range_no": range_no, "rows": rows,
                                        "rate": rate, "state": state})


def workers(conn: psycopg.Connection[Any], job: Job) -> list[WorkerRow]:
    row = conn.execute(query("worker_table_exists")).fetchone()
    if not row or not row["present"]:  # reembed's tables of a version before workers
        return []
    return _all(conn, WorkerRow, "job_workers", {"job_id": job.id})


def range_counts(conn: psycopg.Connection[Any], job: Job) -> dict[str, int]:
    row = conn.execute(query("job_range_counts"), {"job_id": job.id}).fetchone()
    return {k: int(v or 0) for k, v in (row or {}).items()}


def open_ranges(conn: psycopg.Connection[Any], job: Job) -> int:
    row = conn.execute(query("open_ranges"), {"job_id": job.id}).fetchone()
    return int(row["n"]) if row else 0


def committed_cursor(conn: psycopg.Connection[Any], rng: Range) -> str | None:
    row = conn.execute(query("range_cursor"), {"job_id": rng.job_id, "range_no": rng.range_no}).fetchone()
    return row["last_id"] if row else None


def advance(
    conn: psycopg.Connection[Any], rng: Range, *, to_id: str, rows: int, skipped: int, rate: float | None
) -> bool:
    """Move the cursor from where we last left it, as the range's claimant; a claim taken over by
    another worker is ClaimLost, anything else a conflict. Whether a dry worker asked for a split."""
    cur = conn.execute(
        query("advance_checkpoint"),
        {
            "job_id": rng.job_id,
            "range_no": rng.range_no,
            "from_id": rng.last_id,
            "to_id": to_id,
            "rows": rows,
            "skipped": skipped,
            "rate": rate,
            "worker": rng.claimed_by,
        },
    )
    row = cur.fetchone()
    if row is None:
        why_not_moved(conn, rng)
    return bool(row and row["split_wanted"])


def why_not_moved(conn: psycopg.Connection[Any], rng: Range) -> None:
    """The cursor did not move: another worker took the claim over (ClaimLost), or it is not where
    we left it (CheckpointConflict)."""
    row = conn.execute(query("range_claimant"), {"job_id": rng.job_id, "range_no": rng.range_no}).fetchone()
    if row is not None and row["claimed_by"] != rng.claimed_by:
        raise ClaimLost(rng)
    raise CheckpointConflict(rng.job_id, rng.last_id)


def finish_range(conn: psycopg.Connection[Any], rng: Range) -> None:
    moved = conn.execute(
        query("finish_range"),
        {"job_id": rng.job_id, "range_no": rng.range_no, "last_id": rng.last_id, "worker": rng.claimed_by},
    ).rowcount
    if moved != 1:
        why_not_moved(conn, rng)


def set_state(conn: psycopg.Connection[Any], job: Job, *, to: str, from_state: str) -> None:
    moved = conn.execute(query("set_job_state"), {"job_id": job.id, "state": to, "from_state": from_state}).rowcount
    if moved != 1:
        raise CheckpointConflict(job.id, from_state)
    record_history(conn, job.id, now=True)


def mark_index_dropped(conn: psycopg.Connection[Any], job: Job) -> None:
    conn.execute(query("mark_index_dropped"), {"job_id": job.id})


def record_step(conn: psycopg.Connection[Any], job: Job, step: str) -> None:
    conn.execute(query("record_finalize_step"), {"job_id": job.id, "step": step})
    record_history(conn, job.id, now=True)


def record_changed(conn: psycopg.Connection[Any], job: Job, row_ids: list[str]) -> None:
    """Keys for catch-up: rows that changed between the job's read and its write."""
    if row_ids:
        conn.execute(query("capture_keys"), {"job_id": job.id, "row_ids": row_ids})


def record_failed(conn: psycopg.Connection[Any], job: Job, errors: dict[str, str]) -> None:
    """Rows the model could not take (key -> why), inside their batch's transaction."""
    with conn.cursor() as cur:
        cur.executemany(query("record_failed_rows"),
                        [{"job_id": job.id, "row_id": row_id, "error": error} for row_id, error in errors.items()])


def forget_failed(conn: psycopg.Connection[Any], job: Job, row_ids: list[str]) -> None:
    """Rows no longer failed: encoded at last, or deleted."""
    conn.execute(query("forget_failed_rows"), {"job_id": job.id, "row_ids": row_ids})


def heartbeat(conn: psycopg.Connection[Any], job_id: int, holder: str) -> None:
    conn.execute(query("heartbeat"), {"job_id": job_id, "holder": holder})
    record_history(conn, job_id)


def record_history(conn: psycopg.Connection[Any], job_id: int, *, now: bool = False) -> None:
    """A sample of the job's progress for its history: `now`, or if the last one is old enough."""
    conn.execute(query("record_history"), {"job_id": job_id, "every": 0.0 if now else None})


def record_error(conn: psycopg.Connection[Any], job: Job, error: str) -> None:
    conn.execute(query("record_error"), {"job_id": job.id, "error": error[:2000]})


def progress(conn: psycopg.Connection[Any], job: Job) -> dict[str, Any]:
    row = conn.execute(query("job_progress"), {"job_id": job.id}).fetchone()
    if row is None:  # an aggregate: always one row
        raise InternalError("job_progress returned no row")
    return dict(row)
