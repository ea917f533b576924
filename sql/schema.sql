-- reembed's own tables. Idempotent: run at the start of every `reembed run`.
--
-- reembed_checkpoint        one row per job = (table, target signature)
-- reembed_checkpoint_range  the job's cursors: today one unbounded range per job;
--                           a later version splits a job into several id ranges
--                           claimed by parallel workers with FOR UPDATE SKIP LOCKED.
-- reembed_failed_rows       rows the model could not encode (kept, skipped, retried).

CREATE TABLE IF NOT EXISTS reembed_checkpoint (
    job_id              bigserial PRIMARY KEY,
    table_name          text        NOT NULL,   -- schema-qualified, as given to regclass
    column_name         text        NOT NULL,
    content_column      text        NOT NULL,
    id_column           text        NOT NULL,
    id_type             text        NOT NULL,   -- format_type() of the primary key
    state               text        NOT NULL
        CHECK (state IN ('embedding', 'finalizing', 'done', 'abandoned')),
    strategy            text        NOT NULL DEFAULT 'in_place',
    target_model_name   text        NOT NULL,
    target_dimension    int         NOT NULL,
    target_hash         text        NOT NULL,
    source_model_name   text,
    source_dimension    int,
    source_hash         text,
    source_typmod       int,                    -- the column's dimension before the job (NULL: none)
    index_name          text,                   -- the HNSW index to rebuild (NULL: none existed)
    index_def           jsonb,                  -- opclass, m, ef_construction, definition
    index_dropped       boolean     NOT NULL DEFAULT false,
    rows_total          bigint,                 -- estimate taken when the job started
    finalize_steps      text[]      NOT NULL DEFAULT '{}',
    holder              text,                   -- host:pid of the run that last held the job
    heartbeat_at        timestamptz,
    last_error          text,
    started_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz
);

-- At most one active job per table.
CREATE UNIQUE INDEX IF NOT EXISTS reembed_checkpoint_one_active
    ON reembed_checkpoint (table_name, column_name)
    WHERE state IN ('embedding', 'finalizing');

CREATE TABLE IF NOT EXISTS reembed_checkpoint_range (
    job_id      bigint      NOT NULL REFERENCES reembed_checkpoint (job_id) ON DELETE CASCADE,
    range_no    int         NOT NULL,
    lower_id    text,                           -- exclusive; NULL: from the first row
    upper_id    text,                           -- inclusive; NULL: to the last row
    last_id     text,                           -- cursor: every row <= last_id is done
    rows_done   bigint      NOT NULL DEFAULT 0,
    rows_skipped bigint     NOT NULL DEFAULT 0,
    rows_per_sec double precision,              -- recent rate (moving average) of this range
    done        boolean     NOT NULL DEFAULT false,
    claimed_by  text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, range_no)
);

CREATE TABLE IF NOT EXISTS reembed_failed_rows (
    job_id      bigint      NOT NULL REFERENCES reembed_checkpoint (job_id) ON DELETE CASCADE,
    row_id      text        NOT NULL,
    error       text        NOT NULL,
    attempts    int         NOT NULL DEFAULT 1,
    accepted    boolean     NOT NULL DEFAULT false,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, row_id)
);

-- reembed_changes: the keys an application inserted, or whose content or embedding it changed,
-- while a job ran (written by the job's capture trigger, and by the job itself for rows that
-- changed between its read and its write). Catch-up passes re-embed them; no foreign key, so
-- that an application's write pays for one index insert and nothing more.
CREATE TABLE IF NOT EXISTS reembed_changes (
    job_id      bigint      NOT NULL,
    row_id      text        NOT NULL
);
CREATE INDEX IF NOT EXISTS reembed_changes_job_row ON reembed_changes (job_id, row_id);

