"""What a swap carries to the new column: everything PostgreSQL keeps on it and on what depends on it.

A shadow swap renames the live column away and gives the shadow column its name. What refers to
the column by its identity (views, rules, triggers, policies, statistics objects) would go on
reading the previous column, so each is dropped before the renames and created again after them
from the definition PostgreSQL printed before (naming the column: the new one now). A view is
created again with everything PostgreSQL keeps on it: its options, owner, grants (exactly: the
grants default privileges would add are taken back), column grants, comments, column defaults,
and the rules and INSTEAD OF triggers on it (which DROP VIEW takes with it). The column's own
attributes (comment, grants, statistics target, storage, compression, options) and an index's
(comment, expression statistics targets) are set on the new one. Rollback's swap back runs the
same in the other direction.

What cannot be created again (a materialized view, a function or a column of a view's row type,
a security label, a view of an extension) is a refusal, found by `inventory` before any write,
and again inside the swap (then nothing of the swap is committed).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from reembed import partitions
from reembed.errors import ConfigError, InternalError, ReembedError
from reembed.queries import query
from reembed.target import TableInfo

_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN")
_STORAGE = {"p": "PLAIN", "e": "EXTERNAL", "m": "MAIN", "x": "EXTENDED"}
_COMPRESSION = {"": "DEFAULT", "p": "pglz", "l": "lz4"}
_STATE = {"D": "DISABLE", "R": "ENABLE REPLICA", "A": "ENABLE ALWAYS"}
_OPTION = re.compile(r"^([a-z_]+)=(.*)$")


@dataclass(frozen=True)
class Grant:
    """Privileges one grantor gave one grantee (None: PUBLIC) on a relation or a column."""

    grantee: str | None
    grantor: str
    privileges: tuple[str, ...]
    grantable: bool
    column: str | None = None


def grants(rows: list[dict[str, Any]]) -> tuple[Grant, ...]:
    """aclexplode's rows (one per privilege), grouped as GRANT statements take them."""
    def key(r: dict[str, Any]) -> tuple[str, str, str, bool]:
        return (r.get("column") or "", r["grantee"] or "", r["grantor"], bool(r["grantable"]))

    out = []
    for (column, grantee, grantor, grantable), group in itertools.groupby(sorted(rows, key=key), key=key):
        privileges = tuple(sorted({r["privilege"] for r in group}))
        unknown = [p for p in privileges if p not in _PRIVILEGES]
        if unknown:
            raise InternalError(f"unknown privilege {unknown[0]!r} in a grant")
        out.append(Grant(grantee or None, grantor, privileges, grantable, column or None))
    return tuple(out)


@dataclass(frozen=True)
class View:
    """A view over the column (or over such a view), as read before the swap."""

    oid: int
    schema: str
    name: str
    depth: int
    relkind: str
    definition: str
    owner: str
    options: tuple[str, ...]
    comment: str | None
    acl: tuple[Grant, ...]
    column_acl: tuple[Grant, ...]
    column_comments: tuple[tuple[str, str], ...]
    defaults: tuple[tuple[str, str], ...]

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def label_quoted(self) -> str:
        return ".".join('"' + p.replace('"', '""') + '"' for p in (self.schema, self.name))


@dataclass(frozen=True)
class Attached:
    """A rule, trigger, policy or statistics object that names the column or sits on a view."""

    kind: str
    name: str
    schema: str
    relation: str
    definition: str
    enabled: str | None
    comment: str | None
    owner: str | None = None
    stats_target: int | None = None
    relation_owner: str | None = None  # who may drop and create it again (the statistics object's own owner)

    @property
    def relation_ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.relation)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name} on {self.schema}.{self.relation}" if self.kind != "statistics" \
            else f"statistics {self.schema}.{self.name}"


@dataclass(frozen=True)
class Carried:
    """Everything a swap drops before its renames and creates again after them."""

    views: tuple[View, ...]
    attached: tuple[Attached, ...]
    blockers: tuple[str, ...]

    def labels(self) -> list[str]:
        return [f"view {v.label}" for v in self.views] + [a.label for a in self.attached]

    def check(self, info: TableInfo, *, when: str) -> None:
        """Refuse (exit 2) what cannot be created again."""
        matviews = [v.label for v in self.views if v.relkind == "m"]
        said = [f"materialized view {m} (its rows hold the column's values)" for m in matviews]
        said += list(self.blockers)
        if said:
            raise ConfigError(f"the swap of {info.qualified}.{info.column} cannot carry {'; '.join(said)}: drop it "
                              f"for the job and create it again after, or use --strategy in_place; {when}")


