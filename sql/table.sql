-- Statements on the user's table. `-- name: X` starts one, as in queries.sql. {braced}
-- names are filled in by reembed.target.TableInfo.statement(): identifiers with
-- psycopg.sql.Identifier ({table}: schema-qualified, {col}: the column written), the text
-- ({content}: the content column, or the operator's --content expression), the primary key's
-- forms (reembed.target.Key: {id} the key, a column or a row of columns; {id_order}; {id_text} its
-- text form; {after_id}/{upper_id} a parameter's text form made a key again; ...), and literals
-- where named. Values are always parameters.

-- name: count_rows
SELECT count(*) AS n FROM {table};

-- name: sample_content
-- Pages drawn from the whole table (SYSTEM sampling reads only those), not its first rows: a
-- table loaded in some order (long texts first) would bias the estimate.
SELECT {content} AS content FROM {table} TABLESAMPLE SYSTEM (%(percent)s) REPEATABLE (7)
WHERE {content} IS NOT NULL LIMIT %(n)s;

-- name: null_text_rows
-- Rows whose text is NULL (a NOT NULL vector column refuses them before any write).
SELECT count(*) AS n FROM {table} WHERE {content} IS NULL;

-- name: read_first
-- Keyset pagination, first page of a range (upper bound inclusive, NULL: none). xmin tells
-- the write whether the row changed since this read.
SELECT {id_select}, {id_text} AS id_text, {content} AS content, xmin::text::bigint AS xmin
  FROM {table}
 WHERE (%(upper)s::text IS NULL OR {id} <= {upper_id})
 ORDER BY {id_order} LIMIT %(n)s;

-- name: read_next
SELECT {id_select}, {id_text} AS id_text, {content} AS content, xmin::text::bigint AS xmin
  FROM {table}
 WHERE {id} > {after_id}
   AND (%(upper)s::text IS NULL OR {id} <= {upper_id})
 ORDER BY {id_order} LIMIT %(n)s;

-- name: rows_by_ids
-- %(ids)s: the keys' text forms.
SELECT {id_select}, {id_text} AS id_text, {content} AS content, xmin::text::bigint AS xmin
  FROM {table}
 WHERE {ids_match}
 ORDER BY {id_order};

-- name: create_stage
-- The writer's staging table, one per session (binary COPY lands here).
CREATE TEMP TABLE IF NOT EXISTS reembed_stage ({stage_defs}, e {vtype}, x bigint) ON COMMIT DELETE ROWS;

-- name: copy_stage
COPY pg_temp.reembed_stage ({stage_cols}, e, x) FROM STDIN (FORMAT BINARY);

-- name: write_from_stage
-- Only rows unchanged since the batch read them (same xmin): an application's newer write is
-- never overwritten with a vector of older content. The rows written come back.
UPDATE {table} AS t SET {col} = s.e FROM pg_temp.reembed_stage AS s
 WHERE {t_id} = {s_id} AND t.xmin::text::bigint = s.x
RETURNING {t_id_text} AS id_text;

-- name: write_one
-- (a one-column key only: bench.py's comparison of write paths)
UPDATE {table} SET {col} = %s WHERE {id} = %s AND xmin::text::bigint = %s
RETURNING {id_text} AS id_text;

-- name: write_unnest
UPDATE {table} AS t SET {col} = v.e
  FROM unnest(%s::text[], %s::{vtype}[], %s::bigint[]) AS v(k, e, x)
 WHERE {t_id} = {v_id} AND t.xmin::text::bigint = v.x
RETURNING {t_id_text} AS id_text;

-- name: drop_index
DROP INDEX {index};

-- name: drop_index_if_exists
DROP INDEX IF EXISTS {index};

-- name: drop_index_concurrently
-- An invalid leftover of an interrupted CONCURRENTLY build: dropped without queueing an ACCESS
-- EXCLUSIVE request that every query on the table would wait behind.
DROP INDEX CONCURRENTLY IF EXISTS {index};

-- name: relax_typmod
-- vector(N) -> vector (halfvec alike): catalog only, no rewrite.
ALTER TABLE {table} ALTER COLUMN {col} TYPE {vtype};

-- name: tighten_typmod
-- vector -> vector({dim}) (halfvec alike): the integrity gate; rewrites the table.
ALTER TABLE {table} ALTER COLUMN {col} TYPE {vtype}({dim});

-- name: create_index
CREATE INDEX {concurrently} {index_name} ON {table} USING hnsw ({col} {opclass})
  WITH (m = {m}, ef_construction = {ef_construction});

-- name: reindex
REINDEX INDEX {concurrently} {index};

-- name: create_index_on
-- One index of a partitioned index's tree, from its own definition (what follows USING, as
-- pg_get_indexdef prints it; the dimension as the job builds it): on one partition ({only} empty;
-- CONCURRENTLY when asked), or ON ONLY a partitioned table (catalog only; it becomes valid once
-- every partition has its index attached below it).
CREATE INDEX {concurrently} {index} ON {only} {table} USING {body};

-- name: attach_index
-- A partition's index below its parent's (catalog only; holds no application statement up).
ALTER INDEX {parent} ATTACH PARTITION {index};

-- name: pending_keys
-- The next page of captured keys, deduplicated, in key order.
SELECT DISTINCT {row_id_cols}, row_id
  FROM reembed_changes
 WHERE job_id = %(job_id)s
   AND (%(after)s::text IS NULL OR {row_id_key} > {after_id})
 ORDER BY {row_id_order} LIMIT %(n)s;

-- name: forget_changes_if_gone
-- Captured keys whose rows were gone when they were read, forgotten only if still gone: a row
-- inserted again since commits its capture with it, so this statement sees both or neither (one
-- forgotten unconditionally lost the insert's capture, and the row kept the old model's vector). The
-- text forms compared too: a key spelled otherwise than its row (numeric 1.5 / 1.50) is gone.
DELETE FROM reembed_changes c
 WHERE c.job_id = %(job_id)s AND c.row_id = ANY(%(row_ids)s::text[])
   AND NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {t_id} = {c_row_id_key} AND {t_id_text} = c.row_id);

-- name: capture_every_key
-- A partition attached while the job ran: its rows, never seen by the capture triggers, are
-- captured for the catch-up (in reembed's session format of the key, as the trigger writes it).
INSERT INTO {changes} (job_id, row_id) SELECT %(job_id)s, {id_text} FROM {table};

-- name: create_capture_function
-- Runs as its owner (reembed's role), whatever role the application writes as. The key's text
-- form in one format whatever the application session's (a timestamp or float key reads back as
-- itself in reembed's sessions, which fix the same settings: reembed.db.SESSION_SETTINGS).
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET DateStyle = 'ISO, YMD' SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET extra_float_digits = 3
SET bytea_output = 'hex'
AS $capture$
BEGIN
    INSERT INTO {changes} (job_id, row_id) VALUES ({job_id}, {new_id_text});
    RETURN NULL;
END
$capture$;

-- name: create_capture_triggers
-- Inserted rows, and rows whose content or embedding anyone but the job changed, by value: not
-- `UPDATE OF` a column list, which misses content changed by a BEFORE trigger, a rule or a
-- generated column while the UPDATE names another column (the WHEN is evaluated before the event
-- is queued: an update that changes neither costs a comparison, measured by the bench). A row
-- whose key changed is captured too: under its new key it may be behind the job's cursor. On a
-- partitioned table the triggers are cloned onto every partition (and onto one attached later);
-- a change of key that moves a row to another partition is a DELETE and an INSERT there, which
-- the insert trigger captures.
CREATE OR REPLACE TRIGGER {insert_trigger} AFTER INSERT ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}();
CREATE OR REPLACE TRIGGER {update_trigger} AFTER UPDATE ON {table}
    FOR EACH ROW
    WHEN (({changed} OR OLD.{col} IS DISTINCT FROM NEW.{col} OR {key_changed})
          AND current_setting('reembed.writer', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION {function}();

-- name: disable_capture_triggers
-- SHARE ROW EXCLUSIVE, as the cut-over already holds: readers are not held up.
ALTER TABLE {table} DISABLE TRIGGER {insert_trigger}, DISABLE TRIGGER {update_trigger};

-- name: drop_capture
DROP TRIGGER IF EXISTS {insert_trigger} ON {table};
DROP TRIGGER IF EXISTS {update_trigger} ON {table};
DROP FUNCTION IF EXISTS {function}();

-- name: drop_trigger
-- Only inside the write probe's transaction, which is rolled back.
DROP TRIGGER {trigger} ON {table};

-- name: lock_for_cut_over
-- Holds writers off (and this job's triggers still), never readers.
LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE;

-- name: lock_for_rewrite
-- A cut-over that changes the column's type (a table rewrite) holds readers off too: asked for
-- at once, right after the registry row, so that it never waits with work already done.
LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;

-- name: probe_table
-- The inventory's probe (rolled back): an empty copy of the table's columns, no constraints.
CREATE TEMP TABLE reembed_probe AS SELECT * FROM {table} LIMIT 0;

-- name: probe_type
ALTER TABLE pg_temp.reembed_probe ALTER COLUMN {col} TYPE {new_type};

-- name: probe_row
INSERT INTO pg_temp.reembed_probe ({col})
VALUES (CAST(CAST(array_fill(0.5::real, ARRAY[{dim}]) AS vector) AS {new_type}));

-- name: probe_default
ALTER TABLE pg_temp.reembed_probe ALTER COLUMN {col} SET DEFAULT {default};
INSERT INTO pg_temp.reembed_probe DEFAULT VALUES;

-- name: probe_check
ALTER TABLE pg_temp.reembed_probe ADD {check};

-- name: verify_sample
-- `reembed verify`'s rows: drawn row by row from the whole table with a fixed seed (the same
-- rows each time while the table's pages stay where they are), in key order.
SELECT {id_text} AS id_text, {content} AS content, {col}::vector AS e
  FROM {table} TABLESAMPLE BERNOULLI (%(percent)s) REPEATABLE (%(seed)s)
 ORDER BY {id_order} LIMIT %(n)s;

-- name: verify_page
-- `reembed verify --all`: every row, a page at a time in key order.
SELECT {id_text} AS id_text, {content} AS content, {col}::vector AS e
  FROM {table}
 WHERE %(after)s::text IS NULL OR {id} > {after_id}
 ORDER BY {id_order} LIMIT %(n)s;

-- name: cost_sample
-- `plan`'s cost estimate: each sampled row's stored column sizes ({sizes}: pg_column_size of each
-- column and, from PostgreSQL 17, whether the value lives in TOAST), pages drawn from the whole table.
SELECT {sizes} FROM {table} TABLESAMPLE SYSTEM (%(percent)s) REPEATABLE (7) LIMIT %(n)s;

-- name: add_shadow_column
-- --strategy shadow: the new vectors' column beside the live one (catalog only: no default, no rewrite).
ALTER TABLE {table} ADD COLUMN {shadow} {vtype}({dim});

-- name: drop_column_if_exists
ALTER TABLE {table} DROP COLUMN IF EXISTS {col};

-- name: rename_column
ALTER TABLE {table} RENAME COLUMN {old} TO {new};

-- name: rename_index
ALTER INDEX {old} RENAME TO {new};

-- name: drop_not_null
ALTER TABLE {table} ALTER COLUMN {col} DROP NOT NULL;

-- name: create_after_swap_function
-- After a shadow job's swap: the keys of rows the application inserts or whose content it
-- changes (their previous vector is stale), for `reembed rollback`.
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET DateStyle = 'ISO, YMD' SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET extra_float_digits = 3
SET bytea_output = 'hex'
AS $after_swap$
BEGIN
    INSERT INTO {recorded} (job_id, row_id) VALUES ({job_id}, {new_id_text});
    RETURN NULL;
END
$after_swap$;

-- name: create_after_swap_triggers
CREATE OR REPLACE TRIGGER {insert_trigger} AFTER INSERT ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}();
CREATE OR REPLACE TRIGGER {update_trigger} AFTER UPDATE ON {table}
    FOR EACH ROW WHEN {changed}
    EXECUTE FUNCTION {function}();

-- name: drop_after_swap
DROP TRIGGER IF EXISTS {insert_trigger} ON {table};
DROP TRIGGER IF EXISTS {update_trigger} ON {table};
DROP FUNCTION IF EXISTS {function}();

-- name: write_previous
-- `reembed rollback`: a stale row's previous vector, where the row is unchanged since it was read.
-- %(ids)s: the keys' text forms.
UPDATE {table} AS t SET {col} = v.e
  FROM unnest(%(ids)s::text[], %(vectors)s::{vtype}[], %(xmins)s::bigint[]) AS v(k, e, x)
 WHERE {t_id} = {v_id} AND t.xmin::text::bigint = v.x
RETURNING {t_id_text} AS id_text;

-- name: null_previous
UPDATE {table} SET {col} = NULL WHERE {ids_match}
RETURNING {id_text} AS id_text;

-- name: gate_sample
-- The quality gate's rows (reembed.gate): drawn row by row with the job's seed, in key order.
SELECT {id_text} AS id_text, {content} AS content, {col}::vector AS e
  FROM {table} TABLESAMPLE BERNOULLI (%(percent)s) REPEATABLE (%(seed)s)
 WHERE {content} IS NOT NULL
 ORDER BY {id_order} LIMIT %(n)s;

-- name: gate_search
-- One query of the gate through an ANN index: the k nearest rows by the index's own key and operator.
SELECT {id_text} AS id_text, {content} AS content FROM {table} ORDER BY {key} {op} {q} LIMIT {k};

-- name: key_quantiles
-- Range boundaries for workers: the keys at these fractions of a sample of the key space (any
-- orderable key: bigint, uuid, text in its collation), in the order the readers page.
SELECT percentile_disc(%(fractions)s::float8[]) WITHIN GROUP (ORDER BY {id})::text[] AS keys
  FROM {table} TABLESAMPLE BERNOULLI (%(percent)s) REPEATABLE (11);

-- name: key_sample
-- A composite key's boundaries: a sample of the keys' text forms in key order (ranges.py picks them).
SELECT {id_text} AS k FROM {table} TABLESAMPLE BERNOULLI (%(percent)s) REPEATABLE (11) ORDER BY {id_order};

-- name: keys_left
-- Rows of a range past a key (at most %(cap)s counted), for a split.
SELECT count(*) AS n FROM (
  SELECT 1 FROM {table}
   WHERE (%(after)s::text IS NULL OR {id} > {after_id})
     AND (%(upper)s::text IS NULL OR {id} <= {upper_id})
   LIMIT %(cap)s) s;

-- name: key_at
-- The key %(offset)s rows past a key, within a range: where a split cuts.
SELECT {id_text} AS id_text FROM {table}
 WHERE (%(after)s::text IS NULL OR {id} > {after_id})
   AND (%(upper)s::text IS NULL OR {id} <= {upper_id})
 ORDER BY {id_order} OFFSET %(offset)s LIMIT 1;

-- name: probe_write
-- The inventory's last probe (rolled back): one row written as the job will write it, so that the
-- application's triggers and rules on UPDATE run on it (a trigger that copies the row elsewhere, a
-- rule that rewrites the UPDATE): what fails there is refused before any write.
UPDATE {table} SET {col} = CAST(CAST(array_fill(0.5::real, ARRAY[{dim}]) AS vector) AS {vtype})
 WHERE ctid = (SELECT ctid FROM {table} LIMIT 1)
RETURNING 1;

-- name: probe_shadow_column
ALTER TABLE {table} ADD COLUMN {col} {vtype}({dim});

-- name: eval_sample
-- `reembed eval`'s rows, read once: drawn row by row with the operator's seed; of those, %(n)s in
-- an order the seed also fixes (not the key's: the highest keys would be left out most often).
SELECT {id_text} AS id_text, {content} AS content, {col}::vector AS e
  FROM {table} TABLESAMPLE BERNOULLI (%(percent)s) REPEATABLE (%(seed)s)
 WHERE {content} IS NOT NULL
 ORDER BY md5({id_text} || %(seed)s::text) LIMIT %(n)s;

-- name: bridge_sample
-- `reembed bridge`: rows with content and an old vector, pages drawn from the whole table (SYSTEM:
-- only those pages are read), to be encoded by the new model and paired with their old vectors.
SELECT {id_text} AS id_text, {content} AS content, {col}::vector AS old
  FROM {table} TABLESAMPLE SYSTEM (%(percent)s) REPEATABLE (%(seed)s)
 WHERE {content} IS NOT NULL AND {col} IS NOT NULL
 LIMIT %(n)s;

-- name: bridge_pairs
-- `run --bridge`: rows of a range the job has committed ((lower, upper], by the primary key), their
-- new vector in the shadow column ({new}) beside the old one in the live column.
SELECT {id_text} AS id_text, {content} AS content, {col}::vector AS old, {new}::vector AS new
  FROM {table}
 WHERE (%(after)s::text IS NULL OR {id} > {after_id})
   AND {id} <= {upper_id}
   AND {content} IS NOT NULL AND {col} IS NOT NULL AND {new} IS NOT NULL
 ORDER BY {id_order} LIMIT %(n)s;
