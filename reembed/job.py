"""The coordinator: plan -> lock -> prepare -> embed (workers) -> finalize -> done.

Failure semantics (also in docs/RUNBOOK.md): between prepare and finalize the table mixes
two embedding spaces and search must not be served. Every batch commits its vectors and the
checkpoint advance in one transaction, so after any crash data and checkpoint agree; a
re-run with the same model resumes after `last_id`, and a re-run after completion is a no-op.
Prepare, finalize and the job's state run here, once, under the table's lock; the rows are
embedded by a worker (reembed.worker) that claims a range of the key space.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import psycopg
import structlog

from reembed import capture, carry, db, dependents, failures, finalize, fitting, lease, ranges, repartition, shadow
from reembed import checkpoint as ckpt
from reembed.batches import prepare_session
from reembed.checkpoint import Job
from reembed.context import JobState, RunContext, writer_count
from reembed.dependents import Inventory
from reembed.embedder import SentenceTransformerEmbedder, fingerprint, pick_device
from reembed.encoding import Embedder
from reembed.errors import EXIT_FAILED, ConfigError, LockHeld, Stopped, first_line
from reembed.feed import default_workers
from reembed.fleet import Fleet, child_command_line, combined_exit, tokenizers_per_worker
from reembed.metrics import Metrics
from reembed.plan import estimate_rows, inventory, plan_report, rewrite_secs, sample_texts
from reembed.report import Report
from reembed.settings import ModelSpec, RunOptions, Settings
from reembed.signals import StopSignal
from reembed.signature import Signature
from reembed.strategy import for_name
from reembed.target import TableInfo, inspect_target, read_registry
from reembed.throttle import Throttle
from reembed.throttle import check_options as throttle_options
from reembed.worker import Worker

log = structlog.get_logger()

BANNER = """\
WARNING: reembed is about to re-embed {table}.{column} with {model} ({dim}-d).
WARNING: Until this job finishes, the column mixes two embedding spaces{index_note}:
WARNING: search results over it are meaningless. Stop serving search from it now.
WARNING: The application may keep writing: its writes are captured and re-embedded.{rewrite_note}
WARNING: Press Ctrl-C within {secs:g} seconds to abort (--no-confirm skips this pause)."""
SHADOW_BANNER = """\
WARNING: reembed is about to re-embed {table}.{column} with {model} ({dim}-d) in a shadow column.
WARNING: Search keeps serving the old vectors until one short swap at the end; the application may
WARNING: keep writing with the old model (its writes are captured and re-embedded). The table grows
WARNING: by the new column and its indexes until `reembed cleanup` drops the previous ones.
WARNING: Press Ctrl-C within {secs:g} seconds to abort (--no-confirm skips this pause)."""
REWRITE_NOTE = """
WARNING: At the end the column becomes {dim}: that rewrites the table while writers
WARNING: and readers wait, about {secs:.0f} s for {rows:,} rows (see `reembed plan`)."""


def run(settings: Settings, *, embedder: Embedder | None = None, stop: StopSignal | None = None) -> Report:
    """The whole job. Library entry point; the CLI is a thin shell around it."""
    path = settings.options.metrics_file
    if path is None or settings.options.dry_run:
        return _run(settings, embedder, stop, None)
    metrics = Metrics(path, settings)
    try:
        report = _run(settings, embedder, stop, metrics)
    except BaseException as exc:
        code = getattr(exc, "exit_code", EXIT_FAILED)
        metrics.exit(code if isinstance(code, int) else EXIT_FAILED, "failed" if code == EXIT_FAILED else "error")
        raise
    metrics.exit(report.exit_code, report.state)
    return report


def _run(settings: Settings, embedder: Embedder | None, stop: StopSignal | None, metrics: Metrics | None) -> Report:
    if settings.model is None:
        raise ConfigError("run needs a model: give --model (a local model directory)")
    stop = stop or StopSignal()
    started = time.monotonic()
    spec, opts = settings.model.for_target(settings.target), settings.options
    conninfo = settings.target.conninfo()

    name, model_hash = (
        (embedder.signature.name, embedder.signature.hash) if embedder is not None else fingerprint(spec)
    )
    conn = db.connect(conninfo, role="control", vectors=False, autocommit=True)
    try:
        with db.translated():
            info = inspect_target(conn, settings.target)
            registry = Signature.from_registry(read_registry(conn, info))
            job = ckpt.active_job(conn, info)
            check_not_grouped(conn, info, job)
        if job is None and registry is not None and registry_matches(registry, name, model_hash):
            return _noop(registry, spec.dimension, started, info)
        check_target(job, name, model_hash, info, settings)
        with db.translated():
            check_previous(conn, info, job, settings)
            fitting.check_job(conn, info, job, name=name, model_hash=model_hash, registry=registry, opts=opts)
        old_loader = old_model(opts, job, registry)
        if opts.dry_run:
            embedder = embedder or load(spec, opts, model_hash)
            return plan_report(conn, info, registry, job, embedder, settings, started)
        throttle_options(opts, conninfo)  # the operator's query and replicas answer, before any write

        held = lease.take(conn, conninfo, info.oid, table=info.qualified, column=info.column,
                          break_stale_lock=opts.break_stale_lock, stale_after=opts.stale_after, join=opts.join,
                          join_wait=opts.join_wait)
        if held.shared and embedder is None:
            # Joining other workers: the model is loaded holding nothing, then the lock taken again. A
            # joiner that held the lock shared while it loaded (seconds) and died there would be the
            # holder the last worker out gives way to, and nobody would finalize the job.
            held.release()
            embedder = load(spec, opts, model_hash)
            held = lease.take(conn, conninfo, info.oid, table=info.qualified, column=info.column,
                              break_stale_lock=False, stale_after=opts.stale_after, join=True,
                              join_wait=opts.join_wait)
        try:
            # Writer connections: as many as the device wants (a CUDA host: 4); known before the
            # model loads, so that the lease's keeper and the work share one set of connections.
            device = embedder.device if embedder is not None else pick_device(spec.device)
            connections = db.Connections(conninfo, size=6 + writer_count(opts, device),
                                         configure=prepare_session(info), reconnect_timeout=opts.max_outage)
        except BaseException:
            held.release()
            raise
        keeper = lease.Lease(held, connections, table_oid=info.oid, table=info.qualified, stop=stop,
                             max_outage=opts.max_outage, max_retries=opts.max_retries)
        keeper.start()
        try:
            embedder = embedder or load(spec, opts, model_hash)
            if spec.dimension is not None and spec.dimension != embedder.signature.dimension:
                raise ConfigError(
                    f"model produces {embedder.signature.dimension} dimensions but --dimension is {spec.dimension}"
                )
            throttle = Throttle(opts, stop=stop, conninfo=conninfo, table_oid=info.oid, lease=keeper,
                                held=connections.hold("throttle"))
            ctx = RunContext(settings=settings, info=info, embedder=embedder, stop=stop, lease=keeper,
                             connections=connections, control=connections.hold("control"),
                             state=JobState(for_name(opts.strategy)), started=started,
                             deadline=opts.deadline(started), writers=writer_count(opts, embedder.device),
                             throttle=throttle, old_embedder=old_loader,
                             on_progress=metrics.progress if metrics is not None else None)
            stop.install()
            try:
                return _locked_run(ctx, conn)
            finally:
                throttle.close()
                stop.restore()
                stop.close()
                ctx.control.release()
        finally:
            keeper.release()
            connections.close()
    finally:
        conn.close()


def plan(settings: Settings, *, embedder: Embedder | None = None) -> Report:
    """The dry run (`reembed plan`): what `run` would do, with an encode rate sampled from the
    table's own rows; nothing is written."""
    return run(replace(settings, options=replace(settings.options, dry_run=True)), embedder=embedder)