-- Added with live-table support (a job's capture and catch-up); idempotent for older schemas.
ALTER TABLE reembed_checkpoint
    ADD COLUMN IF NOT EXISTS capture_trigger    text,            -- prefix of the job's triggers, while installed
    ADD COLUMN IF NOT EXISTS catchup_pass       int    NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS catchup_pass_total bigint NOT NULL DEFAULT 0,  -- keys pending when the pass began
    ADD COLUMN IF NOT EXISTS catchup_pass_done  bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS catchup_rows       bigint NOT NULL DEFAULT 0,  -- rows re-embedded by catch-up, all passes
    ADD COLUMN IF NOT EXISTS writers_held_secs  double precision;           -- the cut-over's hold on writers

-- Added with the pre-flight inventory: every object on the column and what the job does with
-- it (reembed.dependents); finalize rebuilds the indexes recorded here.
ALTER TABLE reembed_checkpoint
    ADD COLUMN IF NOT EXISTS dependents jsonb;

-- Added with throttling (reembed.throttle): the hold the job is in, if any, for `status`; and a
-- heartbeat row per job that the monitor writes on the primary and reads on each --replica-dsn
-- (its lag there is how far behind that replica replays).
ALTER TABLE reembed_checkpoint
    ADD COLUMN IF NOT EXISTS throttle_reason  text,              -- the checks over their limits, while held
    ADD COLUMN IF NOT EXISTS throttled_since  timestamptz,
    ADD COLUMN IF NOT EXISTS throttled_secs   double precision NOT NULL DEFAULT 0;  -- all holds, all runs
CREATE TABLE IF NOT EXISTS reembed_heartbeat (
    job_id      bigint      PRIMARY KEY,
    beat_at     timestamptz NOT NULL
);

-- Added with the shadow strategy (reembed.shadow): the shadow column and its indexes (their names
-- before and after the swap), the quality gate's figures, the swap, and what became of the
-- previous column (kept until `reembed cleanup`, or swapped back by `reembed rollback`).
ALTER TABLE reembed_checkpoint
    ADD COLUMN IF NOT EXISTS shadow         jsonb,
    ADD COLUMN IF NOT EXISTS gate           jsonb,
    ADD COLUMN IF NOT EXISTS swapped_at     timestamptz,
    ADD COLUMN IF NOT EXISTS previous_state text;            -- kept | rolled_back | cleaned
-- The keys of rows the application wrote after a shadow job's swap (inserted, or their content
-- changed): the rows whose previous vector is stale, which `reembed rollback` re-embeds.
CREATE TABLE IF NOT EXISTS reembed_after_swap (
    seq         bigserial   PRIMARY KEY,
    job_id      bigint      NOT NULL,
    row_id      text        NOT NULL
);
CREATE INDEX IF NOT EXISTS reembed_after_swap_job_row ON reembed_after_swap (job_id, row_id);

-- Added with workers (reembed.worker, reembed.ranges): the key space is split at prepare into
-- ranges of about rows_estimate rows each; a claim names its worker and the backend of that
-- worker's lock connection (a claim whose backend no longer holds the table's lock, or whose
-- heartbeat is older than the stale limit, may be taken over from its cursor); a worker that
-- runs dry asks the holder of the largest remaining range to split it (split_wanted), and the
-- holder cuts it past what it has read. reembed_worker: one row per worker process of a job,
-- for `reembed status`.
ALTER TABLE reembed_checkpoint_range
    ADD COLUMN IF NOT EXISTS rows_estimate bigint,
    ADD COLUMN IF NOT EXISTS claimed_pid   int,
    ADD COLUMN IF NOT EXISTS heartbeat_at  timestamptz,
    ADD COLUMN IF NOT EXISTS split_wanted  boolean NOT NULL DEFAULT false;
-- Added with partitioned tables (reembed.partitions): the partitions below the table when the
-- job started (each one's oid, name, kind and bound), brought up to date when a partition is
-- attached or detached while the job runs (reembed.repartition).
ALTER TABLE reembed_checkpoint
    ADD COLUMN IF NOT EXISTS partitions jsonb;

CREATE TABLE IF NOT EXISTS reembed_worker (
    job_id       bigint      NOT NULL REFERENCES reembed_checkpoint (job_id) ON DELETE CASCADE,
    worker       text        NOT NULL,              -- host:pid/n, as in claimed_by
    host         text        NOT NULL,
    pid          int         NOT NULL,
    device       text,
    range_no     int,                               -- the range it holds now (NULL: none)
    rows_done    bigint      NOT NULL DEFAULT 0,    -- rows it committed, this process
    rows_per_sec double precision,
    state        text        NOT NULL DEFAULT 'running',  -- running | dry | done | stopped | failed
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, worker)
);

