-- Named queries. `-- name: X` starts one; it runs to the next `-- name:`.
-- Values are always parameters. {braced} names are identifiers, filled in with
-- psycopg.sql.Identifier by reembed.queries.

-- name: target_table
-- The table, its primary key's columns and their types (in the key's order), the pgvector extension.
SELECT c.oid::bigint                                    AS table_oid,
       n.nspname                                        AS schema_name,
       c.relname                                        AS table_name,
       (SELECT array_agg(a.attname ORDER BY k.ord)
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = c.oid AND i.indisprimary)   AS pk_columns,
       (SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord)
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = c.oid AND i.indisprimary)   AS pk_types,
       (SELECT array_agg(a.atttypid::bigint ORDER BY k.ord)
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = c.oid AND i.indisprimary)   AS pk_type_oids,
       (SELECT extversion FROM pg_extension WHERE extname = 'vector') AS vector_version,
       c.relkind::text                                  AS relkind
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass(%(table)s);

-- name: column_info
SELECT a.attname,
       a.attnum,
       t.typname,
       format_type(a.atttypid, a.atttypmod) AS formatted,
       a.atttypmod                           AS typmod,
       a.attnotnull                          AS not_null
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
    index_name, index_def, rows_total, holder, heartbeat_at, dependents, content_expr, null_content)
VALUES (
    %(table)s, %(column)s, %(content_column)s, %(id_column)s, %(id_type)s, 'embedding', %(strategy)s,
    %(target_model_name)s, %(target_dimension)s, %(target_hash)s,
    %(source_model_name)s, %(source_dimension)s, %(source_hash)s, %(source_typmod)s,
    %(index_name)s, %(index_def)s, %(rows_total)s, %(holder)s, now(), %(dependents)s, %(content_expr)s,
    %(null_content)s)
RETURNING *;

-- name: insert_range
INSERT INTO reembed_checkpoint_range (job_id, range_no, lower_id, upper_id, last_id, rows_estimate)
VALUES (%(job_id)s, %(range_no)s, %(lower_id)s, %(upper_id)s, %(lower_id)s, %(estimate)s);

-- name: job_ranges
SELECT * FROM reembed_checkpoint_range WHERE job_id = %(job_id)s ORDER BY range_no;

-- name: claim_range
-- The next range to work on: one already claimed by this worker first (a claim whose commit landed
-- but whose acknowledgement was lost: a retried claim takes it again, never a second range), then
-- an unclaimed one, else one whose claim is stale (the claimant's lock backend no longer holds the
-- table's lock: the process died; or its heartbeat is older than %(stale_secs)s), locked so that
-- two workers never take the same one (then marked with mark_claimed in the same transaction). A
-- stale claim is taken over from its cursor.
SELECT r.* FROM reembed_checkpoint_range r
 WHERE r.job_id = %(job_id)s AND NOT r.done
   AND (r.claimed_by IS NULL OR r.claimed_by = %(worker)s
        OR r.heartbeat_at < now() - make_interval(secs => %(stale_secs)s)
        OR (r.claimed_pid IS NOT NULL AND NOT EXISTS (
              SELECT 1 FROM pg_locks l
               WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.pid = r.claimed_pid
                 AND l.classid = ((%(key)s::bigint >> 32) & 4294967295)::bigint::oid
                 AND l.objid   = (%(key)s::bigint & 4294967295)::bigint::oid)))
 ORDER BY r.claimed_by IS NOT DISTINCT FROM %(worker)s DESC, (r.claimed_by IS NULL) DESC, r.range_no
 LIMIT 1
   FOR UPDATE SKIP LOCKED;

-- name: advance_checkpoint
-- Move the cursor; must match exactly one row. Says whether a dry worker asked for a split.
UPDATE reembed_checkpoint_range
   SET last_id = %(to_id)s,
       rows_done = rows_done + %(rows)s,
       rows_skipped = rows_skipped + %(skipped)s,
       rows_per_sec = %(rate)s,
       heartbeat_at = now(),  -- a commit on the claim is a sign of life too
       updated_at = now()
 WHERE job_id = %(job_id)s AND range_no = %(range_no)s
   AND last_id IS NOT DISTINCT FROM %(from_id)s
   AND claimed_by = %(worker)s
   AND NOT done
RETURNING split_wanted;

-- name: finish_range
UPDATE reembed_checkpoint_range
   SET done = true, updated_at = now()
 WHERE job_id = %(job_id)s AND range_no = %(range_no)s
   AND last_id IS NOT DISTINCT FROM %(last_id)s
   AND claimed_by = %(worker)s;

-- name: open_ranges
SELECT count(*) AS n FROM reembed_checkpoint_range WHERE job_id = %(job_id)s AND NOT done;

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
-- A partitioned table's: the sum of its partitions' (NULL while one was never analysed).
SELECT CASE WHEN c.relkind = 'p' THEN (
                SELECT CASE WHEN bool_or(l.reltuples < 0) THEN NULL ELSE sum(l.reltuples)::bigint END
                  FROM pg_partition_tree(c.oid) t JOIN pg_class l ON l.oid = t.relid WHERE t.isleaf)
            WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END AS estimate
  FROM pg_class c WHERE c.oid = %(table_oid)s::oid;

-- name: failed_rows_count
SELECT count(*) FILTER (WHERE NOT accepted) AS pending,
       count(*) FILTER (WHERE accepted)     AS accepted
  FROM reembed_failed_rows WHERE job_id = %(job_id)s;

-- name: column_dependents
-- Every object that depends on the column (pg_depend), with what the inventory needs to
-- judge it: an index's access method, definition (and the part after USING), whether its key
-- reads the column (a key column or a key expression; not only its predicate or INCLUDE), the
-- constraint it backs; a constraint's, default's, view's or trigger's definition.
SELECT DISTINCT ON (d.classid, d.objid)
       CASE d.classid
         WHEN 'pg_class'::regclass THEN
           CASE WHEN c.relkind IN ('i', 'I') THEN 'index'
                WHEN c.oid = %(table_oid)s::oid AND d.objsubid <> 0 THEN 'generated column'
                ELSE 'relation' END
         WHEN 'pg_rewrite'::regclass THEN
           CASE WHEN r.ev_class = %(table_oid)s::oid OR r.rulename <> '_RETURN' THEN 'rule'
                WHEN rc.relkind = 'm' THEN 'materialized view'
                ELSE 'view' END
         WHEN 'pg_trigger'::regclass THEN 'trigger'
         WHEN 'pg_policy'::regclass THEN 'policy'
         WHEN 'pg_constraint'::regclass THEN 'constraint'
         WHEN 'pg_statistic_ext'::regclass THEN 'statistics'
         WHEN 'pg_attrdef'::regclass THEN
           CASE WHEN ad.adnum = %(attnum)s THEN 'default' ELSE 'generated column' END
         WHEN 'pg_proc'::regclass THEN 'function'
         WHEN 'pg_publication_rel'::regclass THEN 'publication'
         ELSE 'object' END                                   AS kind,
       pg_describe_object(d.classid, d.objid, d.objsubid)   AS description,
       d.deptype,
       coalesce(c.relname::text, t.tgname::text, p.proname::text, '') AS object_name,
       am.amname                                            AS method,
       CASE WHEN c.relkind IN ('i', 'I') THEN pg_get_indexdef(c.oid)
            WHEN d.classid = 'pg_constraint'::regclass THEN pg_get_constraintdef(con.oid)
            WHEN d.classid = 'pg_attrdef'::regclass THEN pg_get_expr(ad.adbin, ad.adrelid)
            WHEN d.classid = 'pg_rewrite'::regclass AND rc.relkind IN ('v', 'm') THEN pg_get_viewdef(rc.oid)
            WHEN d.classid = 'pg_trigger'::regclass THEN pg_get_triggerdef(t.oid)
       END                                                  AS definition,
       con.contype::text                                    AS contype,
       (i.indexrelid IS NOT NULL AND (
            EXISTS (SELECT 1 FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                     WHERE k.attnum = %(attnum)s AND k.ord <= i.indnkeyatts)
            OR coalesce(i.indexprs::text ~ (':varattno ' || %(attnum)s || ' '), false)))
                                                            AS key_uses,
       (SELECT bc.conname FROM pg_constraint bc
         WHERE bc.conindid = c.oid AND bc.contype IN ('p', 'u', 'x') LIMIT 1) AS constraint_name,
       c.relkind::text                                      AS relkind,
       -- on a partition: the parent's own object, there by inheritance (judged with the parent's)
       CASE WHEN c.relkind IN ('i', 'I') THEN c.relispartition   -- attached below the parent's index
            WHEN t.oid IS NOT NULL THEN t.tgparentid <> 0         -- the partition's clone of its parent's trigger
            WHEN con.oid IS NOT NULL THEN con.coninhcount > 0     -- a constraint inherited (merged, if local too)
            WHEN ad.oid IS NOT NULL THEN EXISTS (                 -- the parent's default or expression, copied
                 SELECT 1 FROM pg_inherits h
                   JOIN pg_attribute ca ON ca.attrelid = ad.adrelid AND ca.attnum = ad.adnum
                   JOIN pg_attribute pa ON pa.attrelid = h.inhparent AND pa.attname = ca.attname
                   JOIN pg_attrdef pd ON pd.adrelid = pa.attrelid AND pd.adnum = pa.attnum
                  WHERE h.inhrelid = ad.adrelid
                    AND pg_get_expr(pd.adbin, pd.adrelid) = pg_get_expr(ad.adbin, ad.adrelid))
            ELSE false END                                  AS inherited
  FROM pg_depend d
  LEFT JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
  LEFT JOIN pg_index i ON i.indexrelid = c.oid
  LEFT JOIN pg_am am ON am.oid = c.relam AND c.relkind IN ('i', 'I')
  LEFT JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
  LEFT JOIN pg_class rc ON rc.oid = r.ev_class
  LEFT JOIN pg_trigger t ON d.classid = 'pg_trigger'::regclass AND t.oid = d.objid
  LEFT JOIN pg_constraint con ON d.classid = 'pg_constraint'::regclass AND con.oid = d.objid
  LEFT JOIN pg_attrdef ad ON d.classid = 'pg_attrdef'::regclass AND ad.oid = d.objid
  LEFT JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
 WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = %(table_oid)s::oid
   AND d.refobjsubid = %(attnum)s AND d.deptype IN ('n', 'a')
   AND NOT (d.classid = 'pg_class'::regclass AND d.objid = %(table_oid)s::oid AND d.objsubid = %(attnum)s)
 ORDER BY d.classid, d.objid;

