"""Strategies: how a job makes room for the new vectors, where batches write them, and how
it finishes. The coordinator, the worker and finalize only talk to this protocol; `for_name`
picks one. The second, shadow (a column beside the live one, swapped in at the end behind a
quality gate), is reembed.shadow; both end with the bounded cut-over of reembed.cutover.

in_place (the default, the origin plan's): the live column is rewritten. A dimension change
drops every index whose key reads the column (reembed.dependents: the job's inventory) and
relaxes the column to plain `vector` or `halfvec` at prepare (catalog only), and tightens it
again in the cut-over (the integrity gate); search must not be served meanwhile.
Prepare also installs the change capture (reembed.capture); finalize catches up, cuts over
(writers held off briefly, readers never), drops the capture, builds the index (CONCURRENTLY
by default, so it never blocks the application's writes) and marks the job done.
"""

from __future__ import annotations

from typing import Any

import psycopg
import structlog
from psycopg import sql

from reembed import capture, carry, cutover, dependents, failures, finalize, repartition
from reembed import checkpoint as ckpt
from reembed.context import FinalizeStep, Hold, RunContext, Strategy
from reembed.cutover import CutOver
from reembed.errors import ConfigError
from reembed.queries import query
from reembed.shadow import Shadow

log = structlog.get_logger()


class InPlace:
    name = "in_place"

    def __init__(self) -> None:
        self._cut = CutOver()

    def plan(self, ctx: RunContext, job: ckpt.Job) -> dict[str, Any]:
        info, sig = ctx.info, ctx.signature
        relax = info.typmod is not None and info.typmod != sig.dimension
        dropped = [d.name for d in dependents.recorded(job) if d.action == dependents.REBUILD]
        return {"relax_typmod": relax, "drop_indexes": dropped}

    def prepare(self, ctx: RunContext, conn: psycopg.Connection[Any], job: ckpt.Job, *,
                resumed_from: ckpt.Job | None) -> None:
        info, what = ctx.info, self.plan(ctx, job)
        capture.settle_others(ctx, conn, job)  # a stale trigger on the column would block the type change
        for d in dependents.recorded(job):  # IF EXISTS: an abandoned job may have dropped it already
            if d.action == dependents.REBUILD:  # a partitioned index takes its partitions' with it
                ident = (d.table[0], d.name) if d.table else info.index_ident(d.name)
                conn.execute(info.statement("drop_index_if_exists", index=ident))
        if what["drop_indexes"] or (resumed_from is not None and resumed_from.index_dropped):
            ckpt.mark_index_dropped(conn, job)
        if what["relax_typmod"]:
            carry.through_type_change(conn, info, info.statement("relax_typmod"))
        capture.install(ctx, conn, job)

    def column(self, ctx: RunContext) -> str:
        return ctx.info.column

    def finalize_steps(self, ctx: RunContext) -> list[FinalizeStep]:
        return [
            FinalizeStep("catch_up", lambda conn: self._catch_up(ctx), in_transaction=False, record=False),
            # its transaction opens only for the hold, and records the step (reembed.cutover)
            FinalizeStep("cut_over", lambda conn: self._cut_over(ctx), in_transaction=False, record=False),
            FinalizeStep("drop_capture", lambda conn: capture.drop(ctx, conn)),
            *finalize.index_steps(ctx),
            FinalizeStep("done", lambda conn: ckpt.set_state(conn, ctx.active, to="done", from_state="finalizing")),
        ]

    def _catch_up(self, ctx: RunContext) -> None:
        capture.catch_up(ctx, writes=self._cut.writes)
        failures.settle(ctx)  # rows the application wrote that the model cannot take

    def _cut_over(self, ctx: RunContext) -> None:
        """Writers held off, readers not (unless the dimension changes: the table is rewritten,
        readers wait too): the last catch-up, the typmod (the integrity gate), the registry,
        capture off, the news. One transaction: the application never sees the registry and the
        column disagree. The hold is bounded (reembed.cutover); a dimension change's table
        rewrite comes on top (plan and the banner say how long)."""
        cutover.for_strategy(self._cut, ctx, self)

    def hold(self, ctx: RunContext) -> Hold:
        return Hold(rewrite=ctx.lease.read(self._typmod_changes, ctx, on=ctx.control, what="cut_over_type"))

    def swap(self, ctx: RunContext, conn: psycopg.Connection[Any], *, rewrite: bool) -> None:
        repartition.check_unchanged(conn, ctx)  # no partition attached or detached since finalize began
        if rewrite:
            # The capture trigger names the column, which blocks a type change: it goes first
            # (that needs ACCESS EXCLUSIVE, which the rewrite takes anyway).
            capture.drop(ctx, conn)
            self._tighten(ctx, conn)
        else:
            capture.stop_capturing(ctx, conn)  # dropped by the next step: readers need not wait here

    def swapped(self, ctx: RunContext, conn: psycopg.Connection[Any], secs: float) -> None:
        return None

    def _typmod_changes(self, conn: psycopg.Connection[Any], ctx: RunContext) -> bool:
        info = ctx.info
        current = conn.execute(query("column_info"), {"table_oid": info.oid, "column": info.column}).fetchone()
        return current is None or current["typmod"] != ctx.signature.dimension

    def _tighten(self, ctx: RunContext, conn: psycopg.Connection[Any]) -> None:
        """The integrity gate: every vector must have the target dimension, or this fails."""
        carry.through_type_change(conn, ctx.info, ctx.info.statement("tighten_typmod",
                                                                     dim=sql.Literal(ctx.signature.dimension)))


STRATEGIES: dict[str, type[Strategy]] = {"in_place": InPlace, "shadow": Shadow}


def for_name(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}: use one of {', '.join(STRATEGIES)}") from None