def read(conn: psycopg.Connection[Any], info: TableInfo, attnum: int) -> Carried:
    """What depends on column `attnum` of the table, as it is now (inside the swap: its transaction)."""
    rows = conn.execute(query("carry_views"), {"table_oid": info.oid, "attnum": attnum}).fetchall()
    views = tuple(View(
        oid=int(r["oid"]), schema=r["schema"], name=r["name"], depth=int(r["depth"]), relkind=r["relkind"],
        definition=r["definition"], owner=r["owner"], options=tuple(r["options"] or ()), comment=r["comment"],
        acl=grants(r["acl"]), column_acl=grants(r["column_acl"]),
        column_comments=tuple((c["column"], c["comment"]) for c in r["column_comments"]),
        defaults=tuple((d["column"], d["default"]) for d in r["defaults"])) for r in rows)
    oids = [v.oid for v in views]
    params = {"table_oid": info.oid, "attnum": attnum, "views": oids}
    attached = tuple(Attached(kind=r["kind"], name=r["name"], schema=r["schema"], relation=r["relation"],
                              definition=r["definition"], enabled=r["enabled"], comment=r["comment"],
                              owner=r["owner"], stats_target=r["stats_target"], relation_owner=r["relation_owner"])
                     for r in conn.execute(query("carry_attached"), params).fetchall())
    blockers = [f"{r['what']}" + (f" (on {r['depends_on']})" if r["depends_on"] else "")
                for r in conn.execute(query("carry_blockers"), params).fetchall()]
    blockers += _unfaithful(conn, views, attached)
    return Carried(views, attached, tuple(blockers))


def _unfaithful(conn: psycopg.Connection[Any], views: tuple[View, ...], attached: tuple[Attached, ...]) -> list[str]:
    """What could not be created again exactly, said as refusals: a grant made by a role other than
    the object's owner (GRANTED BY is the current user's only: it would come back as the owner's, or
    fail), an object whose owner this session cannot act as (it could not drop or create it)."""
    out = [f"view {v.label}'s grant of {', '.join(g.privileges)}{' on ' + g.column if g.column else ''} to "
           f"{g.grantee or 'PUBLIC'}, made by {g.grantor} (not its owner {v.owner})"
           for v in views for g in (*v.acl, *v.column_acl) if g.grantor != v.owner]
    owners = {v.owner: f"view {v.label}" for v in views}
    owners.update({a.relation_owner: a.label for a in attached if a.relation_owner})
    if owners:
        rows = conn.execute(query("can_act_as"), {"roles": sorted(owners)}).fetchall()
        out += [f"{owners[r['role']]} (owned by {r['role']}, whose objects this role may not drop or create)"
                for r in rows if not r["may"]]
    return out


def drop(conn: psycopg.Connection[Any], carried: Carried) -> None:
    """Before the renames: what names the column by its identity (deepest views first; a view's
    rules and triggers go with it)."""
    for a in carried.attached:
        if a.kind == "statistics":
            conn.execute(query("carry_drop_statistics", object=sql.Identifier(a.schema, a.name)))
        elif not _on_view(a, carried):
            conn.execute(query(f"carry_drop_{a.kind}", object=sql.Identifier(a.name), relation=a.relation_ident))
    for v in sorted(carried.views, key=lambda v: -v.depth):
        conn.execute(query("carry_drop_view", view=v.ident))


_CAST = re.compile(r"::(vector|halfvec|bit|sparsevec)\((\d+)\)")


def recast(text: str, old: int | None, new: int, *, column: str) -> str:
    """`text` with its casts of `column` to the old dimension (`(embedding)::halfvec(64)`,
    `binary_quantize(embedding)::bit(64)`) made to the new one; a cast of anything else (another
    vector column of that dimension) is left as it is."""
    if old is None or old == new:
        return text
    quoted = re.escape('"' + column.replace('"', '""') + '"')
    mention = re.compile(rf'(?<![\w$"]){re.escape(column)}(?![\w$"])|{quoted}')

    def one(m: re.Match[str]) -> str:
        if int(m.group(2)) != old or not mention.search(_operand(text, m.start())):
            return m.group(0)
        return f"::{m.group(1)}({new})"

    return _CAST.sub(one, text)


