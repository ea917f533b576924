"""Everything that depends on the embedding column, read from the catalogs before any write.

`plan` lists it and `run` reads it again before its first write. Each object is either
handled, with what the job will do to it, or refused (a ConfigError, exit 2, nothing written)
with the way forward. What an in-place job does to the column decides which is which:

- a *type change* (the dimension changes, or an untyped column is tightened): the column is
  relaxed at prepare and tightened at the cut-over. Every index whose key reads the column
  (whatever its access method, expression or predicate) is dropped at prepare and built again
  at finalize from its own definition, with the casts to the old dimension (`::halfvec(64)`,
  `binary_quantize(...)::bit(64)`) rewritten to the new one; pgvector's index limits are
  checked first. An index that only filters on the column (a partial index's predicate) or
  INCLUDEs it is carried through the type change by PostgreSQL. A view, materialized view,
  rule, policy, trigger, generated column, SQL-standard function body, a publication's
  column list or row filter, a default or a check constraint that would not take the new
  vectors: refused, by name (PostgreSQL cannot change the type of a column they use, or they
  would break the application's writes after it). A table published for logical replication
  is refused unless the operator says the subscribers take the new dimension.
- no type change (the same dimension): nothing is refused; the indexes whose key reads the
  column are rebuilt at finalize (REINDEX: an IVFFlat index's lists and an HNSW graph are
  trained on the old vectors), or dropped first and built again with --drop-hnsw-first.

Then a probe, in a transaction that is rolled back: an empty copy of the table's columns
with the column at its new type, the column's default and its check constraints, one row
of the new dimension, and every index to build at its new definition. What PostgreSQL or
pgvector refuses there is refused here, before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import psycopg
import structlog
from psycopg import sql

from reembed import carry, partitions
from reembed.errors import ConfigError, first_line
from reembed.partitions import ChildIndex, Partition
from reembed.partitions import after_using as after_using  # the index body, as shadow and gate read it
from reembed.queries import query
from reembed.target import TableInfo

log = structlog.get_logger()

# pgvector 0.8's index limits (HNSW and IVFFlat alike), by the type the index reads.
INDEX_LIMITS = {"vector": 2000, "halfvec": 4000, "bit": 64000}
TYPE_LIMIT = 16000  # the most dimensions a vector or halfvec column can have
ANN_METHODS = ("hnsw", "ivfflat")

REBUILD = "rebuild"  # dropped at prepare, built again at finalize from `definition`
REINDEX = "reindex"  # kept through the writes, REINDEXed at finalize
CARRIED = "carried"  # PostgreSQL carries it through the type change
UNTOUCHED = "untouched"  # nothing the job does affects it
REFUSED = "refused"
SHADOW = "shadow"  # --strategy shadow: an index built on the shadow column, swapped in with it
RECREATE = "recreate"  # --strategy shadow: a view, trigger or policy re-created on the new column at the swap
FIRES = "fires"  # an application's UPDATE trigger or rule: it runs on each of the job's writes too
SKIPS = "skips"  # an application's UPDATE trigger whose WHEN lets the job's writes pass (reembed.writer)

_CAST = re.compile(r"::(vector|halfvec|bit|sparsevec)\((\d+)\)")
_OURS = "reembed_"  # the job's own capture triggers and function


@dataclass(frozen=True)
class Dependent:
    """One object that depends on the column, and what the job does with it."""

    kind: str  # index, view, trigger, policy, ...
    name: str  # as PostgreSQL describes it (pg_describe_object), or the index's own name
    action: str
    definition: str | None = None  # an index: the statement finalize runs (new dimension)
    original: str | None = None  # an index: its definition as found
    method: str | None = None  # an index: its access method
    why: str | None = None  # a refusal: why, and the way forward
    attributes: dict[str, Any] | None = None  # an index: its comment, tablespace, statistics (reembed.carry)
    # an index of a partitioned table (a partitioned index): the indexes attached below it, one per
    # partition (reembed.partitions.ChildIndex), built one at a time; None: a plain index
    children: list[dict[str, Any]] | None = None
    relation: list[str] | None = None  # on a partition of the table, not the table itself: [schema, name]

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "action": self.action}
        for key in ("definition", "original", "method", "why", "attributes", "children", "relation"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Dependent:
        return cls(kind=data["kind"], name=data["name"], action=data["action"], definition=data.get("definition"),
                   original=data.get("original"), method=data.get("method"), why=data.get("why"),
                   attributes=data.get("attributes"), children=data.get("children"), relation=data.get("relation"))

    @property
    def is_index(self) -> bool:
        return self.kind == "index"

    @property
    def partitioned(self) -> bool:
        """A partitioned index: built one partition at a time."""
        return self.children is not None

    @property
    def child_indexes(self) -> list[ChildIndex]:
        return [ChildIndex.from_json(c) for c in self.children or []]

    @property
    def table(self) -> tuple[str, str] | None:
        """The partition the object is on (None: the table itself)."""
        return (self.relation[0], self.relation[1]) if self.relation else None


@dataclass(frozen=True)
class Inventory:
    dependents: tuple[Dependent, ...]
    type_change: bool
    dimension: int
    column_type: str
    strategy: str = "in_place"

    @property
    def shadowed(self) -> list[Dependent]:
        """--strategy shadow: the indexes built again on the shadow column."""
        return [d for d in self.dependents if d.action == SHADOW]

    @property
    def refused(self) -> list[Dependent]:
        return [d for d in self.dependents if d.action == REFUSED]

    @property
    def rebuilt(self) -> list[Dependent]:
        return [d for d in self.dependents if d.action == REBUILD]

    @property
    def indexes(self) -> list[Dependent]:
        """The indexes finalize builds or rebuilds, in the order found."""
        return [d for d in self.dependents if d.action in (REBUILD, REINDEX)]

    def as_json(self) -> list[dict[str, Any]]:
        return [d.as_json() for d in self.dependents]

    def summary(self) -> str:
        return summary(self.dependents)

    def check(self, info: TableInfo) -> None:
        """Refuse, naming every refused object and the way forward (before any write)."""
        refused = self.refused
        if not refused:
            return
        change = f"{info.column_type}({self.dimension})"
        said = refusals(refused)
        how = "with a shadow column (--strategy shadow)" if self.strategy == "shadow" else "in place"
        raise ConfigError(f"cannot change {info.qualified}.{info.column} to {change} {how}: {said}; "
                          "nothing was written")


_SAID = {
    REBUILD: "dropped now, built again at the end at the new dimension",
    REINDEX: "kept, rebuilt at the end",
    CARRIED: "kept (PostgreSQL carries it through the type change)",
    UNTOUCHED: "untouched",
    REFUSED: "refused",
    SHADOW: "built again on the shadow column, swapped in with it",
    RECREATE: "re-created on the new column at the swap",
    FIRES: "fires on each of the job's writes, as on the application's: what it writes, it writes then",
    SKIPS: "lets the job's writes pass (its WHEN reads reembed.writer), fires on the application's",
}

def refusals(refused: Sequence[Dependent]) -> str:
    """Each refused object, why, and the way forward, in one line."""
    return "; ".join(f"{d.kind} {d.name} {d.why}" for d in refused)


def summary(found: Sequence[Dependent]) -> str:
    """One line: each object on the column and what the job does with it."""
    if not found:
        return "nothing else depends on it"
    return ", ".join(f"{d.kind} {d.name}{_where(d)} ({_SAID[d.action]}{_tree(d)})" for d in found)


def _where(d: Dependent) -> str:
    return f" on partition {d.table[0]}.{d.table[1]}" if d.table else ""


def _tree(d: Dependent) -> str:
    if not d.partitioned or d.action not in (REBUILD, REINDEX, SHADOW):
        return ""
    leaves = [c for c in d.child_indexes if c.leaf]
    return f", one partition at a time: {len(leaves)} partition {'index' if len(leaves) == 1 else 'indexes'}"


_SHADOW = "--strategy shadow (a shadow column swapped in at the end) re-creates it on the new column"
_IN_PLACE = "or use --strategy in_place"


def take(conn: psycopg.Connection[Any], info: TableInfo, *, dimension: int, source_dimension: int | None,
         drop_first: bool = False, allow_published: bool = False, probe: bool = True,
         carried: Sequence[Dependent] = (), strategy: str = "in_place") -> Inventory:
    """The inventory for a job that brings the column to `dimension`; `probe`: also try the new
    definitions on an empty copy of the table (in a transaction rolled back); `carried`: the
    indexes an abandoned job dropped (built again by this one, at its dimension). On a partitioned
    table, what is on each partition is found too (what a partition has from its parent, an index
    attached below the parent's or a trigger cloned from it, is the parent's and judged with it)."""
    type_change = info.typmod != dimension
    old = info.typmod or source_dimension
    shadow = strategy == "shadow"
    parts = partitions.tree(conn, info)
    found: list[Dependent] = []
    for row in _rows(conn, info.oid, info.attnum):
        if shadow:
            dependent = _classify_shadow(row, dimension=dimension, old=old, column=info.column)
        else:
            dependent = _classify(row, info, type_change=type_change, dimension=dimension, old=old,
                                  drop_first=drop_first)
        if dependent is not None:
            found.append(_partitioned(row, dependent))
    for p in parts:
        for row in _rows(conn, p.oid, p.attnum):
            if row["inherited"]:
                continue
            dependent = _on_partition(row, p, info, shadow=shadow, type_change=type_change, dimension=dimension,
                                      old=old, drop_first=drop_first)
            if dependent is not None:
                found.append(_partitioned(row, replace(dependent, relation=[p.schema, p.name])
                                          if dependent.is_index else dependent))
    if shadow:
        found += _carried(conn, info)
    found += _fires(conn, info, {d.name for d in found})
    found = [_read_index(conn, info, d, old=old, new=dimension) if d.is_index else d for d in found]
    present = {(d.name, tuple(d.relation or ())) for d in found if d.is_index}
    found = [
        replace(d, action=REBUILD, definition=_rewritten(d.original or d.definition or "", old, dimension, info.column),
                children=None if d.children is None else [
                    {**c, "body": _rewritten(c.get("original") or c["body"], old, dimension, info.column)}
                    for c in d.children],
                why=None)
        for d in carried if d.is_index and d.action == REBUILD and (d.name, tuple(d.relation or ())) not in present
    ] + found
    found += _publications(conn, info, parts, type_change=type_change, allow=allow_published, shadow=shadow)
    inventory = Inventory(tuple(found), type_change=type_change, dimension=dimension, column_type=info.column_type,
                          strategy=strategy)
    if (type_change or shadow) and dimension > TYPE_LIMIT:
        raise ConfigError(f"a {info.column_type} column holds at most {TYPE_LIMIT} dimensions; the model gives "
                          f"{dimension}; nothing was written")
    inventory = _limits(inventory)
    if probe and not inventory.refused and (type_change or inventory.rebuilt or inventory.shadowed):
        inventory = _probe(conn, info, inventory)
    if probe and not inventory.refused:
        _probe_write(conn, info, inventory)
    return inventory


def _probe_write(conn: psycopg.Connection[Any], info: TableInfo, inventory: Inventory,
                 lock_timeout: str = "2s") -> None:
    """One row of the table written as the job will write it, in a transaction rolled back: the
    column relaxed first (in place, a type change) or the shadow column added (shadow), then the
    UPDATE, with the application's triggers and rules running on it. A failure there (a trigger that
    copies the row into a table whose column has the old dimension, or whose row type changed) is
    refused now, not at the first batch. Skipped, and said, when its lock is not granted at once."""
    shadow = inventory.strategy == "shadow"
    column = f"{info.column}_reembed_probe" if shadow else info.column
    dim = sql.Literal(inventory.dimension)
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(query("set_lock_timeout"), {"value": lock_timeout})
            conn.execute(query("write_transaction_settings"))
            # reembed's own capture (an abandoned job's, settled at prepare) reads the column in its
            # WHEN: PostgreSQL would refuse the column's type change for it, not for the application
            for row in conn.execute(query("capture_triggers"), {"table_oid": info.oid}).fetchall():
                conn.execute(info.statement("drop_trigger", trigger=sql.Identifier(row["trigger_name"])))
            if shadow:
                conn.execute(info.statement("probe_shadow_column", column=column, dim=dim))
            elif inventory.type_change:  # as prepare does: the indexes rebuilt later dropped, the column relaxed
                for d in inventory.rebuilt:
                    conn.execute(info.statement("drop_index_if_exists", index=info.index_ident(d.name)))
                conn.execute(info.statement("relax_typmod"))
            conn.execute(info.statement("probe_write", column=column, dim=dim))
    except psycopg.errors.LockNotAvailable:
        log.warning("write_probe_skipped", table=info.qualified,
                    detail="its lock was not granted at once; the job's first write will show what it shows")
    except psycopg.Error as exc:
        raise ConfigError(f"a write like the job's fails on {info.qualified}: {first_line(exc)} (tried on one row, "
                          "rolled back: an application trigger or rule that runs on each UPDATE cannot take the new "
                          "vectors, or the shadow column); change or disable it for the job; nothing was written") \
            from None


def _rows(conn: psycopg.Connection[Any], oid: int, attnum: int) -> list[dict[str, Any]]:
    return conn.execute(query("column_dependents"), {"table_oid": oid, "attnum": attnum}).fetchall()


def _partitioned(row: dict[str, Any], d: Dependent) -> Dependent:
    """A partitioned index is marked as one (its children are read with its attributes)."""
    return replace(d, children=[]) if d.is_index and row["relkind"] == "I" else d


def _read_index(conn: psycopg.Connection[Any], info: TableInfo, d: Dependent, *, old: int | None,
                new: int) -> Dependent:
    """An index the job builds or rebuilds, with what PostgreSQL keeps about it (its comment,
    tablespace, statistics) and, when it is partitioned, the indexes attached below it."""
    if d.action not in (REBUILD, SHADOW, REINDEX):
        return d
    where = info if d.table is None else partitions.relation_named(conn, info, d.table)
    if where is None:
        return d
    if d.action != REINDEX:
        d = replace(d, attributes=carry.read_index(conn, where, d.name).as_json())
    if d.children is None:
        return d
    children = []
    for child, table_oid in partitions.children(conn, where.index_ident(d.name)):
        on = info.on(table_oid, child.table, 0)
        body = _rewritten(child.body, old, new, info.column) if d.action != REINDEX else child.body
        children.append(replace(child, body=body,
                                attributes=carry.read_index(conn, on, child.name).as_json()).as_json())
    return replace(d, children=children)


_ON_PARTITION = ("create it on the partitioned table instead of one partition (--strategy shadow re-creates what is "
                 "on the table itself)")


def _on_partition(row: dict[str, Any], p: Partition, info: TableInfo, *, shadow: bool, type_change: bool,
                  dimension: int, old: int | None, drop_first: bool) -> Dependent | None:
    """An object on one partition's column, not the parent's (an index made on that partition only,
    a view over it, a trigger or policy on it), judged as the same object on the table would be;
    under --strategy shadow what the swap would re-create (a view, trigger, policy, rule or
    statistics object) is refused: the swap re-creates what is on the table itself."""
    kind = row["kind"]
    if kind in ("trigger", "function") and row["object_name"].startswith(_OURS):
        return None
    if kind == "index":
        if shadow:
            return _classify_shadow(row, dimension=dimension, old=old, column=info.column)
        return _index(row, type_change=type_change, dimension=dimension, old=old, column=info.column,
                      drop_first=drop_first)
    said = f"(on partition {p.label}) "
    if shadow:
        if kind in _CARRIED_KINDS:
            return Dependent(kind, row["description"], REFUSED, original=row["definition"], why=(
                f"{said}uses the column: the swap re-creates on the new column what is on the partitioned table, "
                "not on one of its partitions, so it would go on reading the previous column; create it on the "
                f"table, or drop it for the job and create it again after, {_IN_PLACE}"))
        d = _classify_shadow(row, dimension=dimension, old=old, column=info.column)
    else:
        d = _classify(row, info, type_change=type_change, dimension=dimension, old=old, drop_first=drop_first,
                      other_way=_ON_PARTITION)
    if d is not None and d.why is not None:
        d = replace(d, why=said + d.why)
    return d


def _classify(row: dict[str, Any], info: TableInfo, *, type_change: bool, dimension: int, old: int | None,
              drop_first: bool, other_way: str | None = None) -> Dependent | None:
    kind, name = row["kind"], row["description"]
    if kind == "index":
        return _index(row, type_change=type_change, dimension=dimension, old=old, column=info.column,
                      drop_first=drop_first)
    if kind == "trigger" and row["object_name"].startswith(_OURS):
        return None  # the job's own capture (an older job's is settled at prepare)
    if kind == "function" and row["object_name"].startswith(_OURS):
        return None
    if not type_change:
        return Dependent(kind, name, UNTOUCHED)
    if kind == "constraint" and row["contype"] == "n":
        return Dependent(kind, name, CARRIED)  # NOT NULL: kept through the type change
    if kind == "statistics":
        return Dependent(kind, name, CARRIED)
    if kind == "default":
        return Dependent(kind, name, CARRIED, original=row["definition"])  # the probe tries it
    if kind == "constraint" and row["contype"] == "c":
        return Dependent(kind, name, CARRIED, original=row["definition"])  # the probe tries it
    shadow_way = other_way or _SHADOW
    why = {
        "view": f"selects the column: PostgreSQL cannot change the type of a column a view uses; {shadow_way}, "
                "or drop the view for the job and create it again after",
        "rule": "uses the column: PostgreSQL cannot change the type of a column a rule uses; drop the rule for "
                "the job and create it again after",
        "policy": "uses the column: PostgreSQL cannot change the type of a column a row-level security policy "
                  "uses; drop the policy for the job and create it again after (the table is then unprotected "
                  f"by it), or {shadow_way}",
        "trigger": "is defined on the column (UPDATE OF or WHEN): PostgreSQL cannot change its type; drop the "
                   f"trigger for the job and create it again after, or {shadow_way}",
        "generated column": "is computed from the column: PostgreSQL cannot change the type of a column a "
                            "generated column uses, and its expression names the old dimension; drop the expression "
                            "(ALTER TABLE ... ALTER COLUMN ... DROP EXPRESSION) first",
        "function": "has a SQL-standard body that uses the column: PostgreSQL cannot change its type; replace "
                    "the function with a string body for the job",
        "constraint": "uses the column (a key or exclusion constraint): it cannot be dropped for the job; drop "
                      "it and create it again after",
        "publication": "publishes the column with a column list or row filter: PostgreSQL cannot change its "
                       "type; drop the table from the publication for the job",
    }.get(kind, f"depends on the column ({row['deptype']}): reembed does not know how to carry it through "
                "a type change; drop it for the job and create it again after")
    return Dependent(kind, name, REFUSED, original=row["definition"], why=why)


def _classify_shadow(row: dict[str, Any], *, dimension: int, old: int | None, column: str) -> Dependent | None:
    """--strategy shadow: the live column is never touched while the job runs; at the swap it is
    renamed away and the shadow column takes its name. Every index that reads the column is built
    again on the shadow; what refers to the column by its identity (views, triggers, policies) is
    re-created on the new column in the swap's transaction; what holds the column's values or
    would not follow it is refused, by name."""
    kind, name = row["kind"], row["description"]
    if kind in ("trigger", "function") and row["object_name"].startswith(_OURS):
        return None
    if kind == "index":
        index_name, method, original = row["object_name"], row["method"], row["definition"]
        if row["constraint_name"] is not None:
            return Dependent("index", index_name, REFUSED, original=original, method=method,
                             why=f"backs constraint {row['constraint_name']}: a shadow column cannot take it over "
                                 f"in the swap; drop the constraint for the job, {_IN_PLACE}")
        return Dependent("index", index_name, SHADOW, definition=_rewritten(original, old, dimension, column),
                         original=original, method=method)
    if kind in _CARRIED_KINDS:
        return None  # reembed.carry reads them all, and what sits on them (_carried)
    if kind == "constraint" and row["contype"] == "n":  # NOT NULL: on the new column from the swap on
        return Dependent(kind, name, RECREATE)
    why = {
        "generated column": "is computed from the column: it would go on reading the previous column after the "
                            f"swap; drop the expression for the job, {_IN_PLACE}",
        "function": "has a SQL-standard body that uses the column: it would go on reading the previous column "
                    f"after the swap; replace it with a string body for the job, {_IN_PLACE}",
        "constraint": "constrains the column: the shadow column would not carry it; drop it for the job and add it "
                      f"on the new column after, {_IN_PLACE}",
        "default": "is the column's default: the shadow column would not carry it; drop it for the job and set it "
                   f"on the new column after, {_IN_PLACE}",
    }.get(kind, f"depends on the column ({row['deptype']}): reembed does not know how to carry it to a shadow "
                f"column; drop it for the job and create it again after, {_IN_PLACE}")
    return Dependent(kind, name, REFUSED, original=row["definition"], why=why)


_CARRIED_KINDS = ("view", "materialized view", "trigger", "policy", "rule", "statistics")


def _fires(conn: psycopg.Connection[Any], info: TableInfo, said: set[str]) -> list[Dependent]:
    """What runs on each of the job's UPDATEs: the application's row triggers on UPDATE (said, so
    that a trigger stamping updated_at or writing an audit row is no surprise), and its rules ON
    UPDATE: an INSTEAD rule rewrites reembed's UPDATE (refused: the job could not write the vectors);
    a DO ALSO one runs beside it."""
    out = []
    for r in conn.execute(query("fires_on_update"), {"table_oid": info.oid}).fetchall():
        name = f"{r['name']} on {info.qualified}"
        if any(r["name"] in s for s in said):
            continue  # already judged (a trigger on the column, carried by a swap)
        if r["kind"] == "rule" and r["instead"]:
            out.append(Dependent("rule", name, REFUSED, original=r["definition"], why=(
                "rewrites UPDATEs of the table (DO INSTEAD): the job's own writes would not reach the column; drop "
                "it for the job and create it again after, or make it DO ALSO")))
        elif r["kind"] == "trigger" and _WRITER_MARK.search(r["definition"] or ""):
            out.append(Dependent(r["kind"], name, SKIPS, original=r["definition"]))
        else:
            out.append(Dependent(r["kind"], name, FIRES, original=r["definition"]))
    return out


# reembed's sessions carry `reembed.writer = on` (sql/queries.sql: writer_session): a trigger made
# with WHEN (current_setting('reembed.writer', true) IS DISTINCT FROM 'on') skips the job's writes
_WRITER_MARK = re.compile(r"WHEN .*reembed\.writer", re.S)


def _carried(conn: psycopg.Connection[Any], info: TableInfo) -> list[Dependent]:
    """--strategy shadow: what the swap drops and creates again on the new column (views and views
    on them, with their rules, triggers, grants, comments and defaults; rules, triggers, policies and
    statistics naming the column), and what it could not (refused, by name)."""
    carried = carry.read(conn, info, info.attnum)
    out = []
    for v in carried.views:
        if v.relkind == "m":
            out.append(Dependent("materialized view", v.label, REFUSED, why=(
                "holds a copy of the column's values (or of a view's over it): it would have to be refreshed "
                f"inside the swap; drop it for the job and create it again after, {_IN_PLACE}")))
        else:
            out.append(Dependent("view", v.label, RECREATE))
    out += [Dependent(a.kind, a.label.removeprefix(f"{a.kind} "), RECREATE) for a in carried.attached]
    out += [Dependent("object", b, REFUSED, why=(
        "is on what the swap drops and creates again, and reembed cannot create it again as it is; change or "
        f"drop it for the job and create it again after, {_IN_PLACE}")) for b in carried.blockers]
    owner = carry.owner_of(conn, info.oid)
    out += [Dependent("grant", f"{', '.join(g.privileges)} on {info.qualified}.{info.column} to "
                               f"{g.grantee or 'PUBLIC'} by {g.grantor}", REFUSED,
                      why=f"was made by a role other than the table's owner ({owner}): the new column's grant would "
                          f"come back as the owner's; grant it again as the owner for the job, {_IN_PLACE}")
            for g in carry.read_column(conn, info.oid, info.column).acl if g.grantor != owner]
    return out


def _index(row: dict[str, Any], *, type_change: bool, dimension: int, old: int | None, column: str,
           drop_first: bool) -> Dependent:
    name, method, original = row["object_name"], row["method"], row["definition"]
    if not row["key_uses"]:  # only a predicate or an INCLUDE reads the column
        return Dependent("index", name, CARRIED if type_change else UNTOUCHED, original=original, method=method)
    if type_change and row["constraint_name"] is not None:
        return Dependent("index", name, REFUSED, original=original, method=method,
                         why=f"backs constraint {row['constraint_name']}, which cannot be dropped for the job; drop it "
                             "and create it again after")
    definition = _rewritten(original, old, dimension, column) if type_change else original
    if type_change or (drop_first and method in ANN_METHODS):
        return Dependent("index", name, REBUILD, definition=definition, original=original, method=method)
    return Dependent("index", name, REINDEX, definition=definition, original=original, method=method)


def _rewritten(definition: str, old: int | None, new: int, column: str) -> str:
    """The definition with its casts of the column to the old dimension cast to the new one."""
    return carry.recast(definition, old, new, column=column)


def _publications(conn: psycopg.Connection[Any], info: TableInfo, parts: Sequence[Partition], *, type_change: bool,
                  allow: bool, shadow: bool = False) -> list[Dependent]:
    rows: dict[str, dict[str, Any]] = {}
    for oid in [info.oid, *(p.oid for p in parts)]:  # a partition may be published on its own
        rows.update((r["name"], r) for r in conn.execute(query("table_publications"), {"table_oid": oid}).fetchall())
    out = []
    for row in sorted(rows.values(), key=lambda r: r["name"]):
        name = f"publication {row['name']}"
        if shadow:
            out.append(Dependent("publication", name, CARRIED) if allow else Dependent(
                "publication", name, REFUSED,
                why="replicates the table: the shadow column is a new column, and subscribers without it stop "
                    "applying; add it on each subscriber first (see the runbook), then pass --allow-published, "
                    f"{_IN_PLACE}"))
        elif not type_change:
            out.append(Dependent("publication", name, UNTOUCHED))
        elif allow:
            out.append(Dependent("publication", name, CARRIED))
        else:
            out.append(Dependent(
                "publication", name, REFUSED,
                why="replicates the table: subscribers would receive vectors their column's dimension refuses and "
                    "stop applying; relax each subscriber's column first (ALTER ... TYPE "
                    f"{info.column_type}), then pass --allow-published"))
    return out


def _limits(inventory: Inventory) -> Inventory:
    """pgvector's index limits against the new dimension, for every index to build."""
    out = []
    for d in inventory.dependents:
        if d.action in (REBUILD, SHADOW) and d.method in ANN_METHODS and d.definition is not None:
            reads = _index_reads(d.definition) or inventory.column_type  # no opclass shown: the default
            limit = INDEX_LIMITS.get(reads)
            if limit is not None and inventory.dimension > limit:
                d = Dependent(d.kind, d.name, REFUSED, original=d.original, method=d.method, why=(
                    f"({d.method} on {reads}) cannot index {inventory.dimension} dimensions: pgvector's {d.method} "
                    f"takes at most {limit} for {reads}; ways out: a halfvec column (up to {INDEX_LIMITS['halfvec']}) "
                    f"or an index on a halfvec cast, USING {d.method} ((column::halfvec({inventory.dimension})) "
                    "halfvec_cosine_ops)"))
        out.append(d)
    return Inventory(tuple(out), inventory.type_change, inventory.dimension, inventory.column_type,
                     inventory.strategy)