def registry_matches(registry: Signature | None, name: str, model_hash: str) -> bool:
    return registry is not None and registry.name == name and registry.hash == model_hash


def _noop(registry: Signature, dimension: int | None, started: float, info: TableInfo) -> Report:
    if dimension is not None and dimension != registry.dimension:
        raise ConfigError(
            f"model {registry.name} produces {registry.dimension} dimensions but --dimension is {dimension}"
        )
    log.debug("nothing_to_do", table=info.qualified, model_name=registry.name)
    return Report(
        state="noop",
        duration_secs=time.monotonic() - started,
        model_name=registry.name,
        dimension=registry.dimension,
        model_hash=registry.hash,
        message=f"nothing to do: {info.qualified} is already embedded with {registry.name}",
    )


def load(spec: ModelSpec, opts: RunOptions, model_hash: str) -> Embedder:
    return SentenceTransformerEmbedder(spec, encode_batch_size=opts.encode_batch_size, model_hash=model_hash)


def check_not_grouped(conn: psycopg.Connection[Any], info: TableInfo, job: Job | None) -> None:
    """A table of a job over several tables (reembed.group) is resumed, or abandoned, with all of them:
    they cut over together, and a run over one of them alone would flip the registry for the others."""
    grouped = job if job is not None and job.group_id is not None else ckpt.active_group(conn, info.qualified,
                                                                                       info.column)
    if grouped is not None and grouped.group is not None:
        raise ConfigError(grouped.group.refusal(f"{ckpt.plain(info.qualified)}.{info.column}"))


