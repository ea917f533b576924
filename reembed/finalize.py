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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import sql

from reembed import carry, db, dependents, partitions, repartition
from reembed import checkpoint as ckpt
from reembed.background import Background
from reembed.context import FinalizeStep, RunContext
from reembed.errors import InternalError, ReembedError
from reembed.queries import query
from reembed.target import TableInfo, regclass_text

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
    repartition.reconcile(ctx)  # partitions attached or detached meanwhile, before the steps are named
    job = _reload(ctx)
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
    CONCURRENTLY when asked. A partitioned index takes a step per partition (reembed.tree)."""
    indexes = [d for d in dependents.recorded(ctx.active) if d.action in (dependents.REBUILD, dependents.REINDEX)]
    if not indexes:
        def nothing(conn: psycopg.Connection[Any]) -> None:
            log.warning("no_index_to_rebuild", detail="no index read the column when the job started")

        return [FinalizeStep("build_index", nothing)]
    return [step for d in indexes for step in steps_for(ctx, d, only=len(indexes) == 1)]


def steps_for(ctx: RunContext, index: dependents.Dependent, *, only: bool) -> list[FinalizeStep]:
    """The steps that build (or REINDEX) one index: one, or one per partition and two more."""
    return _tree_steps(ctx, index, only=only) if index.partitioned else [index_step(ctx, index, only=only)]


_M = re.compile(r"\bm\s*=\s*'?(\d+)")


def index_step(ctx: RunContext, index: dependents.Dependent, *, only: bool) -> FinalizeStep:
    """A plain index (on the table, or one made on a partition only: built on that partition)."""
    job, opts = ctx.active, ctx.opts
    name = index.name
    rebuild = index.action == dependents.REBUILD
    if rebuild:
        if index.definition is None:
            raise InternalError(f"the job recorded no definition for index {name}")
        text = dependents.concurrently(index.definition) if opts.concurrent_index else index.definition
        statement: sql.SQL | sql.Composed = sql.SQL(text)  # pg_get_indexdef's own text, the dimension rewritten
    rows = ctx.lease.read(ckpt.progress, job, on=ctx.control, what="job_progress")["rows_done"]
    memory = build_memory(rows, ctx.signature.dimension, opts.index_memory, m=_m(index.definition, index.method))

    attributes = carry.IndexAttributes.from_json(index.attributes)
    setup = _setup(ctx, name, index.method, memory=memory, rebuild=rebuild, tablespace=attributes.tablespace)

    def build(conn: psycopg.Connection[Any]) -> None:
        info = _relation(ctx, conn, index.table)
        if info is None:
            return
        if not rebuild:  # kept through the writes: rebuilt to shed the dead entries and learn the new vectors
            _reindex(ctx, conn, info, name)
            return
        existing = conn.execute(query("index_by_name"), {"table_oid": info.oid, "index": name}).fetchone()
        if existing is not None and existing["valid"]:
            log.info("index_already_built", index=name)
        else:
            if existing is not None:  # an invalid leftover of an interrupted CONCURRENTLY build
                _drop_leftover(ctx, conn, info, name)
            with _ProgressWatcher(ctx):
                conn.execute(statement)
        carry.apply_index(conn, info, name, attributes)  # its comment and statistics targets, as found

    return FinalizeStep(dependents.index_step_name(name, only=only), build, in_transaction=not opts.concurrent_index,
                        role="index", setup=setup, timed=True)


def _m(definition: str | None, method: str | None) -> int:
    found = _M.search(definition or "")
    return int(found.group(1)) if found and method == "hnsw" else 16


def _relation(ctx: RunContext, conn: psycopg.Connection[Any], table: tuple[str, str] | None) -> TableInfo | None:
    """The job's table, or its partition `table` while it is still one (None, logged, when it was
    dropped or detached: its rows are no longer the table's)."""
    if table is None:
        return ctx.info
    info = partitions.relation_named(conn, ctx.info, table)
    if info is None or not partitions.below(conn, ctx.info, info.oid):
        log.warning("partition_gone", partition=".".join(table),
                    detail="dropped or detached while the job ran: its index is not built")
        return None
    return info


