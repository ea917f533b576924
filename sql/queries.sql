-- Named queries. `-- name: X` starts one; it runs to the next `-- name:`.
-- Values are always parameters. {braced} names are identifiers, filled in with
-- psycopg.sql.Identifier by reembed.queries.

-- name: target_table
-- The table, its primary key (must be a single column) and the pgvector extension.
SELECT c.oid::bigint                                    AS table_oid,
       n.nspname                                        AS schema_name,
       c.relname                                        AS table_name,
       (SELECT array_agg(a.attname ORDER BY k.ord)
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = c.oid AND i.indisprimary)   AS pk_columns,
       (SELECT format_type(a.atttypid, a.atttypmod)
          FROM pg_index i
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = c.oid AND i.indisprimary)   AS pk_type,
       (SELECT a.atttypid::bigint
          FROM pg_index i
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = c.oid AND i.indisprimary)   AS pk_type_oid,
       (SELECT extversion FROM pg_extension WHERE extname = 'vector') AS vector_version
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass(%(table)s);

-- name: column_info
SELECT a.attname,
       t.typname,
       format_type(a.atttypid, a.atttypmod) AS formatted,
       a.atttypmod                           AS typmod
  FROM pg_attribute a
  JOIN pg_type t ON t.oid = a.atttypid
 WHERE a.attrelid = %(table_oid)s::oid AND a.attname = %(column)s
   AND a.attnum > 0 AND NOT a.attisdropped;

-- name: hnsw_indexes
-- HNSW indexes on exactly the embedding column.
SELECT ic.relname                              AS index_name,
       opc.opcname                             AS opclass,
       ic.reloptions                           AS reloptions,
       pg_get_indexdef(ic.oid)                 AS definition,
       i.indisvalid                            AS valid
  FROM pg_index i
  JOIN pg_class ic ON ic.oid = i.indexrelid
  JOIN pg_am am ON am.oid = ic.relam
  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
  JOIN pg_opclass opc ON opc.oid = i.indclass[0]
 WHERE i.indrelid = %(table_oid)s::oid AND am.amname = 'hnsw'
   AND i.indnatts = 1 AND a.attname = %(column)s
 ORDER BY ic.relname;

-- name: index_by_name
SELECT ic.relname AS index_name, i.indisvalid AS valid, am.amname AS amname
  FROM pg_class ic
  JOIN pg_index i ON i.indexrelid = ic.oid
  JOIN pg_am am ON am.oid = ic.relam
 WHERE ic.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = %(table_oid)s::oid)
   AND ic.relname = %(index)s;

-- name: registry_exists
SELECT to_regclass(%(registry)s) IS NOT NULL AS present;

-- name: read_registry
SELECT model_name, dimension, model_hash FROM {registry} WHERE id = 1;

-- name: upsert_registry
INSERT INTO {registry} (id, model_name, dimension, model_hash, created_at, updated_at)
VALUES (1, %(model_name)s, %(dimension)s, %(model_hash)s, now(), now())
ON CONFLICT (id) DO UPDATE
   SET model_name = EXCLUDED.model_name,
       dimension  = EXCLUDED.dimension,
       model_hash = EXCLUDED.model_hash,
       updated_at = now();

-- name: checkpoint_table_exists
SELECT to_regclass('reembed_checkpoint') IS NOT NULL AS present;

-- name: active_job
SELECT * FROM reembed_checkpoint
 WHERE table_name = %(table)s AND column_name = %(column)s
   AND state IN ('embedding', 'finalizing');

-- name: latest_job
SELECT * FROM reembed_checkpoint
 WHERE table_name = %(table)s AND column_name = %(column)s
 ORDER BY job_id DESC
 LIMIT 1;

-- name: job_by_id
SELECT * FROM reembed_checkpoint WHERE job_id = %(job_id)s;

-- name: insert_job
INSERT INTO reembed_checkpoint (
    table_name, column_name, content_column, id_column, id_type, state, strategy,
    target_model_name, target_dimension, target_hash,
    source_model_name, source_dimension, source_hash, source_typmod,
    index_name, index_def, rows_total, holder, heartbeat_at)
