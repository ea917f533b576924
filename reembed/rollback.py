"""`reembed rollback` and `reembed cleanup`: what happens to a shadow job's previous column.

After the swap the previous column keeps the old vectors, and reembed_after_swap the keys of
every row the application has inserted, or whose content it has changed, since: exactly the
rows whose previous vector is stale.

rollback: with the old model (`--model`, checked against the hash the job recorded), the stale
rows are re-embedded into the previous column, a page per transaction (each page's keys settled
with it, up to the record read: a newer write by the application stays recorded), until what
is left is under a page; then one transaction, writers held off, re-embeds the rest and swaps
back: the views, triggers and policies on the column are created again on the previous one,
the new column and its indexes are dropped, the previous ones take the original names, the
registry names the old model again, NOTIFY. Without the old model it refuses while rows are
stale, unless --leave-stale-null: their previous vector is set NULL in the swap back.
cleanup: the previous column (its indexes go with it) and the recording are dropped.
Both hold the table's lock, both are idempotent (a second run finds nothing to do: exit 2)
and safe to kill: every transaction leaves the table as a re-run expects it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import structlog
from psycopg import sql

from reembed import bridge, carry, db, lease, shadow
from reembed import checkpoint as ckpt
from reembed.embedder import SentenceTransformerEmbedder, fingerprint
from reembed.encoding import Embedder
from reembed.errors import ConfigError, ReembedError
from reembed.queries import query
from reembed.report import Report
from reembed.settings import RollbackOptions, Settings
from reembed.target import TableInfo, inspect_target

log = structlog.get_logger()

_TRIES_FOR = 120.0  # seconds a swap back or a cleanup keeps trying for its locks


@contextlib.contextmanager
def _kept_job(settings: Settings, what: str) -> Iterator[tuple[psycopg.Connection[Any], TableInfo, ckpt.Job]]:
    """The control connection, the target, and the shadow job whose previous column is kept
    (a ConfigError, exit 2, when there is none: nothing to `what`)."""
    conn = db.connect(settings.target.conninfo(), role="control", vectors=False, autocommit=True)
    try:
        with db.translated():
            info = inspect_target(conn, settings.target)
            yield conn, info, _kept(conn, info, what)
    finally:
        conn.close()


def rollback(settings: Settings, opts: RollbackOptions) -> Report:
    started = time.monotonic()
    conninfo = settings.target.conninfo()
    with _kept_job(settings, "roll back") as (conn, info, job):
        names = shadow.Names.of(job)
        stale = _stale(conn, job)
        source = job.source
        if source is None:
            raise ConfigError(f"job {job.id} recorded no model before it (the registry was empty): there is nothing "
                              "to swap back to; `reembed cleanup` keeps the new vectors")
        embedder = _old_model(settings, job, source.hash)
        if embedder is None and stale and not opts.leave_stale_null:
            raise ConfigError(
                f"{stale} rows were written after the swap: their previous vectors are stale; give the old model "
                f"(--model, {source.name}) to re-embed them, or pass --leave-stale-null to swap back with those "
                "rows' embedding NULL; nothing was written")
        held = lease.take(conn, conninfo, info.oid, table=info.qualified, column=info.column,
                          break_stale_lock=False, stale_after=90.0)
        try:
            work = db.connect(conninfo, role="rollback", vectors=True, autocommit=True)
            try:
                re_embedded = _passes(work, info, job, names, embedder, opts) if embedder is not None else 0
                rest, nulled, writers_held = _swap_back(work, info, job, names, embedder, opts)
            finally:
                work.close()
        finally:
            held.release()
    secs = time.monotonic() - started
    message = (f"rolled back {info.qualified}.{info.column} to {source.name} ({source.dimension}-d): "
               f"{re_embedded + rest} stale rows re-embedded with it"
               + (f", {nulled} left NULL (--leave-stale-null)" if nulled else "")
               + f"; writers held off {writers_held:.3f} s")
    log.info("rolled_back", job_id=job.id, re_embedded=re_embedded + rest, left_null=nulled,
             writers_held_secs=round(writers_held, 3))
    return Report(state="rolled_back", job_id=job.id, rows_updated=re_embedded + rest, duration_secs=secs,
                  model_name=source.name, dimension=source.dimension, model_hash=source.hash, message=message,
                  details={"stale_rows": stale, "left_null": nulled, "writers_held_secs": round(writers_held, 4)})


def cleanup(settings: Settings) -> Report:
    started = time.monotonic()
    with _kept_job(settings, "clean up") as (conn, info, job):
        names = shadow.Names.of(job)
        held = lease.take(conn, settings.target.conninfo(), info.oid, table=info.qualified, column=info.column,
                          break_stale_lock=False, stale_after=90.0)
        try:
            _retrying(conn, "cleanup", lambda c: _drop_previous(c, info, job, names))
        finally:
            held.release()
    message = (f"dropped {info.qualified}.{names.previous}"
               + (f" and index {', '.join(i.previous for i in names.indexes)}" if names.indexes else "")
               + " and the record of rows written since the swap; the heap space the column took is reused as rows "
                 "are updated (VACUUM FULL or pg_repack gives it back to the system)")
    log.info("cleaned_up", job_id=job.id, column=names.previous)
    return Report(state="cleaned", job_id=job.id, duration_secs=time.monotonic() - started,
                  model_name=job.target_model_name, dimension=job.target_dimension, model_hash=job.target_hash,
                  message=message)


def _kept(conn: psycopg.Connection[Any], info: TableInfo, what: str) -> ckpt.Job:
    job = ckpt.kept_previous(conn, info.qualified, info.column)
    if job is None:
        latest = ckpt.latest_job(conn, info.qualified, info.column)
        state = f" (the last job, {latest.job_id}, is {latest.previous_state or latest.state})" if latest else ""
        raise ConfigError(f"nothing to {what}: no shadow job keeps a previous column on "
                          f"{info.qualified}.{info.column}{state}")
    return job


def _stale(conn: psycopg.Connection[Any], job: ckpt.Job) -> int:
    row = conn.execute(query("after_swap_count"), {"job_id": job.id}).fetchone()
    return int(row["n"]) if row else 0


def _old_model(settings: Settings, job: ckpt.Job, want_hash: str) -> Embedder | None:
    spec = settings.model
    if spec is None:
        return None
    _, model_hash = fingerprint(spec)
    if model_hash != want_hash:
        raise ConfigError(f"--model {spec.model} hashes to {model_hash}, but job {job.id} replaced a column embedded "
                          f"with {job.source_model_name} ({want_hash}); give that model (with its --prefix and "
                          "--max-seq-length); nothing was written")
    return SentenceTransformerEmbedder(spec, model_hash=model_hash)


def _passes(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job, names: shadow.Names,
            embedder: Embedder, opts: RollbackOptions) -> int:
    """Stale rows re-embedded into the previous column, a page per transaction, until what is
    left is under a page or stops shrinking (the rest is re-embedded in the swap back)."""
    done, previous = 0, None
    while True:
        left = _stale(conn, job)
        if left < opts.batch_size or (previous is not None and left >= previous):
            return done
        after: str | None = None
        while page := conn.execute(query("after_swap_page"),
                                   {"job_id": job.id, "after": after, "n": opts.batch_size}).fetchall():
            with conn.transaction():
                done += _re_embed(conn, info, job, names, embedder, page)
            after = page[-1]["row_id"]
            log.info("rollback_page", rows=done, after=after)
        previous = left


def _re_embed(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job, names: shadow.Names,
              embedder: Embedder | None, page: list[dict[str, Any]]) -> int:
    """One page of stale keys: their rows read, encoded by the old model (or left NULL), written
    where unchanged since the read; the keys settled that are right now (or whose row is gone)."""
    keys = [r["row_id"] for r in page]
    rows = conn.execute(info.statement("rows_by_ids"), {"ids": keys}).fetchall()
    written: set[str] = set()
    if embedder is None:
        conn.execute(info.statement("null_previous", column=names.previous), {"ids": keys})
        written = {r["id_text"] for r in rows}
    elif rows:
        texts = [r["content"] for r in rows if r["content"] is not None]
        encoded = iter(embedder.encode(texts)) if texts else iter(())
        vectors = [None if r["content"] is None else _text(next(encoded)) for r in rows]
        out = conn.execute(info.statement("write_previous", column=names.previous),
                           {"ids": [r["id"] for r in rows], "vectors": vectors,
                            "xmins": [r["xmin"] for r in rows]}).fetchall()
        written = {r["id_text"] for r in out}
    present = {r["id_text"] for r in rows}
    settled = [r for r in page if r["row_id"] in written or r["row_id"] not in present]
    conn.execute(query("after_swap_settled"), {"job_id": job.id, "row_ids": [r["row_id"] for r in settled],
                                               "seqs": [r["seq"] for r in settled]})
    return len(written) if embedder is not None else 0


def _text(vector: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in np.asarray(vector, dtype=np.float32)) + "]"


def _swap_back(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job, names: shadow.Names,
               embedder: Embedder | None, opts: RollbackOptions) -> tuple[int, int, float]:
    """One transaction, writers held off: the rest of the stale rows, then the swap back."""
    out: dict[str, Any] = {}

    def body(c: psycopg.Connection[Any]) -> None:
        c.execute(query("set_lock_timeout"), {"value": opts.cut_over_lock_timeout})
        began = time.monotonic()
        # every lock up front (ACCESS EXCLUSIVE for the renames too): asked for later, while an
        # application transaction that read the table waits for the registry row held here, it
        # would make a deadlock whose victim PostgreSQL may pick in the application
        c.execute(sql.Composed([query("lock_registry_row", registry=info.registry), sql.SQL("; "),
                                info.statement("lock_for_rewrite")]))
        rest = nulled = 0
        after: str | None = None
        while page := c.execute(query("after_swap_page"), {"job_id": job.id, "after": after,
                                                            "n": opts.batch_size}).fetchall():
            if embedder is None:
                nulled += len(page)
            rest += _re_embed(c, info, job, names, embedder, page)
            after = page[-1]["row_id"]
        column = c.execute(query("column_info"), {"table_oid": info.oid, "column": info.column}).fetchone()
        if column is None:
            raise ReembedError(f"{info.qualified}.{info.column} is gone; nothing was swapped back")
        carried = carry.read(c, info, int(column["attnum"]))
        carried.check(info, when="nothing was swapped back")
        attributes = carry.read_column(c, info.oid, info.column)  # what the live column has now goes back with it
        indexes = {i.name: carry.read_index(c, info, i.name) for i in names.indexes}
        carry.drop(c, carried)
        shadow.stop_recording(c, info, job.id)
        c.execute(info.statement("drop_column_if_exists", column=info.column))  # its indexes go with it
        shadow.rename_column(c, info, names.previous, info.column)
        carry.apply_column(c, info, info.column, attributes)
        for i in names.indexes:
            shadow.rename_index(c, info, i.previous, i.name)
            carry.apply_index(c, info, i.name, indexes[i.name])
        carry.create(c, carried, old=job.target_dimension, new=job.source_typmod or job.target_dimension)
        source = job.source
        if source is None:
            raise ReembedError(f"job {job.id} recorded no model before it")
        c.execute(query("upsert_registry", registry=info.registry), source.as_dict())
        bridge.at_swap_back(c, info, job)  # the bridge maps into the old model's space again
        c.execute(query("notify_model_changed"), {"payload": json.dumps(source.as_dict())})
        c.execute(query("set_previous_state"), {"state": "rolled_back", "job_id": job.id})
        out.update(rest=rest, nulled=nulled, held=time.monotonic() - began)

    _retrying(conn, "swap_back", body)
    return out["rest"], out["nulled"], out["held"]


def _retrying(conn: psycopg.Connection[Any], what: str, body: Any) -> None:
    """`body` in one transaction; a lock not granted in time rolls it back and tries again
    (the application is never the one kept waiting long), for up to two minutes."""
    deadline, wait = time.monotonic() + _TRIES_FOR, 0.1
    while True:
        try:
            with conn.transaction():
                body(conn)
            return
        except psycopg.errors.LockNotAvailable:
            if time.monotonic() > deadline:
                raise
            log.info("lock_not_granted", step=what, retry_in_secs=wait)
            time.sleep(wait)
            wait = min(wait * 2, 2.0)


def _drop_previous(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job, names: shadow.Names) -> None:
    conn.execute(query("set_lock_timeout"), {"value": "200ms"})
    shadow.stop_recording(conn, info, job.id)
    conn.execute(info.statement("drop_column_if_exists", column=names.previous))  # its indexes go with it
    bridge.at_cleanup(conn, info, job)  # kept as the identity: applications keep calling it
    conn.execute(query("set_previous_state"), {"state": "cleaned", "job_id": job.id})