def check_previous(conn: psycopg.Connection[Any], info: TableInfo, job: Job | None, settings: Settings) -> None:
    """A new job waits until a shadow job's kept previous column is cleaned up or rolled back
    (a second swap would have nowhere to put it, and rollback would lose its meaning); a
    shadow job needs the name it renames the column to."""
    if job is not None:
        return
    kept = ckpt.kept_previous(conn, info.qualified, info.column)
    if kept is not None:
        previous = (kept.shadow or {}).get("previous", "the previous column")
        raise ConfigError(
            f"job {kept.job_id} swapped {kept.target_model_name} into {info.qualified}.{info.column} and kept "
            f"{previous} for a rollback: run `reembed cleanup` (keep the new vectors) or `reembed rollback` (go "
            "back) before starting another job; nothing was written")
    if settings.options.strategy == "shadow":
        shadow.check_table(conn, info)


def old_model(opts: RunOptions, job: Job | None, registry: Signature | None) -> Callable[[], Embedder] | None:
    """--old-model, checked against the model the column holds now (before any write), and
    loaded only when the quality gate asks for it."""
    if opts.old_model is None:
        return None
    spec = opts.old_model
    name, model_hash = fingerprint(spec)
    current = job.source if job is not None else registry
    if current is None or current.hash != model_hash:
        said = f"{current.name} ({current.hash})" if current is not None else "none (no registry row)"
        raise ConfigError(f"--old-model {spec.model} hashes to {model_hash}, but the column holds {said}: the "
                          "gate would compare the new vectors with the wrong model; give the model (with its "
                          "--old-prefix and --old-max-seq-length) the registry names")
    return functools.cache(lambda: load(spec, opts, model_hash))


