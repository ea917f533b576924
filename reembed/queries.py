"""Loads the named SQL in sql/ once (shipped inside the wheel as package `reembed.sql`)."""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

from psycopg import sql

_NAME = re.compile(r"^--\s*name:\s*(\S+)\s*$", re.MULTILINE)


def read_sql(filename: str) -> str:
    try:
        package = resources.files("reembed.sql")
    except ModuleNotFoundError:  # imported from a source checkout (cwd on sys.path): sql/ is beside us
        return (Path(__file__).resolve().parent.parent / "sql" / filename).read_text(encoding="utf-8")
    return package.joinpath(filename).read_text(encoding="utf-8")


@functools.cache
def _named() -> dict[str, str]:
    text = read_sql("queries.sql")
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(name: str, **identifiers: str | tuple[str, ...]) -> sql.Composed | sql.SQL:
    """The named query, with {braced} identifiers filled in safely."""
    text = _named()[name]
    template = sql.SQL(text)  # type: ignore[arg-type]
    if not identifiers:
        return template
    return template.format(**{k: _ident(v) for k, v in identifiers.items()})


def _ident(value: str | tuple[str, ...]) -> sql.Identifier:
    return sql.Identifier(*value) if isinstance(value, tuple) else sql.Identifier(value)


def schema_sql() -> str:
    return read_sql("schema.sql")


def names() -> list[str]:
    return sorted(_named())
