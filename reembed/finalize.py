"""Finalize: tighten the typmod, rebuild HNSW, update the registry. Idempotent steps.

Each step is recorded in reembed_checkpoint.finalize_steps in the same transaction as the
step itself (alembic's rule), so a crash during finalize resumes finalize at the first
step not recorded. CREATE INDEX CONCURRENTLY cannot run in a transaction: it is recorded
right after, and a re-run that finds the index already built and valid just records it,
while an invalid leftover of a failed build is dropped and built again.

Every DDL statement runs under a short lock_timeout and is retried with backoff, so the
application's queries never queue behind the tool for long.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import sql

from reembed import checkpoint as ckpt
from reembed import db, retry
from reembed.background import Background
from reembed.checkpoint import Job
from reembed.embedder import Signature
from reembed.lease import LockKeeper
from reembed.queries import query
from reembed.settings import RunOptions
from reembed.signals import StopSignal
from reembed.target import TableInfo

log = structlog.get_logger()

STEPS = ("tighten_typmod", "build_index", "update_registry")
_MIN_BUILD_MEMORY = 64 * 1024**2
_PROGRESS_EVERY = 10.0


@dataclass
class Outcome:
    finished: bool
    index_secs: float = 0.0
    message: str = ""


def build_memory(rows: int, dimension: int, cap: int, *, m: int = 16) -> int:
    """maintenance_work_mem for an HNSW graph held in memory.

    Per row: the vector (4*dims + 8), its layer-0 neighbour list (2*m candidates of 16 bytes)
    and the element with its upper layers (~128), plus 20%. The plain rows x (4*dims + 8) x 1.3
    fell short for m = 16: on an H100 host pgvector reported "hnsw graph no longer fits into
    maintenance_work_mem after 43357 tuples" of 50,000 at 384-d.
    """
    need = int(rows * (4 * dimension + 8 + 2 * m * 16 + 128) * 1.2)
    return max(_MIN_BUILD_MEMORY, min(need, cap))


def build_workers(conn: psycopg.Connection[Any], conninfo: str) -> int:
    """max_parallel_maintenance_workers for the build: the server's cores (when it is this host)
    less one for the leader, capped by the server's max_parallel_workers."""
    row = conn.execute(
        "SELECT current_setting('max_parallel_workers')::int AS par,"
        " current_setting('max_worker_processes')::int AS procs"
    ).fetchone()
    assert row is not None
    limit = min(row["par"], row["procs"] - 1)
    host = conn.info.host or ""
    local = host.startswith("/") or host in ("", "localhost", "127.0.0.1", "::1")
    cores = (os.cpu_count() or 2) - 1 if local else 7
    return max(0, min(limit, cores))


def run(
    control: db.Session,
    conninfo: str,
    info: TableInfo,
    job: Job,
    sig: Signature,
    opts: RunOptions,
    stop: StopSignal,
    keeper: LockKeeper,
    *,
    deadline: float | None = None,
) -> Outcome:
    outcome = Outcome(finished=False)
    job = _retried(opts, "reload_job", lambda: ckpt.reload(control.get(), job))
    rows = _retried(opts, "job_progress", lambda: ckpt.progress(control.get(), job))["rows_done"]
    if deadline is not None:
        need = estimate_finalize_secs(rows, sig.dimension, typmod_change=info.typmod != sig.dimension)
        left = deadline - time.monotonic()
        if need * 1.5 > left:
            log.warning(
                "finalize_postponed",
                estimated_secs=round(need),
                secs_left=round(left),
                detail="not enough time left in the window to finalize safely; the next run will",
            )
            stop.request("time_budget")
            outcome.message = "finalize postponed to the next run (not enough time left in the window)"
            return outcome
    log.info("finalize_started", steps_done=job.steps)
    for step in STEPS:
        if step in job.steps:
            continue
        if stop.requested:
            outcome.message = f"stopped before finalize step {step}; re-run to finish"
            return outcome
        keeper.check()
        started = time.monotonic()
        if step == "tighten_typmod":
            _ddl(control, job, step, opts, keeper, lambda conn: _tighten(conn, info, sig))
        elif step == "build_index":
            _build_index(conninfo, info, job, sig, opts, keeper, rows)
            outcome.index_secs = time.monotonic() - started
        else:
            _ddl(control, job, step, opts, keeper, lambda conn, job=job: _update_registry(conn, info, job, sig))
        log.info("finalize_step_done", step=step, secs=round(time.monotonic() - started, 2))
        job = _retried(opts, "reload_job", lambda job=job: ckpt.reload(control.get(), job))
    outcome.finished = True
    return outcome