def check_target(job: Job | None, name: str, model_hash: str, info: TableInfo, settings: Settings) -> None:
    """A different target while a job is active is refused, unless told to abandon it.
    (The hash covers the model's files, so name + hash settle the dimension too; and the text it
    reads, checked here again for a model whose hash is its own: a library caller's embedder.)"""
    model = job is not None and job.matches_fingerprint(name, model_hash)
    text = job is not None and (job.content_expr, job.null_content) == (info.content_sql, info.null_content)
    same = model and text
    if job is not None and not same and not settings.options.abandon_active:
        if model:  # the same model, another text: what the rows already done were encoded from differs
            raise ConfigError(
                f"job {job.id} encodes {job.content_expr or job.content_column} (NULL text: {job.null_content}), "
                f"not {info.content_sql or info.content_column} (NULL text: {info.null_content}); re-run with its "
                "--content and --null-content to resume it, or pass --abandon-active to start over")
        raise ConfigError(
            f"job {job.id} is re-embedding {info.qualified} with {job.target.name} ({job.target.dimension}-d), "
            f"not {name}; re-run with that model to resume it, or pass --abandon-active to drop it and start "
            "over with this one"
        )
    if not same and settings.target.index is not None and info.index is None:
        raise ConfigError(
            f"index {settings.target.index} is not an HNSW index on {info.qualified}.{info.column}; check --index"
        )


def _locked_run(ctx: RunContext, conn: psycopg.Connection[Any]) -> Report:
    info, sig = ctx.info, ctx.signature
    with db.translated():
        job = ckpt.active_job(conn, info)  # again, now that we hold the lock
        check_not_grouped(conn, info, job)
        registry = Signature.from_registry(read_registry(conn, info))
    if job is None and registry is not None and registry_matches(registry, sig.name, sig.hash):
        return _noop(registry, None, ctx.started, info)
    check_target(job, sig.name, sig.hash, info, ctx.settings)
    if ctx.lease.shared:  # other runs' workers hold the lock: join their job, or nothing
        if job is not None and job.matches(sig) and job.state == "embedding":
            return _join(ctx, job)
        if not ctx.lease.coordinate():  # they let go meanwhile, and someone else coordinates now
            raise LockHeld(f"{info.qualified} is being re-embedded by another run; wait for it, or stop it first")
        with db.translated():
            job = ckpt.active_job(conn, info)
        check_target(job, sig.name, sig.hash, info, ctx.settings)

    resumed_from: str | None = None
    if job is not None and job.matches(sig) and job.strategy != ctx.opts.strategy:
        log.warning("strategy_kept", job_id=job.id, strategy=job.strategy, asked=ctx.opts.strategy,
                    detail="a job finishes with the strategy it started with")
    if job is not None and job.matches(sig):
        with db.translated():
            ckpt.ensure_schema(conn)  # a job of an older version gains the newer columns and tables
        # the job row as it is now, and the strategy the job was started with
        job = ctx.state.advance(ckpt.reload(conn, job), strategy=for_name(job.strategy))
        recheck(ctx, conn, job)
        progress = ckpt.progress(conn, job)
        resumed_from = progress["last_id"]
        log.info("job_resumed", job_id=job.id, state=job.state, last_id=resumed_from,
                 rows_done=progress["rows_done"], finalize_steps=job.steps)
    else:
        with db.translated():  # everything on the column, judged before any write (exit 2 if refused)
            carry.finish_not_null(conn, info)  # a NOT NULL a killed rollback left to put back first
            found = inventory(conn, info, registry, job, sig.dimension, ctx.opts)
        rows_total = estimate_rows(conn, info)
        if _confirm(ctx, conn, rows_total, ctx.opts.confirm_seconds, found):
            return Report(state="stopped", exit_code=ctx.stop.exit_code, message="aborted before any write")
        with db.translated():
            ckpt.ensure_schema(conn)  # the first write of a new job: after the banner
        ctx.state.advance(prepare(ctx, conn, registry, job, rows_total=rows_total, found=found))
    return begin(ctx, resumed_from)


def _join(ctx: RunContext, job: Job) -> Report:
    """Another run's workers are on the job: one more worker (no prepare, no schema change, no
    claim released: theirs are live)."""
    ctx.state.advance(job, strategy=for_name(job.strategy))
    log.info("job_joined", job_id=job.id, workers=len(ctx.lease.read(ckpt.workers, job, on=ctx.control,
                                                                      what="read_workers")))
    return begin(ctx, None)


