"""plan -> lock -> prepare -> embed batches (checkpointed) -> finalize -> done.

Failure semantics (also in docs/RUNBOOK.md): between prepare and finalize the table mixes
two embedding spaces and search must not be served. Every batch commits its vectors and the
checkpoint advance in one transaction, so after any crash data and checkpoint agree; a
re-run with the same model resumes after `last_id`, and a re-run after completion is a no-op.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import psycopg
import structlog
from psycopg import sql

from reembed import checkpoint as ckpt
from reembed import db, failures, finalize, retry
from reembed.checkpoint import Job
from reembed.embedder import Embedder, SentenceTransformerEmbedder, Signature, fingerprint
from reembed.errors import ConfigError, LockHeld, Stopped
from reembed.lease import LockKeeper, break_stale
from reembed.pipeline import EmbedPhase
from reembed.queries import query
from reembed.report import Report
from reembed.settings import RunOptions, Settings
from reembed.signals import StopSignal
from reembed.target import TableInfo, inspect_target, read_registry

log = structlog.get_logger()

BANNER = """\
WARNING: reembed is about to re-embed {table}.{column} with {model} ({dim}-d).
WARNING: Until this job finishes, the column mixes two embedding spaces{index_note}:
WARNING: search results over it are meaningless. Stop serving search from it now.
WARNING: Press Ctrl-C within {secs:g} seconds to abort (--no-confirm skips this pause)."""


def run(settings: Settings, *, embedder: Embedder | None = None, stop: StopSignal | None = None) -> Report:
    """The whole job. Library entry point; the CLI is a thin shell around it."""
    assert settings.model is not None, "run needs a model"
    stop = stop or StopSignal()
    started = time.monotonic()
    spec, opts = settings.model, settings.options
    conninfo = settings.target.conninfo()

    name, model_hash = (
        (embedder.signature.name, embedder.signature.hash) if embedder is not None else fingerprint(spec)
    )
    conn = db.connect(conninfo, role="control", vectors=False, autocommit=True)
    try:
        with db.translated():
            info = inspect_target(conn, settings.target)
            registry = read_registry(conn, info)
            job = ckpt.active_job(conn, info)
        if job is None and _registry_matches(registry, name, model_hash):
            return _noop(registry, spec.dimension, started, info)
        _check_target(job, name, model_hash, info, settings)
        if opts.dry_run:
            embedder = embedder or _load(settings, model_hash)
            return plan_report(conn, info, registry, job, embedder.signature, embedder, settings, started)

        lock = _take_lock(conn, conninfo, info, opts)  # exit 3 at once, before the model loads
        keeper = LockKeeper(lock, conninfo, table_oid=info.oid, table=info.qualified)
        keeper.start()
        try:
            embedder = embedder or _load(settings, model_hash)
            if spec.dimension is not None and spec.dimension != embedder.signature.dimension:
                raise ConfigError(
                    f"model produces {embedder.signature.dimension} dimensions but --dimension is {spec.dimension}"
                )
            stop.install()
            try:
                return _locked_run(conn, conninfo, info, embedder, settings, stop, keeper, started)
            finally:
                stop.restore()
        finally:
            keeper.stop()
            lock.release()
    finally:
        conn.close()


def _take_lock(conn: psycopg.Connection[Any], conninfo: str, info: TableInfo, opts: RunOptions) -> db.TableLock:
    try:
        return db.try_lock(conninfo, info.oid, table=info.qualified)
    except LockHeld as held:
        if not opts.break_stale_lock:
            raise
        break_stale(conn, table=info.qualified, column=info.column, holder_pid=held.holder,
                    stale_after=opts.stale_after)
    deadline = time.monotonic() + 15
    while True:  # the terminated backend lets go of the lock as it exits
        try:
            return db.try_lock(conninfo, info.oid, table=info.qualified)
        except LockHeld:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _registry_matches(registry: dict[str, Any] | None, name: str, model_hash: str) -> bool:
    return registry is not None and registry["model_name"] == name and registry["model_hash"] == model_hash


def _noop(registry: dict[str, Any] | None, dimension: int | None, started: float, info: TableInfo) -> Report:
    assert registry is not None
    if dimension is not None and dimension != registry["dimension"]:
        raise ConfigError(
            f"model {registry['model_name']} produces {registry['dimension']} dimensions "
            f"but --dimension is {dimension}"
        )
    log.debug("nothing_to_do", table=info.qualified, model_name=registry["model_name"])
    return Report(
        state="noop",
        duration_secs=time.monotonic() - started,
        model_name=registry["model_name"],
        dimension=registry["dimension"],
        model_hash=registry["model_hash"],
        message=f"nothing to do: {info.qualified} is already embedded with {registry['model_name']}",
    )


def _load(settings: Settings, model_hash: str) -> Embedder:
    assert settings.model is not None
    return SentenceTransformerEmbedder(
        settings.model, encode_batch_size=settings.options.encode_batch_size, model_hash=model_hash
    )


def _check_target(job: Job | None, name: str, model_hash: str, info: TableInfo, settings: Settings) -> None:
    """A different target while a job is active is refused, unless told to abandon it.
    (The hash covers the model's files, so name + hash settle the dimension too.)"""
    same = job is not None and job.matches_fingerprint(name, model_hash)
    if job is not None and not same and not settings.options.abandon_active:
        old_name, dim, _ = job.target
        raise ConfigError(
            f"job {job.id} is re-embedding {info.qualified} with {old_name} ({dim}-d), not {name}; "
            "re-run with that model to resume it, or pass --abandon-active to drop it and start over "
            "with this one"
        )
    if not same:
        _check_index(info, settings)


def _check_index(info: TableInfo, settings: Settings) -> None:
    if settings.target.index is not None and info.index is None:
        raise ConfigError(
            f"index {settings.target.index} is not an HNSW index on {info.qualified}.{info.column}; check --index"
        )


def _locked_run(
    conn: psycopg.Connection[Any],
    conninfo: str,
    info: TableInfo,
    embedder: Embedder,
    settings: Settings,
    stop: StopSignal,
    keeper: LockKeeper,
    started: float,
) -> Report:
    opts = settings.options
    sig = embedder.signature
    with db.translated():
        job = ckpt.active_job(conn, info)  # again, now that we hold the lock
        registry = read_registry(conn, info)
    if job is None and _registry_matches(registry, sig.name, sig.hash):
        return _noop(registry, None, started, info)
    _check_target(job, sig.name, sig.hash, info, settings)

    resumed_from: str | None = None
    if job is not None and job.matches(sig):
        progress = ckpt.progress(conn, job)
        resumed_from = progress["last_id"]
        log.info(
            "job_resumed",
            job_id=job.id,
            state=job.state,
            last_id=resumed_from,
            rows_done=progress["rows_done"],
            finalize_steps=job.steps,
        )
    else:
        if _confirm(info, sig, job, opts.confirm_seconds, stop):
            return Report(state="stopped", exit_code=stop.exit_code, message="aborted before any write")
        with db.translated():
            ckpt.ensure_schema(conn)  # the first write of a new job: after the banner
        job = prepare(conn, info, sig, registry, job, settings, keeper)
    structlog.contextvars.bind_contextvars(job_id=job.id)
    keeper.job_id = job.id
    try:
        return _drive(conninfo, info, embedder, settings, stop, keeper, job, started, resumed_from)
    finally:
        structlog.contextvars.unbind_contextvars("job_id")


def _confirm(info: TableInfo, sig: Signature, job: Job | None, seconds: float, stop: StopSignal) -> bool:
    """The warning banner and its pause. True if the operator aborted."""
    if seconds <= 0:
        return False
    note = " and the HNSW index is dropped until the end" if info.index is not None else ""
    print(
        BANNER.format(
            table=info.qualified, column=info.column, model=sig.name, dim=sig.dimension, index_note=note, secs=seconds
        ),
        file=sys.stderr,
        flush=True,
    )
    return stop.wait(seconds)


def prepare(
    conn: psycopg.Connection[Any],
    info: TableInfo,
    sig: Signature,
    registry: dict[str, Any] | None,
    old: Job | None,
    settings: Settings,
    keeper: LockKeeper,
) -> Job:
    """One transaction: (abandon the old job,) record the new one, drop HNSW, relax the typmod."""
    opts = settings.options
    index_name = info.index.name if info.index else None
    index_def = info.index.as_json() if info.index else None
    source = registry
    source_typmod = info.typmod
    if old is not None:  # abandoning: the old job already dropped the index / relaxed the column
        index_name = index_name or old.row["index_name"]
        index_def = index_def or old.row["index_def"]
        source_typmod = old.row["source_typmod"]
        if old.row["source_model_name"] is not None:
            source = {
                "model_name": old.row["source_model_name"],
                "dimension": old.row["source_dimension"],
                "model_hash": old.row["source_hash"],
            }
    rows_total = estimate_rows(conn, info)
    relax = info.typmod is not None and info.typmod != sig.dimension
    drop = info.index is not None and (opts.drop_hnsw_first or relax)

    def attempt() -> Job:
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(opts.ddl_lock_timeout)))
            if old is not None:
                ckpt.set_state(conn, old, to="abandoned", from_state=old.state)
                log.warning("job_abandoned", old_job_id=old.id, old_model=old.row["target_model_name"])
            job = ckpt.create_job(
                conn,
                info,
                target=sig,
                source=source,
                index=index_def,
                index_name=index_name,
                source_typmod=source_typmod,
                rows_total=rows_total,
                holder=db.holder_name(),
            )
            if drop:
                assert info.index is not None
                conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(info.ident[0], info.index.name)))
                conn.execute(query("mark_index_dropped"), {"job_id": job.id})
            elif old is not None and old.row["index_dropped"]:
                conn.execute(query("mark_index_dropped"), {"job_id": job.id})
            if relax:
                conn.execute(
                    sql.SQL("ALTER TABLE {table} ALTER COLUMN {col} TYPE vector").format(**info.ids())
                )
            keeper.fence(conn)
            return ckpt.reload(conn, job)

    job = retry.call(attempt, what="prepare", max_retries=opts.max_retries)
    log.info(
        "job_started",
        job_id=job.id,
        table=info.qualified,
        model_name=sig.name,
        dimension=sig.dimension,
        rows_total=rows_total,
        index_dropped=drop,
        typmod_relaxed=relax,
    )
    return job