def _operand(text: str, end: int) -> str:
    """What the cast ending at `end` applies to: a parenthesised expression (with the function name
    before it, if any), or a name."""
    at = end
    if at > 0 and text[at - 1] == ")":
        depth = 0
        while at > 0:
            at -= 1
            depth += {")": 1, "(": -1}.get(text[at], 0)
            if depth == 0:
                break
    while at > 0 and (text[at - 1].isalnum() or text[at - 1] in '_."$'):
        at -= 1
    return text[at:end]


def create(conn: psycopg.Connection[Any], carried: Carried, *, old: int | None, new: int, column: str) -> None:
    """After the renames: each view again (shallowest first) with all it had, then the rules,
    triggers, policies and statistics objects, from the definitions read before (their casts to
    the `old` dimension made to the `new` one, as an index's are)."""
    for v in sorted(carried.views, key=lambda v: v.depth):
        _create_view(conn, replace(v, definition=recast(v.definition, old, new, column=column)))
    for a in carried.attached:
        _create_attached(conn, replace(a, definition=recast(a.definition, old, new, column=column)))


def _on_view(a: Attached, carried: Carried) -> bool:
    return a.kind in ("rule", "trigger") and any(v.schema == a.schema and v.name == a.relation
                                                 for v in carried.views)


def _create_view(conn: psycopg.Connection[Any], v: View) -> None:
    options = sql.SQL(" WITH ({})").format(sql.SQL(", ").join(sql.SQL(o) for o in _options(v.options))) \
        if v.options else sql.SQL("")
    conn.execute(query("carry_create_view", view=v.ident, options=options,
                       definition=sql.SQL(v.definition.strip().rstrip(";"))))
    conn.execute(query("carry_view_owner", view=v.ident, owner=sql.Identifier(v.owner)))
    oid = relation_oid(conn, v.label_quoted)
    set_acl(conn, oid, v.ident, None, v.acl)
    for column, grant_group in itertools.groupby(sorted(v.column_acl, key=lambda g: g.column or ""),
                                                 key=lambda g: g.column or ""):
        for g in grant_group:
            _grant(conn, v.ident, g, column=column)
    if v.comment is not None:
        conn.execute(query("carry_view_comment", view=v.ident, text=sql.Literal(v.comment)))
    for column, text in v.column_comments:
        conn.execute(query("carry_column_comment", relation=v.ident, column=sql.Identifier(column),
                           text=sql.Literal(text)))
    for column, expression in v.defaults:
        conn.execute(query("carry_view_default", view=v.ident, column=sql.Identifier(column),
                           expression=sql.SQL(expression)))


def _create_attached(conn: psycopg.Connection[Any], a: Attached) -> None:
    relation = a.relation_ident
    if a.kind == "policy":
        conn.execute(query("carry_create_policy", object=sql.Identifier(a.name), relation=relation,
                           definition=sql.SQL(a.definition)))
    else:  # a rule, trigger or statistics object: PostgreSQL's own CREATE statement
        conn.execute(sql.SQL(a.definition.strip().rstrip(";")))
    if a.kind == "statistics":
        name = sql.Identifier(a.schema, a.name)
        if a.owner:
            conn.execute(query("carry_statistics_owner", object=name, owner=sql.Identifier(a.owner)))
        if a.stats_target is not None and a.stats_target >= 0:
            conn.execute(query("carry_statistics_target", object=name, target=sql.Literal(a.stats_target)))
        if a.comment is not None:
            conn.execute(query("carry_statistics_comment", object=name, text=sql.Literal(a.comment)))
        return
    if a.enabled in _STATE:
        conn.execute(query("carry_enable", relation=relation, state=sql.SQL(_STATE[a.enabled]),
                           kind=sql.SQL(a.kind.upper()), object=sql.Identifier(a.name)))
    if a.comment is not None:
        conn.execute(query("carry_comment", kind=sql.SQL(a.kind.upper()), object=sql.Identifier(a.name),
                           relation=relation, text=sql.Literal(a.comment)))