-- name: partition_tree
-- Every partition below a partitioned table (sub-partitions too), parents before their partitions:
-- its kind (r: a table, p: partitioned again, f: a foreign table), bound, parent, the column's
-- number in it (a table attached after it was made apart may number its columns otherwise), its
-- rows (as last analysed) and size.
SELECT c.oid::bigint AS oid, n.nspname AS schema, c.relname AS name, c.relkind::text AS kind, t.level,
       pn.nspname AS parent_schema, pc.relname AS parent_name, pg_get_expr(c.relpartbound, c.oid) AS bound,
       (SELECT a.attnum FROM pg_attribute a
         WHERE a.attrelid = c.oid AND a.attname = %(column)s AND a.attnum > 0 AND NOT a.attisdropped) AS attnum,
       CASE WHEN c.reltuples < 0 OR c.relkind = 'p' THEN NULL ELSE c.reltuples::bigint END AS rows,
       pg_table_size(c.oid) AS bytes
  FROM pg_partition_tree(%(table_oid)s::oid) t
  JOIN pg_class c ON c.oid = t.relid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_class pc ON pc.oid = t.parentrelid
  JOIN pg_namespace pn ON pn.oid = pc.relnamespace
 WHERE t.level > 0
 ORDER BY t.level, n.nspname, c.relname;

-- name: relation_column
-- A relation by name, as it is now, with the column's number in it (NULL oid: gone).
SELECT c.oid::bigint AS oid, c.relkind::text AS kind,
       (SELECT a.attnum FROM pg_attribute a
         WHERE a.attrelid = c.oid AND a.attname = %(column)s AND a.attnum > 0 AND NOT a.attisdropped) AS attnum
  FROM pg_class c WHERE c.oid = to_regclass(%(name)s);

-- name: index_partitions
-- The indexes attached below a partitioned index, parents before their own: each one's partition,
-- the index it is attached to, whether it is a leaf (a plain index), its definition and method.
SELECT ic.relname AS name, tc.oid::bigint AS table_oid, tn.nspname AS table_schema, tc.relname AS table_name,
       pn.nspname AS parent_schema, pc.relname AS parent_name, ic.relkind = 'i' AS leaf, t.level,
       pg_get_indexdef(ic.oid) AS definition, am.amname AS method
  FROM pg_partition_tree(to_regclass(%(index)s)) t
  JOIN pg_class ic ON ic.oid = t.relid
  JOIN pg_am am ON am.oid = ic.relam
  JOIN pg_index i ON i.indexrelid = ic.oid
  JOIN pg_class tc ON tc.oid = i.indrelid
  JOIN pg_namespace tn ON tn.oid = tc.relnamespace
  JOIN pg_class pc ON pc.oid = t.parentrelid
  JOIN pg_namespace pn ON pn.oid = pc.relnamespace
 WHERE t.level > 0
 ORDER BY t.level, tn.nspname, tc.relname;

-- name: reindex_leftovers
-- What an interrupted REINDEX CONCURRENTLY of an index leaves on its table: invalid copies
-- named after it (<index>_ccnew, <index>_ccold, numbered when taken).
SELECT c.relname AS name
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
 WHERE i.indrelid = %(table_oid)s::oid AND NOT i.indisvalid
   AND left(c.relname, length(%(index)s)) = %(index)s
   AND substr(c.relname, length(%(index)s) + 1) ~ '^_cc(new|old)[0-9]*$';

-- name: partitions_without_index
-- The partitions (tables, at any depth) below a partitioned table that have no index below a
-- partitioned index of it: what keeps that index invalid.
SELECT n.nspname || '.' || c.relname AS name
  FROM pg_partition_tree(%(table_oid)s::oid) t
  JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE t.isleaf AND c.relkind = 'r'
   AND NOT EXISTS (SELECT 1 FROM pg_partition_tree(to_regclass(%(index)s)) x
                     JOIN pg_index i ON i.indexrelid = x.relid WHERE i.indrelid = c.oid)
 ORDER BY 1;

-- name: below_table
-- Is this relation (still) the table or a partition below it?
SELECT EXISTS (SELECT 1 FROM pg_partition_tree(%(table_oid)s::oid) t WHERE t.relid = %(oid)s::oid)
       OR %(oid)s::oid = %(table_oid)s::oid AS below;

-- name: index_attached_under
-- The index of a partition attached to a partitioned index, if any (at most one).
SELECT c.relname AS name, i.indisvalid AS valid
  FROM pg_inherits h
  JOIN pg_class c ON c.oid = h.inhrelid
  JOIN pg_index i ON i.indexrelid = c.oid
 WHERE h.inhparent = to_regclass(%(parent)s) AND i.indrelid = %(table_oid)s::oid;

-- name: relation_in_schema
SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %(schema)s AND c.relname = %(name)s;

-- name: table_publications
-- The publications that replicate the table: named, FOR TABLES IN SCHEMA, or FOR ALL TABLES.
SELECT p.pubname AS name
  FROM pg_publication p
 WHERE p.puballtables
    OR EXISTS (SELECT 1 FROM pg_publication_rel pr WHERE pr.prpubid = p.oid AND pr.prrelid = %(table_oid)s::oid)
    OR EXISTS (SELECT 1 FROM pg_publication_namespace pn JOIN pg_class tc ON tc.relnamespace = pn.pnnspid
                WHERE pn.pnpubid = p.oid AND tc.oid = %(table_oid)s::oid)
 ORDER BY p.pubname;

-- name: deadlock_timeout
SELECT setting::int AS ms FROM pg_settings WHERE name = 'deadlock_timeout';

-- name: cancel_autovacuum
-- Autovacuum workers holding a lock on one of these tables (or their partitions), not vacuuming against wraparound:
-- cancelled (what PostgreSQL does for a lock request that waits deadlock_timeout).
SELECT DISTINCT a.pid, l.relation::regclass::text AS relation, pg_cancel_backend(a.pid) AS cancelled
  FROM pg_stat_activity a
  JOIN pg_locks l ON l.pid = a.pid AND l.granted AND l.locktype = 'relation'
 WHERE a.backend_type = 'autovacuum worker'
   AND l.relation IN (SELECT o FROM unnest(%(oids)s::oid[]) o
                       UNION ALL SELECT t.relid FROM unnest(%(oids)s::oid[]) o, pg_partition_tree(o::regclass) t)
   AND a.query NOT LIKE '%%to prevent wraparound%%';

-- name: lock_holders
-- Who holds a lock on these tables (their partitions too) that the cut-over's would wait for: any but
-- ACCESS SHARE and ROW SHARE, and those too when the column's type changes; the longest-open
-- transactions first. For the operator, when the cut-over's lock requests keep timing out.
SELECT a.pid, a.backend_type, coalesce(a.state, '') AS state, l.relation::regclass::text AS relation,
       string_agg(l.mode, '+' ORDER BY l.mode) AS mode,
       round(extract(epoch FROM now() - coalesce(a.xact_start, a.backend_start))::numeric, 1)::float8 AS open_secs,
       left(regexp_replace(coalesce(a.query, ''), '\s+', ' ', 'g'), 120) AS query
  FROM pg_locks l
  JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid()
   AND l.relation IN (SELECT o FROM unnest(%(oids)s::oid[]) o
                       UNION ALL SELECT t.relid FROM unnest(%(oids)s::oid[]) o, pg_partition_tree(o::regclass) t)
   AND (l.mode NOT IN ('AccessShareLock', 'RowShareLock') OR %(rewrite)s)
 GROUP BY a.pid, a.backend_type, a.state, l.relation, a.xact_start, a.backend_start, a.query
 ORDER BY a.xact_start NULLS LAST, a.pid
 LIMIT 3;

-- name: writes_blocked
-- A session (not this one) holds or waits for a lock on these tables (their partitions too) that
-- keeps writers off: SHARE or stronger.
SELECT EXISTS (
  SELECT 1 FROM pg_locks l
   WHERE l.locktype = 'relation' AND l.pid <> pg_backend_pid()
     AND l.relation IN (SELECT o FROM unnest(%(oids)s::oid[]) o
                       UNION ALL SELECT t.relid FROM unnest(%(oids)s::oid[]) o, pg_partition_tree(o::regclass) t)
     AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
) AS blocked;