def estimate_finalize_secs(rows: int, dimension: int, *, typmod_change: bool) -> float:
    """A conservative guess: HNSW builds here ran at ~3,000 rows/s for 384-d with 2 cores;
    a typmod change rewrites the table (~50,000 rows/s)."""
    build = rows * (dimension / 384.0) / 3000.0
    rewrite = rows / 50000.0 if typmod_change else 0.0
    return 5.0 + build + rewrite


def _retried(opts: RunOptions, what: str, fn: Any) -> Any:
    return retry.call(fn, what=what, max_retries=opts.max_retries)


def _ddl(control: db.Session, job: Job, step: str, opts: RunOptions, keeper: LockKeeper, body: Any) -> None:
    """One DDL step and its record, in one transaction, under a short lock_timeout, retried
    with backoff (a lock wait that times out is transient), on a connection that comes back,
    and committed only while the table's lock is ours."""

    def attempt() -> None:
        conn = control.get()
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(opts.ddl_lock_timeout)))
            body(conn)
            ckpt.record_step(conn, job, step)
            keeper.fence(conn)

    retry.call(attempt, what=step, max_retries=max(opts.max_retries, 8), maximum=30.0)


def _tighten(conn: psycopg.Connection[Any], info: TableInfo, sig: Signature) -> None:
    """The integrity gate: every vector must have the target dimension, or this fails."""
    current = conn.execute(query("column_info"), {"table_oid": info.oid, "column": info.column}).fetchone()
    if current is not None and current["typmod"] == sig.dimension:
        return
    conn.execute(
        sql.SQL("ALTER TABLE {table} ALTER COLUMN {col} TYPE vector({dim})").format(
            dim=sql.Literal(sig.dimension), **info.ids()
        )
    )


def _update_registry(conn: psycopg.Connection[Any], info: TableInfo, job: Job, sig: Signature) -> None:
    conn.execute(query("upsert_registry", registry=info.registry), sig.as_dict())
    ckpt.set_state(conn, job, to="done", from_state="finalizing")