def estimate_rows(conn: psycopg.Connection[Any], info: TableInfo) -> int:
    """pg_class.reltuples when the table is large and analysed; an exact count otherwise."""
    row = conn.execute(query("row_estimate"), {"table_oid": info.oid}).fetchone()
    estimate = row["estimate"] if row else None
    if estimate is not None and estimate >= 1_000_000:
        return int(estimate)
    counted = conn.execute(sql.SQL("SELECT count(*) AS n FROM {table}").format(**info.ids())).fetchone()
    return int(counted["n"]) if counted else 0


def _drive(
    conninfo: str,
    info: TableInfo,
    embedder: Embedder,
    settings: Settings,
    stop: StopSignal,
    keeper: LockKeeper,
    job: Job,
    started: float,
    resumed_from: str | None,
) -> Report:
    opts = settings.options
    sig = embedder.signature
    deadline = opts.deadline(started)
    control = db.Session(conninfo, role="control", vectors=False)
    phase = EmbedPhase(conninfo, info, job, embedder, opts, stop, keeper, deadline=deadline)
    report = Report(
        state="done",
        job_id=job.id,
        model_name=sig.name,
        dimension=sig.dimension,
        model_hash=sig.hash,
        resumed_from=resumed_from,
    )
    try:
        if job.state == "embedding":
            phase.run()
        report.rows_updated, report.rows_skipped = phase.rows_updated, phase.rows_skipped
        report.details["embed_secs"] = round(phase.secs, 3)
        report.details["embed_rows_per_sec"] = round(report.rows_updated / phase.secs, 1) if phase.secs else None
        report.rows_failed = phase.rows_failed
        if stop.requested:
            return _stopped(report, stop, started, control, job)
        note = failures.settle(control, info, job, embedder, opts, keeper, batch_size=opts.batch_size)
        outcome = finalize.run(control, conninfo, info, job, sig, opts, stop, keeper, deadline=deadline)
        report.index_rebuild_secs = outcome.index_secs
        if not outcome.finished:
            return _stopped(report, stop, started, control, job, message=outcome.message)
    except Stopped:
        raise
    except BaseException as exc:
        report.rows_updated, report.rows_skipped = phase.rows_updated, phase.rows_skipped
        _record_error(conninfo, job, exc)
        raise
    finally:
        control.close()
    report.duration_secs = time.monotonic() - started
    report.message = "; ".join(m for m in (note, outcome.message) if m)
    log.info(
        "job_done",
        rows_updated=report.rows_updated,
        rows_skipped=report.rows_skipped,
        duration_secs=round(report.duration_secs, 2),
        index_rebuild_secs=round(report.index_rebuild_secs, 2),
    )
    return report


