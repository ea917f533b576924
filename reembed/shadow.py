"""--strategy shadow: search keeps serving the old vectors until one atomic swap.

Prepare adds a shadow column of the target type beside the live one (catalog only: no rewrite,
no typmod relaxed); batches, catch-ups and the capture write and watch it, and the live
column, its indexes and everything that depends on it are never touched while the job runs.
Finalize catches up, builds every index the inventory found on the live column again on the
shadow (CONCURRENTLY, from its own definition: opclass, parameters, predicate), checks them
valid, catches up again, runs the quality gate (reembed.gate), then swaps in one short
transaction (the bounded cut-over of reembed.cutover: writers held off for the last catch-up,
readers only for the renames): the live column and its indexes become `<name>_previous`, the
shadow ones take the original names, every view, trigger and policy on the column is created
again on the new column (owner, grants, options, comments), the registry names the new model,
NOTIFY. From the swap on, the keys of rows the application writes are recorded
(reembed_after_swap), so that `reembed rollback` knows exactly which previous vectors are
stale; `reembed cleanup` drops the previous column and the recording.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.types.json import Jsonb

from reembed import bridge, capture, carry, cutover, dependents, failures, finalize, gate, partitions, repartition
from reembed import checkpoint as ckpt
from reembed.context import FinalizeStep, Hold, RunContext
from reembed.cutover import CutOver
from reembed.errors import ConfigError, InternalError, ReembedError
from reembed.partitions import ChildIndex
from reembed.queries import query
from reembed.target import TableInfo

log = structlog.get_logger()

PREVIOUS = "_previous"
_SWAP_TAIL = 0.05  # the renames and re-creations after the last catch-up, within --max-writers-held
_SMALL_BACKLOG = 16  # the last catch-up before the swap goes on until fewer keys than this are left
_NAME_BYTES = 63  # NAMEDATALEN - 1


def name_with(base: str, suffix: str) -> str:
    """`base` + `suffix` within PostgreSQL's 63 bytes: when it does not fit, `base` is cut (on a
    character boundary) and a short digest of the whole of it added, so that two long names that
    differ only past the cut never give the same name."""
    if len((base + suffix).encode()) <= _NAME_BYTES:
        return base + suffix
    tag = "_" + hashlib.sha256(base.encode()).hexdigest()[:8]
    room = _NAME_BYTES - len((tag + suffix).encode())
    return base.encode()[:room].decode(errors="ignore") + tag + suffix


@dataclass(frozen=True)
class ShadowIndex:
    """An index of the live column and its twin on the shadow column, by their names at each stage."""

    name: str  # the live index's name (the shadow one's after the swap)
    shadow: str  # the twin's name while the job runs
    previous: str  # the live index's name after the swap
    definition: str  # CREATE INDEX of the twin on the shadow column
    method: str | None
    relation: tuple[str, str] | None = None  # an index made on one partition only: that partition
    # a partitioned index: each partition's index and its twin (from the job's inventory; None: a plain index)
    children: tuple[ShadowChild, ...] | None = None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "shadow": self.shadow, "previous": self.previous,
                "definition": self.definition, "method": self.method,
                "relation": list(self.relation) if self.relation else None}

    @classmethod
    def from_json(cls, data: dict[str, Any], recorded: dict[tuple[str, tuple[str, ...]], dependents.Dependent],
                  suffix: str, column: str, shadow: str) -> ShadowIndex:
        relation = (data["relation"][0], data["relation"][1]) if data.get("relation") else None
        live = recorded.get((data["name"], relation or ()))
        children = None if live is None or not live.partitioned else tuple(
            ShadowChild.of(c, suffix, column, shadow) for c in live.child_indexes)
        return cls(name=data["name"], shadow=data["shadow"], previous=data["previous"],
                   definition=data["definition"], method=data["method"], relation=relation, children=children)


@dataclass(frozen=True)
class ShadowChild:
    """One partition's index of a partitioned live index, and its twin on the shadow column."""

    live: ChildIndex
    twin: ChildIndex  # built below the twin parent, on the shadow column; takes the live one's name at the swap
    previous: str  # the live one's name after the swap

    @classmethod
    def of(cls, c: ChildIndex, suffix: str, column: str, shadow: str) -> ShadowChild:
        twin = replace(c, name=name_with(c.name, suffix), parent=(c.parent[0], name_with(c.parent[1], suffix)),
                       body=dependents.rename_refs(c.body, column, shadow))
        return cls(c, twin, name_with(c.name, PREVIOUS))