def begin(ctx: RunContext, resumed_from: str | None, *, until: str | None = None) -> Report:
    """The job from where it stands to done; `until`: to the finalize step of that name (a job over
    several tables: each table up to the one cut-over of them all), its report's state `ready`."""
    structlog.contextvars.bind_contextvars(job_id=ctx.active.id)
    ctx.lease.job_id = ctx.active.id
    ctx.throttle.begin(ctx.active.id, recorded_hold=ctx.active.throttle_reason)
    ctx.stop.deadline(ctx.deadline)
    try:
        return _drive(ctx, resumed_from, until)
    finally:
        structlog.contextvars.unbind_contextvars("job_id")


def recheck(ctx: RunContext, conn: psycopg.Connection[Any], job: Job) -> None:
    """A resumed job whose column still changes type: refuse what was added on the column since
    the job started (a view, a policy, ...), before any more work, saying what state the table is in.
    A partitioned table's partitions attached or detached meanwhile are taken in (reembed.repartition)."""
    with db.translated():
        repartition.reconcile(ctx)
    if job.strategy == "shadow" or job.source_typmod == job.target_dimension or "cut_over" in job.steps:
        return  # a shadow job re-reads what is on the column inside its swap
    with db.translated():
        now = dependents.take(conn, ctx.info, dimension=job.target_dimension, source_dimension=job.source_typmod,
                              allow_published=ctx.opts.allow_published, probe=False)
    blocking = [d for d in now.refused if not d.is_index]
    if blocking:
        said = dependents.refusals(blocking)
        state = dependents.table_state(job)
        raise ConfigError(f"job {job.id} cannot finish changing {ctx.info.qualified}.{ctx.info.column}: {said}"
                          + (f"; the table now: {state}" if state else "") + "; nothing more was written")


def _confirm(ctx: RunContext, conn: psycopg.Connection[Any], rows: int, seconds: float, found: Inventory) -> bool:
    """The warning banner and its pause. True if the operator aborted."""
    if seconds <= 0:
        return False
    info, sig = ctx.info, ctx.signature
    if ctx.strategy.name == "shadow":
        print(SHADOW_BANNER.format(table=info.qualified, column=info.column, model=sig.name, dim=sig.dimension,
                                   secs=seconds), file=sys.stderr, flush=True)
        return ctx.stop.wait(seconds)
    dropped = [d.name for d in found.rebuilt]
    note = (f" and {'index ' if len(dropped) == 1 else 'indexes '}{', '.join(dropped)} "
            f"{'is' if len(dropped) == 1 else 'are'} dropped until the end") if dropped else ""
    rewrite = ""
    if info.typmod != sig.dimension:
        rewrite = REWRITE_NOTE.format(dim=f"{info.column_type}({sig.dimension})", rows=rows,
                                      secs=rewrite_secs(conn, info, rows))
    print(BANNER.format(table=info.qualified, column=info.column, model=sig.name, dim=sig.dimension,
                        index_note=note, rewrite_note=rewrite, secs=seconds), file=sys.stderr, flush=True)
    return ctx.stop.wait(seconds)