-- name: current_lock_timeout_ms
-- This transaction's lock_timeout, in milliseconds (0: none).
SELECT setting::int AS ms FROM pg_settings WHERE name = 'lock_timeout';

-- name: lock_timeout_ms
-- A duration as PostgreSQL reads it ('200ms', '1s'), in milliseconds.
SELECT (extract(epoch FROM %(value)s::interval) * 1000)::int AS ms;

-- name: vector_extension
SELECT extversion FROM pg_extension WHERE extname = 'vector';

-- name: table_by_name
SELECT c.oid::bigint AS oid, n.nspname, c.relname
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass(%(table)s);

-- name: server_now
SELECT now() AS now;

-- name: schema_lock
-- Serialises the creation of reembed's own tables across runs on different tables.
SELECT pg_advisory_xact_lock(%(key)s);

-- name: try_lock
SELECT pg_try_advisory_lock(%(key)s) AS got;

-- name: release_lock
SELECT pg_advisory_unlock(%(key)s);

-- name: lock_held_by
-- Does backend %(pid)s hold the advisory lock %(key)s (asked inside any transaction)?
SELECT count(*) AS n
  FROM pg_locks
 WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND pid = %(pid)s
   AND classid = ((%(key)s::bigint >> 32) & 4294967295)::bigint::oid
   AND objid   = (%(key)s::bigint & 4294967295)::bigint::oid;

-- name: terminate_backend
SELECT pg_terminate_backend(%(pid)s);

-- name: job_heartbeat_age
-- The active job's holder and the age of its heartbeat, for --break-stale-lock.
SELECT job_id, holder, extract(epoch FROM now() - heartbeat_at) AS age
  FROM reembed_checkpoint
 WHERE table_name = %(table)s AND column_name = %(column)s
   AND state IN ('embedding', 'finalizing');

-- name: set_lock_timeout
-- For the rest of the current transaction.
SELECT set_config('lock_timeout', %(value)s, true);

-- name: writer_session
-- Batch updates join a few hundred staged rows to the table by primary key: without stats on
-- the staged rows the planner hashes the whole table for each batch (measured: 9 of 17 ms at
-- 20k rows, worse with size). Index nested loops are always right for them. `reembed.writer`
-- marks the session's writes as reembed's own: its capture triggers let them pass.
SELECT set_config('enable_hashjoin', 'off', false), set_config('enable_mergejoin', 'off', false),
       set_config('reembed.writer', 'on', false);

-- name: vector_type_oid
SELECT 'vector'::regtype::oid::int AS oid;

-- name: build_settings
-- For the index build's session only.
SELECT set_config('maintenance_work_mem', %(memory)s, false),
       set_config('max_parallel_maintenance_workers', %(workers)s, false),
       set_config('lock_timeout', %(lock_timeout)s, false),
       set_config('default_tablespace', %(tablespace)s, false),
       set_config('row_security', 'on', false);  -- event triggers fire on the build, as on the application's

-- name: parallel_limits
SELECT current_setting('max_parallel_workers')::int AS par,
       current_setting('max_worker_processes')::int AS procs;

-- name: index_build_progress
-- An index build on the table (or a partition of it) now: its phase (a CONCURRENTLY build's last one, "waiting for old
-- snapshots", waits for every transaction older than the build, as long as they last: which, and
-- how many are left), how far it is, how long it has run.
SELECT p.phase, p.index_relid::regclass::text AS index, p.blocks_done, p.blocks_total, p.tuples_done,
       p.tuples_total, p.lockers_total, p.lockers_done, nullif(p.current_locker_pid, 0) AS waiting_for_pid,
       extract(epoch FROM now() - a.query_start)::float8 AS running_secs
  FROM pg_stat_progress_create_index p JOIN pg_stat_activity a ON a.pid = p.pid
 WHERE p.relid = %(table_oid)s::oid
    OR p.relid IN (SELECT relid FROM pg_partition_tree(%(table_oid)s::oid));  -- a partition's, one at a time

-- name: range_cursor
-- A range's cursor as committed (after a lost connection: did our commit land?).
SELECT last_id FROM reembed_checkpoint_range
 WHERE job_id = %(job_id)s AND range_no = %(range_no)s;

-- name: release_claims
-- The coordinator holds the table's lock exclusively: no worker holds it, claims left are dead.
UPDATE reembed_checkpoint_range SET claimed_by = NULL, claimed_pid = NULL, split_wanted = false
 WHERE job_id = %(job_id)s AND NOT done;

-- name: release_my_claims
-- A worker that stops lets go of what it holds (its cursors stay: the next claimant goes on from them).
UPDATE reembed_checkpoint_range SET claimed_by = NULL, claimed_pid = NULL, split_wanted = false,
       updated_at = now()
 WHERE job_id = %(job_id)s AND claimed_by = %(worker)s AND NOT done;

-- name: beat_claims
-- The worker's heartbeat on its claims, and the backend that now holds its lock (after a reconnect).
UPDATE reembed_checkpoint_range SET heartbeat_at = now(), claimed_pid = %(pid)s
 WHERE job_id = %(job_id)s AND claimed_by = %(worker)s AND NOT done;

-- name: request_split
-- A worker ran dry: ask the holder of the largest remaining range (by estimate) to split it. Only
-- ranges with more than %(min_rows)s rows left by estimate; none already asked.
UPDATE reembed_checkpoint_range SET split_wanted = true
 WHERE (job_id, range_no) = (
        SELECT job_id, range_no FROM reembed_checkpoint_range
         WHERE job_id = %(job_id)s AND NOT done AND claimed_by IS NOT NULL AND NOT split_wanted
           AND coalesce(rows_estimate, 0) - rows_done - rows_skipped > %(min_rows)s
         ORDER BY coalesce(rows_estimate, 0) - rows_done - rows_skipped DESC
         LIMIT 1)
   AND NOT EXISTS (SELECT 1 FROM reembed_checkpoint_range
                    WHERE job_id = %(job_id)s AND NOT done AND split_wanted)
RETURNING range_no;

-- name: split_lock
-- Serialises the splits of one job (each takes the next range number).
SELECT pg_advisory_xact_lock(%(key)s);

-- name: split_range
-- The holder cuts its range at %(at)s (past everything it has read): it keeps (lower, at], the
-- new range is (at, upper], unclaimed.
UPDATE reembed_checkpoint_range
   SET upper_id = %(at)s, split_wanted = false, rows_estimate = %(keep_estimate)s, updated_at = now()
 WHERE job_id = %(job_id)s AND range_no = %(range_no)s AND claimed_by = %(worker)s AND NOT done
   AND upper_id IS NOT DISTINCT FROM %(upper)s;

-- name: insert_split
INSERT INTO reembed_checkpoint_range (job_id, range_no, lower_id, upper_id, last_id, rows_estimate)
SELECT %(job_id)s, max(range_no) + 1, %(at)s, %(upper)s, %(at)s, %(estimate)s
  FROM reembed_checkpoint_range WHERE job_id = %(job_id)s
RETURNING range_no;

-- name: split_declined
-- Too little left to split: the estimate is made exact, so that nobody asks again.
UPDATE reembed_checkpoint_range SET split_wanted = false, rows_estimate = %(estimate)s
 WHERE job_id = %(job_id)s AND range_no = %(range_no)s AND claimed_by = %(worker)s;

-- name: mark_claimed
UPDATE reembed_checkpoint_range
   SET claimed_by = %(worker)s, claimed_pid = %(pid)s, heartbeat_at = now(), split_wanted = false,
       updated_at = now()
 WHERE job_id = %(job_id)s AND range_no = %(range_no)s;

-- name: record_failed_rows
INSERT INTO reembed_failed_rows (job_id, row_id, error) VALUES (%(job_id)s, %(row_id)s, %(error)s)
ON CONFLICT (job_id, row_id) DO UPDATE
   SET attempts = reembed_failed_rows.attempts + 1, error = EXCLUDED.error, last_seen = now();

-- name: failed_rows_pending
SELECT count(*) AS n FROM reembed_failed_rows WHERE job_id = %(job_id)s AND NOT accepted;

-- name: failed_row_ids
SELECT row_id FROM reembed_failed_rows WHERE job_id = %(job_id)s AND NOT accepted ORDER BY row_id;

-- name: forget_failed_rows
DELETE FROM reembed_failed_rows WHERE job_id = %(job_id)s AND row_id = ANY(%(row_ids)s);

-- name: accept_failed_rows
UPDATE reembed_failed_rows SET accepted = true WHERE job_id = %(job_id)s AND NOT accepted;

-- name: set_application_name
-- A pool connection takes the name of the role it serves (pg_stat_activity shows who is who).
SELECT set_config('application_name', %(name)s, false);

-- name: tool_schema
-- Where reembed's own tables live (the capture function names its table with it).
SELECT n.nspname AS schema
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass('reembed_changes');

-- name: capture_triggers
-- reembed's capture triggers on a table (any job's).
SELECT t.tgname AS trigger_name, t.tgenabled <> 'D' AS enabled
  FROM pg_trigger t
 WHERE t.tgrelid = %(table_oid)s::oid AND NOT t.tgisinternal
   AND t.tgname LIKE 'reembed\_capture\_%%'
 ORDER BY t.tgname;

-- name: set_capture_trigger
UPDATE reembed_checkpoint SET capture_trigger = %(name)s, updated_at = now() WHERE job_id = %(job_id)s;

