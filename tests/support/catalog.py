"""The catalog oracle: `pg_dump --schema-only` of the whole database before and after a job.

A fixture only holds what its author thought of; the dump holds everything PostgreSQL keeps:
views and their rules, triggers, column grants, comments, statistics targets, storage, policies,
defaults, publications, ownership. A job may change exactly what it exists for (the column's
vectors' dimension, in the column and wherever the definitions name it) and reembed's own objects;
everything else must be the same, entry by entry.

    before = catalog.snapshot(dsn, dims=(64, 48))
    ... the job ...
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48)))

Each TOC entry of the dump (its `-- Name: ...; Type: ...` header and its statements) is one item,
compared as a multiset: pg_dump orders entries by dependencies and OIDs, which a re-created view
changes without changing anything the database means.
"""

from __future__ import annotations

import collections
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_HEADER = re.compile(r"^-- (?:Data for )?Name: (?P<name>.*?); Type: (?P<type>.*?); Schema: (?P<schema>.*?); "
                     r"Owner: (?P<owner>.*)$")
_DIMS = r"(vector|halfvec|bit|sparsevec)\((\d+)\)"
# pg_dump's own session settings between entries (which entry they follow depends on the order)
_SESSION = re.compile(r"^SET (default_tablespace|default_table_access_method) = ")


def pg_dump_path() -> Path:
    import pgserver

    return Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"


def dump(dsn: str) -> str:
    """`pg_dump --schema-only` of the database `dsn` names (pg_dump 18 reads servers 9.2 and newer)."""
    done = subprocess.run([str(pg_dump_path()), "--schema-only", "--no-sync", "-d", dsn],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"pg_dump failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Entry:
    """One TOC entry: what it is, and its statements (comments and blank lines dropped)."""

    type: str
    schema: str
    name: str
    owner: str
    body: str

    def __str__(self) -> str:
        return f"[{self.type} {self.schema}.{self.name} owner {self.owner}]\n{self.body}"


def entries(text: str) -> list[Entry]:
    out: list[Entry] = []
    header: dict[str, str] | None = None
    body: list[str] = []

    def close() -> None:
        if header is not None:
            out.append(Entry(header["type"], header["schema"], header["name"], header["owner"],
                             "\n".join(body).strip()))

    for line in text.splitlines():
        match = _HEADER.match(line)
        if match:
            close()
            header, body = match.groupdict(), []
            continue
        if line.startswith("--") or line.startswith(("\\restrict", "\\unrestrict")) or _SESSION.match(line):
            continue
        if header is not None and line.strip():
            body.append(line.rstrip())
    close()
    return out


@dataclass(frozen=True)
class Snapshot:
    entries: tuple[Entry, ...]

    def named(self, fragment: str) -> list[Entry]:
        return [e for e in self.entries if fragment in e.name or fragment in e.body]


def _ours(text: str) -> bool:
    """Names one of reembed's own objects (its tables and their keys, indexes, sequences, defaults,
    triggers, functions and constraints are all named reembed_...)."""
    return any(w.startswith("reembed_") for w in re.split(r"[\s.\"(),]+", text) if w)


def normalise(text: str, dims: Iterable[int]) -> str:
    """The dimensions the job exists to change, written as N."""
    wanted = {str(d) for d in dims}
    return re.sub(_DIMS, lambda m: f"{m.group(1)}(N)" if m.group(2) in wanted else m.group(0), text)


def snapshot(dsn: str, *, dims: Iterable[int] = (), ignore: Sequence[str] = (),
             any_column_order: bool = False) -> Snapshot:
    """The dump's entries less reembed's own, with the dimensions in `dims` normalised; every
    line that names one of `ignore` (identifiers: a shadow job's previous column and its indexes)
    left out, and an entry left empty by that dropped; `any_column_order`: a table's columns
    compared as a set (a shadow swap puts the new column last: `SELECT *` lists it last)."""
    dims = tuple(dims)
    kept = []
    for entry in entries(dump(dsn)):
        if _ours(entry.name) or any(_names(entry.name, name) for name in ignore):
            continue  # reembed's own object, or one the caller leaves out
        body = normalise(entry.body, dims)
        # a line of someone else's entry about one of ours (a constraint of ours in CREATE TABLE; a
        # statement about our table's rows) goes; the rest of the entry is compared
        lines = [line for line in body.splitlines()
                 if not _ours(line) and not any(_names(line, name) for name in ignore)]
        if not lines:
            continue
        if any_column_order and entry.type == "TABLE":
            lines = _columns_sorted(lines)
        kept.append(Entry(entry.type, entry.schema, entry.name, entry.owner, "\n".join(lines)))
    return Snapshot(tuple(kept))


def _columns_sorted(lines: list[str]) -> list[str]:
    """CREATE TABLE's column lines (indented, between its parentheses) sorted, commas dropped."""
    out, inside, block = [], False, []
    for line in lines:
        if line.startswith("CREATE TABLE") and line.endswith("("):
            inside = True
            out.append(line)
            continue
        if inside and line.startswith(")"):
            out += sorted(block)
            inside, block = False, []
        if inside:
            block.append(line.rstrip(","))
        else:
            out.append(line)
    return out


def _names(text: str, column: str) -> bool:
    return re.search(rf"(?<![\w\"]){re.escape(column)}(?![\w\"])", text) is not None


def difference(before: Snapshot, after: Snapshot) -> tuple[list[Entry], list[Entry]]:
    """(entries gone, entries new)."""
    a, b = collections.Counter(before.entries), collections.Counter(after.entries)
    return list((a - b).elements()), list((b - a).elements())


def assert_unchanged(before: Snapshot, after: Snapshot, *, allowed: Sequence[str] = ()) -> None:
    """Nothing PostgreSQL keeps differs but what `allowed` names (regular expressions matched
    against an entry's header and statements, gone or new)."""
    gone, new = difference(before, after)
    gone = [e for e in gone if not any(re.search(p, str(e)) for p in allowed)]
    new = [e for e in new if not any(re.search(p, str(e)) for p in allowed)]
    if gone or new:
        lines = ["the catalog changed beyond what the job exists for:"]
        lines += [f"- GONE {e}" for e in gone]
        lines += [f"+ NEW  {e}" for e in new]
        raise AssertionError("\n".join(lines))