def _options(options: tuple[str, ...]) -> list[str]:
    """reloptions (key=value) as CREATE VIEW's WITH list takes them."""
    out = []
    for item in options:
        match = _OPTION.match(item)
        if match is None:
            raise InternalError(f"cannot read the option {item!r}")
        out.append(f"{match.group(1)} = '{match.group(2).replace(chr(39), chr(39) * 2)}'")
    return out


# ------------------------------------------------------------------ grants


def _role(name: str | None) -> sql.Composable:
    return sql.SQL("PUBLIC") if name is None else sql.Identifier(name)


def _grant(conn: psycopg.Connection[Any], relation: sql.Composable, g: Grant, *, column: str | None = None,
           owner: str | None = None) -> None:
    """One GRANT; recorded as given by its grantor (a superuser's GRANT counts as the owner's)."""
    privileges = sql.SQL(", ").join(sql.SQL(p) for p in g.privileges)
    option = sql.SQL(" WITH GRANT OPTION" if g.grantable else "")
    by = sql.SQL("") if owner is None or g.grantor == owner else sql.SQL(" GRANTED BY {}").format(
        sql.Identifier(g.grantor))
    if column is None:
        conn.execute(query("carry_grant", privileges=privileges, relation=relation, grantee=_role(g.grantee),
                           grant_option=option, granted_by=by))
    else:
        conn.execute(query("carry_grant_column", privileges=privileges, column=sql.Identifier(column),
                           relation=relation, grantee=_role(g.grantee), grant_option=option, granted_by=by))


def set_acl(conn: psycopg.Connection[Any], relation_oid: int, relation: sql.Composable, column: str | None,
            wanted: tuple[Grant, ...]) -> None:
    """Make the grants on a relation (or one of its columns) exactly `wanted`: every grant there now
    taken back (those default privileges gave a view just created, too), then `wanted` given."""
    now = [r["grantee"] for r in conn.execute(query("current_acl"),
                                              {"relation": relation_oid, "column": column}).fetchall()]
    if now:
        grantees = sql.SQL(", ").join(_role(g) for g in now)
        if column is None:
            conn.execute(query("carry_revoke", relation=relation, grantees=grantees))
        else:
            conn.execute(query("carry_revoke_column", column=sql.Identifier(column), relation=relation,
                               grantees=grantees))
    owner = owner_of(conn, relation_oid)
    for g in wanted:
        _grant(conn, relation, g, column=column, owner=owner)


