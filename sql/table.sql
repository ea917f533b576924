-- Statements on the user's table. `-- name: X` starts one, as in queries.sql. {braced}
-- names are filled in by reembed.target.TableInfo.sql(): identifiers with
-- psycopg.sql.Identifier ({table}: schema-qualified, {id}, {col}: the column written,
-- {content}), {id_type} from format_type() (already quoted), and literals where named.
-- Values are always parameters.

-- name: count_rows
SELECT count(*) AS n FROM {table};

-- name: sample_content
SELECT {content} AS content FROM {table} WHERE {content} IS NOT NULL LIMIT %(n)s;

-- name: read_first
-- Keyset pagination, first page of a range (upper bound inclusive, NULL: none).
SELECT {id} AS id, {id}::text AS id_text, {content} AS content
  FROM {table}
 WHERE (%(upper)s::text IS NULL OR {id} <= CAST(%(upper)s AS {id_type}))
 ORDER BY {id} LIMIT %(n)s;

-- name: read_next
SELECT {id} AS id, {id}::text AS id_text, {content} AS content
  FROM {table}
 WHERE {id} > CAST(%(after)s AS {id_type})
   AND (%(upper)s::text IS NULL OR {id} <= CAST(%(upper)s AS {id_type}))
 ORDER BY {id} LIMIT %(n)s;

-- name: rows_by_ids
SELECT {id} AS id, {id}::text AS id_text, {content} AS content
  FROM {table}
 WHERE {id} = ANY(CAST(%(ids)s AS {id_type}[]))
 ORDER BY {id};

-- name: create_stage
-- The writer's staging table, one per session (binary COPY lands here).
CREATE TEMP TABLE IF NOT EXISTS reembed_stage (id {id_type}, e vector) ON COMMIT DELETE ROWS;

-- name: copy_stage
COPY pg_temp.reembed_stage (id, e) FROM STDIN (FORMAT BINARY);

-- name: write_from_stage
UPDATE {table} AS t SET {col} = s.e FROM pg_temp.reembed_stage AS s WHERE t.{id} = s.id;

-- name: write_one
UPDATE {table} SET {col} = %s WHERE {id} = %s;

-- name: write_unnest
UPDATE {table} AS t SET {col} = v.e
  FROM unnest(%s::{id_type}[], %s::vector[]) AS v(id, e)
 WHERE t.{id} = v.id;

-- name: drop_index
DROP INDEX {index};

-- name: drop_index_if_exists
DROP INDEX IF EXISTS {index};

-- name: relax_typmod
-- vector(N) -> vector: catalog only, no rewrite.
ALTER TABLE {table} ALTER COLUMN {col} TYPE vector;

-- name: tighten_typmod
-- vector -> vector({dim}): the integrity gate; rewrites the table.
ALTER TABLE {table} ALTER COLUMN {col} TYPE vector({dim});

-- name: create_index
CREATE INDEX {concurrently} {index_name} ON {table} USING hnsw ({col} {opclass})
  WITH (m = {m}, ef_construction = {ef_construction});

-- name: reindex
REINDEX INDEX {concurrently} {index};