@dataclass(frozen=True)
class Names:
    """A shadow job's columns and indexes (recorded on the job row at prepare)."""

    column: str  # the live column (the shadow's name after the swap)
    shadow: str  # the shadow column while the job runs
    previous: str  # the live column after the swap
    indexes: tuple[ShadowIndex, ...]
    not_null: bool  # the live column is NOT NULL: carried to the new column at the swap, from the previous
    not_null_name: str | None = None  # its constraint's name (PostgreSQL 18 names them), given back after

    def as_json(self) -> dict[str, Any]:
        return {"column": self.column, "shadow": self.shadow, "previous": self.previous,
                "indexes": [i.as_json() for i in self.indexes], "not_null": self.not_null,
                "not_null_name": self.not_null_name}

    @classmethod
    def of(cls, job: ckpt.Job) -> Names:
        data = job.shadow
        if data is None:
            raise InternalError(f"job {job.id} is a shadow job but recorded no shadow column")
        recorded = {(d.name, tuple(d.relation or ())): d for d in dependents.recorded(job) if d.is_index}
        suffix = f"_reembed{job.id}"
        return cls(column=data["column"], shadow=data["shadow"], previous=data["previous"],
                   indexes=tuple(ShadowIndex.from_json(i, recorded, suffix, data["column"], data["shadow"])
                                 for i in data["indexes"]),
                   not_null=bool(data.get("not_null")), not_null_name=data.get("not_null_name"))


def plan_names(info: TableInfo, job_id: int, found: list[dependents.Dependent], *, not_null: bool,
               not_null_name: str | None = None) -> Names:
    suffix = f"_reembed{job_id}"
    shadow = name_with(info.column, suffix)
    indexes = []
    for d in found:
        if d.action != dependents.SHADOW or d.definition is None:
            continue
        twin = name_with(d.name, suffix)
        body = dependents.rename_refs(dependents.after_using(d.definition, d.method), info.column, shadow)
        statement = sql.SQL("CREATE INDEX {name} ON {table} USING ").format(
            name=sql.Identifier(twin), table=sql.Identifier(*(d.table or info.ident))).as_string() + body
        children = None if not d.partitioned else tuple(
            ShadowChild.of(c, suffix, info.column, shadow) for c in d.child_indexes)
        indexes.append(ShadowIndex(d.name, twin, name_with(d.name, PREVIOUS), statement, d.method, d.table, children))
    return Names(info.column, shadow, name_with(info.column, PREVIOUS), tuple(indexes), not_null, not_null_name)


def twin_dependent(i: ShadowIndex, attributes: dict[str, Any] | None) -> dependents.Dependent:
    """What finalize builds for a live index: its twin on the shadow column (a partitioned one's
    partition by partition, under its own names)."""
    return dependents.Dependent("index", i.shadow, dependents.REBUILD, definition=i.definition, method=i.method,
                                attributes=attributes, relation=list(i.relation) if i.relation else None,
                                children=None if i.children is None else [c.twin.as_json() for c in i.children])


def check_table(conn: psycopg.Connection[Any], info: TableInfo) -> None:
    """Before any write: the names the swap will give must be free."""
    previous = name_with(info.column, PREVIOUS)
    if conn.execute(query("column_info"), {"table_oid": info.oid, "column": previous}).fetchone() is not None:
        raise ConfigError(f"{info.qualified} already has a column {previous}: a shadow job renames "
                          f"{info.column} to it at the swap; `reembed cleanup` drops a previous column a "
                          "shadow job kept, or rename it; nothing was written")


