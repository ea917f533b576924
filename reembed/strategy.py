"""Strategies: how a job makes room for the new vectors, where batches write them, and how
it finishes. The coordinator, the worker and finalize only talk to this protocol, so a
second strategy (a shadow column swapped in at the end) is a new module here.

in_place (the default, the origin plan's): the live column is rewritten. A dimension change
drops the HNSW index and relaxes the column to plain `vector` at prepare (catalog only), and
tightens it again at finalize (the integrity gate); search must not be served meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import psycopg
import structlog
from psycopg import sql

from reembed import checkpoint as ckpt
from reembed import finalize
from reembed.errors import ConfigError
from reembed.finalize import Step
from reembed.queries import query

if TYPE_CHECKING:
    from reembed.context import RunContext

log = structlog.get_logger()


class Strategy(Protocol):
    name: str

    def plan(self, ctx: RunContext) -> dict[str, Any]:
        """What prepare would do, for the plan and the log (no writes)."""
        ...

    def prepare(self, ctx: RunContext, conn: psycopg.Connection[Any], job: ckpt.Job, *, resumed_from: ckpt.Job | None) -> None:
        """Make room for the new vectors, inside prepare's fenced transaction."""
        ...

    def column(self, ctx: RunContext) -> str:
        """The column batches write to."""
        ...

    def finalize_steps(self, ctx: RunContext) -> list[Step]:
        """What finalize does, in order; each step recorded when done."""
        ...


class InPlace:
    name = "in_place"

    def plan(self, ctx: RunContext) -> dict[str, Any]:
        info, sig = ctx.info, ctx.signature
        relax = info.typmod is not None and info.typmod != sig.dimension
        drop = info.index is not None and (ctx.opts.drop_hnsw_first or relax)
        return {"relax_typmod": relax, "drop_index": drop}

    def prepare(self, ctx: RunContext, conn: psycopg.Connection[Any], job: ckpt.Job, *, resumed_from: ckpt.Job | None) -> None:
        info, what = ctx.info, self.plan(ctx)
        if what["drop_index"]:
            assert info.index is not None
            conn.execute(info.statement("drop_index", index=info.index_ident(info.index.name)))
            ckpt.mark_index_dropped(conn, job)
        elif resumed_from is not None and resumed_from.index_dropped:
            ckpt.mark_index_dropped(conn, job)  # the abandoned job dropped it already
        if what["relax_typmod"]:
            conn.execute(info.statement("relax_typmod"))

    def column(self, ctx: RunContext) -> str:
        return ctx.info.column

    def finalize_steps(self, ctx: RunContext) -> list[Step]:
        return [
            Step("tighten_typmod", lambda conn: self._tighten(ctx, conn)),
            finalize.index_step(ctx),
            Step("update_registry", lambda conn: self._update_registry(ctx, conn)),
        ]

    def _tighten(self, ctx: RunContext, conn: psycopg.Connection[Any]) -> None:
        """The integrity gate: every vector must have the target dimension, or this fails."""
        info, dim = ctx.info, ctx.signature.dimension
        current = conn.execute(query("column_info"), {"table_oid": info.oid, "column": info.column}).fetchone()
        if current is not None and current["typmod"] == dim:
            return
        conn.execute(info.statement("tighten_typmod", dim=sql.Literal(dim)))

    def _update_registry(self, ctx: RunContext, conn: psycopg.Connection[Any]) -> None:
        conn.execute(query("upsert_registry", registry=ctx.info.registry), ctx.signature.as_dict())
        ckpt.set_state(conn, ctx.active, to="done", from_state="finalizing")


STRATEGIES: dict[str, type[Strategy]] = {"in_place": InPlace}


def for_name(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}: use one of {', '.join(STRATEGIES)}") from None