-- name: capture_keys
INSERT INTO reembed_changes (job_id, row_id) SELECT %(job_id)s, unnest(%(row_ids)s::text[]);

-- name: changes_pending
SELECT count(DISTINCT row_id) AS n FROM reembed_changes WHERE job_id = %(job_id)s;

-- name: forget_changes
DELETE FROM reembed_changes WHERE job_id = %(job_id)s AND row_id = ANY(%(row_ids)s::text[]);

-- name: forget_job_changes
DELETE FROM reembed_changes WHERE job_id = %(job_id)s;

-- name: catchup_pass_started
UPDATE reembed_checkpoint
   SET catchup_pass = %(pass)s, catchup_pass_total = %(pending)s, catchup_pass_done = 0, updated_at = now()
 WHERE job_id = %(job_id)s;

-- name: catchup_advanced
UPDATE reembed_checkpoint
   SET catchup_pass_done = catchup_pass_done + %(keys)s, catchup_rows = catchup_rows + %(rows)s,
       updated_at = now()
 WHERE job_id = %(job_id)s;

-- name: lock_registry_row
-- The cut-over takes the registry row first, as the application's writers do (FOR SHARE):
-- writers that read it first wait here before touching the table. (Those that touch the table
-- first may wait here holding a table lock: the cut-over's table lock, asked for in the same
-- round trip, then times out before PostgreSQL's deadlock check, and the cut-over retries.)
SELECT id FROM {registry} WHERE id = 1 FOR UPDATE;

-- name: notify_model_changed
SELECT pg_notify('reembed_model_changed', %(payload)s);

-- name: record_writers_held
UPDATE reembed_checkpoint SET writers_held_secs = %(secs)s, updated_at = now() WHERE job_id = %(job_id)s;

-- name: table_size
-- With its partitions' (a partitioned table holds no rows itself).
SELECT sum(pg_table_size(c.oid))::bigint AS bytes
  FROM pg_class c
 WHERE c.oid = %(table_oid)s::oid OR c.oid IN (SELECT relid FROM pg_partition_tree(%(table_oid)s::oid));

-- name: accepted_failed_rows
-- Rows a finished job left NULL with --accept-failed (verify does not count them as wrong).
SELECT f.row_id FROM reembed_failed_rows f JOIN reembed_checkpoint c USING (job_id)
 WHERE c.table_name = %(table)s AND c.column_name = %(column)s AND c.state = 'done' AND f.accepted
   AND f.row_id = ANY(%(row_ids)s::text[]);

-- name: leftover_changes
-- Captured keys of jobs that are no longer active: nobody will catch them up.
SELECT c.job_id, count(*) AS n FROM reembed_changes c
  LEFT JOIN reembed_checkpoint j USING (job_id)
 WHERE j.job_id IS NULL OR (j.table_name = %(table)s AND j.state NOT IN ('embedding', 'finalizing'))
 GROUP BY c.job_id ORDER BY c.job_id;

-- name: wal_position
-- Where the primary writes WAL now, in bytes (reembed.throttle samples it).
SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS lsn;

-- name: replication_positions
-- Each replica this role may see: how far it replayed (NULL: hidden from this role).
SELECT application_name, pg_wal_lsn_diff(replay_lsn, '0/0')::bigint AS replay_lsn,
       pg_wal_lsn_diff(flush_lsn, '0/0')::bigint AS flush_lsn,
       extract(epoch FROM replay_lag)::float8 AS replay_lag
  FROM pg_stat_replication;

-- name: idle_replication_slots
-- Replication slots whose consumer is not connected: they keep the WAL from their position on.
SELECT slot_name, slot_type, wal_status, safe_wal_size,
       pg_wal_lsn_diff(coalesce(confirmed_flush_lsn, restart_lsn), '0/0')::bigint AS position,
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained_bytes
  FROM pg_replication_slots
 WHERE NOT active AND restart_lsn IS NOT NULL AND NOT temporary;

-- name: apply_delay
-- On a replica: its recovery_min_apply_delay, in seconds (a delayed standby replays late on purpose).
SELECT extract(epoch FROM current_setting('recovery_min_apply_delay')::interval)::float8 AS secs;

-- name: archive_state
SELECT current_setting('archive_mode') AS mode, a.last_archived_wal,
       pg_walfile_name(pg_current_wal_lsn()) AS current_wal,
       (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size') AS segment_bytes
  FROM pg_stat_archiver a;

-- name: autovacuum_on_table
SELECT count(*) FILTER (WHERE a.query LIKE '%%to prevent wraparound%%') AS wraparound, count(*) AS any
  FROM pg_stat_progress_vacuum p JOIN pg_stat_activity a ON a.pid = p.pid
 WHERE p.relid = %(table_oid)s::oid AND a.backend_type = 'autovacuum worker';

-- name: lock_waits_on_us
-- Application sessions waiting for a lock that one of reembed's sessions holds.
SELECT count(*) AS n FROM pg_stat_activity w
 WHERE w.wait_event_type = 'Lock' AND left(w.application_name, 8) <> 'reembed '
   AND EXISTS (SELECT 1 FROM pg_stat_activity b
                WHERE b.pid = ANY (pg_blocking_pids(w.pid)) AND left(b.application_name, 8) = 'reembed ');

-- name: active_sessions
-- The application's load: its sessions running a statement now (reembed's own not counted).
SELECT count(*) AS n FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid()
   AND left(application_name, 8) <> 'reembed ';

-- name: write_heartbeat
INSERT INTO reembed_heartbeat (job_id, beat_at) VALUES (%(job_id)s, clock_timestamp())
    ON CONFLICT (job_id) DO UPDATE SET beat_at = excluded.beat_at
RETURNING beat_at;

-- name: heartbeat_seen
-- On a replica: the job's heartbeat as far as it has replayed.
SELECT beat_at FROM reembed_heartbeat WHERE job_id = %(job_id)s;

-- name: record_throttle
UPDATE reembed_checkpoint
   SET throttle_reason = %(reason)s::text,
       throttled_since = CASE WHEN %(reason)s::text IS NULL THEN NULL ELSE now() END,
       throttled_secs = throttled_secs + %(secs)s, updated_at = now()
 WHERE job_id = %(job_id)s;

-- name: cost_facts
-- What `plan`'s cost estimate reads: the table's size on disk (with its partitions': a partitioned
-- table holds no rows itself), its TOAST, the server's WAL settings.
SELECT sum(c.relpages)::bigint AS heap_pages, sum(pg_relation_size(c.oid))::bigint AS heap_bytes,
       sum(coalesce(pg_relation_size(c.reltoastrelid), 0))::bigint AS toast_bytes,
       current_setting('full_page_writes') = 'on' AS full_page_writes,
       current_setting('wal_compression') <> 'off' AS wal_compression,
       (SELECT setting::float8 FROM pg_settings WHERE name = 'checkpoint_timeout') AS checkpoint_timeout_secs,
       (SELECT setting::float8 * 1024 * 1024 FROM pg_settings WHERE name = 'max_wal_size') AS max_wal_bytes,
       current_setting('checkpoint_completion_target')::float8 AS completion_target
  FROM pg_class c
 WHERE c.oid = %(table_oid)s::oid OR c.oid IN (SELECT relid FROM pg_partition_tree(%(table_oid)s::oid))
HAVING count(*) > 0;

-- name: cost_columns
-- Each column's average stored width (a TOASTed value counts as its pointer) and, for the key,
-- how well its order follows the table's physical order (ANALYZE's figures; NULL if never analysed).
SELECT a.attname, a.attnum, a.attlen, s.avg_width, s.correlation, s.null_frac, s.n_distinct,
       current_setting('server_version_num')::int AS server_version
  FROM pg_attribute a
  LEFT JOIN pg_stats s ON s.schemaname = %(schema)s AND s.tablename = %(table)s AND s.attname = a.attname
 WHERE a.attrelid = %(table_oid)s::oid AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum;

-- name: cost_indexes
-- Each index's size (a partitioned index's: its partitions' indexes).
SELECT i.indexrelid::regclass::text AS name, c.relname AS index_name,
       (pg_relation_size(i.indexrelid) + coalesce((SELECT sum(pg_relation_size(t.relid))
                                                     FROM pg_partition_tree(i.indexrelid) t
                                                    WHERE t.level > 0), 0))::bigint AS bytes,
       am.amname AS method
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
 WHERE i.indrelid = %(table_oid)s::oid;

-- name: kept_previous
-- A shadow job whose previous column is kept (until `reembed cleanup` or `reembed rollback`).
SELECT * FROM reembed_checkpoint
 WHERE table_name = %(table)s AND column_name = %(column)s AND previous_state = 'kept'
 ORDER BY job_id DESC LIMIT 1;

-- name: record_partitions
-- A partitioned table's partitions, and the inventory that names their indexes (reembed.repartition).
UPDATE reembed_checkpoint SET partitions = %(partitions)s, dependents = coalesce(%(dependents)s, dependents),
       updated_at = now()
 WHERE job_id = %(job_id)s;

-- name: record_shadow
UPDATE reembed_checkpoint SET shadow = %(shadow)s, updated_at = now() WHERE job_id = %(job_id)s;

-- name: record_gate
UPDATE reembed_checkpoint SET gate = %(gate)s, updated_at = now() WHERE job_id = %(job_id)s;

-- name: record_swap
UPDATE reembed_checkpoint SET swapped_at = now(), previous_state = 'kept', updated_at = now()
 WHERE job_id = %(job_id)s;