def prepare(ctx: RunContext, conn: psycopg.Connection[Any], registry: Signature | None, old: Job | None, *,
            rows_total: int, found: Inventory, group: ckpt.Group | None = None) -> Job:
    """One fenced transaction: (abandon the old job,) record the new one and its inventory, make
    room (strategy). The inventory is read again inside it: what it records is what it drops.
    `group`: the job over several tables it is one of (id 0: a new group, whose id is this job's)."""
    info, sig = ctx.info, ctx.signature
    index_name = info.index.name if info.index else None
    index_def = info.index.as_json() if info.index else None
    source, source_typmod = registry, info.typmod
    if old is not None:  # abandoning: the old job already dropped the index / relaxed the column
        index_name = index_name or old.index_name
        index_def = index_def or old.index_def
        source_typmod = old.source_typmod
        source = old.source or source

    def body(c: psycopg.Connection[Any]) -> Job:  # one call: no loop, nothing to bind
        now = inventory(c, info, registry, old, sig.dimension, ctx.opts, probe=False)
        if [(d.name, d.action) for d in now.dependents] != [(d.name, d.action) for d in found.dependents]:
            raise ConfigError(f"the objects on {info.qualified}.{info.column} changed while the job was starting "
                              f"(now: {now.summary()}); nothing was written: run again")
        if old is not None:
            ckpt.set_state(c, old, to="abandoned", from_state=old.state)
            capture.remove(c, info, old.id)
            if old.strategy == "shadow":
                shadow.discard(c, info, old)
            log.warning("job_abandoned", old_job_id=old.id, old_model=old.target.name)
        bounds = ranges.boundaries(c, info, rows_total=rows_total,
                                   ranges=ranges.count_for(rows_total, ctx.opts.batch_size, ctx.opts.ranges))
        job = ckpt.create_job(c, info, target=sig, source=source, index=index_def, index_name=index_name,
                              source_typmod=source_typmod, rows_total=rows_total, holder=db.holder_name(),
                              dependents=now.as_json(), strategy=ctx.strategy.name, bounds=bounds)
        if group is not None:
            ckpt.set_group(c, job, group if group.id else replace(group, id=job.id))
        repartition.record(c, info, job)
        ctx.strategy.prepare(ctx, c, job, resumed_from=old)
        return ckpt.reload(c, job)

    job = ctx.lease.write(body, on=ctx.control, what="prepare", lock_timeout=ctx.opts.ddl_lock_timeout)
    plan = ctx.strategy.plan(ctx, job)
    log.info("job_started", job_id=job.id, table=info.qualified, model_name=sig.name, dimension=sig.dimension,
             rows_total=rows_total, indexes_dropped=plan["drop_indexes"], typmod_relaxed=plan["relax_typmod"],
             on_column=found.summary(), ranges=len(ctx.lease.read(ckpt.ranges, job, on=ctx.control, what="ranges")))
    return job


def _drive(ctx: RunContext, resumed_from: str | None, until: str | None = None) -> Report:
    sig, job = ctx.signature, ctx.active
    worker = Worker(ctx)
    report = Report(state="done", job_id=job.id, model_name=sig.name, dimension=sig.dimension,
                    model_hash=sig.hash, resumed_from=resumed_from)
    try:
        if job.state == "embedding":
            if not ctx.lease.shared:  # the lock is ours alone: claims left by earlier runs are dead
                ctx.lease.write(ckpt.release_claims, job, on=ctx.control, what="release_claims")
                if job.group_id is None:  # a job over several tables runs on one worker (reembed.group)
                    ctx.lease.share()  # from here on, other runs may join as workers
            with fitting.while_embedding(ctx):  # --bridge: fitted once enough rows are committed
                _embed(ctx, worker, report)
            if not ctx.stop.requested and not ctx.lease.coordinate():
                return _worker_done(ctx, worker, report)
            ctx.state.advance(ctx.lease.read(ckpt.reload, ctx.active, on=ctx.control, what="reload_job"))
            if ctx.active.state == "done":  # the last of the other workers finalized it a moment ago
                return _worker_done(ctx, worker, report, finalized=True)
            _hand_to_finalize(ctx, worker)
        ctx.stop.deadline(None)  # finalize judges the window once, up front (finalize._postponed)
        _embedded(ctx, worker, report)
        if ctx.stop.requested:
            return _stopped(ctx, report)
        fitting.ensure(ctx)  # --bridge on a table smaller than its sample: fitted now, before the swap
        note = failures.settle(ctx)
        outcome = finalize.run(ctx, until=until)
        if outcome.reached:  # ready for the cut-over of a job over several tables
            report.state = "ready"
            _with_workers(report)
            report.message = note
            return report
        report.index_rebuild_secs = outcome.index_secs
        report.details["writers_held_secs"] = ctx.active.writers_held_secs
        report.details["catch_up_rows"] = ctx.active.catchup_rows
        report.details["strategy"] = ctx.strategy.name
        if ctx.active.gate is not None:
            report.details["gate"] = ctx.active.gate
        if ctx.active.shadow is not None:
            report.details["readers_held_secs"] = ctx.active.shadow.get("readers_held_secs")
        if not outcome.finished:
            return _stopped(ctx, report, message=outcome.message)
    except Stopped:
        raise
    except BaseException as exc:
        report.rows_updated, report.rows_skipped = worker.rows_updated, worker.rows_skipped
        _record_error(ctx, exc)
        raise
    _with_workers(report)
    report.duration_secs = time.monotonic() - ctx.started
    report.message = "; ".join(m for m in (note, outcome.message) if m)
    log.info("job_done", rows_updated=report.rows_updated, rows_skipped=report.rows_skipped,
             duration_secs=round(report.duration_secs, 2), index_rebuild_secs=round(report.index_rebuild_secs, 2))
    return report