def _build_index(
    conninfo: str,
    info: TableInfo,
    job: Job,
    sig: Signature,
    opts: RunOptions,
    keeper: LockKeeper,
    rows: int,
) -> None:
    name = job.row["index_name"]
    if name is None:
        log.warning("no_index_to_rebuild", detail="the column had no HNSW index when the job started")
        control = db.Session(conninfo, role="control", vectors=False)
        try:
            _ddl(control, job, "build_index", opts, keeper, lambda conn: None)
        finally:
            control.close()
        return
    spec = job.row["index_def"] or {}
    index = sql.Identifier(info.ident[0], name)
    memory = build_memory(rows, sig.dimension, opts.index_memory, m=int(spec.get("m", 16)))
    if job.row["index_dropped"]:
        statement = sql.SQL(
            "CREATE INDEX {conc}{name} ON {table} USING hnsw ({col} {opclass}) "
            "WITH (m = {m}, ef_construction = {ef})"
        ).format(
            conc=sql.SQL("CONCURRENTLY " if opts.concurrent_index else ""),
            name=sql.Identifier(name),
            opclass=sql.Identifier(spec.get("opclass", "vector_cosine_ops")),
            m=sql.Literal(int(spec.get("m", 16))),
            ef=sql.Literal(int(spec.get("ef_construction", 64))),
            **info.ids(),
        )
    else:  # the index was kept through the writes: rebuild it to shed the dead entries
        statement = sql.SQL("REINDEX INDEX {conc}{name}").format(
            conc=sql.SQL("CONCURRENTLY " if opts.concurrent_index else ""), name=index
        )
    watcher = _ProgressWatcher(conninfo, info.oid)
    build_conn = db.connect(conninfo, role="index", vectors=False, autocommit=True)
    build_conn.add_notice_handler(_notice)
    workers = build_workers(build_conn, conninfo)
    log.info(
        "index_build_started",
        index=name,
        maintenance_work_mem_mb=memory // 1024**2,
        parallel_workers=workers,
        concurrent=opts.concurrent_index,
    )
    try:
        watcher.start()

        def settings() -> None:
            build_conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(f"{memory // 1024}kB")))
            build_conn.execute(
                sql.SQL("SET max_parallel_maintenance_workers = {}").format(sql.Literal(workers))
            )
            build_conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(opts.ddl_lock_timeout)))

        def attempt() -> None:
            nonlocal build_conn
            if build_conn.broken or build_conn.closed:
                build_conn = db.reconnect(conninfo, role="index", vectors=False, autocommit=True)
                build_conn.add_notice_handler(_notice)
            settings()
            if job.row["index_dropped"]:
                existing = build_conn.execute(
                    query("index_by_name"), {"table_oid": info.oid, "index": name}
                ).fetchone()
                if existing is not None and existing["valid"]:
                    log.info("index_already_built", index=name)
                else:
                    if existing is not None:  # an invalid leftover of an interrupted CONCURRENTLY build
                        build_conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(index))
                    if opts.concurrent_index:
                        keeper.ensure()  # CONCURRENTLY cannot run inside a (fenced) transaction
                        build_conn.execute(statement)
                    else:
                        with build_conn.transaction():
                            build_conn.execute(statement)
                            ckpt.record_step(build_conn, job, "build_index")
                            keeper.fence(build_conn)
                        return
            else:
                keeper.ensure()
                build_conn.execute(statement)
            with build_conn.transaction():
                ckpt.record_step(build_conn, job, "build_index")
                keeper.fence(build_conn)

        retry.call(attempt, what="build_index", max_retries=max(opts.max_retries, 8), maximum=30.0)
    finally:
        watcher.stop()
        build_conn.close()


def _notice(diag: psycopg.errors.Diagnostic) -> None:
    message = diag.message_primary or ""
    if "no longer fits into maintenance_work_mem" in message:
        log.warning(
            "index_build_spilled",
            server_notice=message,
            detail="the HNSW graph outgrew maintenance_work_mem and the build slows down; "
            "raise --index-memory (the server needs that much free RAM) or accept the slower build",
        )
    else:
        log.info("server_notice", message=message)


class _ProgressWatcher(Background):
    """Logs pg_stat_progress_create_index for the table while the build runs."""

    def __init__(self, conninfo: str, table_oid: int) -> None:
        super().__init__("reembed-index-progress", join_timeout=5)
        self.conninfo = conninfo
        self.table_oid = table_oid

    def _loop(self) -> None:
        try:
            conn = db.connect(self.conninfo, role="index-progress", vectors=False, autocommit=True)
        except Exception:  # noqa: BLE001 - progress is a nicety; the build goes on without it
            return
        with conn:
            while not self._stopped.wait(_PROGRESS_EVERY):
                try:
                    row = conn.execute(
                        "SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total"
                        " FROM pg_stat_progress_create_index WHERE relid = %s::oid",
                        (self.table_oid,),
                    ).fetchone()
                except psycopg.Error:
                    return
                if row is not None:
                    log.info("index_build_progress", **row)