_OPCLASS = re.compile(r"\b(vector|halfvec|bit|sparsevec)_[a-z0-9]+_ops\b")


def _index_reads(definition: str) -> str | None:
    """The pgvector type an index reads, from its operator class (the default one reads the
    column's own type)."""
    found = _OPCLASS.search(definition)
    if found:
        return found.group(1)
    cast = _CAST.search(definition)
    return cast.group(1) if cast else None


def _probe(conn: psycopg.Connection[Any], info: TableInfo, inventory: Inventory) -> Inventory:
    """Try the new definitions on an empty copy; each object PostgreSQL refuses is refused."""
    new_text = f"{info.column_type}({inventory.dimension})"
    new_type = sql.SQL(new_text)
    refused: dict[str, str] = {}
    with conn.transaction(force_rollback=True):
        conn.execute(info.statement("probe_table"))
        error = _try(conn, info.statement("probe_type", new_type=new_type)) or _try(
            conn, info.statement("probe_row", new_type=new_type, dim=sql.Literal(inventory.dimension)))
        if error is not None:
            raise ConfigError(f"{info.qualified}.{info.column} cannot become {new_text}: {error}; "
                              "nothing was written")
        steps: list[tuple[Dependent, sql.SQL | sql.Composed]] = []
        for d in inventory.dependents:  # the default first: a check must not blame it
            if d.kind == "default" and d.action == CARRIED and d.original is not None:
                steps.append((d, info.statement("probe_default", default=sql.SQL(d.original))))
        for d in inventory.dependents:
            if d.kind == "constraint" and d.action == CARRIED and d.original is not None:
                steps.append((d, info.statement("probe_check", check=sql.SQL(d.original))))
        for d in inventory.dependents:
            if d.action in (REBUILD, SHADOW) and d.definition is not None:
                steps.append((d, sql.SQL("CREATE INDEX ON pg_temp.reembed_probe USING ")
                              + sql.SQL(after_using(d.definition, d.method))))
        for d, statement in steps:
            if (error := _try(conn, statement)) is not None:
                refused[d.name] = error
    if not refused:
        return inventory
    out = []
    for d in inventory.dependents:
        if d.name in refused:
            what = "the column's default" if d.kind == "default" else f"the {d.kind}"
            d = Dependent(d.kind, d.name, REFUSED, original=d.original, method=d.method,
                          why=f"would not take the new vectors ({what}, tried on an empty copy of the table at "
                              f"{new_text}: {refused[d.name]}); change or drop it for the job")
        out.append(d)
    return Inventory(tuple(out), inventory.type_change, inventory.dimension, inventory.column_type,
                     inventory.strategy)


