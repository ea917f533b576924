"""The database side of the tests: the design's schema filled with rows, snapshots and queries to
compare before and after, the checkpoint checked against the data, an application's open
transaction, and what pg_stat_activity says the job is waiting on."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Self

import psycopg
from pgvector.psycopg import register_vector
from psycopg.rows import dict_row

from support.fakes import hash_vector, sentence

REGISTRY_DDL = """
CREATE TABLE embedding_model (
    id int PRIMARY KEY CHECK (id = 1),
    model_name text NOT NULL, dimension int NOT NULL, model_hash text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now()
)"""


def make_id(id_type: str, i: int) -> Any:
    if id_type == "uuid":
        return uuid.uuid5(uuid.NAMESPACE_OID, str(i))  # random order relative to i
    return i * 3 + 1 if id_type == "bigint" else f"k{i:05d}"


def make_table(
    dsn: str,
    *,
    rows: int = 200,
    id_type: str = "uuid",
    old_dim: int = 64,
    null_every: int = 0,
    with_index: bool = True,
    registry: bool = True,
    old_model: str = "old-model",
    content: Callable[[int], str | None] | None = None,
    table: str = "knowledge_nodes",
) -> list[Any]:
    """The design's schema, filled with `rows` rows embedded by an "old" 64-d model."""
    id_sql = {"uuid": "uuid", "bigint": "bigint", "text": "text"}[id_type]
    ids: list[Any] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table} (id {id_sql} PRIMARY KEY, content text, source text NOT NULL,"
            f" touched int NOT NULL DEFAULT 7, embedding vector({old_dim}))"
        )
        if with_index:
            conn.execute(
                f"CREATE INDEX idx_{table}_embedding_hnsw ON {table}"
                " USING hnsw (embedding vector_cosine_ops) WITH (m = 8, ef_construction = 32)"
            )
        if registry:
            conn.execute(REGISTRY_DDL)
            conn.execute(
                "INSERT INTO embedding_model (id, model_name, dimension, model_hash) VALUES (1, %s, %s, 'sha256:old')",
                (old_model, old_dim),
            )
        data = []
        for i in range(rows):
            row_id = make_id(id_type, i)
            text = content(i) if content else (None if null_every and i % null_every == 0 else sentence(i))
            vec = hash_vector(f"old:{text}", old_dim) if text is not None else None
            data.append((row_id, text, f"src-{i}", vec))
            ids.append(row_id)
        register_vector(conn)
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} (id, content, source, embedding) VALUES (%s, %s, %s, %s)", data)
        conn.execute(f"ANALYZE {table}")
    return ids


def snapshot(dsn: str, table: str = "knowledge_nodes") -> dict[str, Any]:
    """Everything a test compares before/after: rows (all columns), catalog facts, tool tables."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        rows = conn.execute(f"SELECT to_jsonb(t)::text AS r FROM {table} t ORDER BY 1").fetchall()
        col = conn.execute(
            "SELECT format_type(atttypid, atttypmod) AS t FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attname = 'embedding'",
            (table,),
        ).fetchone()
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s ORDER BY indexname", (table,)
        ).fetchall()
        reg = None
        if conn.execute("SELECT to_regclass('embedding_model') IS NOT NULL AS p").fetchone()["p"]:
            reg = conn.execute("SELECT model_name, dimension, model_hash, updated_at FROM embedding_model").fetchall()
        tool = conn.execute("SELECT to_regclass('reembed_checkpoint') IS NOT NULL AS p").fetchone()["p"]
        return {
            "rows": rows,
            "column": col["t"] if col else None,
            "indexes": indexes,
            "registry": reg,
            "tool_tables": tool,
        }


def fetch(dsn: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def one(dsn: str, sql: str, params: Any = None) -> Any:
    rows = fetch(dsn, sql, params)
    return next(iter(rows[0].values())) if rows else None


def assert_checkpoint_agrees_with_data(dsn: str, new_dim: int, *, model: Any = None) -> str:
    """Rows up to the cursor hold new vectors, every other row its old one: nothing lost, nothing
    extra, and the rows done counted. New and old are told apart by their dimension or, for a job
    that keeps the dimension, by `model` (a model directory): a new vector is its encoding of the
    row's content, an old one the vector make_table wrote. Returns the cursor."""
    import json

    import numpy as np

    last_id = one(dsn, "SELECT last_id FROM reembed_checkpoint_range")
    done = one(dsn, "SELECT rows_done FROM reembed_checkpoint_range")
    rows = fetch(dsn, "SELECT id::text AS id, content, embedding::text AS e FROM knowledge_nodes ORDER BY id")
    ids = [r["id"] for r in rows]
    cursor = -1 if last_id is None else ids.index(last_id)  # key order, whatever the key's type
    rows = [dict(r, behind=i <= cursor) for i, r in enumerate(rows) if r["content"] is not None]
    vectors = [None if r["e"] is None else np.array(json.loads(r["e"]), dtype=np.float32) for r in rows]
    if model is None:
        new = [v is not None and len(v) == new_dim for v in vectors]
        assert not all(new) or all(r["behind"] for r in rows), "every row is new_dim-d: pass the model"
    else:
        from support.models import reference

        want = reference(model).encode([r["content"] for r in rows], convert_to_numpy=True)
        new = [v is not None and v.shape == w.shape and bool(np.allclose(v, w, rtol=1e-4, atol=1e-5))
               for v, w in zip(vectors, want, strict=True)]
        stale = [r["id"] for r, v in zip(rows, vectors, strict=True) if not r["behind"]
                 and (v is None or not np.allclose(v, hash_vector(f"old:{r['content']}", len(v)), atol=1e-6))]
        assert stale == [], f"rows after the cursor that lost their old vector: {stale[:5]}"
    assert new == [r["behind"] for r in rows]
    assert sum(new) == done
    return str(last_id)


def job_rows_done(dsn: str) -> int:
    try:
        value = one(dsn, "SELECT coalesce(sum(rows_done + rows_skipped), 0) FROM reembed_checkpoint_range")
    except psycopg.errors.UndefinedTable:
        return 0
    return int(value or 0)


def keys(dsn: str, table: str = "knowledge_nodes") -> list[Any]:
    """The table's ids in key order (the order the job walks them)."""
    return [r["id"] for r in fetch(dsn, f"SELECT id FROM {table} ORDER BY id")]


def ddl_waiting(dsn: str) -> int:
    """How many of the job's DDL statements (ALTER TABLE, DROP TRIGGER, or the cut-over's
    registry-and-table lock request) wait on a lock right now."""
    return int(
        one(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND application_name LIKE 'reembed %%'"
            " AND (query ILIKE 'ALTER TABLE%%' OR query ILIKE 'DROP TRIGGER%%' OR query ILIKE '%%LOCK TABLE%%')",
        )
    )


def writer_waiting(dsn: str) -> int:
    """Is the job's writer waiting on a lock (an application's row lock) right now?"""
    return int(
        one(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'reembed writer%%'"
            " AND wait_event_type = 'Lock'",
        )
    )


class Application:
    """An application's open transaction, holding what a live system holds, until end()."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn)

    def hold_row(self, key: Any, table: str = "knowledge_nodes") -> None:
        self.conn.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE", (key,))

    def hold_registry(self) -> None:
        """What every writer of the runbook's protocol holds for a moment: the registry row FOR SHARE."""
        self.conn.execute("SELECT 1 FROM embedding_model WHERE id = 1 FOR SHARE")

    def hold_table(self, table: str = "knowledge_nodes") -> None:
        self.conn.execute(f"LOCK TABLE {table} IN ACCESS SHARE MODE")

    def end(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()
