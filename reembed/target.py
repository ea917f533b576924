"""What the job works on: the table, its key, the vector column, the HNSW index, the registry.
Every problem found here is a ConfigError, raised before anything is written."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from reembed.errors import ConfigError
from reembed.queries import Fill, query, table_statement
from reembed.settings import Target

_HNSW_DEFAULTS = {"m": 16, "ef_construction": 64}
VECTOR_TYPES = ("vector", "halfvec")  # the column types re-embedded (sparsevec and bit are not a model's output)


def split_name(name: str, what: str = "table") -> tuple[str, ...]:
    """'schema.table' -> ('schema', 'table'); 'table' -> ('table',). Quotes allowed. `what`: the
    kind of name, as the error says it ("function" for --bridge-function)."""
    parts = re.findall(r'"((?:[^"]|"")*)"|([^."]+)', name)
    out = tuple(q.replace('""', '"') if q else p for q, p in parts)
    if not out or len(out) > 2:
        raise ConfigError(f"cannot read {what} name {name!r}: write it as {what} or schema.{what}")
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
class Key:
    """The table's primary key, as the statements of sql/table.sql use it. A key's text form (the
    cursors, the captured keys, the failed rows: all text) is its column's `::text` for a one-column
    key, and a JSON array of its columns' `::text` for a composite one (`["7", "k0042"]`); each is
    parsed back to a row value the key's index serves: keyset reads compare rows, `(a, b) > (x, y)`."""

    columns: tuple[str, ...]
    types: tuple[str, ...]  # format_type() of each: already quoted as needed
    type_oids: tuple[int, ...]

    @property
    def composite(self) -> bool:
        return len(self.columns) > 1

    def _cols(self, q: str | None) -> list[sql.Composable]:
        if q in ("NEW", "OLD"):  # a trigger's record: a keyword, not an identifier to quote
            return [sql.SQL(f"{q}.") + sql.Identifier(c) for c in self.columns]
        return [sql.Identifier(q, c) if q else sql.Identifier(c) for c in self.columns]

    def row(self, q: str | None = None) -> sql.Composable:
        """`a`, or the row `(a, b)` (its columns qualified by `q`)."""
        cols = self._cols(q)
        return cols[0] if not self.composite else sql.SQL("({})").format(sql.SQL(", ").join(cols))

    def order(self, q: str | None = None) -> sql.Composable:
        return sql.SQL(", ").join(self._cols(q))

    def text(self, q: str | None = None) -> sql.Composable:
        """The key's text form, computed from the row."""
        cols = [sql.SQL("{}::text").format(c) for c in self._cols(q)]
        return cols[0] if not self.composite else sql.SQL("json_build_array({})::text").format(sql.SQL(", ").join(cols))

    def of(self, text: sql.Composable) -> sql.Composable:
        """The key (a value, or a row of values) whose text form `text` is."""
        if not self.composite:
            return sql.SQL("CAST({} AS {})").format(text, sql.SQL(self.types[0]))
        parts = [sql.SQL("(({})::json->>{})::{}").format(text, sql.Literal(i), sql.SQL(t))
                 for i, t in enumerate(self.types)]
        return sql.SQL("({})").format(sql.SQL(", ").join(parts))

    def select(self) -> sql.Composable:
        """The key's columns as a read returns them: `id`, or `id_0, id_1, ...`."""
        if not self.composite:
            return sql.SQL("{} AS id").format(sql.Identifier(self.columns[0]))
        return sql.SQL(", ").join(sql.SQL("{} AS {}").format(c, sql.Identifier(f"id_{i}"))
                                  for i, c in enumerate(self._cols(None)))

    def stage_names(self) -> list[str]:
        return ["id"] if not self.composite else [f"id_{i}" for i in range(len(self.columns))]

    def fills(self) -> dict[str, sql.Composable]:
        stage = self.stage_names()
        parsed = sql.SQL("k")
        change_cols = [sql.SQL("{} AS {}").format(part, sql.Identifier(f"k{i}"))
                       for i, part in enumerate(self._parts(sql.SQL("row_id")))]
        return {
            "id": self.row(),
            "id_order": self.order(),
            "id_text": self.text(),
            "id_select": self.select(),
            "t_id": self.row("t"),
            "t_id_text": self.text("t"),
            "new_id_text": self.text("NEW"),
            "key_changed": sql.SQL("{} IS DISTINCT FROM {}").format(self.row("OLD"), self.row("NEW")),
            "after_id": self.of(sql.Placeholder("after")),
            "upper_id": self.of(sql.Placeholder("upper")),
            "ids_match": (sql.SQL("{} = ANY(CAST(%(ids)s AS {}[]))").format(self.row(), sql.SQL(self.types[0]))
                          if not self.composite else
                          sql.SQL("{} IN (SELECT {} FROM unnest(CAST(%(ids)s AS text[])) AS k)").format(
                              self.row(), sql.SQL(", ").join(self._parts(parsed)))),
            "stage_defs": sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t))
                                             for n, t in zip(stage, self.types, strict=True)),
            "stage_cols": sql.SQL(", ").join(sql.Identifier(n) for n in stage),
            "s_id": (sql.Identifier("s", stage[0]) if not self.composite else
                     sql.SQL("({})").format(sql.SQL(", ").join(sql.Identifier("s", n) for n in stage))),
            "v_id": self.of(sql.SQL("v.k")),
            "row_id_key": self.of(sql.SQL("row_id")),
            "c_row_id_key": self.of(sql.SQL("c.row_id")),
            "row_id_cols": sql.SQL(", ").join(change_cols),
            "row_id_order": sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(len(self.columns))),
        }

    def _parts(self, text: sql.Composable) -> list[sql.Composable]:
        if not self.composite:
            return [sql.SQL("CAST({} AS {})").format(text, sql.SQL(self.types[0]))]
        return [sql.SQL("(({})::json->>{})::{}").format(text, sql.Literal(i), sql.SQL(t))
                for i, t in enumerate(self.types)]


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
    content_sql: str | None = None  # --content: the text as a SQL expression over the row (else the column)
    content_reads: tuple[str, ...] = ()  # the columns the text is made of (what capture compares)
    null_content: str = "null"  # a NULL text: "null" (a NULL vector) or "empty" (the empty text's vector)
    not_null: bool = False  # the vector column is NOT NULL: no row may be left without a vector
    key: Key | None = None  # the primary key (None: id_column alone, as an older caller built it)

    @property
    def pk(self) -> Key:
        return self.key or Key((self.id_column,), (self.id_type,), (self.id_type_oid,))
    partitioned: bool = False  # a partitioned table (relkind 'p'): its rows are in its partitions (reembed.partitions)

    def statement(self, name: str, *, column: str | None = None, **extra: Fill) -> sql.Composed | sql.SQL:
        """The statement `name` of sql/table.sql on this table; `column`: the column written
        (default: the embedding column); `extra`: the statement's own identifiers or literals."""
        fill: dict[str, Fill] = {
            **self.pk.fills(),
            "table": self.ident,
            "col": column or self.column,
            "content": self.content,
            "changed": self.content_changed,
            "id_type": sql.SQL(self.id_type),  # from format_type(): already quoted as needed
            "vtype": sql.SQL(self.column_type),  # vector or halfvec, a known keyword
        }
        fill.update(extra)
        return table_statement(name, fill)

    @property
    def content(self) -> sql.Composable:
        """The text each row is encoded from: the content column, or the --content expression
        (the operator's SQL, checked at inspection), with a NULL as the empty text under
        --null-content empty."""
        text: sql.Composable = sql.Identifier(self.content_column) if self.content_sql is None \
            else sql.SQL("({})::text").format(sql.SQL(self.content_sql))
        return sql.SQL("coalesce({}, '')").format(text) if self.null_content == "empty" else text

    @property
    def content_changed(self) -> sql.Composable:
        """In a row trigger: did the text's columns change (by value)?"""
        reads = self.content_reads or (self.content_column,)
        return sql.SQL("(") + sql.SQL(" OR ").join(
            sql.SQL("OLD.{c} IS DISTINCT FROM NEW.{c}").format(c=sql.Identifier(c)) for c in reads) + sql.SQL(")")

    def index_ident(self, name: str) -> tuple[str, str]:
        """An index of this table, schema-qualified."""
        return (self.ident[0], name)

    def on(self, oid: int, ident: tuple[str, str], attnum: int, *, partitioned: bool = False) -> TableInfo:
        """This description for another relation with the same columns (a partition of this table):
        its statements run there. Never a job's key: `qualified` names the partition."""
        return replace(self, oid=oid, ident=ident, qualified=regclass_text(ident), attnum=attnum, index=None,
                       partitioned=partitioned)


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
    if not pk:
        raise ConfigError(
            f"table {table} has no primary key; reembed walks the table in primary-key order and needs one "
            "(of one column or several); add one")
    column = _column(conn, row["table_oid"], target.column)
    if column is None:
        raise ConfigError(f"column {target.column} does not exist in {table}; check --column")
    if column["typname"] not in VECTOR_TYPES:
        raise ConfigError(
            f"column {target.column} of {table} is {column['formatted']}, not a pgvector vector or halfvec; "
            "check --column"
        )
    if target.content is None:
        content = _column(conn, row["table_oid"], target.content_column)
        if content is None:
            raise ConfigError(f"column {target.content_column} does not exist in {table}; check --content-column")
        if content["typname"] not in ("text", "varchar", "bpchar", "citext", "name"):
            raise ConfigError(
                f"column {target.content_column} of {table} is {content['formatted']}, not text; check "
                "--content-column")
        reads: tuple[str, ...] = (target.content_column,)
    else:
        reads = _expression_reads(conn, int(row["table_oid"]), (row["schema_name"], row["table_name"]),
                                  target.content, table)
    if target.column in reads:
        raise ConfigError(f"the text to encode ({target.content or target.content_column}) reads the vector "
                          f"column {target.column} itself; give the text's own columns")
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
        id_type=row["pk_types"][0],
        id_type_oid=int(row["pk_type_oids"][0]),
        key=Key(tuple(pk), tuple(row["pk_types"]), tuple(int(o) for o in row["pk_type_oids"])),
        column=target.column,
        content_column=target.content_column,
        typmod=typmod,
        index=index,
        registry=registry,
        attnum=int(column["attnum"]),
        column_type=column["typname"],
        content_sql=target.content,
        content_reads=reads,
        null_content=target.null_content,
        not_null=bool(column["not_null"]),
        partitioned=row["relkind"] == "p",
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


def _expression_reads(conn: psycopg.Connection[Any], oid: int, ident: tuple[str, str], expression: str,
                      table: str) -> tuple[str, ...]:
    """--content: the expression must be one expression over the row that PostgreSQL can turn into
    text (tried, and made into a temporary view, in a transaction rolled back); the columns it reads,
    from that view's dependencies (what capture compares, by value)."""
    text = sql.SQL("({})::text").format(sql.SQL(expression))
    try:
        with conn.transaction(force_rollback=True):
            # prepared: one statement only (an expression with a `;` in it is refused here)
            conn.execute(query("content_probe", table=ident, text=text), prepare=True)
            conn.execute(query("content_probe_view", table=ident, text=text))
            rows = conn.execute(query("content_probe_reads"), {"table_oid": oid}).fetchall()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--content {expression!r} is not an expression over a row of {table} that can be "
                          f"text: {first}; write it as for a SELECT list, its columns unqualified") from None
    if not rows or any(r["attnum"] == 0 for r in rows):  # a whole-row reference, or none at all
        raise ConfigError(f"--content {expression!r} reads the whole row of {table}, or none of its columns; name "
                          "the columns the text is made of (capture compares them)")
    return tuple(r["attname"] for r in rows)


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