_LITERAL = re.compile(r"('(?:[^']|'')*')")


def rename_refs(text: str, old: str, new: str) -> str:
    """`text` (an expression PostgreSQL printed) with its references to column `old` made to
    `new`: a quoted "old" anywhere, a bare old as a whole word (not a function's name, not after
    a dot), never inside a string literal."""
    quoted_new = '"' + new.replace('"', '""') + '"'
    quoted_old = re.escape('"' + old.replace('"', '""') + '"')
    bare = re.compile(rf"(?<![\w.\"$]){re.escape(old)}(?![\w\"$(])") if re.fullmatch(r"[a-z_][a-z0-9_$]*", old) \
        else None
    parts = _LITERAL.split(text)
    for i in range(0, len(parts), 2):  # the even parts are outside literals
        part = re.sub(quoted_old, lambda _m: quoted_new, parts[i])
        if bare is not None:
            part = bare.sub(lambda _m: quoted_new, part)
        parts[i] = part
    return "".join(parts)


def _try(conn: psycopg.Connection[Any], statement: sql.SQL | sql.Composed) -> str | None:
    try:
        with conn.transaction():  # a savepoint: the probe goes on after a refusal
            conn.execute(statement)
    except psycopg.Error as exc:
        return first_line(exc)
    return None


class RecordedJob(Protocol):
    """What a job row (reembed.checkpoint.Job) records of its inventory and its progress."""

    @property
    def dependents(self) -> list[dict[str, Any]] | None: ...
    @property
    def index_name(self) -> str | None: ...
    @property
    def index_def(self) -> dict[str, Any] | None: ...
    @property
    def index_dropped(self) -> bool: ...
    @property
    def state(self) -> str: ...
    @property
    def finalize_steps(self) -> list[str]: ...
    @property
    def source_typmod(self) -> int | None: ...
    @property
    def target_dimension(self) -> int: ...
    @property
    def strategy(self) -> str: ...