def _embed(ctx: RunContext, worker: Worker, report: Report) -> None:
    """This process's worker, and with --workers N the other N - 1 of this host (reembed.fleet),
    until every range is done or a stop; the others' exit codes kept for the report."""
    fleet = _start_fleet(ctx, worker) if ctx.opts.workers > 1 else None
    try:
        worker.run()
    except BaseException:
        if fleet is not None:
            report.details["worker_exit_codes"] = fleet.end()
        raise
    finally:
        if fleet is not None:
            fleet.close()
    if fleet is not None:
        codes = fleet.wait()
        report.details["worker_exit_codes"] = codes
        report.details["worker_pids"] = fleet.pids
        rows = ctx.lease.read(ckpt.workers, ctx.active, on=ctx.control, what="read_workers")
        report.details["worker_rows"] = {w.worker: w.rows_done for w in rows
                                         if w.host == db.host_name() and w.pid in fleet.pids}


def _start_fleet(ctx: RunContext, worker: Worker) -> Fleet:
    opts = ctx.opts
    if not opts.command_line:
        raise ConfigError("--workers N starts `reembed run` again for each worker: run it from the command line")
    devices = opts.devices or (None,)
    tokenizers = opts.tokenizer_workers
    if tokenizers is None:
        tokenizers = worker.tokenizers = _size_tokenizers(ctx)
    left = ctx.deadline - time.monotonic() if ctx.deadline is not None else None
    fleet = Fleet(ctx.stop)
    fleet.start([child_command_line(opts.command_line, device=devices[i % len(devices)],
                                    tokenizers=tokenizers, seconds_left=left)
                 for i in range(1, opts.workers)])
    return fleet


def _size_tokenizers(ctx: RunContext) -> int:
    """The host's tokenizer processes shared out between its workers, from the measured balance of
    tokenising and device time on a sample of the table's own rows (reembed.fleet)."""
    texts = sample_texts(ctx.control.conn, ctx.info, 128, ctx.active.rows_total or 0)
    cores = default_workers() + 1
    if not texts:
        return max(0, cores - ctx.opts.workers) // ctx.opts.workers
    emb = ctx.embedder
    emb.encode(texts[:8])  # the first call pays for kernels and allocations
    started = time.perf_counter()
    features = emb.tokenize(texts)
    tokenized = time.perf_counter()
    emb.forward(features)
    done = time.perf_counter()
    tok, dev = (tokenized - started) / len(texts), (done - tokenized) / len(texts)
    count = tokenizers_per_worker(cores=cores, workers=ctx.opts.workers, tokenize_secs=tok, device_secs=dev)
    log.info("tokenizers_sized", per_worker=count, workers=ctx.opts.workers, cores=cores,
             tokenize_rows_per_sec=round(1 / tok) if tok else None, device_rows_per_sec=round(1 / dev) if dev else None)
    return count


