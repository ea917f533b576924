"""Partitions attached or detached while a job runs: found, and taken in.

A partitioned table's partitions are recorded at prepare (reembed_checkpoint.partitions). A job that
resumes, and finalize before its first step, compare them with the table's as they are now:

- a partition attached (ATTACH PARTITION, or CREATE TABLE ... PARTITION OF, as pg_partman does when a
  month begins) is taken in: its rows, which the capture triggers may never have seen (an attached
  table's rows were not inserted through the table), are captured for the catch-up, and each of the
  job's partitioned indexes gains its index (the one PostgreSQL gave it if the parent index existed,
  else `<partition>_<column>_idx`). It is refused, with the job intact, when it brings objects of its
  own on the column (an index, view or trigger made on it apart): drop them, or detach it, and re-run.
- a partition detached or dropped is no longer the table's: it leaves the job (its index steps with
  it), and what it is left with is said (in place: what the job had written, its column without a
  dimension, its index dropped).

Inside the cut-over's hold, which no ATTACH or DETACH can pass (both need a lock the hold conflicts
with), the partitions are checked once more: one attached or detached since finalize began fails the
cut-over with nothing of it committed, and a re-run takes it in.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import psycopg
import structlog
from psycopg.types.json import Jsonb

from reembed import checkpoint as ckpt
from reembed import dependents, partitions
from reembed.context import RunContext
from reembed.errors import ConfigError, ReembedError
from reembed.partitions import ChildIndex, Partition
from reembed.queries import query
from reembed.target import TableInfo

log = structlog.get_logger()


def record(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job) -> None:
    """Inside prepare's transaction: the partitions the job starts with."""
    if not info.partitioned:
        return
    found = [p.as_json() for p in partitions.tree(conn, info)]
    conn.execute(query("record_partitions"), {"partitions": Jsonb(found), "dependents": None, "job_id": job.id})


def reconcile(ctx: RunContext) -> None:
    """The partitions now against the job's (a resumed job's, finalize's before its steps): taken in."""
    if not ctx.info.partitioned or ctx.active.partitions is None:
        return
    if ctx.lease.write(_reconcile, ctx, on=ctx.control, what="partitions"):
        ctx.state.advance(ctx.lease.read(ckpt.reload, ctx.active, on=ctx.control, what="reload_job"))


def check_unchanged(conn: psycopg.Connection[Any], ctx: RunContext) -> None:
    """Under the cut-over's hold: the partitions are the job's (else nothing of the cut-over commits)."""
    if not ctx.info.partitioned or ctx.active.partitions is None:
        return
    added, gone = partitions.changes(_recorded(ctx.active), partitions.tree(conn, ctx.info))
    if added or gone:
        raise ReembedError(f"partitions of {ctx.info.qualified} changed while the job finalized "
                           f"({_said(added, gone)}); nothing of the cut-over was committed: re-run, and the job "
                           "takes them in")


def _recorded(job: ckpt.Job) -> list[Partition]:
    return [Partition.from_json(p) for p in job.partitions or []]


def _said(added: list[Partition], gone: list[Partition]) -> str:
    parts = []
    if added:
        parts.append(f"attached: {partitions.said(added)}")
    if gone:
        parts.append(f"detached or dropped: {', '.join(p.label for p in gone)}")
    return "; ".join(parts)


def _reconcile(conn: psycopg.Connection[Any], ctx: RunContext) -> bool:
    info, job = ctx.info, ckpt.reload(conn, ctx.active)
    try:
        now = partitions.tree(conn, info)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (attached while job {job.id} ran; the job is intact: detach it and re-run)") from None
    added, gone = partitions.changes(_recorded(job), now)
    if not added and not gone:
        return False
    found = dependents.recorded(job)
    if not (job.strategy == "shadow" and "cut_over" in job.steps):  # a shadow job's indexes are swapped already
        _refuse_own_objects(conn, info, job, added)
        taken: set[tuple[str, str]] = set()
        found = [_taken_in(conn, info, d, added, gone, taken) for d in found
                 if d.table is None or d.table not in {p.ident for p in gone}]
    schema = conn.execute(query("tool_schema")).fetchone()
    for p in added:  # after the cut-over the registry names the new model: the application's rows, as any
        if p.leaf and "cut_over" not in job.steps:
            conn.execute(partitions.relation(info, p).statement("capture_every_key", changes=(
                schema["schema"] if schema else "public", "reembed_changes")), {"job_id": job.id})
    conn.execute(query("record_partitions"), {"partitions": Jsonb([p.as_json() for p in now]),
                                              "dependents": Jsonb([d.as_json() for d in found]), "job_id": job.id})
    if added:
        log.warning("partitions_attached", partitions=[p.label for p in added],
                    detail="attached while the job ran: their rows are re-embedded by the catch-up and their "
                           "indexes built with the others")
    if gone:
        left = ("what the job had written to its rows, its column without a dimension and its indexes dropped"
                if job.strategy == "in_place" and job.source_typmod != job.target_dimension
                else "what the job had written to its rows")
        log.warning("partitions_detached", partitions=[p.label for p in gone],
                    detail=f"detached or dropped while the job ran: no longer the table's, they leave the job with "
                           f"{left}")
    return True


def _refuse_own_objects(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job,
                        added: list[Partition]) -> None:
    """An attached partition with objects of its own on the column (not its parent's, inherited)."""
    own = []
    for p in added:
        for row in conn.execute(query("column_dependents"), {"table_oid": p.oid, "attnum": p.attnum}).fetchall():
            if not row["inherited"] and not row["object_name"].startswith("reembed_"):
                own.append(f"{row['description']} (on {p.label})")
    if own:
        raise ConfigError(f"partitions attached to {info.qualified} while job {job.id} ran have objects of their own "
                          f"on {info.column}: {'; '.join(own)}; drop them (or detach the partition) and re-run: the "
                          "job is intact and takes the partition in")


def _taken_in(conn: psycopg.Connection[Any], info: TableInfo, d: dependents.Dependent, added: list[Partition],
              gone: list[Partition], taken: set[tuple[str, str]]) -> dependents.Dependent:
    """A partitioned index of the job, with an index for each partition attached below it and
    without those of the partitions gone."""
    if not d.partitioned or d.action not in (dependents.REBUILD, dependents.REINDEX, dependents.SHADOW):
        return d
    gone_tables = {p.ident for p in gone}
    children = [c for c in d.child_indexes if c.table not in gone_tables]
    top_table = d.table or info.ident
    body = partitions.after_using(d.definition or "", d.method)
    for p in added:
        if p.parent == top_table:
            parent = (top_table[0], d.name)
        else:
            above = next((c for c in children if c.table == p.parent), None)
            if above is None:
                continue  # below a partition made apart: not this index's tree
            parent = above.ident
        attached = partitions.attached_under(conn, parent, p.oid)
        name = attached["name"] if attached is not None else partitions.free_name(
            conn, p.schema, f"{p.name}_{info.column}_idx", {n for s, n in taken if s == p.schema})
        taken.add((p.schema, name))
        children.append(ChildIndex(table=p.ident, name=name, parent=parent, leaf=p.leaf, body=body, level=p.level,
                                   original=body))
    return replace(d, children=[c.as_json() for c in children])