def _drop_leftover(ctx: RunContext, conn: psycopg.Connection[Any], info: TableInfo, name: str) -> None:
    drop = "drop_index_concurrently" if ctx.opts.concurrent_index else "drop_index_if_exists"
    log.info("invalid_index_dropped", index=name, concurrently=ctx.opts.concurrent_index)
    conn.execute(info.statement(drop, index=info.index_ident(name)))


def _reindex(ctx: RunContext, conn: psycopg.Connection[Any], info: TableInfo, name: str) -> None:
    """REINDEX [CONCURRENTLY], after dropping what an interrupted REINDEX CONCURRENTLY of it left."""
    for row in conn.execute(query("reindex_leftovers"), {"table_oid": info.oid, "index": name}).fetchall():
        _drop_leftover(ctx, conn, info, row["name"])
    concurrently = sql.SQL("CONCURRENTLY" if ctx.opts.concurrent_index else "")
    with _ProgressWatcher(ctx):
        conn.execute(info.statement("reindex", concurrently=concurrently, index=info.index_ident(name)))


def _setup(ctx: RunContext, name: str, method: str | None, *, memory: int, rebuild: bool,
           tablespace: str | None) -> Callable[[psycopg.Connection[Any]], None]:
    """The build's session settings, on its dedicated connection."""
    opts = ctx.opts

    def setup(conn: psycopg.Connection[Any]) -> None:
        conn.add_notice_handler(_notice)
        workers = build_workers(conn)
        # CONCURRENTLY takes SHARE UPDATE EXCLUSIVE, which holds no application statement up, and
        # at its end waits for every older snapshot: it waits as long as it must (no lock_timeout)
        conn.execute(query("build_settings"), {"memory": f"{memory // 1024}kB", "workers": str(workers),
                                               "lock_timeout": "0" if opts.concurrent_index
                                               else opts.ddl_lock_timeout,
                                               "tablespace": tablespace or ""})
        log.info("index_build_started", index=name, method=method, rebuild=rebuild,
                 maintenance_work_mem_mb=memory // 1024**2, parallel_workers=workers,
                 concurrent=opts.concurrent_index)

    return setup


# ------------------------------------------------------------------ a partitioned index, one partition at a time


def _tree_steps(ctx: RunContext, index: dependents.Dependent, *, only: bool) -> list[FinalizeStep]:
    """A partitioned index (reembed.partitions), which PostgreSQL cannot build or REINDEX
    CONCURRENTLY as a whole: kept through the writes, each partition's index is REINDEXed in a step of
    its own; dropped (or a shadow column's), the parent index is created ON ONLY the table (and below,
    for partitions partitioned again), then each partition's index is built under its own name and
    attached below its parent, a step each, then the whole is checked valid and given what PostgreSQL
    kept about each index (comments, statistics). A crash resumes at the partition it was building."""
    opts, name = ctx.opts, index.name
    leaves = [c for c in index.child_indexes if c.leaf]
    last = FinalizeStep(dependents.index_step_name(name, only=only), lambda conn: _complete(ctx, index, conn))
    rows = ctx.lease.read(ckpt.progress, ctx.active, on=ctx.control, what="job_progress")["rows_done"]
    memory = build_memory(rows, ctx.signature.dimension, opts.index_memory, m=_m(index.definition, index.method))
    rebuild = index.action == dependents.REBUILD
    builds = [FinalizeStep(dependents.child_step_name(name, c), _child_builder(ctx, index, c, rebuild=rebuild),
                           in_transaction=not opts.concurrent_index, role="index", timed=True,
                           setup=_setup(ctx, c.name, index.method, memory=memory, rebuild=rebuild,
                                        tablespace=carry.IndexAttributes.from_json(c.attributes).tablespace))
              for c in leaves]
    if not rebuild:
        return [*builds, last]
    if index.definition is None:
        raise InternalError(f"the job recorded no definition for index {name}")
    top = FinalizeStep(dependents.parent_step_name(name), lambda conn: _parents(ctx, index, conn))
    return [top, *builds, last]


