"""Partitioned tables: the partitions below the table, and the indexes attached below a partitioned index.

A partitioned table (relkind 'p') holds no rows itself: its partitions do (each a table, or
partitioned again), and the job reads and writes every row through the parent (keyset pages by the
key, which a partitioned table's primary key always includes: PostgreSQL merges the partitions'
key indexes in order). The parent's indexes are partitioned indexes (relkind 'I'): one index per
partition is attached below each (ALTER INDEX ... ATTACH PARTITION), with a name of its own.
PostgreSQL cannot build a partitioned index CONCURRENTLY (nor REINDEX one in a transaction), so
reembed builds such an index one partition at a time (reembed.finalize): the parent index ON ONLY
the table (catalog only, invalid until complete), then each partition's index under its own name,
attached as soon as it is built; the parent becomes valid when every partition has its index
attached. A partition created meanwhile gets its index from PostgreSQL (the parent index exists).

A foreign table cannot be a partition of a table with a primary key (PostgreSQL refuses it); one is
refused here anyway, before any write: it has no index to build and its rows are another server's.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import psycopg

from reembed.errors import ConfigError, InternalError
from reembed.queries import query
from reembed.target import TableInfo, regclass_text

_NAME_BYTES = 63


@dataclass(frozen=True)
class Partition:
    """One partition below the table (at any depth), as found."""

    oid: int
    schema: str
    name: str
    kind: str  # r: a table; p: partitioned again; f: a foreign table
    level: int  # 1: a partition of the table; 2: of a partition; ...
    parent: tuple[str, str]  # the table it is a partition of
    bound: str  # FOR VALUES ... | DEFAULT
    attnum: int  # the column's number in it (a table attached after it was made apart may differ)
    rows: int | None = None  # pg_class.reltuples (None: never analysed)
    bytes: int = 0

    @property
    def ident(self) -> tuple[str, str]:
        return (self.schema, self.name)

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def leaf(self) -> bool:
        return self.kind != "p"

    def as_json(self) -> dict[str, Any]:
        return {"oid": self.oid, "schema": self.schema, "name": self.name, "kind": self.kind, "level": self.level,
                "parent": list(self.parent), "bound": self.bound, "attnum": self.attnum}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Partition:
        return cls(oid=int(data["oid"]), schema=data["schema"], name=data["name"], kind=data["kind"],
                   level=int(data["level"]), parent=(data["parent"][0], data["parent"][1]), bound=data["bound"],
                   attnum=int(data["attnum"]))


def tree(conn: psycopg.Connection[Any], info: TableInfo) -> list[Partition]:
    """Every partition below the table, parents before their partitions ([] for a plain table)."""
    if not info.partitioned:
        return []
    rows = conn.execute(query("partition_tree"), {"table_oid": info.oid, "column": info.column}).fetchall()
    found = [Partition(oid=int(r["oid"]), schema=r["schema"], name=r["name"], kind=r["kind"], level=int(r["level"]),
                       parent=(r["parent_schema"], r["parent_name"]), bound=r["bound"] or "",
                       attnum=int(r["attnum"] or 0), rows=None if r["rows"] is None else int(r["rows"]),
                       bytes=int(r["bytes"] or 0)) for r in rows]
    foreign = [p.label for p in found if p.kind == "f"]
    if foreign:
        raise ConfigError(f"{info.qualified} has foreign tables as partitions ({', '.join(foreign)}): their rows live "
                          "on another server, which reembed does not write, and they take no index; detach them "
                          "for the job (ALTER TABLE ... DETACH PARTITION) and attach them again after; "
                          "nothing was written")
    return found


def relation(info: TableInfo, p: Partition) -> TableInfo:
    """The table's description, for statements on partition `p`."""
    return info.on(p.oid, p.ident, p.attnum, partitioned=not p.leaf)


def relation_named(conn: psycopg.Connection[Any], info: TableInfo, ident: tuple[str, str]) -> TableInfo | None:
    """The table's description for the partition (or table) `ident`, as it is now; None when gone."""
    row = conn.execute(query("relation_column"), {"name": regclass_text(ident), "column": info.column}).fetchone()
    if row is None or row["oid"] is None:
        return None
    return info.on(int(row["oid"]), ident, int(row["attnum"] or 0), partitioned=row["kind"] == "p")