def _embedded(ctx: RunContext, worker: Worker, report: Report) -> None:
    """The embedding part of the report: this process's rows, and its workers'."""
    others = report.details.get("worker_rows", {})
    report.rows_updated = worker.rows_updated + sum(others.values())
    report.rows_skipped = worker.rows_skipped
    report.details["embed_secs"] = round(worker.secs, 3)
    report.details["embed_rows_per_sec"] = round(report.rows_updated / worker.secs, 1) if worker.secs else None
    report.details["ranges_claimed"] = worker.ranges
    report.details["ranges_split"] = worker.splits
    report.rows_failed = worker.rows_failed
    report.details["throttled_secs"] = round(ctx.throttle.secs, 3)
    report.details["throttle_pauses"] = ctx.throttle.pauses


def _with_workers(report: Report) -> None:
    """With --workers N: the most severe of this process's exit code and its workers'."""
    if codes := report.details.get("worker_exit_codes"):
        report.exit_code = combined_exit(report.exit_code, codes)


def _worker_done(ctx: RunContext, worker: Worker, report: Report, *, finalized: bool = False) -> Report:
    """Every range is done, and another worker finalizes (the last to let go of the lock)."""
    report.state = "worker_done"
    _embedded(ctx, worker, report)
    report.duration_secs = time.monotonic() - ctx.started
    report.message = ("the job was finalized by another worker" if finalized
                      else "every range is done; the last worker to finish finalizes the job")
    _with_workers(report)
    log.info("worker_done", rows_updated=worker.rows_updated, detail=report.message)
    return report


def _hand_to_finalize(ctx: RunContext, worker: Worker) -> None:
    """Every range is done: the job moves on to finalize."""
    if ctx.stop.requested:
        return
    if ctx.lease.write(_to_finalizing, ctx.active, on=ctx.control, what="finish_embedding"):
        log.info("embedding_complete", rows_updated=worker.rows_updated, rows_skipped=worker.rows_skipped)


def _to_finalizing(conn: psycopg.Connection[Any], job: Job) -> bool:
    if ckpt.open_ranges(conn, job):
        return False
    ckpt.set_state(conn, job, to="finalizing", from_state="embedding")
    return True


def _stopped(ctx: RunContext, report: Report, message: str = "") -> Report:
    stop = ctx.stop
    report.state = stop.reason if stop.reason in ("time_budget", "throttle_critical") else "stopped"
    report.exit_code = stop.exit_code
    _with_workers(report)
    report.duration_secs = time.monotonic() - ctx.started
    progress = ctx.lease.read(ckpt.progress, ctx.active, on=ctx.control, what="job_progress")
    critical = ctx.throttle.critical if stop.reason == "throttle_critical" else None
    report.message = message or ((f"{critical.said()}; " if critical else "")
                                 + f"checkpoint at {progress['last_id']}; re-run to resume")
    log.warning("job_stopped", reason=stop.reason, last_id=progress["last_id"], rows_done=progress["rows_done"])
    return report


def _record_error(ctx: RunContext, exc: BaseException) -> None:
    """Best effort: leave the error on the job row for `reembed status`, and say (on the error
    line too) what the job left the table without and what a re-run does."""
    try:
        with ctx.connections.connection("error") as c:
            job = ckpt.reload(c, ctx.active)
            state = dependents.table_state(job)
            note = f" (table now: {state})" if state else ""
            ckpt.record_error(c, ctx.active, f"{type(exc).__name__}: {exc}{note}")
    except Exception:  # noqa: BLE001 - the original error matters more
        return
    if state:
        exc.add_note(f"the table now: {state}")
        log.error("job_failed", error=first_line(exc), table_state=state)