-- Added with the tables applications have (issue 28): the text as a SQL expression over the row
-- (--content; NULL: content_column), how a NULL text is taken (--null-content).
ALTER TABLE reembed_checkpoint
    ADD COLUMN IF NOT EXISTS content_expr text,
    ADD COLUMN IF NOT EXISTS null_content text NOT NULL DEFAULT 'null';

-- Added with reports (reembed.htmlreport): the job's history, samples of (time, rows done, state,
-- last finalize step, held by a throttle) taken at each heartbeat (thinned: about a thousand for a
-- long job) and at each change of state, finalize step and throttle hold; `status --report` plots it.
ALTER TABLE reembed_checkpoint
    ADD COLUMN IF NOT EXISTS history jsonb NOT NULL DEFAULT '[]';

-- Added with the bridge (reembed.bridge): a map from a new model's space into the space the live
-- column holds, fitted on rows of the table (reembed.mapping) and installed as a SQL function the
-- application wraps around every new-model vector it searches or writes with. A current bridge
-- (one per function name) is 'mapping' while the column holds the old model's vectors, 'identity' once a
-- shadow job's swap put the new model's there (back to 'mapping' on rollback); 'refused' (below
-- --bridge-min-recall, never installed), 'replaced' and 'dropped' are history. The map's output
-- coordinate i is bias b plus the inner product of the query with row w.
CREATE TABLE IF NOT EXISTS reembed_bridge (
    bridge_id          bigserial   PRIMARY KEY,
    table_name         text        NOT NULL,
    column_name        text        NOT NULL,
    function_schema    text        NOT NULL,
    function_name      text        NOT NULL,
    state              text        NOT NULL
        CHECK (state IN ('mapping', 'identity', 'refused', 'replaced', 'dropped')),
    job_id             bigint,                  -- the job that fitted it (NULL: `reembed bridge`)
    source_model_name  text        NOT NULL,    -- the model the live column held when it was fitted
    source_dimension   int         NOT NULL,
    source_hash        text        NOT NULL,
    target_model_name  text        NOT NULL,    -- the model the application encodes with
    target_dimension   int         NOT NULL,
    target_hash        text        NOT NULL,
    kind               text        NOT NULL,    -- ridge | procrustes | ridge+nce
    normalize          boolean     NOT NULL,    -- the output is made unit length (the old vectors are)
    figures            jsonb       NOT NULL,    -- the fit and its measurement on held-out rows
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS reembed_bridge_one_function
    ON reembed_bridge (function_schema, function_name)
    WHERE state IN ('mapping', 'identity');
CREATE TABLE IF NOT EXISTS reembed_bridge_map (
    bridge_id   bigint           NOT NULL REFERENCES reembed_bridge (bridge_id) ON DELETE CASCADE,
    i           int              NOT NULL,   -- the output coordinate, from 0
    w           vector           NOT NULL,   -- its weights over the new model's coordinates
    b           double precision NOT NULL,
    PRIMARY KEY (bridge_id, i)
);

-- Added with jobs over several tables (issue 28): tables under one registry re-embedded by one job,
-- each with its own row here (its cursors, capture, failed rows, finalize steps) and all cut over
-- in one transaction that flips the registry once. group_id is the group's first job's id (NULL: a
-- job over one table); job_group records the group on each of its rows: its id, the signature the
-- registry gets, and its targets in the order their locks are taken ({table, column, ...} each).
ALTER TABLE reembed_checkpoint
    ADD COLUMN IF NOT EXISTS group_id  bigint,
    ADD COLUMN IF NOT EXISTS job_group jsonb;
CREATE INDEX IF NOT EXISTS reembed_checkpoint_group ON reembed_checkpoint (group_id) WHERE group_id IS NOT NULL;
