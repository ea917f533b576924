"""What the job works on: the table, its key, the vector column, the HNSW index, the registry.
Every problem found here is a ConfigError, raised before anything is written."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from reembed.errors import ConfigError
from reembed.queries import Fill, query, table_statement
from reembed.settings import Target

_HNSW_DEFAULTS = {"m": 16, "ef_construction": 64}
VECTOR_TYPES = ("vector", "halfvec")  # the column types re-embedded (sparsevec and bit are not a model's output)


def split_name(name: str) -> tuple[str, ...]:
    """'schema.table' -> ('schema', 'table'); 'table' -> ('table',). Quotes allowed."""
    parts = re.findall(r'"((?:[^"]|"")*)"|([^."]+)', name)
    out = tuple(q.replace('""', '"') if q else p for q, p in parts)
    if not out or len(out) > 2:
        raise ConfigError(f"cannot read table name {name!r}: write it as table or schema.table")
    return out


def regclass_text(parts: tuple[str, ...]) -> str:
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


@dataclass(frozen=True)
class IndexInfo:
    name: str
    opclass: str
    m: int
    ef_construction: int
    definition: str

    def as_json(self) -> dict[str, Any]:
        return {
            "opclass": self.opclass,
            "m": self.m,
            "ef_construction": self.ef_construction,
            "definition": self.definition,
        }


@dataclass(frozen=True)
class TableInfo:
    qualified: str  # schema.table, quoted, the key of the job in reembed_checkpoint
    ident: tuple[str, str]
    oid: int
    id_column: str
    id_type: str
    id_type_oid: int
    column: str
    content_column: str
    typmod: int | None  # the column's current dimension; None for plain `vector`
    index: IndexInfo | None  # the column's first HNSW index (the job's inventory has them all)
    registry: tuple[str, ...]
    attnum: int = 0  # the column's number (pg_attribute.attnum)
    column_type: str = "vector"  # the column's pgvector type: vector or halfvec

    def statement(self, name: str, *, column: str | None = None, **extra: Fill) -> sql.Composed | sql.SQL:
        """The statement `name` of sql/table.sql on this table; `column`: the column written
        (default: the embedding column); `extra`: the statement's own identifiers or literals."""
        fill: dict[str, Fill] = {
            "table": self.ident,
            "id": self.id_column,
            "col": column or self.column,
            "content": self.content_column,
            "id_type": sql.SQL(self.id_type),  # from format_type(): already quoted as needed
            "vtype": sql.SQL(self.column_type),  # vector or halfvec, a known keyword
        }
        fill.update(extra)
        return table_statement(name, fill)

    def index_ident(self, name: str) -> tuple[str, str]:
        """An index of this table, schema-qualified."""
        return (self.ident[0], name)


def inspect_target(conn: psycopg.Connection[Any], target: Target) -> TableInfo:
    parts = split_name(target.table)
    row = conn.execute(query("target_table"), {"table": regclass_text(parts)}).fetchone()
    ext = conn.execute(query("vector_extension")).fetchone()
    if ext is None:
        raise ConfigError(
            "the pgvector extension is not installed in this database; run CREATE EXTENSION vector "
            "(or point --dsn at the right database)"
        )
    if row is None:
        raise ConfigError(f"table {target.table} does not exist; check --table and --dsn")
    table = f"{target.table}"
    pk = row["pk_columns"] or []
    if len(pk) != 1:
        what = "no primary key" if not pk else f"a composite primary key ({', '.join(pk)})"
        raise ConfigError(
            f"table {table} has {what}; reembed walks the table in primary-key order and needs "
            "a single-column primary key"
        )
    column = _column(conn, row["table_oid"], target.column)
    if column is None:
        raise ConfigError(f"column {target.column} does not exist in {table}; check --column")
    if column["typname"] not in VECTOR_TYPES:
        raise ConfigError(
            f"column {target.column} of {table} is {column['formatted']}, not a pgvector vector or halfvec; "
            "check --column"
        )
    content = _column(conn, row["table_oid"], target.content_column)
    if content is None:
        raise ConfigError(f"column {target.content_column} does not exist in {table}; check --content-column")
    if content["typname"] not in ("text", "varchar", "bpchar", "citext", "name"):
        raise ConfigError(
            f"column {target.content_column} of {table} is {content['formatted']}, not text; check --content-column"
        )
    registry = split_name(target.registry)
    present = conn.execute(query("registry_exists"), {"registry": regclass_text(registry)}).fetchone()
    if not present or not present["present"]:
        raise ConfigError(
            f"registry table {target.registry} does not exist; create it (see README, 'The tables') "
            "or name it with --registry"
        )
    check_row_security(conn, [(table, int(row["table_oid"])), (target.registry, None)],
                       registry=regclass_text(registry))
    index = _index(conn, row["table_oid"], target, table)
    typmod = column["typmod"] if column["typmod"] and column["typmod"] > 0 else None
    return TableInfo(
        qualified=regclass_text((row["schema_name"], row["table_name"])),
        ident=(row["schema_name"], row["table_name"]),
        oid=int(row["table_oid"]),
        id_column=pk[0],
        id_type=row["pk_type"],
        id_type_oid=int(row["pk_type_oid"]),
        column=target.column,
        content_column=target.content_column,
        typmod=typmod,
        index=index,
        registry=registry,
        attnum=int(column["attnum"]),
        column_type=column["typname"],
    )


def check_row_security(conn: psycopg.Connection[Any], relations: list[tuple[str, int | None]], *,
                       registry: str) -> None:
    """Refuse (exit 2, before any write) a table whose row-level security policies apply to this
    role: the job would see, and re-embed, only the rows they let it (reembed's sessions run with
    row_security off, so PostgreSQL would raise instead, at the first statement they touch)."""
    for name, oid in relations:
        params = {"oid": oid, "name": registry if oid is None else None}
        row = conn.execute(query("row_security_applies"), params).fetchone()
        if row is None or not row["active"]:
            continue
        why = ("FORCE ROW LEVEL SECURITY applies its policies to its owner too" if row["forced"] and row["owns"]
               else f"it has row-level security and {row['me']} neither owns it nor has BYPASSRLS")
        raise ConfigError(
            f"{name}: {why}, so the job would see only the rows its policies allow; run reembed as a role with "
            f"BYPASSRLS (ALTER ROLE {row['me']} BYPASSRLS), or as the table's owner "
            f"({row['owner']}) with FORCE ROW LEVEL SECURITY off; nothing was written")


def _column(conn: psycopg.Connection[Any], oid: int, name: str) -> dict[str, Any] | None:
    return conn.execute(query("column_info"), {"table_oid": oid, "column": name}).fetchone()


def _index(conn: psycopg.Connection[Any], oid: int, target: Target, table: str) -> IndexInfo | None:
    rows = conn.execute(query("hnsw_indexes"), {"table_oid": oid, "column": target.column}).fetchall()
    if target.index is not None:
        # Not found is an error only for a new job: a resumed one dropped it already.
        rows = [r for r in rows if r["index_name"] == target.index]
    if not rows:
        return None
    chosen = rows[0]
    options = dict(_HNSW_DEFAULTS)
    for item in chosen["reloptions"] or []:
        key, _, value = item.partition("=")
        if key in options:
            options[key] = int(value)
    return IndexInfo(
        name=chosen["index_name"],
        opclass=chosen["opclass"],
        m=options["m"],
        ef_construction=options["ef_construction"],
        definition=chosen["definition"],
    )


def read_registry(conn: psycopg.Connection[Any], info: TableInfo) -> dict[str, Any] | None:
    return conn.execute(query("read_registry", registry=info.registry)).fetchone()
