"""The reembed_checkpoint rows: create, find, resume, advance, finish.

A job is one row of reembed_checkpoint per (table, target signature); its cursors live in
reembed_checkpoint_range (one unbounded range today). Every cursor move happens in the
same transaction as the vector writes it stands for, and must match exactly one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from reembed.embedder import Signature
from reembed.errors import CheckpointConflict
from reembed.queries import query, schema_sql
from reembed.target import TableInfo

ACTIVE = ("embedding", "finalizing")
_SCHEMA_LOCK = 0x7265656D00000000  # 'reem' << 32: serialises schema creation across runs


@dataclass(frozen=True)
class Job:
    row: dict[str, Any]

    @property
    def id(self) -> int:
        return int(self.row["job_id"])

    @property
    def state(self) -> str:
        return str(self.row["state"])

    @property
    def target(self) -> tuple[str, int, str]:
        return (self.row["target_model_name"], self.row["target_dimension"], self.row["target_hash"])

    def matches(self, sig: Signature) -> bool:
        return self.target == (sig.name, sig.dimension, sig.hash)

    def matches_fingerprint(self, name: str, model_hash: str) -> bool:
        return self.row["target_model_name"] == name and self.row["target_hash"] == model_hash

    @property
    def steps(self) -> list[str]:
        return list(self.row["finalize_steps"] or [])


@dataclass
class Cursor:
    """One range's position, as last committed."""

    job_id: int
    range_no: int
    last_id: str | None
    upper_id: str | None
    rows_done: int
    rows_skipped: int
    done: bool


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create reembed's own tables if missing (concurrent runs on other tables serialise here)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute(schema_sql())  # type: ignore[arg-type]


def schema_present(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(query("checkpoint_table_exists")).fetchone()
    return bool(row and row["present"])


def active_job(conn: psycopg.Connection[Any], info: TableInfo) -> Job | None:
    if not schema_present(conn):
        return None
    row = conn.execute(query("active_job"), {"table": info.qualified, "column": info.column}).fetchone()
    return Job(row) if row else None


def latest_job(conn: psycopg.Connection[Any], table: str, column: str) -> Job | None:
    if not schema_present(conn):
        return None
    row = conn.execute(query("latest_job"), {"table": table, "column": column}).fetchone()
    return Job(row) if row else None


def reload(conn: psycopg.Connection[Any], job: Job) -> Job:
    row = conn.execute(query("job_by_id"), {"job_id": job.id}).fetchone()
    assert row is not None, f"job {job.id} vanished"
    return Job(row)


def create_job(
    conn: psycopg.Connection[Any],
    info: TableInfo,
    *,
    target: Signature,
    source: dict[str, Any] | None,
    index: dict[str, Any] | None,
    index_name: str | None,
    source_typmod: int | None,
    rows_total: int | None,
    holder: str,
) -> Job:
    """Insert the job and its single range. Call inside the caller's transaction."""
    row = conn.execute(
        query("insert_job"),
        {
            "table": info.qualified,
            "column": info.column,
            "content_column": info.content_column,
            "id_column": info.id_column,
            "id_type": info.id_type,
            "target_model_name": target.name,
            "target_dimension": target.dimension,
            "target_hash": target.hash,
            "source_model_name": source["model_name"] if source else None,
            "source_dimension": source["dimension"] if source else None,
            "source_hash": source["model_hash"] if source else None,
            "source_typmod": source_typmod,
            "index_name": index_name,
            "index_def": Jsonb(index) if index is not None else None,
            "rows_total": rows_total,
            "holder": holder,
        },
    ).fetchone()
    assert row is not None
    conn.execute(query("insert_range"), {"job_id": row["job_id"], "range_no": 0, "lower_id": None, "upper_id": None})
    return Job(row)


def cursors(conn: psycopg.Connection[Any], job: Job) -> list[Cursor]:
    rows = conn.execute(query("job_ranges"), {"job_id": job.id}).fetchall()
    return [
        Cursor(
            job_id=job.id,
            range_no=r["range_no"],
            last_id=r["last_id"],
            upper_id=r["upper_id"],
            rows_done=r["rows_done"],
            rows_skipped=r["rows_skipped"],
            done=r["done"],
        )
        for r in rows
    ]


def advance(
    conn: psycopg.Connection[Any],
    cursor: Cursor,
    *,
    to_id: str,
    rows: int,
    skipped: int,
    rate: float | None,
) -> None:
    """Move the cursor from where we last left it; anything else is a conflict."""
    moved = conn.execute(
        query("advance_checkpoint"),
        {
            "job_id": cursor.job_id,
            "range_no": cursor.range_no,
            "from_id": cursor.last_id,
            "to_id": to_id,
            "rows": rows,
            "skipped": skipped,
            "rate": rate,
        },
    ).rowcount
    if moved != 1:
        raise CheckpointConflict(cursor.job_id, cursor.last_id)


def finish_range(conn: psycopg.Connection[Any], cursor: Cursor) -> None:
    moved = conn.execute(
        query("finish_range"),
        {"job_id": cursor.job_id, "range_no": cursor.range_no, "last_id": cursor.last_id},
    ).rowcount
    if moved != 1:
        raise CheckpointConflict(cursor.job_id, cursor.last_id)


def set_state(conn: psycopg.Connection[Any], job: Job, *, to: str, from_state: str) -> None:
    moved = conn.execute(query("set_job_state"), {"job_id": job.id, "state": to, "from_state": from_state}).rowcount
    if moved != 1:
        raise CheckpointConflict(job.id, from_state)


def record_step(conn: psycopg.Connection[Any], job: Job, step: str) -> None:
    conn.execute(query("record_finalize_step"), {"job_id": job.id, "step": step})


def heartbeat(conn: psycopg.Connection[Any], job_id: int, holder: str) -> None:
    conn.execute(query("heartbeat"), {"job_id": job_id, "holder": holder})


def record_error(conn: psycopg.Connection[Any], job: Job, error: str) -> None:
    conn.execute(query("record_error"), {"job_id": job.id, "error": error[:2000]})


def progress(conn: psycopg.Connection[Any], job: Job) -> dict[str, Any]:
    row = conn.execute(query("job_progress"), {"job_id": job.id}).fetchone()
    assert row is not None
    return dict(row)