def check_names(conn: psycopg.Connection[Any], info: TableInfo, names: Names) -> None:
    """Inside prepare, before its DDL: the shadow column's and the indexes' names at each stage are
    free and distinct (a name PostgreSQL would have to cut to 63 bytes is made unique by a digest)."""
    if conn.execute(query("column_info"), {"table_oid": info.oid, "column": names.shadow}).fetchone() is not None:
        raise ConfigError(f"{info.qualified} already has a column {names.shadow}; rename it; nothing was written")
    wanted = [((i.relation or info.ident)[0], n) for i in names.indexes for n in (i.shadow, i.previous)]
    wanted += [(c.live.table[0], n) for i in names.indexes for c in i.children or () for n in (c.twin.name, c.previous)]
    taken = {(schema, n) for schema, n in wanted
             if conn.execute(query("relation_in_schema"), {"schema": schema, "name": n}).fetchone() is not None}
    clash = sorted(f"{schema}.{n}" for schema, n in taken | {w for w in wanted if wanted.count(w) > 1})
    if clash:
        raise ConfigError(f"the shadow job would name indexes {', '.join(clash)}, which are taken; rename the "
                          "relation or index that holds the name; nothing was written")


class Shadow:
    name = "shadow"

    def __init__(self) -> None:
        self._cut = CutOver()

    def names(self, ctx: RunContext) -> Names:
        return Names.of(ctx.active)

    def plan(self, ctx: RunContext, job: ckpt.Job) -> dict[str, Any]:
        return {"relax_typmod": False, "drop_indexes": [],
                "shadow_column": job.shadow["shadow"] if job.shadow else None}

    def prepare(self, ctx: RunContext, conn: psycopg.Connection[Any], job: ckpt.Job, *,
                resumed_from: ckpt.Job | None) -> None:
        info = ctx.info
        capture.settle_others(ctx, conn, job)
        check_table(conn, info)
        names = plan_names(info, job.id, dependents.recorded(job), not_null=info.not_null,
                           not_null_name=carry.not_null_name(conn, info, info.column) if info.not_null else None)
        check_names(conn, info, names)
        conn.execute(info.statement("add_shadow_column", shadow=names.shadow, dim=sql.Literal(ctx.signature.dimension)))
        conn.execute(query("record_shadow"), {"shadow": Jsonb(names.as_json()), "job_id": job.id})
        capture.install(ctx, conn, job, column=names.shadow)
        log.info("shadow_column_added", column=names.shadow, indexes=[i.shadow for i in names.indexes])

    def column(self, ctx: RunContext) -> str:
        """The shadow column; after the swap it has the live column's name."""
        return ctx.info.column if "cut_over" in ctx.active.steps else self.names(ctx).shadow

    def finalize_steps(self, ctx: RunContext) -> list[FinalizeStep]:
        names = self.names(ctx)
        recorded = {(d.name, d.table): d for d in dependents.recorded(ctx.active) if d.is_index}
        old_uses = [gate.IndexUse.of(i.name, definition, ctx.info.column)
                    for i in names.indexes if (definition := recorded[(i.name, i.relation)].original) is not None]
        builds = [step for i in names.indexes  # with the live index's tablespace, comment, statistics
                  for step in finalize.steps_for(ctx, twin_dependent(i, recorded[(i.name, i.relation)].attributes),
                                                 only=False)]
        return [
            FinalizeStep("catch_up", lambda conn: self._catch_up(ctx), in_transaction=False, record=False),
            *builds,
            FinalizeStep("check_indexes", lambda conn: self._check_indexes(ctx, conn, names)),
            FinalizeStep("gate", lambda conn: gate.run(ctx, conn, names.shadow, [
                gate.IndexUse.of(i.shadow, i.definition, names.shadow) for i in names.indexes], old_uses),
                in_transaction=False, role="gate"),
            # what the application wrote during the index builds and the gate, down to a few rows:
            # the swap's own catch-up writes through the new indexes, with writers held off
            FinalizeStep("catch_up_before_swap", lambda conn: self._catch_up(ctx, until=_SMALL_BACKLOG),
                         in_transaction=False, record=False),
            # its transaction opens only for the hold, and records the step (reembed.cutover)
            FinalizeStep("cut_over", lambda conn: self._cut_over(ctx), in_transaction=False, record=False),
            *([FinalizeStep("not_null", lambda conn: self._not_null(ctx, conn), in_transaction=False)]
              if names.not_null else []),
            FinalizeStep("done", lambda conn: ckpt.set_state(conn, ctx.active, to="done", from_state="finalizing")),
        ]

    def _catch_up(self, ctx: RunContext, *, until: int | None = None) -> None:
        if "cut_over" in ctx.active.steps:
            return  # a run resumed after the swap: nothing is captured any more
        capture.catch_up(ctx, until=until, writes=self._cut.writes)
        failures.settle(ctx)

    def _not_null(self, ctx: RunContext, conn: psycopg.Connection[Any]) -> None:
        """After the swap, no lock held: the new column's NOT NULL, validated while the application
        goes on, then put back under its name (reembed.carry.finish_not_null)."""
        done = carry.finish_not_null(conn, ctx.info, lock_timeout=ctx.opts.ddl_lock_timeout)
        log.info("not_null_carried", columns=done)

    def _check_indexes(self, ctx: RunContext, conn: psycopg.Connection[Any], names: Names) -> None:
        wanted = [i.shadow for i in names.indexes]
        if not wanted:
            return
        valid = set()
        for i in names.indexes:  # a partitioned index is valid once every partition's is attached below it
            where = on_relation(conn, ctx.info, i.relation)
            if where is None:  # a partition's own index, the partition detached: not the table's any more
                valid.add(i.shadow)
                continue
            rows = conn.execute(query("indexes_valid"), {"table_oid": where.oid, "names": [i.shadow]}).fetchall()
            valid |= {r["name"] for r in rows if r["valid"]}
        bad = [n for n in wanted if n not in valid]
        if bad:
            raise ReembedError(f"index {', '.join(bad)} on the shadow column is missing or not valid; nothing was "
                               "swapped; drop it and re-run to build it again")
        log.info("shadow_indexes_valid", indexes=wanted)

    def _cut_over(self, ctx: RunContext) -> None:
        """The swap: the last catch-up (bounded, as in place) and the renames under one hold.
        The renames need ACCESS EXCLUSIVE, and it is asked for up front with the writers' locks
        (as a rewriting cut-over does): asked for later, while an application transaction that
        read the table waits for the registry row the swap holds, it would make a deadlock whose
        victim PostgreSQL may pick in the application. So readers wait for the whole hold: the
        last catch-up is a few rows (the step before it), the renames a few milliseconds."""
        cutover.for_strategy(self._cut, ctx, self)

    def hold(self, ctx: RunContext) -> Hold:
        return Hold(rewrite=True, tail=_SWAP_TAIL)

    def swapped(self, ctx: RunContext, conn: psycopg.Connection[Any], secs: float) -> None:
        conn.execute(query("record_readers_held"), {"secs": secs, "job_id": ctx.active.id})
        log.info("swap", readers_held_secs=round(secs, 4), table=ctx.info.qualified, column=ctx.info.column,
                 previous=self.names(ctx).previous)

    def swap(self, ctx: RunContext, conn: psycopg.Connection[Any], *, rewrite: bool = True) -> None:
        info, names, job = ctx.info, self.names(ctx), ctx.active
        repartition.check_unchanged(conn, ctx)  # no partition attached or detached since finalize began
        carried = carry.read(conn, info, info.attnum)
        carried.check(info, when="nothing was swapped (it was created while the job ran)")
        columns = carry.read_columns(conn, info, info.column)  # on each partition too
        indexes = read_indexes(conn, info, names.indexes)
        capture.remove(conn, info, job.id)
        carry.drop(conn, carried)
        rename_column(conn, info, info.column, names.previous)  # on every partition too
        rename_column(conn, info, names.shadow, info.column)
        carry.apply_columns(conn, columns, info.column)
        if names.not_null:  # the application stops writing the previous column; the new one refuses NULL
            conn.execute(info.statement("drop_not_null", column=names.previous))
            carry.hold_not_null(conn, info, info.column, job_id=job.id, name=names.not_null_name)
        for where, live, twin, previous in index_names(conn, info, names.indexes):
            rename_index(conn, where, live, previous)
            rename_index(conn, where, twin, live)
            carry.apply_index(conn, where, live, indexes[(where.ident[0], live)])
        carry.create(conn, carried, old=job.source_typmod, new=ctx.signature.dimension, column=info.column)
        if carried.views or carried.attached:
            log.info("recreated_on_new_column", objects=carried.labels())
        record_after_swap(conn, info, job.id)
        bridge.at_swap(conn, info, job)  # the bridge is the identity from this transaction on
        conn.execute(query("record_swap"), {"job_id": job.id})