-- name: record_readers_held
UPDATE reembed_checkpoint SET shadow = shadow || jsonb_build_object('readers_held_secs', %(secs)s::float8)
 WHERE job_id = %(job_id)s;

-- name: set_previous_state
UPDATE reembed_checkpoint SET previous_state = %(state)s, updated_at = now()
 WHERE job_id = %(job_id)s AND previous_state = 'kept';

-- name: after_swap_count
-- Rows written after the swap that still exist (a deleted row needs no previous vector).
SELECT count(DISTINCT row_id) AS n FROM reembed_after_swap WHERE job_id = %(job_id)s;

-- name: after_swap_page
-- The next page of keys written after the swap, each with the newest record of it read.
SELECT row_id, max(seq) AS seq FROM reembed_after_swap
 WHERE job_id = %(job_id)s AND (%(after)s::text IS NULL OR row_id > %(after)s) AND seq <= %(upto)s
 GROUP BY row_id ORDER BY row_id LIMIT %(n)s;

-- name: after_swap_settled
-- Keys whose previous vector is right again: their records up to the one read (a newer write
-- by the application, recorded since, stays).
DELETE FROM reembed_after_swap AS a
 USING unnest(%(row_ids)s::text[], %(seqs)s::bigint[]) AS s(row_id, seq)
 WHERE a.job_id = %(job_id)s AND a.row_id = s.row_id AND a.seq <= s.seq;

-- name: forget_after_swap
DELETE FROM reembed_after_swap WHERE job_id = %(job_id)s;

-- name: bridge_tables_exist
SELECT to_regclass('reembed_bridge') IS NOT NULL AS present;

-- name: current_bridges
-- The bridges of (table, column) the application calls now: mapping or identity.
SELECT * FROM reembed_bridge
 WHERE table_name = %(table)s AND column_name = %(column)s AND state IN ('mapping', 'identity')
 ORDER BY bridge_id;

-- name: latest_bridge
-- The newest bridge of (table, column), whatever its state (status shows a refusal too).
SELECT * FROM reembed_bridge WHERE table_name = %(table)s AND column_name = %(column)s
 ORDER BY bridge_id DESC LIMIT 1;

-- name: bridge_of_function
-- The current bridge that owns a function name (this table's, or another's).
SELECT * FROM reembed_bridge
 WHERE function_schema = %(schema)s AND function_name = %(name)s AND state IN ('mapping', 'identity');

-- name: refused_bridge_since
-- A refusal recorded for a job since a moment (another worker of the run fitted and refused it).
SELECT * FROM reembed_bridge
 WHERE job_id = %(job_id)s AND state = 'refused' AND created_at >= %(since)s
 ORDER BY bridge_id DESC LIMIT 1;

-- name: bridge_install_lock
-- One install at a time per table (transaction level): the workers of a run, `reembed bridge`.
SELECT pg_try_advisory_xact_lock(%(key)s::bigint) AS granted;

-- name: bridge_fit_lock
-- The same lock held by a session across a fit (minutes) and its install: the other workers wait.
SELECT pg_try_advisory_lock(%(key)s::bigint) AS granted;

-- name: bridge_fit_unlock
SELECT pg_advisory_unlock(%(key)s::bigint) AS released;

-- name: registry_for_share
-- What the live column holds, held still while a bridge into it is installed (a swap waits).
SELECT model_name, dimension, model_hash FROM {registry} WHERE id = 1 FOR SHARE;

-- name: insert_bridge
INSERT INTO reembed_bridge (
    table_name, column_name, function_schema, function_name, state, job_id,
    source_model_name, source_dimension, source_hash, target_model_name, target_dimension, target_hash,
    kind, normalize, figures)
VALUES (
    %(table)s, %(column)s, %(function_schema)s, %(function_name)s, %(state)s, %(job_id)s,
    %(source_model_name)s, %(source_dimension)s, %(source_hash)s,
    %(target_model_name)s, %(target_dimension)s, %(target_hash)s,
    %(kind)s, %(normalize)s, %(figures)s)
RETURNING *;

-- name: insert_bridge_row
INSERT INTO reembed_bridge_map (bridge_id, i, w, b) VALUES (%(bridge_id)s, %(i)s, %(w)s, %(b)s);

-- name: set_bridge_state
-- Must match exactly one row: the bridge in the state it was read in.
UPDATE reembed_bridge SET state = %(state)s, updated_at = now()
 WHERE bridge_id = %(bridge_id)s AND state = %(from_state)s;

-- name: forget_bridge_map
DELETE FROM reembed_bridge_map WHERE bridge_id = %(bridge_id)s;

-- name: bridge_map_rows
SELECT count(*) AS n FROM reembed_bridge_map WHERE bridge_id = %(bridge_id)s;

-- name: function_exists
-- Functions of that name taking one vector, and whether reembed made them (a bridge names them).
SELECT p.oid::regprocedure::text AS signature FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = %(schema)s AND p.proname = %(name)s;

-- name: function_schema_rights
-- The schema a bridge's function goes in: whether it exists (a row) and this role may create in it.
SELECT current_user AS role, has_schema_privilege(current_user, n.oid, 'CREATE') AS can_create
  FROM pg_namespace n WHERE n.nspname = %(schema)s;

-- name: function_owner_rights
-- A bridge's function (its signature: to_regprocedure's text, NULL when gone): its owner, and
-- whether this role acts as it (CREATE OR REPLACE, COMMENT ON and DROP need the owner's rights)
-- and may create in its schema (CREATE OR REPLACE needs that too).
SELECT p.oid::regprocedure::text AS signature, pg_get_userbyid(p.proowner) AS owner, current_user AS role,
       pg_has_role(current_user, p.proowner, 'USAGE') AS owns,
       has_schema_privilege(current_user, p.pronamespace, 'CREATE') AS can_create,
       n.nspname AS schema
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE p.oid = to_regprocedure(%(signature)s);

-- name: function_dependents
-- What depends on a bridge's function (a view that calls it, a default, a function whose body
-- names it): DROP FUNCTION without CASCADE fails on them. A view by its name, not its rule's.
SELECT DISTINCT coalesce(
           (SELECT CASE c.relkind WHEN 'm' THEN 'materialized view ' ELSE 'view ' END || c.oid::regclass::text
              FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
             WHERE d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid),
           pg_describe_object(d.classid, d.objid, d.objsubid)) AS what
  FROM pg_depend d
 WHERE d.refclassid = 'pg_proc'::regclass AND d.refobjid = to_regprocedure(%(signature)s) AND d.deptype = 'n'
 ORDER BY 1;

-- name: tool_schema_of_bridge
-- Where the bridge's map lives (the function names its table with it).
SELECT n.nspname AS schema
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass('reembed_bridge_map');

-- name: vector_schema
SELECT n.nspname AS schema FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
 WHERE e.extname = 'vector';

-- name: create_bridge_function
-- The bridge while the column holds the old model's vectors: a new-model vector mapped into that
-- space, one output coordinate per map row (pgvector's <#> is the negative inner product), made
-- unit length ({normalize}: l2_normalize, or nothing) when the old vectors are. It runs as its owner
-- (the application needs no grant on reembed's tables). Wrap it in a scalar subquery in a search,
-- `ORDER BY embedding <=> (SELECT {function}($1))`: evaluated once, the index still used.
-- The map is the one of this function's current bridge that the caller's snapshot sees, not one
-- named in the body: the body is read from the catalog as it is now, the map rows with the caller's
-- snapshot, so a repeatable-read transaction older than a re-fit maps with the map it began under
-- (with the new one's id it found no rows and ranked by NULL, silently); one older than the first
-- install finds none and fails ("vector must have at least 1 dimension") rather than rank by NULL.
CREATE OR REPLACE FUNCTION {function}(q {vschema}.vector) RETURNS {vschema}.vector
LANGUAGE sql STABLE STRICT PARALLEL SAFE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $bridge$
SELECT {normalize}(coalesce(array_agg(m.b - (m.w OPERATOR({vschema}.<#>) q) ORDER BY m.i),
                            ARRAY[]::float8[])::{vschema}.vector)
  FROM {map} AS m
 WHERE m.bridge_id = (SELECT b.bridge_id FROM {bridges} AS b
                       WHERE b.function_schema = {function_schema} AND b.function_name = {function_name}
                         AND b.state IN ('mapping', 'identity'))
$bridge$;

-- name: create_identity_function
-- The bridge once the column holds the new model's vectors (after a shadow job's swap): the vector
-- itself. A plain SQL expression, inlined into the application's statements: it costs nothing.
CREATE OR REPLACE FUNCTION {function}(q {vschema}.vector) RETURNS {vschema}.vector
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $bridge$
SELECT q
$bridge$;

-- name: comment_bridge_function
COMMENT ON FUNCTION {function}({vschema}.vector) IS {comment};

-- name: drop_bridge_function
DROP FUNCTION IF EXISTS {function}({vschema}.vector);

-- name: swap_dependents
-- Everything to re-create when the column is swapped: the views on the column, and the views on
-- those (depth: 1 on the column), the triggers and policies that name the column.
WITH RECURSIVE views AS (
    SELECT DISTINCT r.ev_class AS oid, 1 AS depth
      FROM pg_depend d JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
     WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = %(table_oid)s::oid
       AND d.refobjsubid = %(attnum)s AND r.ev_class <> %(table_oid)s::oid
    UNION
    SELECT DISTINCT r.ev_class, v.depth + 1
      FROM views v
      JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = v.oid
      JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
     WHERE r.ev_class <> v.oid
)
SELECT 'view' AS kind, c.oid, n.nspname AS schema, c.relname AS name, max(v.depth) AS depth,
       c.relkind::text AS relkind, pg_get_viewdef(c.oid) AS definition,
       pg_get_userbyid(c.relowner) AS owner, c.reloptions,
       obj_description(c.oid, 'pg_class') AS comment,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('grantee', CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                                          ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                                                     'privilege', a.privilege_type, 'grantable', a.is_grantable)),
                        '[]'::jsonb)
          FROM aclexplode(c.relacl) a WHERE a.grantee <> c.relowner) AS grants,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('column', at.attname, 'comment', col_description(c.oid, at.attnum))),
                        '[]'::jsonb)
          FROM pg_attribute at WHERE at.attrelid = c.oid AND at.attnum > 0
           AND col_description(c.oid, at.attnum) IS NOT NULL) AS column_comments,
       NULL::text AS enabled
  FROM views v JOIN pg_class c ON c.oid = v.oid JOIN pg_namespace n ON n.oid = c.relnamespace
 GROUP BY c.oid, n.nspname, c.relname
