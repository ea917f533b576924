"""Finalize: the strategy's steps, run once every row is done, each idempotent and recorded.

A step is a name, the statements it applies, and whether they can run in a transaction.
One loop runs them: a step that can is applied and recorded in reembed_checkpoint's
finalize_steps in ONE fenced transaction (alembic's rule), under a short lock_timeout and
retried with backoff, so the application's queries never queue behind the tool for long.
A step that cannot (CREATE INDEX CONCURRENTLY) takes the one other path: applied on an
autocommit connection once the lock is verified, then recorded; such a step is written to be
re-applied safely (a valid index found is just recorded; an invalid leftover is rebuilt).
A crash anywhere resumes finalize at the first step not recorded.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import sql

from reembed import carry, db, dependents
from reembed import checkpoint as ckpt
from reembed.background import Background
from reembed.context import FinalizeStep, RunContext
from reembed.errors import InternalError
from reembed.queries import query

log = structlog.get_logger()

_MIN_BUILD_MEMORY = 64 * 1024**2
_PROGRESS_EVERY = 10.0


@dataclass
class Outcome:
    finished: bool
    index_secs: float = 0.0
    message: str = ""


def run(ctx: RunContext) -> Outcome:
    outcome = Outcome(finished=False)
    job = _reload(ctx)
    if _postponed(ctx, outcome):
        return outcome
    log.info("finalize_started", steps_done=job.steps)
    for step in ctx.strategy.finalize_steps(ctx):
        if step.name in job.steps:
            continue
        if ctx.stop.requested:
            outcome.message = f"stopped before finalize step {step.name}; re-run to finish"
            return outcome
        ctx.lease.check()
        started = time.monotonic()
        _apply(ctx, step)
        if ctx.stop.requested and not step.record:  # a phase cut short by a stop: go no further
            outcome.message = f"stopped during {step.name}; re-run to finish"
            return outcome
        secs = time.monotonic() - started
        if step.timed:
            outcome.index_secs += secs
        log.info("finalize_step_done", step=step.name, secs=round(secs, 2))
        job = _reload(ctx)
    outcome.finished = True
    return outcome


def _reload(ctx: RunContext) -> ckpt.Job:
    """The job row as it is now (the steps done so far), for the coordinator's state."""
    return ctx.state.advance(ctx.lease.read(ckpt.reload, ctx.active, on=ctx.control, what="reload_job"))


def _apply(ctx: RunContext, step: FinalizeStep) -> None:
    if step.role is None:
        _apply_on(ctx, step, ctx.control)
        return
    held = ctx.connections.dedicated(step.role, setup=step.setup)
    try:
        _apply_on(ctx, step, held)
    finally:
        held.release()


def _apply_on(ctx: RunContext, step: FinalizeStep, held: db.Kept) -> None:
    job, lease = ctx.active, ctx.lease
    if step.in_transaction:
        lease.write(_applied, step, job, on=held, what=step.name,
                    lock_timeout=step.lock_timeout or ctx.opts.ddl_lock_timeout, patient=True,
                    max_backoff=step.max_backoff)
        return
    lease.outside_transaction(_apply_outside, step, on=held, what=step.name)
    if step.record:
        lease.write(ckpt.record_step, job, step.name, on=ctx.control, what=step.name)


def _applied(conn: psycopg.Connection[Any], step: FinalizeStep, job: ckpt.Job) -> None:
    """A step and its record, in one transaction."""
    step.apply(conn)
    ckpt.record_step(conn, job, step.name)


def _apply_outside(conn: psycopg.Connection[Any], step: FinalizeStep) -> None:
    step.apply(conn)


def _postponed(ctx: RunContext, outcome: Outcome) -> bool:
    if ctx.deadline is None:
        return False
    rows = ctx.lease.read(ckpt.progress, ctx.active, on=ctx.control, what="job_progress")["rows_done"]
    need = estimate_finalize_secs(rows, ctx.signature.dimension,
                                  typmod_change=ctx.info.typmod != ctx.signature.dimension
                                  and ctx.strategy.name == "in_place")
    left = ctx.deadline - time.monotonic()
    if need * 1.5 <= left:
        return False
    log.warning(
        "finalize_postponed",
        estimated_secs=round(need),
        secs_left=round(left),
        detail="not enough time left in the window to finalize safely; the next run will",
    )
    ctx.stop.request("time_budget")
    outcome.message = "finalize postponed to the next run (not enough time left in the window)"
    return True


# A typmod change rewrites the table (inside the cut-over): measured at about 50,000 rows/s of
# 384-d rows here (scripts/bench.py, live section), and about 100 MB/s.
REWRITE_ROWS_PER_SEC = 50_000.0
REWRITE_BYTES_PER_SEC = 100e6


def estimate_finalize_secs(rows: int, dimension: int, *, typmod_change: bool) -> float:
    """A conservative guess: HNSW builds here ran at ~3,000 rows/s for 384-d with 2 cores;
    a typmod change rewrites the table."""
    build = rows * (dimension / 384.0) / 3000.0
    rewrite = rows / REWRITE_ROWS_PER_SEC if typmod_change else 0.0
    return 5.0 + build + rewrite


# ------------------------------------------------------------------ the HNSW index