def discard(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job) -> None:
    """An abandoned shadow job's shadow column and its indexes (the live column is as it was)."""
    if job.shadow is None or "cut_over" in job.steps:
        return
    names = Names.of(job)
    for i in names.indexes:  # a partitioned one takes its partitions' with it
        conn.execute(info.statement("drop_index_if_exists", index=((i.relation or info.ident)[0], i.shadow)))
    conn.execute(info.statement("drop_column_if_exists", column=names.shadow))
    log.warning("shadow_column_dropped", old_job_id=job.id, column=names.shadow)


def rename_column(conn: psycopg.Connection[Any], info: TableInfo, old: str, new: str) -> None:
    conn.execute(info.statement("rename_column", old=old, new=new))


def rename_index(conn: psycopg.Connection[Any], info: TableInfo, old: str, new: str) -> None:
    conn.execute(info.statement("rename_index", old=info.index_ident(old), new=new))


def on_relation(conn: psycopg.Connection[Any], info: TableInfo,
                relation: tuple[str, str] | None) -> TableInfo | None:
    """The table, or its partition `relation` while it is one (None: dropped or detached since; a
    swap checks first that none was, rollback's swap back leaves such a table alone)."""
    if relation is None:
        return info
    found = partitions.relation_named(conn, info, relation)
    if found is None or not partitions.below(conn, info, found.oid):
        return None
    return found


