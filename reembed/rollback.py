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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar, TypeVarTuple

import numpy as np
import psycopg
import structlog

from reembed import bridge, capture, carry, db, lease, shadow
from reembed import checkpoint as ckpt
from reembed.batches import Batch
from reembed.cutover import Bound, CutOver, Several, flip_registry
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


@dataclass(frozen=True)
class _Kept:
    """A target and the shadow job whose previous column is kept on it."""

    info: TableInfo
    job: ckpt.Job
    names: shadow.Names

    @property
    def label(self) -> str:
        return f"{self.info.qualified}.{self.info.column}"


@contextlib.contextmanager
def _kept_jobs(settings: Settings, what: str) -> Iterator[tuple[psycopg.Connection[Any], list[_Kept]]]:
    """The control connection, and each target with the shadow job whose previous column is kept on it
    (a ConfigError, exit 2, when there is none: nothing to `what`). A job over several tables swapped
    them together: they are rolled back (or cleaned up) together, every one named, in its order."""
    conn = db.connect(settings.target.conninfo(), role="control", vectors=False, autocommit=True)
    try:
        with db.translated():
            infos = [inspect_target(conn, target) for target in settings.all_targets]
            for info in infos:  # what a rollback killed after its swap back left to finish, on every table
                carry.finish_not_null(conn, info)
            kept = []
            for info in infos:
                job = _kept(conn, info, what)
                kept.append(_Kept(info, job, shadow.Names.of(job)))
            yield conn, _together(kept, what)
    finally:
        conn.close()


def _together(kept: list[_Kept], what: str) -> list[_Kept]:
    """The jobs of exactly one swap: one job over one table, or every table of one job over several
    (in the group's order; the swap back locks them in the order of their oids)."""
    groups = {k.job.group_id for k in kept}
    group = next((k.job.group for k in kept if k.job.group is not None), None)
    if group is None:
        if len(kept) > 1:
            raise ConfigError(f"{', '.join(k.label for k in kept)} were swapped by jobs of their own (jobs "
                              f"{', '.join(str(k.job.id) for k in kept)}): {what} each on its own (one --table); "
                              "nothing was written")
        return kept
    keys = {(k.info.qualified, k.info.column) for k in kept}
    if len(groups) > 1 or keys != set(group.keys):
        raise ConfigError(f"job group {group.id} swapped {group.said()} together: give exactly these tables "
                          f"({group.options()}) to {what}; nothing was written")
    order = {key: i for i, key in enumerate(group.keys)}
    return sorted(kept, key=lambda k: order[(k.info.qualified, k.info.column)])


def rollback(settings: Settings, opts: RollbackOptions) -> Report:
    started = time.monotonic()
    conninfo = settings.target.conninfo()
    with _kept_jobs(settings, "roll back") as (conn, kept):
        source = kept[0].job.source
        if source is None:
            raise ConfigError(f"job {kept[0].job.id} recorded no model before it (the registry was empty): there is "
                              "nothing to swap back to; `reembed cleanup` keeps the new vectors")
        if any(k.job.source != source for k in kept):
            raise ReembedError(f"the jobs of group {kept[0].job.group_id} recorded different models before them: "
                               f"{', '.join(f'{k.label}: {k.job.source_model_name}' for k in kept)}; nothing was "
                               "swapped back")
        embedder = _old_model(settings, kept[0].job, source.hash)
        stale = {k.job.id: _stale(conn, k.job) for k in kept}
        for k in kept:
            _check_stale(k, stale[k.job.id], source, embedder is not None, opts)
            _check_added_since(conn, k.info, k.names)
            _check_bridges_into_new(conn, k.info, k.job, source)
            bridge.check_owners(conn, k.info)  # the swap back redefines the bridge's function
        with contextlib.ExitStack() as stack:
            for oid, k in sorted({k.info.oid: k for k in kept}.items()):  # each table's lock, in their oids' order
                held = lease.take(conn, conninfo, oid, table=k.info.qualified, column=k.info.column,
                                  break_stale_lock=False, stale_after=90.0)
                stack.callback(held.release)
            stop = StopSignal()
            stop.install()
            stack.callback(stop.close)
            stack.callback(stop.restore)
            work = db.connect(conninfo, role="rollback", vectors=True, autocommit=True)
            stack.callback(work.close)
            writer = db.connect(conninfo, role="rollback-write", vectors=True, autocommit=True)
            stack.callback(writer.close)
            for c in (work, writer):  # a page joins the table by key: never a hash of the whole table
                c.execute(query("writer_session"))
            stale_rows = [AfterSwap(k.info, k.job, k.names, embedder, batch_size=opts.batch_size, writer=writer)
                          for k in kept]
            cut = CutOver()
            if embedder is not None:
                for rows in stale_rows:
                    _passes(work, rows, stop, writes=cut.writes)
            tables = [(k.info, True) for k in kept]
            source_of: capture.Source = stale_rows[0] if len(kept) == 1 else Several(
                stale_rows, hold=lambda c: capture.hold_tables(c, kept[0].info.registry, tables))
            done = cut.run(
                source_of, bound=Bound(opts.max_writers_held, _SWAP_TAIL * len(kept)), stop=stop,
                read=lambda body: body(work),
                transaction=lambda body: _retrying(work, "swap_back", _with_lock_timeout,
                                                   opts.cut_over_lock_timeout, body),
                swap=lambda c: _swap_back_all(c, kept, source),
                record=lambda c, secs: None, patience=_TRIES_FOR)
            for k in kept:
                carry.finish_not_null(work, k.info)  # the previous column's NOT NULL, validated with no hold
    secs = time.monotonic() - started
    re_embedded, nulled = sum(r.re_embedded for r in stale_rows), sum(r.nulled for r in stale_rows)
    message = (f"rolled back {', '.join(k.label for k in kept)} to {source.name} ({source.dimension}-d): "
               f"{re_embedded} stale rows re-embedded with it"
               + (f", {nulled} left NULL (--leave-stale-null)" if nulled else "")
               + f"; writers held off {done.secs:.3f} s")
    log.info("rolled_back", job_id=kept[0].job.id, group_id=kept[0].job.group_id, re_embedded=re_embedded,
             left_null=nulled, writers_held_secs=round(done.secs, 3), caught_up_under_the_hold=done.rows)
    details: dict[str, Any] = {"stale_rows": sum(stale.values()), "left_null": nulled,
                               "writers_held_secs": round(done.secs, 4), "tries": done.tries}
    if len(kept) > 1:
        details["group_id"] = kept[0].job.group_id
        details["tables"] = [{"table": k.info.qualified, "column": k.info.column, "job_id": k.job.id,
                              "stale_rows": stale[k.job.id], "re_embedded": r.re_embedded, "left_null": r.nulled}
                             for k, r in zip(kept, stale_rows, strict=True)]
    return Report(state="rolled_back", job_id=kept[0].job.group_id or kept[0].job.id, rows_updated=re_embedded,
                  duration_secs=secs, model_name=source.name, dimension=source.dimension, model_hash=source.hash,
                  message=message, details=details)


