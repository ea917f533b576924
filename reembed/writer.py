"""Reading batches in key order, and writing vectors back.

Three write paths, measured by `scripts/bench.py` (writepaths section): each batch of 256
random vectors plus a checkpoint update, one transaction per batch, 20,000 rows, PostgreSQL 18
+ pgvector 0.8.2 embedded, in rows/s (best of two passes):

    path                                 384-d (2 cores)   768-d (2 cores)   384-d / 768-d (H100 host, 16 cores)
    executemany (pipeline mode)          26,795            15,797            29,367 / 14,867
    binary COPY + UPDATE ... FROM        42,210            15,632            43,198 / 15,891
    UPDATE ... FROM unnest(ids, vecs)     1,486               805             1,875 /    938

COPY wins at 384-d and ties executemany at 768-d (where WAL and TOAST work on the server
dominate), so it is the default. unnest loses by 20x: psycopg dumps a list of numpy arrays
as a vector[] value element by element on the client (~0.24 s per 256 x 768 batch), and the
planner hashes the whole table for each batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from reembed.target import TableInfo

WRITE_PATHS = ("executemany", "copy", "unnest")
DEFAULT_WRITE_PATH = "copy"


@dataclass
class Batch:
    """One keyset page: ids in key order, their text form, and their content (None = NULL)."""

    seq: int
    after: str | None  # the cursor before this batch (exclusive lower bound)
    ids: list[Any]
    id_texts: list[str]
    texts: list[str | None]
    vectors: list[np.ndarray | None] | None = None
    failed: dict[int, str] = field(default_factory=dict)  # index -> why the model could not take it

    @property
    def last_id(self) -> str:
        return self.id_texts[-1]

    @property
    def skipped(self) -> int:
        return sum(1 for t in self.texts if t is None)


class Reader:
    """Keyset pagination: WHERE id > last ORDER BY id LIMIT n, on its own connection."""

    def __init__(self, conn: psycopg.Connection[Any], info: TableInfo, *, batch_size: int, upper: str | None = None):
        self.conn = conn
        self.batch_size = batch_size
        ids = info.ids()
        bound = sql.SQL(" AND {id} <= CAST(%(upper)s AS {id_type})").format(**ids) if upper else sql.SQL("")
        select = "SELECT {id} AS id, {id}::text AS id_text, {content} AS content FROM {table}"
        self._first = sql.SQL(select + " WHERE true{bound} ORDER BY {id} LIMIT %(n)s").format(bound=bound, **ids)
        self._next = sql.SQL(
            select + " WHERE {id} > CAST(%(after)s AS {id_type}){bound} ORDER BY {id} LIMIT %(n)s"
        ).format(bound=bound, **ids)
        self.upper = upper

    def read(self, after: str | None, seq: int) -> Batch | None:
        params = {"after": after, "n": self.batch_size, "upper": self.upper}
        with self.conn.transaction():
            rows = self.conn.execute(self._first if after is None else self._next, params).fetchall()
        if not rows:
            return None
        return Batch(
            seq=seq,
            after=after,
            ids=[r["id"] for r in rows],
            id_texts=[r["id_text"] for r in rows],
            texts=[r["content"] for r in rows],
        )


class Writer:
    """Writes one batch of vectors (call inside the caller's transaction)."""

    def __init__(self, conn: psycopg.Connection[Any], info: TableInfo, *, path: str = DEFAULT_WRITE_PATH):
        if path not in WRITE_PATHS:
            raise ValueError(f"unknown write path {path!r}")
        self.conn = conn
        self.info = info
        self.path = path
        ids = info.ids()
        self._update_one = sql.SQL("UPDATE {table} SET {col} = %s WHERE {id} = %s").format(**ids)
        self._update_unnest = sql.SQL(
            "UPDATE {table} AS t SET {col} = v.e"
            " FROM unnest(%s::{id_type}[], %s::vector[]) AS v(id, e) WHERE t.{id} = v.id"
        ).format(**ids)
        self._update_stage = sql.SQL(
            "UPDATE {table} AS t SET {col} = s.e FROM pg_temp.reembed_stage AS s WHERE t.{id} = s.id"
        ).format(**ids)
        self._vector_oid = 0
        # A batch joins a few hundred staged rows to the table by primary key. Without stats
        # on the staged rows the planner hashes the whole table for each batch (O(table) per
        # batch, measured: 9 of 17 ms at 20k rows, worse with size); on this connection, which
        # only runs these updates, index nested loops are always right.
        conn.execute("SET enable_hashjoin = off")
        conn.execute("SET enable_mergejoin = off")
        if path == "copy":
            self.prepare()

    def prepare(self) -> None:
        """Create the session's staging table (the connection is in autocommit mode here)."""
        self.conn.execute(
            sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS reembed_stage (id {id_type}, e vector) ON COMMIT DELETE ROWS"
            ).format(**self.info.ids())
        )
        row = self.conn.execute("SELECT 'vector'::regtype::oid::int AS oid").fetchone()
        self._vector_oid = int(row["oid"])  # type: ignore[index]

    def write(self, ids: Sequence[Any], vectors: Sequence[np.ndarray | None]) -> None:
        if self.path == "executemany":
            with self.conn.cursor() as cur:
                cur.executemany(self._update_one, list(zip(vectors, ids, strict=True)))
        elif self.path == "unnest":
            self.conn.execute(self._update_unnest, (list(ids), list(vectors)))
        else:
            self._write_copy(ids, vectors)

    def _write_copy(self, ids: Sequence[Any], vectors: Sequence[np.ndarray | None]) -> None:
        with self.conn.cursor() as cur:
            with cur.copy("COPY pg_temp.reembed_stage (id, e) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types([self.info.id_type_oid, self._vector_oid])
                for row_id, vec in zip(ids, vectors, strict=True):
                    copy.write_row((row_id, vec))
            cur.execute(self._update_stage)