def relation_oid(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute(query("relation_oid"), {"name": name}).fetchone()
    if row is None or row["oid"] is None:
        raise InternalError(f"relation {name} is gone")
    return int(row["oid"])


def owner_of(conn: psycopg.Connection[Any], relation_oid: int) -> str:
    row = conn.execute(query("relation_owner"), {"relation": relation_oid}).fetchone()
    if row is None:
        raise InternalError(f"relation {relation_oid} is gone")
    return str(row["owner"])


# ------------------------------------------------------------------ the column and its indexes


@dataclass(frozen=True)
class ColumnAttributes:
    """What PostgreSQL keeps about a column beyond its type and values."""

    comment: str | None
    acl: tuple[Grant, ...]
    stats_target: int | None
    storage: str
    type_storage: str
    compression: str
    options: tuple[str, ...]
    not_null: bool

    def as_json(self) -> dict[str, Any]:
        return {"comment": self.comment, "stats_target": self.stats_target, "storage": self.storage,
                "type_storage": self.type_storage, "compression": self.compression, "options": list(self.options),
                "not_null": self.not_null,
                "acl": [{"grantee": g.grantee, "grantor": g.grantor, "privileges": list(g.privileges),
                         "grantable": g.grantable} for g in self.acl]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ColumnAttributes:
        return cls(comment=data["comment"], stats_target=data["stats_target"], storage=data["storage"],
                   type_storage=data["type_storage"], compression=data["compression"],
                   options=tuple(data["options"]), not_null=bool(data["not_null"]),
                   acl=tuple(Grant(g["grantee"], g["grantor"], tuple(g["privileges"]), g["grantable"])
                             for g in data["acl"]))


def read_column(conn: psycopg.Connection[Any], relation_oid: int, column: str) -> ColumnAttributes:
    row = conn.execute(query("column_attributes"), {"relation": relation_oid, "column": column}).fetchone()
    if row is None:
        raise InternalError(f"column {column} of relation {relation_oid} is gone")
    return ColumnAttributes(comment=row["comment"], acl=grants(row["acl"]), stats_target=row["stats_target"],
                            storage=row["storage"], type_storage=row["type_storage"],
                            compression=row["compression"] or "", options=tuple(row["options"] or ()),
                            not_null=bool(row["not_null"]))


def apply_column(conn: psycopg.Connection[Any], info: TableInfo, column: str, attrs: ColumnAttributes, *,
                 acl: bool = True) -> None:
    """Column `column` of the table given `attrs` (its NOT NULL is the caller's: it may scan)."""
    table, col = sql.Identifier(*info.ident), sql.Identifier(column)
    conn.execute(query("carry_column_comment", relation=table, column=col,
                       text=sql.Literal(attrs.comment)))
    target = attrs.stats_target if attrs.stats_target is not None else -1
    conn.execute(query("carry_column_statistics", relation=table, column=col, target=sql.Literal(target)))
    conn.execute(query("carry_column_storage", relation=table, column=col,
                       storage=sql.SQL(_STORAGE[attrs.storage])))
    conn.execute(query("carry_column_compression", relation=table, column=col,
                       method=sql.SQL(_COMPRESSION.get(attrs.compression, "DEFAULT"))))
    if attrs.options:
        conn.execute(query("carry_column_options", relation=table, column=col,
                           options=sql.SQL(", ").join(sql.SQL(o) for o in _options(attrs.options))))
    else:
        conn.execute(query("carry_column_options_reset", relation=table, column=col))
    if acl:
        set_acl(conn, info.oid, table, column, attrs.acl)


@dataclass(frozen=True)
class ColumnOn:
    """A column's attributes on the table or on one partition (`parent`: the table it is a partition of)."""

    info: TableInfo
    attrs: ColumnAttributes
    parent: tuple[str, str] | None = None


def read_columns(conn: psycopg.Connection[Any], info: TableInfo, column: str) -> list[ColumnOn]:
    """Column `column`'s attributes on the table and, on a partitioned table, on each partition
    (each keeps its own: a comment, grants, a statistics target or storage set on it), parents first."""
    out = [ColumnOn(info, read_column(conn, info.oid, column))]
    for p in partitions.tree(conn, info):
        out.append(ColumnOn(partitions.relation(info, p), read_column(conn, p.oid, column), p.parent))
    return out


def apply_columns(conn: psycopg.Connection[Any], found: list[ColumnOn], column: str, *, acl: bool = True,
                  recursed: bool = False) -> None:
    """`found` (read_columns) set on column `column` of the table and each partition, parents first:
    ALTER COLUMN ... SET STATISTICS, STORAGE, COMPRESSION and options recurse into the partitions,
    so each partition's own come after its parent's. `recursed`: only the statistics, storage,
    compression and options were reset (a type change), so a partition whose are its parent's is
    left as its parent's statement made it."""
    by_table = {c.info.ident: c.attrs for c in found}
    for c in found:
        parent = by_table.get(c.parent) if c.parent is not None else None
        if recursed and parent is not None and _settings(c.attrs) == _settings(parent):
            continue
        apply_column(conn, c.info, column, c.attrs, acl=acl)


def _settings(attrs: ColumnAttributes) -> tuple[Any, ...]:
    """What ALTER COLUMN ... TYPE resets and SET on a parent recurses into (not the comment, grants)."""
    return (attrs.stats_target, attrs.storage, attrs.compression, attrs.options)


def through_type_change(conn: psycopg.Connection[Any], info: TableInfo, statement: sql.SQL | sql.Composed) -> None:
    """`statement` (ALTER COLUMN ... TYPE: it sets the column's storage and compression back to its
    type's, on every partition too), then the column's attributes as they were before it."""
    found = read_columns(conn, info, info.column)
    conn.execute(statement)
    apply_columns(conn, found, info.column, acl=False, recursed=True)


@dataclass(frozen=True)
class IndexAttributes:
    comment: str | None
    tablespace: str | None
    stats: tuple[tuple[int, int], ...]  # (column number, statistics target) of expression columns

    def as_json(self) -> dict[str, Any]:
        return {"comment": self.comment, "tablespace": self.tablespace, "stats": [list(s) for s in self.stats]}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> IndexAttributes:
        data = data or {}
        return cls(comment=data.get("comment"), tablespace=data.get("tablespace"),
                   stats=tuple((int(a), int(b)) for a, b in data.get("stats", [])))


def read_index(conn: psycopg.Connection[Any], info: TableInfo, name: str) -> IndexAttributes:
    row = conn.execute(query("index_attributes"), {"table_oid": info.oid, "index": name}).fetchone()
    if row is None:
        return IndexAttributes(None, None, ())
    return IndexAttributes(comment=row["comment"], tablespace=row["tablespace"],
                           stats=tuple((int(s["column"]), int(s["target"])) for s in row["stats"]))


def apply_index(conn: psycopg.Connection[Any], info: TableInfo, name: str, attrs: IndexAttributes) -> None:
    index = sql.Identifier(*info.index_ident(name))
    conn.execute(query("carry_index_comment", index=index, text=sql.Literal(attrs.comment)))
    for number, target in attrs.stats:
        conn.execute(query("carry_index_statistics", index=index, number=sql.Literal(number),
                           target=sql.Literal(target)))


# ------------------------------------------------------------------ NOT NULL across a swap

NOT_NULL_CHECK = "reembed_not_null_{job_id}"


def hold_not_null(conn: psycopg.Connection[Any], info: TableInfo, column: str, *, job_id: int,
                  name: str | None) -> None:
    """Inside a swap: `column` (which has NULLs only where rows wait for their vector, none by now)
    refuses NULL from now on, with no scan under the hold: a CHECK ... NOT VALID, which
    `finish_not_null` validates after the hold and turns into the NOT NULL constraint `name` (the
    one the column had; PostgreSQL 18 names them)."""
    table, check = sql.Identifier(*info.ident), sql.Identifier(NOT_NULL_CHECK.format(job_id=job_id))
    conn.execute(query("carry_not_null_check", relation=table, object=check, column=sql.Identifier(column)))
    conn.execute(query("carry_constraint_comment", object=check, relation=table, text=sql.Literal(name or "")))


def finish_not_null(conn: psycopg.Connection[Any], info: TableInfo, *, lock_timeout: str = "5s") -> list[str]:
    """Outside any hold, on an autocommit connection: each CHECK left by `hold_not_null` validated
    (SHARE UPDATE EXCLUSIVE: the application's reads and writes go on while it scans), then, in one
    short transaction, the column's NOT NULL put back under its name (PostgreSQL proves it from the
    valid check: no second scan) and the check dropped. Idempotent; returns the columns done."""
    done = []
    table = sql.Identifier(*info.ident)
    for r in conn.execute(query("not_null_checks"), {"table_oid": info.oid}).fetchall():
        check, column = sql.Identifier(r["check_name"]), sql.Identifier(r["column_name"])
        if not r["validated"]:
            try:
                with conn.transaction():
                    conn.execute(query("write_transaction_settings"))
                    conn.execute(query("carry_validate", relation=table, object=check))
            except psycopg.errors.CheckViolation as exc:
                raise ReembedError(
                    f"{info.qualified}.{r['column_name']} has rows without a vector, so it cannot be NOT NULL again "
                    f"({str(exc).splitlines()[0]}); the check {r['check_name']} refuses new NULLs meanwhile: "
                    "give those rows vectors and run again") from exc
        with conn.transaction():
            conn.execute(query("write_transaction_settings"))
            conn.execute(query("set_lock_timeout"), {"value": lock_timeout})
            if not r["not_null"]:
                if conn.info.server_version >= 180000 and r["wanted"]:
                    conn.execute(query("carry_add_not_null", relation=table, object=sql.Identifier(r["wanted"]),
                                       column=column))
                else:
                    conn.execute(query("carry_set_not_null", relation=table, column=column))
            conn.execute(query("carry_drop_constraint", relation=table, object=check))
        done.append(str(r["column_name"]))
    return done


def not_null_name(conn: psycopg.Connection[Any], info: TableInfo, column: str) -> str | None:
    """The name of the column's NOT NULL constraint (PostgreSQL 18 catalogues them), or None."""
    row = conn.execute(query("not_null_constraint"), {"table_oid": info.oid, "column": column}).fetchone()
    return str(row["name"]) if row else None