def below(conn: psycopg.Connection[Any], info: TableInfo, oid: int) -> bool:
    """Is relation `oid` the table, or (still) a partition below it?"""
    row = conn.execute(query("below_table"), {"table_oid": info.oid, "oid": oid}).fetchone()
    return bool(row and row["below"])


def changes(recorded: list[Partition], now: list[Partition]) -> tuple[list[Partition], list[Partition]]:
    """(partitions added, partitions gone) since `recorded`, by identity (a partition detached and
    another attached under its name is both)."""
    before = {p.oid for p in recorded}
    after = {p.oid for p in now}
    return [p for p in now if p.oid not in before], [p for p in recorded if p.oid not in after]


_SAID_AT_MOST = 8


def said(parts: list[Partition]) -> str:
    """The partitions and their bounds, for a line (the first few of many, and how many more)."""
    shown = ", ".join(f"{p.label} ({p.bound})" for p in parts[:_SAID_AT_MOST])
    more = len(parts) - _SAID_AT_MOST
    return shown + (f" and {more} more" if more > 0 else "")


# ------------------------------------------------------------------ the indexes below a partitioned index


@dataclass(frozen=True)
class ChildIndex:
    """An index attached below a partitioned index: on one partition, under its parent index."""

    table: tuple[str, str]  # the partition it is on (the index lives in the partition's schema)
    name: str
    parent: tuple[str, str]  # the index it is attached to
    leaf: bool  # False: the index of a partition that is partitioned again (built ON ONLY it)
    body: str  # its definition after USING, as the job builds it
    level: int = 1
    attributes: dict[str, Any] | None = None  # its comment, tablespace, statistics (reembed.carry)
    original: str | None = None  # its body as found (`body`: the dimension the job builds)

    @property
    def ident(self) -> tuple[str, str]:
        return (self.table[0], self.name)

    def as_json(self) -> dict[str, Any]:
        return {"table": list(self.table), "name": self.name, "parent": list(self.parent), "leaf": self.leaf,
                "body": self.body, "level": self.level, "attributes": self.attributes, "original": self.original}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChildIndex:
        return cls(table=(data["table"][0], data["table"][1]), name=data["name"],
                   parent=(data["parent"][0], data["parent"][1]), leaf=bool(data["leaf"]), body=data["body"],
                   level=int(data.get("level", 1)), attributes=data.get("attributes"), original=data.get("original"))


def children(conn: psycopg.Connection[Any], index: tuple[str, str]) -> list[tuple[ChildIndex, int]]:
    """The indexes attached below partitioned index `index`, parents before their own, each with its
    partition's oid; their bodies as PostgreSQL prints them."""
    rows = conn.execute(query("index_partitions"), {"index": regclass_text(index)}).fetchall()
    return [(ChildIndex(table=(r["table_schema"], r["table_name"]), name=r["name"],
                        parent=(r["parent_schema"], r["parent_name"]), leaf=bool(r["leaf"]),
                        body=after_using(r["definition"], r["method"]), level=int(r["level"]),
                        original=after_using(r["definition"], r["method"])), int(r["table_oid"]))
            for r in rows]


def attached_under(conn: psycopg.Connection[Any], parent: tuple[str, str], table_oid: int) -> dict[str, Any] | None:
    """The index of table `table_oid` attached to index `parent` (name, valid), if any."""
    return conn.execute(query("index_attached_under"), {"parent": regclass_text(parent),
                                                         "table_oid": table_oid}).fetchone()


def free_name(conn: psycopg.Connection[Any], schema: str, base: str, taken: Collection[str] = ()) -> str:
    """`base` cut to 63 bytes, or with a number after it, as PostgreSQL names an index it creates:
    the first that no relation of `schema` has (nor `taken`)."""
    for n in range(0, 1000):
        tail = "" if n == 0 else str(n)
        name = base.encode()[:_NAME_BYTES - len(tail)].decode(errors="ignore") + tail
        row = conn.execute(query("relation_in_schema"), {"schema": schema, "name": name}).fetchone()
        if row is None and name not in taken:
            return name
    raise InternalError(f"no free index name for {base} in schema {schema}")


def after_using(definition: str, method: str | None) -> str:
    """`CREATE INDEX name ON [ONLY] table USING hnsw (...) ...` -> `hnsw (...) ...`."""
    marker = f" USING {method} " if method else " USING "
    at = definition.find(marker)
    if at < 0:
        raise ConfigError(f"cannot read the index definition {definition!r}")
    return definition[at + len(" USING "):]