def _parents(ctx: RunContext, index: dependents.Dependent, conn: psycopg.Connection[Any]) -> None:
    """The parent index ON ONLY the table, and ON ONLY each partition partitioned again, attached
    below its own parent (catalog only; in one transaction)."""
    info = _relation(ctx, conn, index.table)
    if info is None or index.definition is None:
        return
    _create_on_only(conn, info, index.name, partitions.after_using(index.definition, index.method))
    for c in index.child_indexes:
        if c.leaf:
            continue
        below = _relation(ctx, conn, c.table)
        if below is not None:
            _create_on_only(conn, below, c.name, c.body)
            _attach(conn, below, c)


def _create_on_only(conn: psycopg.Connection[Any], info: TableInfo, name: str, body: str) -> None:
    if conn.execute(query("index_by_name"), {"table_oid": info.oid, "index": name}).fetchone() is None:
        conn.execute(info.statement("create_index_on", concurrently=sql.SQL(""), index=name, only=sql.SQL("ONLY"),
                                    body=sql.SQL(body)))  # pg_get_indexdef's own text, the dimension rewritten


def _attach(conn: psycopg.Connection[Any], info: TableInfo, c: partitions.ChildIndex) -> None:
    attached = partitions.attached_under(conn, c.parent, info.oid)
    if attached is None:
        conn.execute(info.statement("attach_index", parent=c.parent, index=c.ident))


def _child_builder(ctx: RunContext, index: dependents.Dependent, c: partitions.ChildIndex, *,
                   rebuild: bool) -> Callable[[psycopg.Connection[Any]], None]:
    def build(conn: psycopg.Connection[Any]) -> None:
        info = _relation(ctx, conn, c.table)
        if info is None:
            return
        if not rebuild:
            _reindex(ctx, conn, info, c.name)
            return
        attached = partitions.attached_under(conn, c.parent, info.oid)
        if attached is not None and attached["name"] != c.name and attached["valid"]:
            # the partition was created after the parent index: PostgreSQL gave it one, under its own name
            conn.execute(info.statement("rename_index", old=info.index_ident(attached["name"]), new=c.name))
            log.info("partition_index_adopted", index=c.name, partition=".".join(c.table), was=attached["name"])
            return
        existing = conn.execute(query("index_by_name"), {"table_oid": info.oid, "index": c.name}).fetchone()
        if existing is not None and existing["valid"]:
            log.info("index_already_built", index=c.name, partition=".".join(c.table))
        else:
            if existing is not None:  # an invalid leftover of an interrupted CONCURRENTLY build
                _drop_leftover(ctx, conn, info, c.name)
            concurrently = sql.SQL("CONCURRENTLY" if ctx.opts.concurrent_index else "")
            with _ProgressWatcher(ctx):
                conn.execute(info.statement("create_index_on", concurrently=concurrently, index=c.name,
                                            only=sql.SQL(""), body=sql.SQL(c.body)))
        _attach(conn, info, c)

    return build


def _complete(ctx: RunContext, index: dependents.Dependent, conn: psycopg.Connection[Any]) -> None:
    """Every partition's index attached: the parent is valid; each index given its comment and
    statistics targets as found."""
    info = _relation(ctx, conn, index.table)
    if info is None:
        return
    row = conn.execute(query("index_by_name"), {"table_oid": info.oid, "index": index.name}).fetchone()
    if row is None or not row["valid"]:
        missing = [r["name"] for r in conn.execute(query("partitions_without_index"), {
            "table_oid": info.oid, "index": regclass_text(info.index_ident(index.name))}).fetchall()]
        raise ReembedError(f"index {index.name} on {info.qualified} is not valid: partitions {', '.join(missing)} have "
                           "no index attached below it (attached to the table while its index was built); re-run: "
                           "the job takes them in and builds theirs")
    if index.action == dependents.REBUILD:
        carry.apply_index(conn, info, index.name, carry.IndexAttributes.from_json(index.attributes))
        for c in index.child_indexes:
            below = _relation(ctx, conn, c.table)
            if below is not None:
                carry.apply_index(conn, below, c.name, carry.IndexAttributes.from_json(c.attributes))
    log.info("partitioned_index_valid", index=index.name, partitions=len([c for c in index.child_indexes if c.leaf]))


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
    """Logs pg_stat_progress_create_index for the table (or a partition of it) while the build runs."""

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