def _check_stale(k: _Kept, stale: int, source: Signature, model: bool, opts: RollbackOptions) -> None:
    if not model and stale and k.names.not_null:
        raise ConfigError(
            f"{stale} rows were written after the swap and {k.info.column} was NOT NULL: their previous vectors "
            f"cannot be left NULL; give the old model (--model, {source.name}) to re-embed them; nothing was "
            "written")
    if not model and stale and not opts.leave_stale_null:
        raise ConfigError(
            f"{stale} rows were written after the swap: their previous vectors are stale; give the old model "
            f"(--model, {source.name}) to re-embed them, or pass --leave-stale-null to swap back with those "
            "rows' embedding NULL; nothing was written")


def cleanup(settings: Settings) -> Report:
    started = time.monotonic()
    with _kept_jobs(settings, "clean up") as (conn, kept):
        for k in kept:
            bridge.check_owners(conn, k.info, create=False)  # cleanup comments the bridge's function
        with contextlib.ExitStack() as stack:
            for oid, k in sorted({k.info.oid: k for k in kept}.items()):
                held = lease.take(conn, settings.target.conninfo(), oid, table=k.info.qualified,
                                  column=k.info.column, break_stale_lock=False, stale_after=90.0)
                stack.callback(held.release)
            _retrying(conn, "cleanup", _drop_all_previous, kept)  # one transaction: all of them, or none
    dropped = [f"{k.info.qualified}.{k.names.previous}" + (
        f" and index {', '.join(i.previous for i in k.names.indexes)}" if k.names.indexes else "") for k in kept]
    message = (f"dropped {'; '.join(dropped)} and the record of rows written since the swap; the heap space the "
               "column took is reused as rows are updated (VACUUM FULL or pg_repack gives it back to the system)")
    for k in kept:
        log.info("cleaned_up", job_id=k.job.id, column=k.names.previous, table=k.info.qualified)
    job = kept[0].job
    return Report(state="cleaned", job_id=job.group_id or job.id, duration_secs=time.monotonic() - started,
                  model_name=job.target_model_name, dimension=job.target_dimension, model_hash=job.target_hash,
                  message=message)


def _drop_all_previous(conn: psycopg.Connection[Any], kept: list[_Kept]) -> None:
    for k in kept:
        _drop_previous(conn, k.info, k.job, k.names)


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
    """The model the previous column holds, checked by its hash: the one the registry recorded, which
    covers the text the table was read by (`--content`), or not (a job over several tables whose texts
    differ records the model's own)."""
    if settings.model is None:
        return None
    spec = settings.model.for_target(settings.target)
    _, model_hash = fingerprint(spec)
    if model_hash != want_hash and fingerprint(replace(spec, content=None, null_content="null"))[1] != want_hash:
        raise ConfigError(f"--model {spec.model} hashes to {model_hash}, but job {job.id} replaced a column embedded "
                          f"with {job.source_model_name} ({want_hash}); give that model (with its --prefix and "
                          "--max-seq-length); nothing was written")
    return SentenceTransformerEmbedder(spec, model_hash=want_hash)


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
        return capture.hold_tables(conn, self.info.registry, [(self.info, True)])

    def locked(self) -> list[tuple[int, bool]]:
        return [(self.info.oid, True)]

    def _encode(self, batch: Batch, known: capture.Encoded) -> list[np.ndarray | None]:
        vectors: list[np.ndarray | None] = [None] * len(batch.ids)
        if self.embedder is None:
            return vectors
        todo = []
        for i in batch.present:
            vec = known.get((batch.id_texts[i], batch.xmins[i]))  # (only vectors: a failure raises here)
            vectors[i] = vec if isinstance(vec, np.ndarray) else None
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
    bridge.at_swap_back(c, info, job)  # the bridge maps into the old model's space again
    c.execute(query("set_previous_state"), {"state": "rolled_back", "job_id": job.id})


def _swap_back_all(c: psycopg.Connection[Any], kept: list[_Kept], source: Signature) -> None:
    """Every table swapped back, in order, then the registry names the old model again, once."""
    for k in kept:
        _swap_back(c, k.info, k.job, k.names)
    flip_registry(c, kept[0].info.registry, source)


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
