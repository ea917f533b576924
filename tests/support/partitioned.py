"""Partitioned tables, as large pgvector tables are kept: `app.items` partitioned by its key (range with a
partition partitioned again by hash and a default partition; hash; or list with a default partition in
another schema, `archive`), an HNSW
index on the parent (a partitioned index: one index per partition, one of them renamed and commented),
a partition's own column comment, statistics target, storage and grant, a table trigger (cloned onto
every partition), a check constraint and a default inherited by every partition, and the registry.

`local_index=True` adds an index made on one partition only (not attached to the parent's)."""

from __future__ import annotations

from typing import Any

import psycopg
from pgvector.psycopg import register_vector

from support.database import REGISTRY_DDL
from support.fakes import hash_vector, sentence

TABLE = "app.items"

_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS app;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'reembed_search') THEN
        CREATE ROLE reembed_search NOLOGIN;
    END IF;
END $$;
CREATE TABLE app.items (
    id         bigint PRIMARY KEY,
    tenant_id  int NOT NULL DEFAULT 1,
    content    text,
    embedding  vector({dim}),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT items_tenant CHECK (tenant_id > 0)
) PARTITION BY {by} (id);
COMMENT ON TABLE app.items IS 'partitioned by key';
COMMENT ON COLUMN app.items.embedding IS 'the model named by embedding_model';
ALTER TABLE app.items ALTER COLUMN embedding SET STATISTICS 50;
"""

_RANGE = """
CREATE TABLE app.items_0 PARTITION OF app.items FOR VALUES FROM (0) TO (1000);
CREATE TABLE app.items_1 PARTITION OF app.items FOR VALUES FROM (1000) TO (2000) PARTITION BY HASH (id);
CREATE TABLE app.items_1a PARTITION OF app.items_1 FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE app.items_1b PARTITION OF app.items_1 FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE app.items_2 PARTITION OF app.items FOR VALUES FROM (2000) TO (3000);
CREATE TABLE app.items_rest PARTITION OF app.items DEFAULT;
"""

_HASH = "".join(f"CREATE TABLE app.items_{r} PARTITION OF app.items FOR VALUES WITH (MODULUS 4, REMAINDER {r});\n"
                for r in range(4))

_LIST = """
CREATE TABLE app.items_chosen PARTITION OF app.items FOR VALUES IN (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233);
CREATE SCHEMA IF NOT EXISTS archive;
CREATE TABLE archive.items_rest PARTITION OF app.items DEFAULT;
"""

_AFTER = """
CREATE INDEX items_embedding_hnsw ON app.items USING hnsw (embedding vector_cosine_ops)
    WITH (m = 8, ef_construction = 32);
COMMENT ON INDEX app.items_embedding_hnsw IS 'search';
ALTER INDEX app.{first}_embedding_idx RENAME TO {first}_search;
COMMENT ON INDEX app.{first}_search IS 'search, first partition';
CREATE INDEX items_tenant ON app.items (tenant_id);
COMMENT ON COLUMN app.{first}.embedding IS 'first partition: the oldest rows';
ALTER TABLE app.{first} ALTER COLUMN embedding SET STATISTICS 70;
ALTER TABLE app.{first} ALTER COLUMN embedding SET STORAGE MAIN;
GRANT SELECT (id, embedding) ON app.{first} TO reembed_search;
GRANT SELECT (id, content, embedding) ON app.items TO reembed_search;
CREATE FUNCTION app.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at := now(); RETURN NEW; END $$;
CREATE TRIGGER items_touch BEFORE UPDATE ON app.items FOR EACH ROW EXECUTE FUNCTION app.touch();
"""

FIRST = {"range": "items_0", "hash": "items_0", "list": "items_chosen"}


def make_partitioned_table(dsn: str, *, by: str = "range", rows: int = 240, dim: int = 64,
                           local_index: bool = False, registry: bool = True) -> list[int]:
    """`app.items` partitioned `by` range, hash or list, `rows` rows (every tenth with NULL content)
    spread over every partition, embedded by an "old" `dim`-d model. Returns the keys."""
    layout = {"range": ("RANGE", _RANGE), "hash": ("HASH", _HASH), "list": ("LIST", _LIST)}[by]
    first = FIRST[by]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_SCHEMA.format(dim=dim, by=layout[0]))
        conn.execute(layout[1])
        conn.execute(_AFTER.format(first=first))
        if local_index:
            conn.execute(f"CREATE INDEX {first}_l2 ON app.{first} USING hnsw (embedding vector_l2_ops)")
        if registry:
            conn.execute(REGISTRY_DDL)
            conn.execute("INSERT INTO embedding_model (id, model_name, dimension, model_hash)"
                         " VALUES (1, 'old-model', %s, 'sha256:old')", (dim,))
        register_vector(conn)
        keys = spread(rows)
        data: list[tuple[Any, ...]] = []
        for i, key in enumerate(keys):
            text = None if i % 10 == 3 else sentence(i)
            data.append((key, text, hash_vector(f"old:{text}", dim) if text is not None else None))
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO app.items (id, content, embedding) VALUES (%s, %s, %s)", data)
        conn.execute("ANALYZE app.items")
    return keys


def spread(rows: int) -> list[int]:
    """Keys over every range partition (and past the last: the default one), and the list's chosen."""
    out = [1, 2, 3, 5, 8, 13]
    step = max(1, 4000 // max(rows - len(out), 1))
    key = 20
    while len(out) < rows:
        out.append(key)
        key += step
    return sorted(set(out))


def partition_counts(dsn: str) -> dict[str, int]:
    """Rows per leaf partition."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT tableoid::regclass::text, count(*) FROM app.items GROUP BY 1").fetchall()
    return {r[0]: int(r[1]) for r in rows}


def index_tree(dsn: str, index: str = "app.items_embedding_hnsw") -> list[tuple[str, str, bool]]:
    """(table, index, valid) of a partitioned index and every index below it."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT i.indrelid::regclass::text, t.relid::regclass::text, i.indisvalid"
            "  FROM pg_partition_tree(%s::regclass) t JOIN pg_index i ON i.indexrelid = t.relid ORDER BY 1",
            (index,)).fetchall()
    return [(r[0], r[1], bool(r[2])) for r in rows]


def vectors_by_dimension(dsn: str) -> dict[int | None, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT vector_dims(embedding), count(*) FROM app.items GROUP BY 1").fetchall()
    return {r[0]: int(r[1]) for r in rows}