def recorded(job: RecordedJob | None) -> list[Dependent]:
    """The inventory a job recorded; a job of an older version recorded only its HNSW index."""
    if job is None:
        return []
    if job.dependents is not None:
        return [Dependent.from_json(d) for d in job.dependents]
    if job.index_name is None:
        return []
    definition = (job.index_def or {}).get("definition")
    return [Dependent("index", job.index_name, REBUILD if job.index_dropped else REINDEX, definition=definition,
                      original=definition, method="hnsw")]


def concurrently(definition: str) -> str:
    """CREATE [UNIQUE] INDEX name ... -> CREATE [UNIQUE] INDEX CONCURRENTLY name ..."""
    return re.sub(r"^CREATE (UNIQUE )?INDEX ", lambda m: f"CREATE {m.group(1) or ''}INDEX CONCURRENTLY ", definition,
                  count=1)


def index_step_name(name: str, *, only: bool) -> str:
    """The finalize step that builds index `name` (an older job's one index: "build_index"); for a
    partitioned index, the last of its steps (every partition's index attached, the parent valid)."""
    return "build_index" if only else f"build_index {name}"


def parent_step_name(name: str) -> str:
    """A partitioned index's first step: the parent index ON ONLY the table (and below it)."""
    return f"build_index {name} on only"