UNION ALL
SELECT 'trigger', t.oid, NULL, t.tgname, 0, NULL, pg_get_triggerdef(t.oid), NULL, NULL,
       obj_description(t.oid, 'pg_trigger'), '[]'::jsonb, '[]'::jsonb, t.tgenabled::text
  FROM pg_trigger t
 WHERE t.tgrelid = %(table_oid)s::oid AND NOT t.tgisinternal AND t.tgname NOT LIKE 'reembed\_%%'
   AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_trigger'::regclass AND d.objid = t.oid
                  AND d.refobjid = %(table_oid)s::oid AND d.refobjsubid = %(attnum)s)
UNION ALL
SELECT 'policy', p.oid, NULL, p.polname, 0, NULL,
       'AS ' || CASE WHEN p.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END
       || ' FOR ' || CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                   WHEN 'd' THEN 'DELETE' ELSE 'ALL' END
       || ' TO ' || (SELECT string_agg(CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r)) END, ', ')
                       FROM unnest(p.polroles) AS r)
       || coalesce(' USING (' || pg_get_expr(p.polqual, p.polrelid) || ')', '')
       || coalesce(' WITH CHECK (' || pg_get_expr(p.polwithcheck, p.polrelid) || ')', ''),
       NULL, NULL, obj_description(p.oid, 'pg_policy'), '[]'::jsonb, '[]'::jsonb, NULL
  FROM pg_policy p
 WHERE p.polrelid = %(table_oid)s::oid
   AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_policy'::regclass AND d.objid = p.oid
                  AND d.refobjid = %(table_oid)s::oid AND d.refobjsubid = %(attnum)s)
 ORDER BY 1, 5, 4;

-- name: column_not_null
SELECT attnotnull AS not_null FROM pg_attribute WHERE attrelid = %(table_oid)s::oid AND attname = %(column)s;

-- name: indexes_valid
SELECT c.relname AS name, i.indisvalid AND i.indisready AS valid
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
 WHERE i.indrelid = %(table_oid)s::oid AND c.relname = ANY(%(names)s::text[]);

-- name: previous_state_exists
SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('reembed_checkpoint')
                  AND attname = 'previous_state' AND NOT attisdropped) AS present;

-- name: gate_excused
-- Rows that may lack a new vector at the gate: captured and not caught up yet, or failed and accepted.
SELECT row_id FROM reembed_changes WHERE job_id = %(job_id)s
UNION
SELECT row_id FROM reembed_failed_rows WHERE job_id = %(job_id)s;

-- name: gate_search_settings
-- The gate's queries go through the index (as the application's search does); IVFFlat probes a
-- tenth of a usual 100 lists, HNSW keeps the server's ef_search.
SET LOCAL enable_seqscan = off;
SET LOCAL ivfflat.probes = 10;

-- name: upsert_worker
-- A worker process joins the job (or its row is refreshed): for `reembed status`.
INSERT INTO reembed_worker (job_id, worker, host, pid, device, state)
VALUES (%(job_id)s, %(worker)s, %(host)s, %(pid)s, %(device)s, 'running')
ON CONFLICT (job_id, worker) DO UPDATE
   SET device = EXCLUDED.device, state = 'running', heartbeat_at = now();

-- name: beat_worker
UPDATE reembed_worker
   SET range_no = %(range_no)s, rows_done = %(rows)s, rows_per_sec = %(rate)s, state = %(state)s,
       heartbeat_at = now()
 WHERE job_id = %(job_id)s AND worker = %(worker)s;

-- name: job_workers
-- Every worker of the job, with its heartbeat's age (seconds) and whether its process still holds
-- the table's lock (its claims' backend; NULL when it holds no claim).
SELECT w.*, extract(epoch FROM now() - w.heartbeat_at)::float8 AS heartbeat_age,
       (SELECT r.last_id FROM reembed_checkpoint_range r
         WHERE r.job_id = w.job_id AND r.range_no = w.range_no) AS range_last_id
  FROM reembed_worker w
 WHERE w.job_id = %(job_id)s
 ORDER BY w.started_at, w.worker;

-- name: job_range_counts
SELECT count(*) AS ranges, count(*) FILTER (WHERE done) AS done,
       count(*) FILTER (WHERE claimed_by IS NOT NULL AND NOT done) AS claimed
  FROM reembed_checkpoint_range WHERE job_id = %(job_id)s;

-- name: try_lock_shared
SELECT pg_try_advisory_lock_shared(%(key)s) AS got;

-- name: lock_shared
SELECT pg_advisory_lock_shared(%(key)s);

-- name: release_lock_shared
SELECT pg_advisory_unlock_shared(%(key)s);

-- name: range_claimant
SELECT claimed_by FROM reembed_checkpoint_range WHERE job_id = %(job_id)s AND range_no = %(range_no)s;

-- name: worker_table_exists
SELECT to_regclass('reembed_worker') IS NOT NULL AS present;

-- ------------------------------------------------------------------ reembed.carry
-- What a shadow swap (and rollback's swap back) drops and creates again, read from the catalogs
-- just before: the views over the column (and views over those), with everything PostgreSQL keeps
-- on them; rules, triggers, policies and statistics that name the column or sit on those views;
-- and what depends on those views that cannot be created again (refused, by name).

-- name: carry_views
-- Each view over the column (depth 1) or over such a view, with its owner, options, grants (NULL
-- grants as the owner's defaults), column grants, comments and column defaults.
WITH RECURSIVE views AS (
    SELECT DISTINCT r.ev_class AS oid, 1 AS depth
      FROM pg_depend d JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
     WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = %(table_oid)s::oid
       AND d.refobjsubid = %(attnum)s AND r.rulename = '_RETURN' AND r.ev_class <> %(table_oid)s::oid
    UNION
    SELECT DISTINCT r.ev_class, v.depth + 1
      FROM views v
      JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = v.oid
      JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
     WHERE r.ev_class <> v.oid AND r.rulename = '_RETURN'
)
SELECT c.oid::bigint AS oid, n.nspname AS schema, c.relname AS name, max(v.depth) AS depth,
       c.relkind::text AS relkind, pg_get_viewdef(c.oid) AS definition,
       pg_get_userbyid(c.relowner) AS owner, c.reloptions AS options,
       obj_description(c.oid, 'pg_class') AS comment,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'grantee', CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END,
                   'grantor', pg_get_userbyid(a.grantor), 'privilege', a.privilege_type,
                   'grantable', a.is_grantable)), '[]'::jsonb)
          FROM aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a) AS acl,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'column', at.attname,
                   'grantee', CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END,
                   'grantor', pg_get_userbyid(a.grantor), 'privilege', a.privilege_type,
                   'grantable', a.is_grantable)), '[]'::jsonb)
          FROM pg_attribute at CROSS JOIN LATERAL aclexplode(at.attacl) a
         WHERE at.attrelid = c.oid AND at.attnum > 0 AND at.attacl IS NOT NULL) AS column_acl,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('column', at.attname,
                                                     'comment', col_description(c.oid, at.attnum))), '[]'::jsonb)
          FROM pg_attribute at WHERE at.attrelid = c.oid AND at.attnum > 0
           AND col_description(c.oid, at.attnum) IS NOT NULL) AS column_comments,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('column', at.attname,
                                                     'default', pg_get_expr(ad.adbin, ad.adrelid))), '[]'::jsonb)
          FROM pg_attrdef ad JOIN pg_attribute at ON at.attrelid = ad.adrelid AND at.attnum = ad.adnum
         WHERE ad.adrelid = c.oid) AS defaults
  FROM views v JOIN pg_class c ON c.oid = v.oid JOIN pg_namespace n ON n.oid = c.relnamespace
 GROUP BY c.oid, n.nspname, c.relname
 ORDER BY max(v.depth), n.nspname, c.relname;