def index_names(conn: psycopg.Connection[Any], info: TableInfo,
                indexes: tuple[ShadowIndex, ...]) -> list[tuple[TableInfo, str, str, str]]:
    """(relation, live name, twin name, previous name) of every index the swap renames: each live
    index, and each partition's index of a partitioned one."""
    out = []
    for i in indexes:
        named = [(i.relation, i.name, i.shadow, i.previous)]
        named += [(c.live.table, c.live.name, c.twin.name, c.previous) for c in i.children or ()]
        for relation, live, twin, previous in named:
            where = on_relation(conn, info, relation)
            if where is not None:
                out.append((where, live, twin, previous))
    return out


def read_indexes(conn: psycopg.Connection[Any], info: TableInfo,
                 indexes: tuple[ShadowIndex, ...]) -> dict[tuple[str, str], carry.IndexAttributes]:
    """What PostgreSQL keeps about each index under its live name (by schema and name), before the
    renames: what the index that takes the name gets."""
    return {(where.ident[0], name): carry.read_index(conn, where, name)
            for where, name, _, _ in index_names(conn, info, indexes)}


# --------------------------------------------------- the keys written after the swap


def after_swap_names(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any]:
    schema = capture.tool_schema(conn)
    prefix = f"reembed_after_swap_{job_id}"
    return {"function": (schema, prefix), "insert_trigger": f"{prefix}_ins", "update_trigger": f"{prefix}_upd",
            "recorded": (schema, "reembed_after_swap")}


def record_after_swap(conn: psycopg.Connection[Any], info: TableInfo, job_id: int) -> None:
    """From the swap on: the keys of rows inserted, or whose content changes."""
    names = after_swap_names(conn, job_id)
    conn.execute(info.statement("create_after_swap_function", job_id=sql.Literal(job_id), **names))
    conn.execute(info.statement("create_after_swap_triggers", **names))


def stop_recording(conn: psycopg.Connection[Any], info: TableInfo, job_id: int) -> None:
    conn.execute(info.statement("drop_after_swap", **after_swap_names(conn, job_id)))
    conn.execute(query("forget_after_swap"), {"job_id": job_id})
