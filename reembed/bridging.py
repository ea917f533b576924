"""`reembed bridge`: a bridge fitted and installed without a job, so that the application moves to the
new model first and the re-embed comes later (or previewed with --dry-run, or dropped with --drop).

Rows are drawn from the whole table and encoded by the new model; their old vectors are read from
the live column (reembed.fitting); the map is fitted, measured on held-out rows and refused below
--bridge-min-recall (exit 2, nothing written); otherwise installed (reembed.bridge), the registry
row held FOR SHARE meanwhile so that no swap slips in between. Refused before any encoding: a column
that holds the new model's vectors already, an in-place job (the column mixes both models), a job
for another model, a function name that is not free or in a schema it cannot go in (PostgreSQL's own,
missing, no CREATE), a bridge it would replace whose function another role owns.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import structlog

from reembed import bridge, db, fitting
from reembed import checkpoint as ckpt
from reembed.embedder import SentenceTransformerEmbedder, fingerprint
from reembed.encoding import Embedder
from reembed.errors import ConfigError, LockHeld
from reembed.plan import estimate_rows
from reembed.report import Report
from reembed.settings import BridgeOptions, Settings
from reembed.signature import Signature
from reembed.target import TableInfo, inspect_target

log = structlog.get_logger()


def bridge_command(settings: Settings, opts: BridgeOptions, *, embedder: Embedder | None = None) -> Report:
    """Library entry point (`embedder`: the new model already loaded, as `run` takes it)."""
    if len(settings.all_targets) > 1:
        raise ConfigError(f"reembed bridge maps one table's column, not {len(settings.all_targets)}: give one --table")
    started = time.monotonic()
    conn = db.connect(settings.target.conninfo(), role="bridge", vectors=True, autocommit=True)
    try:
        with db.translated():
            info = inspect_target(conn, settings.target)
            if opts.drop:
                return _drop(conn, info, opts, started)
            return _fit(conn, info, settings, opts, started, embedder)
    finally:
        conn.close()


def _drop(conn: psycopg.Connection[Any], info: TableInfo, opts: BridgeOptions, started: float) -> Report:
    function = bridge.function_of(info, opts.function) if opts.function else None
    with conn.transaction():
        if not bridge.claim(conn, info):
            raise LockHeld(f"a bridge is being installed on {info.qualified} right now; try again in a moment")
        dropped = bridge.drop(conn, info, function)
    return Report(state="dropped", duration_secs=time.monotonic() - started, model_name=dropped.target_model_name,
                  dimension=dropped.target_dimension, model_hash=dropped.target_hash,
                  message=f"dropped {dropped.called}: an application still calling it now fails",
                  details={"function": dropped.called})


def _fit(conn: psycopg.Connection[Any], info: TableInfo, settings: Settings, opts: BridgeOptions,
         started: float, embedder: Embedder | None) -> Report:
    if settings.model is None:
        raise ConfigError("bridge needs the new model: give --model (a local model directory), or --drop")
    spec = settings.model.for_target(settings.target)  # the text it reads is in its hash, as a job's
    name, model_hash = (embedder.signature.name, embedder.signature.hash) if embedder is not None \
        else fingerprint(spec)
    source = fitting.source_of(conn, info)
    target = Signature(name, spec.dimension or 0, model_hash)
    function = bridge.function_of(info, opts.function)
    _check(conn, info, source, target, function)
    embedder = embedder or SentenceTransformerEmbedder(spec, model_hash=model_hash)
    target = embedder.signature
    if spec.dimension is not None and spec.dimension != target.dimension:
        raise ConfigError(f"model produces {target.dimension} dimensions but --dimension is {spec.dimension}")
    sample = fitting.sample_table(conn, info, embedder, n=opts.sample, rows_total=estimate_rows(conn, info))
    log.info("bridge_sampled", rows=len(sample.pairs), model=target.name)
    fitted = fitting.fit(sample, min_recall=opts.min_recall, embedder=embedder)
    figures = fitted.figures
    said = fitting.said(figures)
    if "refused" in figures:
        raise ConfigError(f"the bridge was refused: {figures['refused']} ({said}); nothing was written")
    details: dict[str, Any] = {"bridge": figures, "function": bridge.shown(function), "source": source.as_dict()}
    if opts.dry_run:
        return Report(state="planned", duration_secs=time.monotonic() - started, model_name=target.name,
                      dimension=target.dimension, model_hash=target.hash, details=details,
                      message=f"bridge (dry run, nothing installed): {said}")
    ckpt.ensure_schema(conn)
    with conn.transaction():
        if not bridge.claim(conn, info):
            raise LockHeld(f"a bridge is being installed on {info.qualified} right now; try again in a moment")
        made = bridge.install(conn, info, fitted, source=source, target=target, function=function, job_id=None)
    return Report(state="installed", duration_secs=time.monotonic() - started, model_name=target.name,
                  dimension=target.dimension, model_hash=target.hash, details=details,
                  message=f"installed {made.called}, mapping {target.name} ({target.dimension}-d) into "
                          f"{source.name} ({source.dimension}-d): {said}. The application may now encode with "
                          f"{target.name} and wrap every vector in it (runbook: \"The bridge\")")


def _check(conn: psycopg.Connection[Any], info: TableInfo, source: Signature, target: Signature,
           function: tuple[str, str]) -> None:
    """What refuses a bridge before anything is encoded (exit 2)."""
    if source.hash == target.hash:
        raise ConfigError(f"nothing to bridge: {info.qualified}.{info.column} holds {target.name}'s vectors already "
                          "(the registry names it)")
    job = ckpt.active_job(conn, info)
    if job is not None and job.strategy != "shadow":
        raise ConfigError(f"job {job.id} re-embeds {info.qualified}.{info.column} in place: the column holds both "
                          "models' vectors until it ends, so no map into it can be right; nothing was written")
    if job is not None and job.target_hash != target.hash:
        raise ConfigError(f"job {job.id} re-embeds {info.qualified}.{info.column} with {job.target_model_name}: a "
                          f"bridge for {target.name} would be wrong from its swap on; nothing was written")
    previous = bridge.check_function(conn, info, function, target)
    if previous is not None:  # a re-fit redefines its function
        bridge.check_owners(conn, info, [previous])