-- name: carry_attached
-- Rules (not a view's own), triggers, policies and statistics objects that name the column, or
-- sit on one of the views (%(views)s), or name one of them: each with its definition as
-- PostgreSQL prints it (the column by its name), its relation, comment and enabled state.
SELECT 'rule' AS kind, r.oid::bigint AS oid, r.rulename AS name, n.nspname AS schema, c.relname AS relation,
       pg_get_ruledef(r.oid) AS definition, r.ev_enabled::text AS enabled,
       obj_description(r.oid, 'pg_rewrite') AS comment, NULL::text AS owner, NULL::int AS stats_target,
       pg_get_userbyid(c.relowner) AS relation_owner
  FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE r.rulename <> '_RETURN'
   AND (r.ev_class = ANY(%(views)s::oid[])
        OR EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                      AND d.refclassid = 'pg_class'::regclass
                      AND ((d.refobjid = %(table_oid)s::oid AND d.refobjsubid = %(attnum)s)
                           OR (d.refobjid = ANY(%(views)s::oid[]) AND d.refobjid <> r.ev_class))))
UNION ALL
SELECT 'trigger', t.oid::bigint, t.tgname, n.nspname, c.relname, pg_get_triggerdef(t.oid), t.tgenabled::text,
       obj_description(t.oid, 'pg_trigger'), NULL, NULL, pg_get_userbyid(c.relowner)
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE NOT t.tgisinternal AND t.tgname NOT LIKE 'reembed\_%%'
   AND (t.tgrelid = ANY(%(views)s::oid[])
        OR EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_trigger'::regclass AND d.objid = t.oid
                      AND d.refclassid = 'pg_class'::regclass AND d.refobjid = %(table_oid)s::oid
                      AND d.refobjsubid = %(attnum)s))
UNION ALL
SELECT 'policy', p.oid::bigint, p.polname, n.nspname, c.relname,
       'AS ' || CASE WHEN p.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END
       || ' FOR ' || CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                   WHEN 'd' THEN 'DELETE' ELSE 'ALL' END
       || ' TO ' || (SELECT string_agg(CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r)) END, ', ')
                       FROM unnest(p.polroles) AS r)
       || coalesce(' USING (' || pg_get_expr(p.polqual, p.polrelid) || ')', '')
       || coalesce(' WITH CHECK (' || pg_get_expr(p.polwithcheck, p.polrelid) || ')', ''),
       NULL, obj_description(p.oid, 'pg_policy'), NULL, NULL, pg_get_userbyid(c.relowner)
  FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE EXISTS (SELECT 1 FROM pg_depend d
                WHERE d.classid = 'pg_policy'::regclass AND d.objid = p.oid AND d.refclassid = 'pg_class'::regclass
                  AND ((d.refobjid = %(table_oid)s::oid AND d.refobjsubid = %(attnum)s)
                       OR d.refobjid = ANY(%(views)s::oid[])))
UNION ALL
SELECT 'statistics', s.oid::bigint, s.stxname, n.nspname, c.relname, pg_get_statisticsobjdef(s.oid), NULL,
       obj_description(s.oid, 'pg_statistic_ext'), pg_get_userbyid(s.stxowner), s.stxstattarget::int,
       pg_get_userbyid(s.stxowner)
  FROM pg_statistic_ext s JOIN pg_class c ON c.oid = s.stxrelid JOIN pg_namespace n ON n.oid = s.stxnamespace
 WHERE EXISTS (SELECT 1 FROM pg_depend d
                WHERE d.classid = 'pg_statistic_ext'::regclass AND d.objid = s.oid
                  AND d.refclassid = 'pg_class'::regclass AND d.refobjid = %(table_oid)s::oid
                  AND d.refobjsubid = %(attnum)s)
 ORDER BY 1, 4, 5, 3;

-- name: carry_blockers
-- What depends on the views (%(views)s) or their row types that the swap cannot create again:
-- described, with what it depends on. (Views, rules, triggers and policies are carried; a view's
-- own row type, column defaults and its membership of nothing are its own.)
SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) AS what,
       pg_describe_object(d.refclassid, d.refobjid, 0) AS depends_on
  FROM pg_depend d
 WHERE ((d.refclassid = 'pg_class'::regclass AND d.refobjid = ANY(%(views)s::oid[]))
        OR (d.refclassid = 'pg_type'::regclass AND d.refobjid IN (
              SELECT t.oid FROM pg_type t JOIN pg_class c ON c.reltype = t.oid WHERE c.oid = ANY(%(views)s::oid[])
              UNION
              SELECT t.typarray FROM pg_type t JOIN pg_class c ON c.reltype = t.oid WHERE c.oid = ANY(%(views)s::oid[]))))
   AND d.deptype IN ('n', 'a')
   AND d.classid NOT IN ('pg_rewrite'::regclass, 'pg_trigger'::regclass, 'pg_policy'::regclass,
                         'pg_attrdef'::regclass)
   AND NOT (d.classid = 'pg_type'::regclass AND d.objid IN (
              SELECT t.typarray FROM pg_type t JOIN pg_class c ON c.reltype = t.oid WHERE c.oid = ANY(%(views)s::oid[])))
UNION
SELECT 'security label on ' || pg_describe_object(l.classoid, l.objoid, l.objsubid), NULL
  FROM pg_seclabel l
 WHERE l.classoid = 'pg_class'::regclass
   AND (l.objoid = ANY(%(views)s::oid[]) OR (l.objoid = %(table_oid)s::oid AND l.objsubid = %(attnum)s))
UNION
SELECT pg_describe_object('pg_class'::regclass, d.objid, 0) || ' (a member of '
       || pg_describe_object(d.refclassid, d.refobjid, 0) || ')', NULL
  FROM pg_depend d
 WHERE d.classid = 'pg_class'::regclass AND d.objid = ANY(%(views)s::oid[]) AND d.deptype = 'e'
 ORDER BY 1;

-- name: column_attributes
-- What PostgreSQL keeps about a column beyond its type and values: its comment, grants (with
-- their grantors), statistics target, storage, compression and options.
SELECT a.attnum, col_description(a.attrelid, a.attnum) AS comment, a.attstattarget::int AS stats_target,
       a.attstorage::text AS storage, t.typstorage::text AS type_storage, a.attcompression::text AS compression,
       a.attoptions AS options, a.attnotnull AS not_null,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'grantee', CASE WHEN x.grantee = 0 THEN NULL ELSE pg_get_userbyid(x.grantee) END,
                   'grantor', pg_get_userbyid(x.grantor), 'privilege', x.privilege_type,
                   'grantable', x.is_grantable)), '[]'::jsonb)
          FROM aclexplode(a.attacl) x) AS acl
  FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
 WHERE a.attrelid = %(relation)s::oid AND a.attname = %(column)s AND a.attnum > 0 AND NOT a.attisdropped;

-- name: index_attributes
-- An index's comment, tablespace and statistics targets (of its expression columns).
SELECT obj_description(c.oid, 'pg_class') AS comment,
       (SELECT spcname FROM pg_tablespace WHERE oid = c.reltablespace) AS tablespace,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('column', a.attnum, 'target', a.attstattarget::int)), '[]'::jsonb)
          FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attstattarget IS NOT NULL
           AND a.attstattarget >= 0) AS stats
  FROM pg_class c
 WHERE c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = %(table_oid)s::oid) AND c.relname = %(index)s;

-- name: relation_oid
SELECT to_regclass(%(name)s)::oid::bigint AS oid;

-- name: carry_drop_view
DROP VIEW {view};

-- name: carry_create_view
CREATE VIEW {view}{options} AS {definition};

-- name: carry_view_owner
ALTER VIEW {view} OWNER TO {owner};

-- name: carry_revoke
REVOKE ALL ON {relation} FROM {grantees} CASCADE;

-- name: carry_grant
GRANT {privileges} ON {relation} TO {grantee}{grant_option}{granted_by};

-- name: carry_revoke_column
REVOKE ALL ({column}) ON {relation} FROM {grantees} CASCADE;

-- name: carry_grant_column
GRANT {privileges} ({column}) ON {relation} TO {grantee}{grant_option}{granted_by};

-- name: carry_view_comment
COMMENT ON VIEW {view} IS {text};

-- name: carry_column_comment
COMMENT ON COLUMN {relation}.{column} IS {text};

-- name: carry_index_comment
COMMENT ON INDEX {index} IS {text};

-- name: carry_index_statistics
ALTER INDEX {index} ALTER COLUMN {number} SET STATISTICS {target};

-- name: carry_view_default
ALTER VIEW {view} ALTER COLUMN {column} SET DEFAULT {expression};

-- name: carry_column_statistics
ALTER TABLE {relation} ALTER COLUMN {column} SET STATISTICS {target};

-- name: carry_column_storage
ALTER TABLE {relation} ALTER COLUMN {column} SET STORAGE {storage};

-- name: carry_column_compression
ALTER TABLE {relation} ALTER COLUMN {column} SET COMPRESSION {method};

-- name: carry_column_options
ALTER TABLE {relation} ALTER COLUMN {column} SET ({options});

-- name: carry_column_options_reset
ALTER TABLE {relation} ALTER COLUMN {column} RESET (n_distinct, n_distinct_inherited);

-- name: carry_drop_rule
DROP RULE {object} ON {relation};

-- name: carry_drop_trigger
DROP TRIGGER {object} ON {relation};

-- name: carry_drop_policy
DROP POLICY {object} ON {relation};

-- name: carry_drop_statistics
DROP STATISTICS {object};

-- name: carry_create_policy
CREATE POLICY {object} ON {relation} {definition};

-- name: carry_enable
ALTER TABLE {relation} {state} {kind} {object};

-- name: carry_comment
COMMENT ON {kind} {object} ON {relation} IS {text};

-- name: carry_statistics_comment
COMMENT ON STATISTICS {object} IS {text};

