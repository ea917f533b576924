"""The bridge in the database: a SQL function the application wraps around every vector it encodes
with the new model, whatever the column holds.

While the live column holds the old model's vectors the function maps a new-model vector into that
space (reembed.mapping's affine map, its rows in reembed_bridge_map, computed with pgvector's inner
product; unit length when the old vectors are); once a shadow job's swap put the new model's
vectors there it is the identity. The function is redefined inside the swap's transaction
(`at_swap`), mapped again inside rollback's swap back (`at_swap_back`), and kept as the identity by
`reembed cleanup` (`at_cleanup`: the map rows go, applications keep calling it) until
`reembed bridge --drop`. So the application encodes everything with the new model from the day the
bridge is installed, and never reads the registry or redeploys for the swap.

The current bridges of a (table, column) are its rows in reembed_bridge that are 'mapping' or
'identity', one per function name (a second name lets an application that wraps one model's vectors
move to another's: the old name stays until it is dropped). Installs are serialised per table by a
transaction-level advisory lock and hold the registry row FOR SHARE: a swap (which takes it FOR
UPDATE) comes before or after, never between.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import structlog
from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from reembed import checkpoint as ckpt
from reembed.errors import ConfigError, InternalError, ReembedError
from reembed.mapping import Fitted
from reembed.queries import query
from reembed.signature import Signature
from reembed.target import TableInfo, split_name

log = structlog.get_logger()

DEFAULT_FUNCTION = "reembed_query"
_LOCK_NAMESPACE = 0x72656562  # 'reeb': one install at a time per table


@dataclass(frozen=True)
class Bridge:
    """A row of reembed_bridge."""

    bridge_id: int
    table_name: str
    column_name: str
    function_schema: str
    function_name: str
    state: str
    job_id: int | None
    source_model_name: str
    source_dimension: int
    source_hash: str
    target_model_name: str
    target_dimension: int
    target_hash: str
    kind: str
    normalize: bool
    figures: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def function(self) -> tuple[str, str]:
        return (self.function_schema, self.function_name)

    @property
    def source(self) -> Signature:
        return Signature(self.source_model_name, self.source_dimension, self.source_hash)

    @property
    def target(self) -> Signature:
        return Signature(self.target_model_name, self.target_dimension, self.target_hash)

    @property
    def called(self) -> str:
        """The function as the application calls it."""
        return shown(self.function)


def shown(function: tuple[str, str]) -> str:
    return f"{sql.Identifier(*function).as_string()}(vector)"


def function_of(info: TableInfo, name: str | None) -> tuple[str, str]:
    """--bridge-function (name or schema.name; default reembed_query) in the table's schema."""
    parts = split_name(name or DEFAULT_FUNCTION, "function")
    return (parts[0], parts[1]) if len(parts) == 2 else (info.ident[0], parts[0])


