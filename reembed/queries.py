"""The named SQL in sql/, loaded once (shipped inside the wheel as package `reembed.sql`).

`queries.sql` holds reembed's own statements (plain values only). `table.sql` holds the
statements on the user's table, whose identifiers are filled in by reembed.target.TableInfo.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

from psycopg import sql

_NAME = re.compile(r"^--\s*name:\s*(\S+)\s*$", re.MULTILINE)
_LEADING_COMMENTS = re.compile(r"\A(?:\s*--[^\n]*\n)*")

Fill = str | tuple[str, ...] | sql.Composable


def read_sql(filename: str) -> str:
    try:
        package = resources.files("reembed.sql")
    except ModuleNotFoundError:  # imported from a source checkout (cwd on sys.path): sql/ is beside us
        return (Path(__file__).resolve().parent.parent / "sql" / filename).read_text(encoding="utf-8")
    return package.joinpath(filename).read_text(encoding="utf-8")


@functools.cache
def _named(filename: str) -> dict[str, str]:
    parts = _NAME.split(read_sql(filename))
    # parts = [preamble, name1, body1, name2, body2, ...]; a body's leading comment lines
    # document it and stay out of the statement (pg_stat_activity shows what runs)
    return {name: _LEADING_COMMENTS.sub("", body).strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(name: str, **fill: Fill) -> sql.Composed | sql.SQL:
    """A statement of queries.sql, with {braced} identifiers filled in safely."""
    return _compose(_named("queries.sql")[name], fill)


def table_statement(name: str, fill: dict[str, Fill]) -> sql.Composed | sql.SQL:
    """A statement of table.sql; call it through TableInfo.sql(), which knows the identifiers."""
    return _compose(_named("table.sql")[name], fill)


def _compose(text: str, fill: dict[str, Fill]) -> sql.Composed | sql.SQL:
    template = sql.SQL(text)
    if not fill:
        return template
    return template.format(**{k: _part(v) for k, v in fill.items()})


def _part(value: Fill) -> sql.Composable:
    if isinstance(value, sql.Composable):
        return value
    return sql.Identifier(*value) if isinstance(value, tuple) else sql.Identifier(value)


def schema_sql() -> str:
    return read_sql("schema.sql")


def names() -> list[str]:
    return sorted(_named("queries.sql"))