def child_step_name(name: str, child: ChildIndex) -> str:
    """A partitioned index's step on one partition: its index built and attached."""
    return f"build_index {name} on {child.table[0]}.{child.table[1]}"


def table_state(job: RecordedJob) -> str | None:
    """What an unfinished job has done to the table that is not undone yet, and what a re-run
    does about it; None when nothing is (or the job is over)."""
    if job.state not in ("embedding", "finalizing"):
        return None
    if job.strategy == "shadow":
        return None  # the live column, its indexes and what depends on it are untouched until the swap
    steps = set(job.finalize_steps or [])
    indexes = [d for d in recorded(job) if d.action in (REBUILD, REINDEX)]
    dropped = [d.name for d in indexes if d.action == REBUILD
               and index_step_name(d.name, only=len(indexes) == 1) not in steps]
    parts = []
    if dropped:
        parts.append(f"{'index' if len(dropped) == 1 else 'indexes'} {', '.join(dropped)} dropped")
    for d in indexes:
        leaves = [c for c in d.child_indexes if c.leaf]
        if d.name in dropped and leaves:
            built = sum(1 for c in leaves if child_step_name(d.name, c) in steps)
            parts.append(f"{d.name} built again on {built} of its {len(leaves)} partitions")
    if job.source_typmod != job.target_dimension and "cut_over" not in steps:
        parts.append(f"the column without its dimension until the cut-over makes it ({job.target_dimension})")
    if not parts:
        return None
    return "; ".join(parts) + ": a re-run with the same model resumes the job and builds what it dropped"