-- name: carry_statistics_owner
ALTER STATISTICS {object} OWNER TO {owner};

-- name: carry_statistics_target
ALTER STATISTICS {object} SET STATISTICS {target};

-- name: current_acl
-- The grantees of a relation's grants, or of one of its columns', as they are now.
SELECT DISTINCT CASE WHEN x.grantee = 0 THEN NULL ELSE pg_get_userbyid(x.grantee) END AS grantee
  FROM pg_class c
  LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = %(column)s::text
  CROSS JOIN LATERAL aclexplode(CASE WHEN %(column)s::text IS NULL THEN c.relacl ELSE a.attacl END) x
 WHERE c.oid = %(relation)s::oid;

-- name: relation_owner
SELECT pg_get_userbyid(relowner) AS owner FROM pg_class WHERE oid = %(relation)s::oid;

-- name: row_security_applies
-- Would row-level security filter what this role reads of the relation (its oid, or its name)?
SELECT row_security_active(c.oid) AS active, c.relforcerowsecurity AS forced,
       pg_has_role(c.relowner, 'USAGE') AS owns, pg_get_userbyid(c.relowner) AS owner, current_user AS me
  FROM pg_class c
 WHERE c.oid = coalesce(%(oid)s::oid, to_regclass(%(name)s::text)) AND c.relrowsecurity;

-- name: after_swap_newest
-- The newest record of a row written after the swap, now: a pass goes no further than it.
SELECT max(seq) AS seq FROM reembed_after_swap WHERE job_id = %(job_id)s;

-- name: split_landed
-- A split retried after a lost acknowledgement: where the range's upper bound is now, and the
-- range that starts there (NULL when the range was not cut).
SELECT r.upper_id AS at, n.range_no AS new_range_no
  FROM reembed_checkpoint_range r
  LEFT JOIN reembed_checkpoint_range n ON n.job_id = r.job_id AND n.lower_id = r.upper_id
 WHERE r.job_id = %(job_id)s AND r.range_no = %(range_no)s
   AND r.upper_id IS DISTINCT FROM %(upper)s;

-- name: relations_named
-- Which of these names a relation (table, index, view, sequence) of the table's schema already has.
SELECT c.relname AS name FROM pg_class c
 WHERE c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = %(table_oid)s::oid)
   AND c.relname = ANY(%(names)s::text[]);

-- name: content_probe
-- --content, tried on the table (no row read).
SELECT {text} AS content FROM {table} LIMIT 0;

-- name: content_probe_view
-- --content as a temporary view (rolled back): its dependencies are the columns the text reads.
CREATE TEMP VIEW reembed_content_probe AS SELECT {text} AS content FROM {table};

-- name: content_probe_reads
SELECT DISTINCT d.refobjsubid AS attnum, a.attname
  FROM pg_depend d
  JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
  LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
 WHERE r.ev_class = 'pg_temp.reembed_content_probe'::regclass
   AND d.refclassid = 'pg_class'::regclass AND d.refobjid = %(table_oid)s::oid
 ORDER BY 1;

-- name: carry_not_null_check
ALTER TABLE {relation} ADD CONSTRAINT {object} CHECK ({column} IS NOT NULL) NOT VALID;

-- name: carry_constraint_comment
COMMENT ON CONSTRAINT {object} ON {relation} IS {text};

-- name: carry_validate
ALTER TABLE {relation} VALIDATE CONSTRAINT {object};

-- name: carry_add_not_null
-- PostgreSQL 18: the NOT NULL constraint under the name the column had (a valid CHECK proves it).
ALTER TABLE {relation} ADD CONSTRAINT {object} NOT NULL {column};

-- name: carry_set_not_null
ALTER TABLE {relation} ALTER COLUMN {column} SET NOT NULL;

-- name: carry_drop_constraint
ALTER TABLE {relation} DROP CONSTRAINT {object};

-- name: not_null_checks
-- The checks a swap left to stand for a NOT NULL (reembed.carry.hold_not_null): their column, whether
-- validated, the NOT NULL constraint's name to give back (in the check's comment), the column's state.
SELECT c.conname AS check_name, a.attname AS column_name, c.convalidated AS validated,
       nullif(obj_description(c.oid, 'pg_constraint'), '') AS wanted, a.attnotnull AS not_null
  FROM pg_constraint c
  JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
 WHERE c.conrelid = %(table_oid)s::oid AND c.contype = 'c' AND c.conname LIKE 'reembed\_not\_null\_%%'
 ORDER BY c.conname;

-- name: not_null_constraint
SELECT c.conname AS name
  FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
 WHERE c.conrelid = %(table_oid)s::oid AND c.contype = 'n' AND a.attname = %(column)s;

-- name: vector_columns_of_dimension
-- Every vector or halfvec column of this dimension in the database's tables (partitions left out: their
-- parent stands for them), but reembed's own: columns that probably follow the same registry.
SELECT c.oid::bigint AS table_oid, n.nspname AS schema, c.relname AS table_name, a.attname AS column_name
  FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_type t ON t.oid = a.atttypid
 WHERE t.typname IN ('vector', 'halfvec') AND a.atttypmod = %(dim)s AND a.attnum > 0 AND NOT a.attisdropped
   AND c.relkind IN ('r', 'p') AND NOT c.relispartition
   AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%%'
   AND c.relname NOT LIKE 'reembed\_%%'
 ORDER BY 2, 3, 4;

-- name: write_transaction_settings
-- A transaction of reembed's that writes the user's table or its catalog: the application's triggers
-- and event triggers fire on it, with row security as the application has it (reembed's sessions
-- read with row_security off: a policy that would hide rows raises instead; target.check_row_security
-- refuses such a table before any write).
SELECT set_config('row_security', 'on', true);

-- name: can_act_as
-- May this session act as these roles (own their objects, give them objects)? Superuser, or a member.
SELECT r.rolname AS role,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) OR pg_has_role(current_user, r.oid, 'MEMBER')
           AS may
  FROM pg_roles r WHERE r.rolname = ANY(%(roles)s::text[]);

-- name: settle_session
-- reembed's session settings (reembed.db.SESSION_SETTINGS), set for the session.
SELECT count(set_config(n, v, false)) FROM unnest(%(names)s::text[], %(values)s::text[]) AS s(n, v);

-- name: fires_on_update
-- What fires when reembed updates a row of the table: the application's row triggers on UPDATE
-- (enabled, not reembed's own) and its rules ON UPDATE (an INSTEAD rule rewrites reembed's UPDATE).
SELECT 'trigger' AS kind, t.tgname AS name, pg_get_triggerdef(t.oid) AS definition, false AS instead
  FROM pg_trigger t
 WHERE t.tgrelid = %(table_oid)s::oid AND NOT t.tgisinternal AND t.tgname NOT LIKE 'reembed\_%%'
   AND t.tgenabled <> 'D' AND (t.tgtype & 1) = 1 AND (t.tgtype & 16) = 16  -- FOR EACH ROW, UPDATE
UNION ALL
SELECT 'rule', r.rulename, pg_get_ruledef(r.oid), r.is_instead
  FROM pg_rewrite r
 WHERE r.ev_class = %(table_oid)s::oid AND r.ev_type = '2' AND r.ev_enabled <> 'D'
 ORDER BY 1, 2;

-- name: record_history
-- A sample of the job's progress for its history (`status --report` plots it): the time, the rows
-- done, the state, the last finalize step, whether a throttle holds the job. %(every)s NULL: at
-- most one per 9 s or per 1/500 of the job's age, whichever is longer (a long job keeps about a
-- thousand); 0: now (a change of state, a finalize step, a hold).
UPDATE reembed_checkpoint c
   SET history = c.history || jsonb_build_array(jsonb_build_object(
           't', round(extract(epoch FROM clock_timestamp())::numeric, 3),
           'rows', (SELECT coalesce(sum(r.rows_done + r.rows_skipped), 0) FROM reembed_checkpoint_range r
                     WHERE r.job_id = c.job_id),
           'state', c.state,
           'step', c.finalize_steps[cardinality(c.finalize_steps)],
           'held', c.throttle_reason IS NOT NULL))
 WHERE c.job_id = %(job_id)s
   AND (jsonb_array_length(c.history) = 0
        OR extract(epoch FROM clock_timestamp()) - (c.history -> -1 ->> 't')::float8
           >= coalesce(%(every)s::float8, greatest(9.0, extract(epoch FROM now() - c.started_at) / 500)));

-- name: group_columns_exist
SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('reembed_checkpoint')
                  AND attname = 'job_group' AND NOT attisdropped) AS present;

-- name: set_job_group
-- A job over several tables: the group it is one of (recorded in its prepare's transaction).
UPDATE reembed_checkpoint SET group_id = %(group_id)s, job_group = %(group)s, updated_at = now()
 WHERE job_id = %(job_id)s;

-- name: group_jobs
SELECT * FROM reembed_checkpoint WHERE group_id = %(group_id)s ORDER BY job_id;

-- name: active_group_naming
-- A job of an active group (one of its jobs embedding or finalizing) that names (table, column).
SELECT * FROM reembed_checkpoint
 WHERE group_id IS NOT NULL AND state IN ('embedding', 'finalizing')
   AND job_group->'targets' @> jsonb_build_array(jsonb_build_object('table', %(table)s::text,
                                                                     'column', %(column)s::text))
 ORDER BY job_id DESC
 LIMIT 1;