def _present(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(query("bridge_tables_exist")).fetchone()
    return bool(row and row["present"])  # False: reembed's tables of a version before the bridge, or none yet


def _one(conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> Bridge | None:
    if not _present(conn):
        return None
    with conn.cursor(row_factory=class_row(Bridge)) as cur:
        return cur.execute(query(name), params).fetchone()


def current(conn: psycopg.Connection[Any], table: str, column: str) -> list[Bridge]:
    """The bridges the application calls now on (table, column): mapping or identity."""
    if not _present(conn):
        return []
    with conn.cursor(row_factory=class_row(Bridge)) as cur:
        return cur.execute(query("current_bridges"), {"table": table, "column": column}).fetchall()


def latest(conn: psycopg.Connection[Any], table: str, column: str) -> Bridge | None:
    """The newest bridge of (table, column) in any state (a refusal, a dropped one)."""
    return _one(conn, "latest_bridge", {"table": table, "column": column})


def named(conn: psycopg.Connection[Any], function: tuple[str, str]) -> Bridge | None:
    """The current bridge whose function this is."""
    return _one(conn, "bridge_of_function", {"schema": function[0], "name": function[1]})


def refused_since(conn: psycopg.Connection[Any], job: ckpt.Job, since: dt.datetime) -> Bridge | None:
    return _one(conn, "refused_bridge_since", {"job_id": job.id, "since": since})


def claim(conn: psycopg.Connection[Any], info: TableInfo) -> bool:
    """Inside the caller's transaction: this transaction is the one installing a bridge on the
    table (False: another one is, right now)."""
    row = conn.execute(query("bridge_install_lock"), {"key": _lock_key(info)})
    granted = row.fetchone()
    return bool(granted and granted["granted"])


def lock_fit(conn: psycopg.Connection[Any], info: TableInfo) -> bool:
    """This session takes the table's bridge lock for a fit and its install (False: another session
    holds it); it outlives the transaction: `unlock_fit` lets it go, or the session's end."""
    row = conn.execute(query("bridge_fit_lock"), {"key": _lock_key(info)}).fetchone()
    return bool(row and row["granted"])


def unlock_fit(conn: psycopg.Connection[Any], info: TableInfo) -> None:
    """Lets this session's bridge lock go, as often as a retried transaction took it (a session lock
    is taken again on each try, and outlives a rollback); a lost connection let it go already."""
    with contextlib.suppress(psycopg.Error), conn.transaction():
        for _ in range(100):
            row = conn.execute(query("bridge_fit_unlock"), {"key": _lock_key(info)}).fetchone()
            if not (row and row["released"]):
                return


def _lock_key(info: TableInfo) -> int:
    return (_LOCK_NAMESPACE << 32) | (info.oid & 0xFFFFFFFF)


def install(conn: psycopg.Connection[Any], info: TableInfo, fitted: Fitted, *, source: Signature,
            target: Signature, function: tuple[str, str], job_id: int | None) -> Bridge:
    """Inside the caller's transaction (after `claim`): the map's rows, its row in reembed_bridge and
    the function, replacing the bridge of that name (a re-fit for the same model). Refused (nothing
    written) when the column no longer holds `source`'s vectors or the name is not free."""
    check_source(conn, info, source)
    previous = check_function(conn, info, function, target)
    if previous is not None:
        check_owners(conn, info, [previous])
        _set_state(conn, previous, "replaced")
    made = _insert(conn, info, fitted, source=source, target=target, function=function, job_id=job_id,
                   state="mapping")
    weight, bias = fitted.map.weight, fitted.map.bias
    with conn.cursor() as cur:
        cur.executemany(query("insert_bridge_row"), [
            {"bridge_id": made.bridge_id, "i": i, "w": _text(weight[:, i]), "b": float(bias[i])}
            for i in range(weight.shape[1])])
    _define_map(conn, made)
    log.info("bridge_installed", function=made.called, kind=made.kind, source=source.name, target=target.name,
             **{k: fitted.figures.get(k) for k in ("recall_vs_old", "recall_vs_new", "self_recall", "pairs")})
    return made


def record_refused(conn: psycopg.Connection[Any], info: TableInfo, fitted: Fitted, *, source: Signature,
                   target: Signature, function: tuple[str, str], job_id: int | None) -> Bridge:
    """A fit below --bridge-min-recall, for `status` (no map, no function)."""
    return _insert(conn, info, fitted, source=source, target=target, function=function, job_id=job_id,
                   state="refused")


def check_source(conn: psycopg.Connection[Any], info: TableInfo, source: Signature) -> None:
    """The registry names `source` (the model whose vectors the pairs' old side came from), held
    FOR SHARE until the caller's transaction ends."""
    row = conn.execute(query("registry_for_share", registry=info.registry)).fetchone()
    if row is None or row["model_hash"] != source.hash:
        now = f"{row['model_name']} ({row['model_hash']})" if row else "nothing (no registry row)"
        raise ReembedError(f"the registry of {info.qualified} names {now}, not {source.name} ({source.hash}) whose "
                           "vectors the bridge was fitted on: the column changed meanwhile; no bridge was installed")


def check_function(conn: psycopg.Connection[Any], info: TableInfo, function: tuple[str, str],
                   target: Signature) -> Bridge | None:
    """The function name is free, or this table's bridge for the same model (returned: a re-fit
    replaces it); refused otherwise (exit 2)."""
    check_schema(conn, function)
    owner = named(conn, function)
    shown = sql.Identifier(*function).as_string()
    if owner is not None and (owner.table_name, owner.column_name) != (info.qualified, info.column):
        raise ConfigError(f"function {shown} is the bridge of {owner.table_name}.{owner.column_name}: give this "
                          "table's bridge another name (--bridge-function); nothing was written")
    if owner is not None and owner.target_hash != target.hash:
        raise ConfigError(f"the application wraps {owner.target_model_name}'s vectors in {owner.called}: a map for "
                          f"{target.name} under that name would take them for {target.name}'s; install it under "
                          "another name (--bridge-function), move the application to it, then drop this one "
                          "(`reembed bridge --drop --bridge-function ...`); nothing was written")
    taken = conn.execute(query("function_exists"), {"schema": function[0], "name": function[1]}).fetchall()
    if taken and owner is None:
        raise ConfigError(f"a function {', '.join(r['signature'] for r in taken)} exists and is not a bridge of "
                          "reembed's: name the bridge otherwise (--bridge-function); nothing was written")
    return owner


def check_schema(conn: psycopg.Connection[Any], function: tuple[str, str]) -> None:
    """The schema a bridge's function goes in, before anything is encoded or written: not one of
    PostgreSQL's own (pg_temp's function would vanish with reembed's session), one that exists, and
    this role may create in it; refused otherwise (exit 2)."""
    schema = function[0]
    named_as = sql.Identifier(schema).as_string()
    if schema.startswith("pg_"):
        raise ConfigError(f"the bridge {shown(function)} would be in {named_as}, a schema of PostgreSQL's own "
                          "(pg_catalog, pg_toast*, pg_temp*: a function in pg_temp vanishes with reembed's session): "
                          "name it in a schema of the application's (--bridge-function schema.name); nothing was "
                          "written")
    row = conn.execute(query("function_schema_rights"), {"schema": schema}).fetchone()
    if row is None:
        raise ConfigError(f"schema {named_as} does not exist, so the bridge {shown(function)} cannot be installed "
                          "there: create the schema, or name the bridge in another (--bridge-function schema.name); "
                          "nothing was written")
    if not row["can_create"]:
        role = sql.Identifier(row["role"]).as_string()
        raise ConfigError(f"role {role} may not create functions in schema {named_as} (no CREATE on it), so the "
                          f"bridge {shown(function)} cannot be installed there: GRANT CREATE ON SCHEMA {named_as} "
                          f"TO {role}, or name the bridge in another schema (--bridge-function schema.name); "
                          "nothing was written")


def check_owners(conn: psycopg.Connection[Any], info: TableInfo, bridges: list[Bridge] | None = None, *,
                 create: bool = True) -> None:
    """Before anything is written: the role reembed runs as has the owner's rights on the function
    of each current bridge of the table (or of `bridges`), which the swap, rollback's swap back and
    a re-fit redefine (CREATE OR REPLACE FUNCTION), cleanup comments and --drop drops; and (`create`)
    may create in its schema, which CREATE OR REPLACE asks too. ConfigError (exit 2) otherwise. A
    function gone (dropped by hand) is no obstacle: CREATE OR REPLACE makes it again."""
    for b in current(conn, info.qualified, info.column) if bridges is None else bridges:
        signature = _signature(conn, b.function)
        row = conn.execute(query("function_owner_rights"), {"signature": signature}).fetchone()
        if row is None:
            continue
        role, owner = sql.Identifier(row["role"]).as_string(), sql.Identifier(row["owner"]).as_string()
        if not row["owns"]:
            raise ConfigError(f"the bridge {b.called} is owned by role {owner}, and {role}, the role reembed runs "
                              "as, has not its rights: the swap, rollback's swap back and a re-fit redefine it, "
                              "cleanup comments it and --drop drops it, which only its owner may; run "
                              f"`ALTER FUNCTION {signature} OWNER TO {role}`, or run reembed as {owner}; nothing "
                              "was written")
        if create and not row["can_create"]:
            schema = sql.Identifier(row["schema"]).as_string()
            raise ConfigError(f"role {role} may not create functions in schema {schema} (no CREATE on it): the "
                              f"swap, rollback's swap back and a re-fit redefine the bridge {b.called} there "
                              f"(CREATE OR REPLACE FUNCTION asks it); GRANT CREATE ON SCHEMA {schema} TO {role}; "
                              "nothing was written")


def at_swap(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job) -> None:
    """Inside a shadow job's swap: the column now holds the job's model's vectors, and the table's
    bridges become the identity in the same transaction."""
    for bridge in current(conn, info.qualified, info.column):
        if bridge.target_hash != job.target_hash:
            raise ReembedError(f"the bridge {bridge.called} takes {bridge.target_model_name}'s vectors for "
                               f"{info.qualified}.{info.column}, but job {job.id} swaps in {job.target_model_name}'s: "
                               "the application would search one model's vectors with another's; nothing was "
                               "swapped; `reembed bridge --drop` it once no application calls it, and run again")
        if bridge.state == "mapping":
            define_identity(conn, bridge, f"the identity since the swap of job {job.id}")
            _set_state(conn, bridge, "identity")
            log.info("bridge_identity", function=bridge.called, job_id=job.id)


def at_swap_back(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job) -> None:
    """Inside rollback's swap back: the column holds the old model's vectors again, and the bridges
    that the swap made the identity map into them again."""
    for bridge in current(conn, info.qualified, info.column):
        if bridge.state != "identity" or bridge.target_hash != job.target_hash:
            continue
        if job.source_hash != bridge.source_hash:
            raise ReembedError(f"the bridge {bridge.called} maps into {bridge.source_model_name}'s space, but the "
                               f"column goes back to {job.source_model_name}'s; nothing was swapped back")
        rows = conn.execute(query("bridge_map_rows"), {"bridge_id": bridge.bridge_id}).fetchone()
        if not rows or int(rows["n"]) != bridge.source_dimension:
            raise ReembedError(f"the map of bridge {bridge.called} is gone from reembed_bridge_map (deleted by "
                               "hand?): the application's vectors could not be mapped back; nothing was swapped back")
        _define_map(conn, bridge)
        _set_state(conn, bridge, "mapping")
        log.info("bridge_mapping_again", function=bridge.called, job_id=job.id)


def at_cleanup(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job) -> None:
    """Inside `reembed cleanup`: no swap back is possible any more; the functions stay the identity
    (the application keeps calling them) and their map rows go."""
    for bridge in current(conn, info.qualified, info.column):
        if bridge.state != "identity" or bridge.target_hash != job.target_hash:
            continue
        conn.execute(query("forget_bridge_map"), {"bridge_id": bridge.bridge_id})
        _comment(conn, bridge, f"the identity since job {job.id} (its previous column cleaned up)")
        log.info("bridge_kept_as_identity", function=bridge.called,
                 detail="applications keep calling it; `reembed bridge --drop` removes it once none does")


def drop(conn: psycopg.Connection[Any], info: TableInfo, function: tuple[str, str] | None) -> Bridge:
    """`reembed bridge --drop`: a bridge of the table (by its function; None: its only one)."""
    found = current(conn, info.qualified, info.column)
    if function is not None:
        found = [b for b in found if b.function == function]
    if len(found) != 1:
        names = ", ".join(b.called for b in current(conn, info.qualified, info.column))
        raise ConfigError(f"nothing to drop: {info.qualified}.{info.column} has no bridge of that name"
                          + (f" (it has {names}: name one with --bridge-function)" if names else ""))
    bridge = found[0]
    check_owners(conn, info, [bridge], create=False)
    needing = [r["what"] for r in conn.execute(query("function_dependents"),
                                                {"signature": _signature(conn, bridge.function)}).fetchall()]
    if needing:
        raise ConfigError(f"{'; '.join(needing)} depend{'s' if len(needing) == 1 else ''} on {bridge.called}: "
                          "dropping it would break them (or drop them with it); change or drop them first, then "
                          "drop the bridge; nothing was dropped")
    conn.execute(query("drop_bridge_function", function=bridge.function, vschema=_vschema(conn)))
    conn.execute(query("forget_bridge_map"), {"bridge_id": bridge.bridge_id})
    _set_state(conn, bridge, "dropped")
    log.info("bridge_dropped", function=bridge.called)
    return bridge


def said(bridge: Bridge) -> str:
    """One line for `status`, `plan` and the reports."""
    f = bridge.figures
    measured = (f"recall@{f.get('k', 10)} vs the old model's neighbours {f['recall_vs_old']:.3f}, vs the new "
                f"model's {f['recall_vs_new']:.3f}, rows found {f['self_recall']:.3f} on {f['held_out']:,} held-out "
                f"rows ({bridge.kind}, {f['pairs']:,} pairs)") if "recall_vs_old" in f else "not measured"
    what = {"mapping": f"maps {bridge.target_model_name} ({bridge.target_dimension}-d) into {bridge.source_model_name} "
                       f"({bridge.source_dimension}-d)",
            "identity": f"is the identity ({bridge.target_model_name} is in the column)",
            "refused": f"REFUSED: {f.get('refused', 'below --bridge-min-recall')}; not installed",
            "replaced": "was replaced", "dropped": "was dropped"}.get(bridge.state, bridge.state)
    return f"{bridge.called} {what}; {measured}"


def wrap(expression: str, bridge: Bridge) -> str:
    """A query vector's SQL expression passed through the bridge, evaluated once per statement."""
    return f"(SELECT {sql.Identifier(*bridge.function).as_string()}({expression}))"


def _insert(conn: psycopg.Connection[Any], info: TableInfo, fitted: Fitted, *, source: Signature,
            target: Signature, function: tuple[str, str], job_id: int | None, state: str) -> Bridge:
    with conn.cursor(row_factory=class_row(Bridge)) as cur:
        made = cur.execute(query("insert_bridge"), {
            "table": info.qualified, "column": info.column, "function_schema": function[0],
            "function_name": function[1], "state": state, "job_id": job_id,
            "source_model_name": source.name, "source_dimension": source.dimension, "source_hash": source.hash,
            "target_model_name": target.name, "target_dimension": target.dimension, "target_hash": target.hash,
            "kind": fitted.map.kind, "normalize": fitted.map.normalize, "figures": Jsonb(fitted.figures),
        }).fetchone()
    if made is None:
        raise InternalError("insert_bridge returned no row")
    return made


def _set_state(conn: psycopg.Connection[Any], bridge: Bridge, state: str) -> None:
    moved = conn.execute(query("set_bridge_state"), {"bridge_id": bridge.bridge_id, "state": state,
                                                     "from_state": bridge.state}).rowcount
    if moved != 1:
        raise ReembedError(f"the bridge {bridge.called} is no longer {bridge.state} (changed by another run?); "
                           "run again")


def _define_map(conn: psycopg.Connection[Any], bridge: Bridge) -> None:
    vschema = _vschema(conn)
    normalize = sql.SQL("{}.l2_normalize").format(sql.Identifier(vschema)) if bridge.normalize else sql.SQL("")
    tools = _tool_schema(conn)
    conn.execute(query("create_bridge_function", function=bridge.function, vschema=vschema, normalize=normalize,
                       map=(tools, "reembed_bridge_map"), bridges=(tools, "reembed_bridge"),
                       function_schema=sql.Literal(bridge.function_schema),
                       function_name=sql.Literal(bridge.function_name)))
    _comment(conn, bridge, f"maps {bridge.target_model_name} into {bridge.source_model_name}")


def define_identity(conn: psycopg.Connection[Any], bridge: Bridge, why: str) -> None:
    """The function as the identity (`why`: its comment), inside the caller's transaction."""
    conn.execute(query("create_identity_function", function=bridge.function, vschema=_vschema(conn)))
    _comment(conn, bridge, why)


def _comment(conn: psycopg.Connection[Any], bridge: Bridge, what: str) -> None:
    text = (f"reembed's bridge for {bridge.table_name}.{bridge.column_name}: {what}. Wrap every vector the "
            f"application encodes with {bridge.target_model_name} in it (see reembed's runbook, \"The bridge\").")
    conn.execute(query("comment_bridge_function", function=bridge.function, vschema=_vschema(conn),
                       comment=sql.Literal(text)))


def _vschema(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute(query("vector_schema")).fetchone()
    if row is None:
        raise ConfigError("the pgvector extension is not installed in this database; run CREATE EXTENSION vector")
    return str(row["schema"])


def _signature(conn: psycopg.Connection[Any], function: tuple[str, str]) -> str:
    """The bridge's function with its argument type, schema-qualified (to_regprocedure's, ALTER FUNCTION's)."""
    return f"{sql.Identifier(*function).as_string()}({sql.Identifier(_vschema(conn), 'vector').as_string()})"


def _tool_schema(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute(query("tool_schema_of_bridge")).fetchone()
    if row is None:
        raise ReembedError("reembed_bridge_map is missing (dropped by hand?); run `reembed bridge` again")
    return str(row["schema"])


def _text(vector: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in np.asarray(vector, dtype=np.float32)) + "]"
