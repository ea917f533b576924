"""Batches: reading them in key order, and writing their vectors back.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg

from reembed.queries import query
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
    xmins: list[int] = field(default_factory=list)  # each row's xmin when read: the write checks it
    vectors: list[np.ndarray | None] | None = None
    failed: dict[int, str] = field(default_factory=dict)  # index -> why the model could not take it

    @classmethod
    def of(cls, seq: int, after: str | None, rows: Sequence[dict[str, Any]]) -> Batch:
        """A page as the reads return it: a one-column key as `id`, a composite one as `id_0`,
        `id_1`, ... (kept as a tuple), and the key's text form as `id_text`."""
        parts = sorted((k for k in rows[0] if k.startswith("id_") and k[3:].isdigit()), key=lambda k: int(k[3:])) \
            if rows and "id" not in rows[0] else []
        return cls(
            seq=seq,
            after=after,
            ids=[tuple(r[k] for k in parts) for r in rows] if parts else [r["id"] for r in rows],
            id_texts=[r["id_text"] for r in rows],
            texts=[r["content"] for r in rows],
            xmins=[r["xmin"] for r in rows],
        )

    @property
    def present(self) -> list[int]:
        """Positions of the rows with content (NULL content is skipped)."""
        return [i for i, t in enumerate(self.texts) if t is not None]

    @property
    def present_texts(self) -> list[str]:
        """The content of the rows that have some, in their order."""
        return [t for t in self.texts if t is not None]

    @property
    def last_id(self) -> str:
        return self.id_texts[-1]

    @property
    def skipped(self) -> int:
        return sum(1 for t in self.texts if t is None)


class Reader:
    """Keyset pagination over one key range: WHERE id > last ORDER BY id LIMIT n."""

    def __init__(self, info: TableInfo, *, batch_size: int, upper: str | None = None) -> None:
        self.batch_size = batch_size
        self.upper = upper
        self._first = info.statement("read_first")
        self._next = info.statement("read_next")

    def read(self, conn: psycopg.Connection[Any], after: str | None, seq: int) -> Batch | None:
        params = {"after": after, "n": self.batch_size, "upper": self.upper}
        with conn.transaction():
            rows = conn.execute(self._first if after is None else self._next, params).fetchall()
        if not rows:
            return None
        return Batch.of(seq, after, rows)


class Writer:
    """Writes one batch of vectors into `column` (call inside the caller's transaction), on a
    connection that `prepare_session` made ready; only rows unchanged since they were read."""

    def __init__(self, info: TableInfo, *, column: str | None = None, path: str = DEFAULT_WRITE_PATH) -> None:
        if path not in WRITE_PATHS:
            raise ValueError(f"unknown write path {path!r}")
        if info.pk.composite and path == "executemany":
            raise ValueError("a composite key is written by COPY or unnest, not executemany")
        self.info = info
        self.path = path
        self.half = info.column_type == "halfvec"  # written as halfvec values, the column's own type
        self.not_null = info.not_null  # the live column refuses NULL (a shadow column too: it will be the live one)
        self._update_one = info.statement("write_one", column=column)
        self._update_unnest = info.statement("write_unnest", column=column)
        self._update_stage = info.statement("write_from_stage", column=column)
        self._copy = info.statement("copy_stage")

    def write(self, conn: psycopg.Connection[Any], ids: Sequence[Any], vectors: Sequence[Any],
              xmins: Sequence[int], *, id_texts: Sequence[str] = ()) -> set[str]:
        """The text form of the keys written: those whose xmin is still the one read. `ids`: the
        keys' values (a tuple each for a composite key); `id_texts`: their text forms (unnest's)."""
        if self.half:
            from pgvector import HalfVector

            vectors = [None if v is None else HalfVector(v) for v in vectors]
        if self.path == "executemany":
            with conn.cursor() as cur:
                cur.executemany(self._update_one, list(zip(vectors, ids, xmins, strict=True)), returning=True)
                written: set[str] = set()
                while True:
                    written.update(r["id_text"] for r in cur.fetchall())
                    if not cur.nextset():
                        break
                return written
        if self.path == "unnest":
            rows = conn.execute(self._update_unnest, (list(id_texts), list(vectors), list(xmins))).fetchall()
            return {r["id_text"] for r in rows}
        return self._write_copy(conn, ids, vectors, xmins)

    def _write_copy(self, conn: psycopg.Connection[Any], ids: Sequence[Any], vectors: Sequence[Any],
                    xmins: Sequence[int]) -> set[str]:
        vector_oid = conn.adapters.types[self.info.column_type].oid
        key = self.info.pk
        with conn.cursor() as cur:
            with cur.copy(self._copy) as copy:
                copy.set_types([*key.type_oids, vector_oid, "int8"])
                if key.composite:
                    for parts, vec, xmin in zip(ids, vectors, xmins, strict=True):
                        copy.write_row((*parts, vec, xmin))
                else:
                    for row in zip(ids, vectors, xmins, strict=True):
                        copy.write_row(row)
            return {r["id_text"] for r in cur.execute(self._update_stage).fetchall()}


def prepare_session(info: TableInfo) -> Callable[[psycopg.Connection[Any]], None]:
    """What each pool connection runs once (autocommit): the writer's join settings, the mark
    that the capture trigger lets pass (every write on these connections is reembed's own), and
    the session's staging table."""

    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute(query("writer_session"))
        conn.execute(info.statement("create_stage"))

    return configure