def build_memory(rows: int, dimension: int, cap: int, *, m: int = 16) -> int:
    """maintenance_work_mem for an HNSW graph held in memory.

    Per row: the vector (4*dims + 8), its layer-0 neighbour list (2*m candidates of 16 bytes)
    and the element with its upper layers (~128), plus 20%. The plain rows x (4*dims + 8) x 1.3
    fell short for m = 16: on an H100 host pgvector reported "hnsw graph no longer fits into
    maintenance_work_mem after 43357 tuples" of 50,000 at 384-d.
    """
    need = int(rows * (4 * dimension + 8 + 2 * m * 16 + 128) * 1.2)
    return max(_MIN_BUILD_MEMORY, min(need, cap))


def build_workers(conn: psycopg.Connection[Any]) -> int:
    """max_parallel_maintenance_workers for the build: the server's cores (when it is this host)
    less one for the leader, capped by the server's max_parallel_workers."""
    row = conn.execute(query("parallel_limits")).fetchone()
    if row is None:
        raise InternalError("parallel_limits returned no row")
    limit = min(int(row["par"]), int(row["procs"]) - 1)
    host = conn.info.host or ""
    local = host.startswith("/") or host in ("", "localhost", "127.0.0.1", "::1")
    cores = (os.cpu_count() or 2) - 1 if local else 7
    return max(0, min(limit, cores))


def index_steps(ctx: RunContext) -> list[FinalizeStep]:
    """One step per index the job's inventory names: built again from its recorded definition
    (at the new dimension) if prepare dropped it, REINDEXed if it was kept through the writes;
    CONCURRENTLY when asked."""
    indexes = [d for d in dependents.recorded(ctx.active) if d.action in (dependents.REBUILD, dependents.REINDEX)]
    if not indexes:
        def nothing(conn: psycopg.Connection[Any]) -> None:
            log.warning("no_index_to_rebuild", detail="no index read the column when the job started")

        return [FinalizeStep("build_index", nothing)]
    return [index_step(ctx, d, only=len(indexes) == 1) for d in indexes]


_M = re.compile(r"\bm\s*=\s*'?(\d+)")


def index_step(ctx: RunContext, index: dependents.Dependent, *, only: bool) -> FinalizeStep:
    job, info, opts = ctx.active, ctx.info, ctx.opts
    name = index.name
    ident = info.index_ident(name)
    rebuild = index.action == dependents.REBUILD
    if rebuild:
        if index.definition is None:
            raise InternalError(f"the job recorded no definition for index {name}")
        text = dependents.concurrently(index.definition) if opts.concurrent_index else index.definition
        statement: sql.SQL | sql.Composed = sql.SQL(text)  # pg_get_indexdef's own text, the dimension rewritten
    else:  # kept through the writes: rebuilt to shed the dead entries and learn the new vectors
        concurrently = sql.SQL("CONCURRENTLY" if opts.concurrent_index else "")
        statement = info.statement("reindex", concurrently=concurrently, index=ident)
    rows = ctx.lease.read(ckpt.progress, job, on=ctx.control, what="job_progress")["rows_done"]
    found = _M.search(index.definition or "")
    m = int(found.group(1)) if found and index.method == "hnsw" else 16
    memory = build_memory(rows, ctx.signature.dimension, opts.index_memory, m=m)

    attributes = carry.IndexAttributes.from_json(index.attributes)

    def setup(conn: psycopg.Connection[Any]) -> None:
        conn.add_notice_handler(_notice)
        workers = build_workers(conn)
        # CONCURRENTLY takes SHARE UPDATE EXCLUSIVE, which holds no application statement up, and
        # at its end waits for every older snapshot: it waits as long as it must (no lock_timeout)
        conn.execute(query("build_settings"), {"memory": f"{memory // 1024}kB", "workers": str(workers),
                                               "lock_timeout": "0" if opts.concurrent_index
                                               else opts.ddl_lock_timeout,
                                               "tablespace": attributes.tablespace or ""})
        log.info("index_build_started", index=name, method=index.method, rebuild=rebuild,
                 maintenance_work_mem_mb=memory // 1024**2, parallel_workers=workers,
                 concurrent=opts.concurrent_index)

    def build(conn: psycopg.Connection[Any]) -> None:
        if not rebuild:
            with _ProgressWatcher(ctx):
                conn.execute(statement)
            return
        existing = conn.execute(query("index_by_name"), {"table_oid": info.oid, "index": name}).fetchone()
        if existing is not None and existing["valid"]:
            log.info("index_already_built", index=name)
        else:
            if existing is not None:  # an invalid leftover of an interrupted CONCURRENTLY build
                drop = "drop_index_concurrently" if opts.concurrent_index else "drop_index_if_exists"
                log.info("invalid_index_dropped", index=name, concurrently=opts.concurrent_index)
                conn.execute(info.statement(drop, index=ident))
            with _ProgressWatcher(ctx):
                conn.execute(statement)
        carry.apply_index(conn, info, name, attributes)  # its comment and statistics targets, as found

    return FinalizeStep(dependents.index_step_name(name, only=only), build, in_transaction=not opts.concurrent_index,
                        role="index", setup=setup, timed=True)


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

    def __init__(self, ctx: RunContext) -> None:
        super().__init__("reembed-index-progress", join_timeout=5)
        self.ctx = ctx

    def __enter__(self) -> _ProgressWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        try:
            with self.ctx.connections.connection("index-progress") as conn:
                while not self._stopped.wait(_PROGRESS_EVERY):
                    row = conn.execute(query("index_build_progress"), {"table_oid": self.ctx.info.oid}).fetchone()
                    if row is not None:
                        log.info("index_build_progress", **row)
        except Exception:  # noqa: BLE001 - progress is a nicety; the build goes on without it
            return