def _stopped(
    report: Report, stop: StopSignal, started: float, control: db.Session, job: Job, message: str = ""
) -> Report:
    report.state = "time_budget" if stop.reason == "time_budget" else "stopped"
    report.exit_code = stop.exit_code
    report.duration_secs = time.monotonic() - started
    progress = ckpt.progress(control.get(), job)
    report.message = message or f"checkpoint at {progress['last_id']}; re-run to resume"
    log.warning("job_stopped", reason=stop.reason, last_id=progress["last_id"], rows_done=progress["rows_done"])
    return report


def _record_error(conninfo: str, job: Job, exc: BaseException) -> None:
    """Best effort: leave the error on the job row for `reembed status`."""
    try:
        with db.connect(conninfo, role="error", vectors=False, autocommit=True) as c:
            ckpt.record_error(c, job, f"{type(exc).__name__}: {exc}")
    except Exception:  # noqa: BLE001 - the original error matters more
        pass


def plan_report(
    conn: psycopg.Connection[Any],
    info: TableInfo,
    registry: dict[str, Any] | None,
    job: Job | None,
    sig: Signature,
    embedder: Embedder,
    settings: Settings,
    started: float,
) -> Report:
    """The dry run: what `run` would do, with an encode-rate sample from the table. No writes."""
    opts = settings.options
    rows = estimate_rows(conn, info)
    resume = job is not None and job.matches(sig)
    done = ckpt.progress(conn, job)["rows_done"] if resume and job is not None else 0
    to_update = max(rows - done, 0)
    sample = conn.execute(
        sql.SQL("SELECT {content} AS c FROM {table} WHERE {content} IS NOT NULL LIMIT 64").format(**info.ids())
    ).fetchall()
    texts = [r["c"] for r in sample]
    rate = None
    if texts:
        embedder.encode(texts[:8])  # warm-up
        t0 = time.perf_counter()
        embedder.encode(texts)
        rate = len(texts) / max(time.perf_counter() - t0, 1e-6)
    current = (
        {"model_name": registry["model_name"], "dimension": registry["dimension"], "model_hash": registry["model_hash"]}
        if registry
        else None
    )
    batches = -(-to_update // opts.batch_size)
    estimate = round(to_update / rate, 1) if rate else None
    alter = info.typmod != sig.dimension if not resume else (job.row["source_typmod"] != sig.dimension)  # type: ignore[union-attr]
    details = {
        "table": info.qualified,
        "rows_to_update": to_update,
        "embedder_batches": batches,
        "estimated_walltime_secs": estimate,
        "encode_rows_per_sec_sample": round(rate, 1) if rate else None,
        "current_signature": current,
        "target_signature": sig.as_dict(),
        "would_alter_typmod": bool(alter),
        "index": info.index.name if info.index else (job.row["index_name"] if job else None),
        "resumes_job": job.id if resume and job else None,
    }
    message = (
        f"plan: {to_update} rows of {info.qualified} to re-embed in {batches} batches with {sig.name} "
        f"({sig.dimension}-d), about {estimate if estimate is not None else '?'} s of encoding; "
        f"typmod change: {'yes' if alter else 'no'}; current model: "
        f"{current['model_name'] if current else 'none'}"
        + (f"; resumes job {job.id}" if resume and job else "")
    )
    return Report(
        state="planned",
        model_name=sig.name,
        dimension=sig.dimension,
        model_hash=sig.hash,
        duration_secs=time.monotonic() - started,
        message=message,
        details=details,
    )

