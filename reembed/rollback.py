"""`reembed rollback` and `reembed cleanup`: what happens to a shadow job's previous column.

After the swap the previous column keeps the old vectors, and reembed_after_swap the keys of
every row the application has inserted, or whose content it has changed, since: exactly the
rows whose previous vector is stale.

rollback: with the old model (`--model`, checked against the hash the job recorded), the stale
rows are re-embedded into the previous column, a page per transaction, encoded outside it (each
page's keys settled with it, up to the record read: a newer write by the application stays
recorded; a pass ends at the newest record it saw when it began), until what is left is under a
page; then the bounded swap back (reembed.cutover, as a job's cut-over): the rest encoded (and, if
its writes alone would run long, written) ahead with no lock, until what is left fits
--max-writers-held; then one transaction holds writers and readers off (the renames need ACCESS
EXCLUSIVE), re-embeds the rest and swaps back: the new column and its indexes are dropped, the
previous ones take the original names with what the live ones carry now (reembed.carry), the
views, rules, triggers and policies on the column are created again on it, the registry names the
old model again, NOTIFY. Without the old model it refuses while rows are stale, unless
--leave-stale-null: their previous vector is set NULL (ahead, and in the swap back).
cleanup: the previous column (its indexes go with it) and the recording are dropped.
Both hold the table's lock, both are idempotent (a second run finds nothing to do: exit 2)
and safe to kill: every transaction leaves the table as a re-run expects it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, TypeVarTuple

import numpy as np
import psycopg
import structlog
from psycopg import sql

from reembed import bridge, capture, carry, db, lease, shadow
from reembed import checkpoint as ckpt
from reembed.batches import Batch
from reembed.cutover import Bound, CutOver
from reembed.embedder import SentenceTransformerEmbedder, fingerprint
from reembed.encoding import Embedder
from reembed.errors import ConfigError, Interrupted, ReembedError
from reembed.progress import Pace
from reembed.queries import query
from reembed.report import Report
from reembed.settings import RollbackOptions, Settings
from reembed.signals import StopSignal
from reembed.signature import Signature
from reembed.target import TableInfo, inspect_target

log = structlog.get_logger()

_TRIES_FOR = 120.0  # seconds a swap back or a cleanup keeps trying for its locks
_SWAP_TAIL = 0.05  # the drops, renames and re-creations after the last catch-up, within --max-writers-held

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


@contextlib.contextmanager
def _kept_job(settings: Settings, what: str) -> Iterator[tuple[psycopg.Connection[Any], TableInfo, ckpt.Job]]:
    """The control connection, the target, and the shadow job whose previous column is kept
    (a ConfigError, exit 2, when there is none: nothing to `what`)."""
    conn = db.connect(settings.target.conninfo(), role="control", vectors=False, autocommit=True)
    try:
        with db.translated():
            info = inspect_target(conn, settings.target)
            carry.finish_not_null(conn, info)  # what a rollback killed after its swap back left to finish
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
        if embedder is None and stale and names.not_null:
            raise ConfigError(
                f"{stale} rows were written after the swap and {info.column} was NOT NULL: their previous vectors "
                f"cannot be left NULL; give the old model (--model, {source.name}) to re-embed them; nothing was "
                "written")
        if embedder is None and stale and not opts.leave_stale_null:
            raise ConfigError(
                f"{stale} rows were written after the swap: their previous vectors are stale; give the old model "
                f"(--model, {source.name}) to re-embed them, or pass --leave-stale-null to swap back with those "
                "rows' embedding NULL; nothing was written")
        _check_added_since(conn, info, names)
        _check_bridges_into_new(conn, info, job, source)
        bridge.check_owners(conn, info)  # the swap back redefines the bridge's function
        held = lease.take(conn, conninfo, info.oid, table=info.qualified, column=info.column,
                          break_stale_lock=False, stale_after=90.0)
        stop = StopSignal()
        stop.install()
        try:
            work = db.connect(conninfo, role="rollback", vectors=True, autocommit=True)
            writer = db.connect(conninfo, role="rollback-write", vectors=True, autocommit=True)
            try:
                for c in (work, writer):  # a page joins the table by key: never a hash of the whole table
                    c.execute(query("writer_session"))
                stale_rows = AfterSwap(info, job, names, embedder, batch_size=opts.batch_size, writer=writer)
                cut = CutOver()
                if embedder is not None:
                    _passes(work, stale_rows, stop, writes=cut.writes)
                done = cut.run(
                    stale_rows, bound=Bound(opts.max_writers_held, _SWAP_TAIL), stop=stop,
                    read=lambda body: body(work),
                    transaction=lambda body: _retrying(work, "swap_back", _with_lock_timeout,
                                                       opts.cut_over_lock_timeout, body),
                    swap=lambda c: _swap_back(c, info, job, names),
                    record=lambda c, secs: None)
                carry.finish_not_null(work, info)  # the previous column's NOT NULL, validated with no hold
            finally:
                work.close()
                writer.close()
        finally:
            stop.restore()
            stop.close()
            held.release()
    secs = time.monotonic() - started
    re_embedded, nulled = stale_rows.re_embedded, stale_rows.nulled
    message = (f"rolled back {info.qualified}.{info.column} to {source.name} ({source.dimension}-d): "
               f"{re_embedded} stale rows re-embedded with it"
               + (f", {nulled} left NULL (--leave-stale-null)" if nulled else "")
               + f"; writers held off {done.secs:.3f} s")
    log.info("rolled_back", job_id=job.id, re_embedded=re_embedded, left_null=nulled,
             writers_held_secs=round(done.secs, 3), caught_up_under_the_hold=done.rows)
    return Report(state="rolled_back", job_id=job.id, rows_updated=re_embedded,
                  duration_secs=secs, model_name=source.name, dimension=source.dimension, model_hash=source.hash,
                  message=message,
                  details={"stale_rows": stale, "left_null": nulled, "writers_held_secs": round(done.secs, 4),
                           "tries": done.tries})


def cleanup(settings: Settings) -> Report:
    started = time.monotonic()
    with _kept_job(settings, "clean up") as (conn, info, job):
        names = shadow.Names.of(job)
        bridge.check_owners(conn, info, create=False)  # cleanup comments the bridge's function
        held = lease.take(conn, settings.target.conninfo(), info.oid, table=info.qualified, column=info.column,
                          break_stale_lock=False, stale_after=90.0)
        try:
            _retrying(conn, "cleanup", _drop_previous, info, job, names)
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


def _check_bridges_into_new(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job, source: Signature) -> None:
    """Before any write: a bridge installed since the swap maps into the space the column holds now
    (the job's model); after the swap back it would map into a space the column no longer holds (a
    failed query when the dimensions differ, wrong neighbours when they agree)."""
    for b in bridge.current(conn, info.qualified, info.column):
        if b.state == "mapping" and b.source_hash == job.target_hash:
            raise ConfigError(
                f"the bridge {b.called} maps {b.target_model_name}'s vectors into {b.source_model_name}'s space, "
                f"which {info.qualified}.{info.column} holds since the swap: after the swap back the column holds "
                f"{source.name}'s and the bridge would map into a space it no longer holds; move the application "
                f"off it and `reembed bridge --drop --bridge-function {b.function_name}`, then roll back; nothing "
                "was written")


def _check_added_since(conn: psycopg.Connection[Any], info: TableInfo, names: shadow.Names) -> None:
    """What was created on the new column after the swap and would go with it (an index, a
    constraint): refused, by name (views, rules, triggers and policies are carried back)."""
    ours = {i.name for i in names.indexes}
    found = conn.execute(query("column_dependents"), {"table_oid": info.oid, "attnum": info.attnum}).fetchall()
    added = [f"{r['kind']} {r['object_name'] or r['description']}" for r in found
             if (r["kind"] == "index" and r["object_name"] not in ours)
             or (r["kind"] == "constraint" and r["contype"] != "n")]
    if added:
        raise ConfigError(f"{', '.join(added)} created on {info.qualified}.{info.column} after the swap would go "
                          "with that column when rolling back drops it; drop each first (and create it on the "
                          "previous column if it is wanted there), then roll back; nothing was written")


def _stale(conn: psycopg.Connection[Any], job: ckpt.Job) -> int:
    row = conn.execute(query("after_swap_count"), {"job_id": job.id}).fetchone()
    return int(row["n"]) if row else 0


def _old_model(settings: Settings, job: ckpt.Job, want_hash: str) -> Embedder | None:
    if settings.model is None:
        return None
    spec = settings.model.for_target(settings.target)
    _, model_hash = fingerprint(spec)
    if model_hash != want_hash:
        raise ConfigError(f"--model {spec.model} hashes to {model_hash}, but job {job.id} replaced a column embedded "
                          f"with {job.source_model_name} ({want_hash}); give that model (with its --prefix and "
                          "--max-seq-length); nothing was written")
    return SentenceTransformerEmbedder(spec, model_hash=model_hash)


class AfterSwap:
    """The rows written after the swap (reembed_after_swap), whose previous vectors are stale: read,
    encoded by the old model (or left NULL without it), written into the previous column where
    unchanged since the read, and settled with their record (a newer write stays recorded). A
    `capture.Source` for the bounded swap back (reembed.cutover)."""

    def __init__(self, info: TableInfo, job: ckpt.Job, names: shadow.Names, embedder: Embedder | None, *,
                 batch_size: int, writer: psycopg.Connection[Any]) -> None:
        self.info, self.job, self.names, self.embedder = info, job, names, embedder
        self.batch_size = batch_size
        self.writer = writer  # the connection of the writes ahead (none of the swap back's locks)
        self.re_embedded = 0  # rows written with the old model's vectors, ahead and under the hold
        self.nulled = 0  # rows left NULL (--leave-stale-null)

    def backlog(self, conn: psycopg.Connection[Any], ahead: capture.Encoded) -> capture.Backlog:
        """The keys recorded up to now (a pass ends at the newest record it saw when it began:
        an application that inserts faster than the old model encodes cannot make it endless)."""
        upto = conn.execute(query("after_swap_newest"), {"job_id": self.job.id}).fetchone()
        out = capture.Backlog(0, 0, [])
        after: str | None = None
        while upto and upto["seq"] is not None and (page := conn.execute(query("after_swap_page"), {
                "job_id": self.job.id, "after": after, "n": self.batch_size, "upto": upto["seq"]}).fetchall()):
            keys = [r["row_id"] for r in page]
            batch = Batch.of(-1, None, conn.execute(self.info.statement("rows_by_ids"), {"ids": keys}).fetchall())
            out.keys += len(page)
            if self.embedder is not None:
                out.unencoded += sum(1 for i in batch.present if (batch.id_texts[i], batch.xmins[i]) not in ahead)
            out.batches.append((page, batch))
            after = keys[-1]
        return out

    def encode_ahead(self, work: capture.Backlog, known: capture.Encoded) -> tuple[capture.Encoded, int]:
        done: capture.Encoded = {}
        for _, batch in work.batches:
            for i, vec in enumerate(self._encode(batch, known)):
                if vec is not None:
                    done[(batch.id_texts[i], batch.xmins[i])] = vec
        return done, work.unencoded

    def write_ahead(self, work: capture.Backlog, ahead: capture.Encoded) -> int:
        rows = 0
        for page, batch in work.batches:
            vectors = self._encode(batch, ahead)
            with self.writer.transaction():
                self.writer.execute(query("write_transaction_settings"))
                rows += self._write(self.writer, page, batch, vectors)
        return rows

    def final(self, conn: psycopg.Connection[Any], ahead: capture.Encoded, work: capture.Backlog) -> int:
        return sum(self._write(conn, page, batch, self._encode(batch, ahead)) for page, batch in work.batches)

    def hold(self, conn: psycopg.Connection[Any]) -> float:
        """The registry row, then ACCESS EXCLUSIVE for the renames, in one round trip: every lock up
        front (asked for later, while an application transaction that read the table waits for the
        registry row held here, it would make a deadlock whose victim could be the application)."""
        began = time.monotonic()
        conn.execute(sql.Composed([query("lock_registry_row", registry=self.info.registry), sql.SQL("; "),
                                   self.info.statement("lock_for_rewrite")]))
        return began

    def _encode(self, batch: Batch, known: capture.Encoded) -> list[np.ndarray | None]:
        vectors: list[np.ndarray | None] = [None] * len(batch.ids)
        if self.embedder is None:
            return vectors
        todo = []
        for i in batch.present:
            vectors[i] = known.get((batch.id_texts[i], batch.xmins[i]))
            if vectors[i] is None:
                todo.append(i)
        if todo:
            for i, vec in zip(todo, self.embedder.encode([batch.texts[i] or "" for i in todo]), strict=True):
                vectors[i] = vec
        return vectors

    def _write(self, conn: psycopg.Connection[Any], page: list[dict[str, Any]], batch: Batch,
               vectors: list[np.ndarray | None]) -> int:
        """One page, inside the caller's transaction: its rows' previous vectors where unchanged since
        the read (NULL without the old model), and the keys settled that are right now or gone."""
        previous = self.names.previous
        if self.embedder is None:
            out = conn.execute(self.info.statement("null_previous", column=previous),
                               {"ids": batch.id_texts}).fetchall()
            self.nulled += len(out)
        else:
            out = conn.execute(self.info.statement("write_previous", column=previous), {
                "ids": batch.id_texts, "vectors": [None if v is None else _text(v) for v in vectors],
                "xmins": batch.xmins}).fetchall()
            self.re_embedded += len(out)
        written = {r["id_text"] for r in out}
        present = set(batch.id_texts)
        settled = [r for r in page if r["row_id"] in written or r["row_id"] not in present]
        conn.execute(query("after_swap_settled"), {"job_id": self.job.id,
                                                   "row_ids": [r["row_id"] for r in settled],
                                                   "seqs": [r["seq"] for r in settled]})
        return len(written)


def _passes(conn: psycopg.Connection[Any], stale: AfterSwap, stop: StopSignal, *, writes: Pace) -> None:
    """Before the swap back, no lock held: passes over the stale rows, a page per transaction
    (encoded outside it), until what is left is under a page or stops shrinking; the bounded swap
    back does the rest. `writes`: the pace of the page writes, measured (the swap back's
    prediction of its hold)."""
    previous = None
    while not stop.requested:
        left = _stale(conn, stale.job)
        if left < stale.batch_size or (previous is not None and left >= previous):
            return
        newest = conn.execute(query("after_swap_newest"), {"job_id": stale.job.id}).fetchone()
        upto = newest["seq"] if newest else None
        after: str | None = None
        while not stop.requested and (page := conn.execute(query("after_swap_page"), {
                "job_id": stale.job.id, "after": after, "n": stale.batch_size, "upto": upto}).fetchall()):
            keys = [r["row_id"] for r in page]
            batch = Batch.of(-1, None, conn.execute(stale.info.statement("rows_by_ids"), {"ids": keys}).fetchall())
            vectors = stale._encode(batch, {})
            started = time.monotonic()
            with conn.transaction():
                conn.execute(query("write_transaction_settings"))
                stale._write(conn, page, batch, vectors)
            writes.measured(len(page), time.monotonic() - started)
            after = keys[-1]
            log.info("rollback_page", rows=stale.re_embedded, after=after)
        previous = left
    raise Interrupted(f"stopped ({stop.reason}) before the swap back; nothing was swapped; re-run rollback to "
                      "finish", exit_code=stop.exit_code)


def _text(vector: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in np.asarray(vector, dtype=np.float32)) + "]"


def _swap_back(c: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job, names: shadow.Names) -> None:
    """Under the hold, every stale row caught up: the new column and its indexes dropped, the previous
    ones take the original names with what the live column and indexes carry now, the views, rules,
    triggers and policies on the column created again on it, the registry names the old model."""
    column = c.execute(query("column_info"), {"table_oid": info.oid, "column": info.column}).fetchone()
    if column is None:
        raise ReembedError(f"{info.qualified}.{info.column} is gone; nothing was swapped back")
    carried = carry.read(c, info, int(column["attnum"]))
    carried.check(info, when="nothing was swapped back")
    columns = carry.read_columns(c, info, info.column)  # what the live column has now goes back with it
    indexes = shadow.read_indexes(c, info, names.indexes)
    renames = shadow.index_names(c, info, names.indexes)
    carry.drop(c, carried)
    shadow.stop_recording(c, info, job.id)
    c.execute(info.statement("drop_column_if_exists", column=info.column))  # its indexes go with it
    shadow.rename_column(c, info, names.previous, info.column)
    carry.apply_columns(c, columns, info.column)
    if names.not_null:  # the swap took it off the previous column: back, validated after the hold
        carry.hold_not_null(c, info, info.column, job_id=job.id, name=names.not_null_name)
    for where, name, _, previous in renames:  # each partition's index of a partitioned one too
        shadow.rename_index(c, where, previous, name)
        carry.apply_index(c, where, name, indexes[(where.ident[0], name)])
    carry.create(c, carried, old=job.target_dimension, new=job.source_typmod or job.target_dimension,
                 column=info.column)
    source = job.source
    if source is None:
        raise ReembedError(f"job {job.id} recorded no model before it")
    c.execute(query("upsert_registry", registry=info.registry), source.as_dict())
    bridge.at_swap_back(c, info, job)  # the bridge maps into the old model's space again
    c.execute(query("notify_model_changed"), {"payload": json.dumps(source.as_dict())})
    c.execute(query("set_previous_state"), {"state": "rolled_back", "job_id": job.id})


def _with_lock_timeout(conn: psycopg.Connection[Any], lock_timeout: str,
                       body: Callable[[psycopg.Connection[Any]], T]) -> T:
    conn.execute(query("set_lock_timeout"), {"value": lock_timeout})
    return body(conn)


def _retrying(conn: psycopg.Connection[Any], what: str, body: Callable[[psycopg.Connection[Any], *Ts], T],
              *args: *Ts) -> T:
    """body(conn, *args) in one transaction; a lock not granted in time rolls it back and tries
    again (the application is never the one kept waiting long), for up to two minutes."""
    deadline, wait = time.monotonic() + _TRIES_FOR, 0.1
    while True:
        try:
            with conn.transaction():
                conn.execute(query("write_transaction_settings"))  # the application's triggers fire on it
                return body(conn, *args)
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