VALUES (
    %(table)s, %(column)s, %(content_column)s, %(id_column)s, %(id_type)s, 'embedding', 'in_place',
    %(target_model_name)s, %(target_dimension)s, %(target_hash)s,
    %(source_model_name)s, %(source_dimension)s, %(source_hash)s, %(source_typmod)s,
    %(index_name)s, %(index_def)s, %(rows_total)s, %(holder)s, now())
RETURNING *;

-- name: insert_range
INSERT INTO reembed_checkpoint_range (job_id, range_no, lower_id, upper_id, last_id)
VALUES (%(job_id)s, %(range_no)s, %(lower_id)s, %(upper_id)s, %(lower_id)s);

-- name: job_ranges
SELECT * FROM reembed_checkpoint_range WHERE job_id = %(job_id)s ORDER BY range_no;

-- name: claim_range
-- The next unfinished range nobody else is working on.
SELECT * FROM reembed_checkpoint_range
 WHERE job_id = %(job_id)s AND NOT done
 ORDER BY range_no
 LIMIT 1
   FOR UPDATE SKIP LOCKED;

-- name: advance_checkpoint
-- Move the cursor; must match exactly one row.
UPDATE reembed_checkpoint_range
   SET last_id = %(to_id)s,
       rows_done = rows_done + %(rows)s,
       rows_skipped = rows_skipped + %(skipped)s,
       rows_per_sec = %(rate)s,
       updated_at = now()
 WHERE job_id = %(job_id)s AND range_no = %(range_no)s
   AND last_id IS NOT DISTINCT FROM %(from_id)s
   AND NOT done;

-- name: finish_range
UPDATE reembed_checkpoint_range
   SET done = true, updated_at = now()
 WHERE job_id = %(job_id)s AND range_no = %(range_no)s
   AND last_id IS NOT DISTINCT FROM %(last_id)s;

-- name: heartbeat
UPDATE reembed_checkpoint
   SET heartbeat_at = now(), updated_at = now(), holder = %(holder)s
 WHERE job_id = %(job_id)s;

-- name: set_job_state
UPDATE reembed_checkpoint
   SET state = %(state)s, updated_at = now(),
       finished_at = CASE WHEN %(state)s IN ('done', 'abandoned') THEN now() END
 WHERE job_id = %(job_id)s AND state = %(from_state)s;

-- name: mark_index_dropped
UPDATE reembed_checkpoint SET index_dropped = true, updated_at = now()
 WHERE job_id = %(job_id)s;

-- name: record_finalize_step
-- Recorded in the same transaction as the step itself.
UPDATE reembed_checkpoint
   SET finalize_steps = array_append(finalize_steps, %(step)s), updated_at = now()
 WHERE job_id = %(job_id)s AND NOT (%(step)s = ANY (finalize_steps));

-- name: record_error
UPDATE reembed_checkpoint SET last_error = %(error)s, updated_at = now()
 WHERE job_id = %(job_id)s;

-- name: job_progress
SELECT coalesce(sum(rows_done), 0)::bigint    AS rows_done,
       coalesce(sum(rows_skipped), 0)::bigint AS rows_skipped,
       bool_and(done)                         AS all_done,
       (array_agg(last_id ORDER BY range_no))[1] AS last_id
  FROM reembed_checkpoint_range WHERE job_id = %(job_id)s;

-- name: lock_holder
-- Who holds an advisory lock (bigint key: classid = high half, objid = low half).
SELECT a.pid, a.application_name, a.client_addr::text AS client_addr,
       a.backend_start, a.state_change
  FROM pg_locks l
  JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted
   AND l.classid = ((%(key)s::bigint >> 32) & 4294967295)::bigint::oid
   AND l.objid   = (%(key)s::bigint & 4294967295)::bigint::oid
   AND l.objsubid = 1;

-- name: row_estimate
SELECT CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END AS estimate
  FROM pg_class c WHERE c.oid = %(table_oid)s::oid;

-- name: failed_rows_count
SELECT count(*) FILTER (WHERE NOT accepted) AS pending,
       count(*) FILTER (WHERE accepted)     AS accepted
  FROM reembed_failed_rows WHERE job_id = %(job_id)s;
