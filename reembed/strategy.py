"""Strategies: how a job makes room for the new vectors, where batches write them, and how
it finishes. The coordinator, the worker and finalize only talk to this protocol, so a
second strategy (a shadow column swapped in at the end) is a new module here.

in_place (the default, the origin plan's): the live column is rewritten. A dimension change
drops every index whose key reads the column (reembed.dependents: the job's inventory) and
relaxes the column to plain `vector` or `halfvec` at prepare (catalog only), and tightens it
again in the cut-over (the integrity gate); search must not be served meanwhile.
Prepare also installs the change capture (reembed.capture); finalize catches up, cuts over
(writers held off briefly, readers never), drops the capture, builds the index (CONCURRENTLY
by default, so it never blocks the application's writes) and marks the job done.
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
import structlog
from psycopg import sql

from reembed import capture, dependents, failures, finalize
from reembed import checkpoint as ckpt
from reembed.context import FinalizeStep, RunContext, Strategy
from reembed.errors import ConfigError, Interrupted
from reembed.progress import Pace
from reembed.queries import query

log = structlog.get_logger()


# The cut-over gives up its locks as soon as it waits on the application (capture.hold_writers);
# it then tries again soon, not after the long waits an outage gets: yielding costs it a retry.
_CUT_OVER_BACKOFF = 0.5
_MARGIN = 1.25  # the predicted hold, padded: the pace is a moving average, the write rate a constant


class InPlace:
    name = "in_place"

    def __init__(self) -> None:
        self._lock_timeout_checked = False
        self._ahead: capture.Encoded = {}  # the cut-over's rows encoded ahead, kept across its tries
        self._pace = Pace(at_least=8)  # rows/s of the cut-over's encoding ahead

    def plan(self, ctx: RunContext, job: ckpt.Job) -> dict[str, Any]:
        info, sig = ctx.info, ctx.signature
        relax = info.typmod is not None and info.typmod != sig.dimension
        dropped = [d.name for d in dependents.recorded(job) if d.action == dependents.REBUILD]
        return {"relax_typmod": relax, "drop_indexes": dropped}

    def prepare(self, ctx: RunContext, conn: psycopg.Connection[Any], job: ckpt.Job, *,
                resumed_from: ckpt.Job | None) -> None:
        info, what = ctx.info, self.plan(ctx, job)
        capture.settle_others(ctx, conn, job)  # a stale trigger on the column would block the type change
        for name in what["drop_indexes"]:  # IF EXISTS: an abandoned job may have dropped it already
            conn.execute(info.statement("drop_index_if_exists", index=info.index_ident(name)))
        if what["drop_indexes"] or (resumed_from is not None and resumed_from.index_dropped):
            ckpt.mark_index_dropped(conn, job)
        if what["relax_typmod"]:
            conn.execute(info.statement("relax_typmod"))
        capture.install(ctx, conn, job)

    def column(self, ctx: RunContext) -> str:
        return ctx.info.column

    def finalize_steps(self, ctx: RunContext) -> list[FinalizeStep]:
        return [
            FinalizeStep("catch_up", lambda conn: self._catch_up(ctx), in_transaction=False, record=False),
            FinalizeStep("cut_over", lambda conn: self._cut_over(ctx, conn),
                         lock_timeout=ctx.opts.cut_over_lock_timeout, max_backoff=_CUT_OVER_BACKOFF),
            FinalizeStep("drop_capture", lambda conn: capture.drop(ctx, conn)),
            *finalize.index_steps(ctx),
            FinalizeStep("done", lambda conn: ckpt.set_state(conn, ctx.active, to="done", from_state="finalizing")),
        ]

    def _catch_up(self, ctx: RunContext) -> None:
        capture.catch_up(ctx)
        failures.settle(ctx)  # rows the application wrote that the model cannot take

    def _cut_over(self, ctx: RunContext, conn: psycopg.Connection[Any]) -> None:
        """Writers held off, readers not (unless the dimension changes: the table is rewritten,
        readers wait too): the last catch-up, the typmod (the integrity gate), the registry,
        capture off, the news. One transaction: the application never sees the registry and the
        column disagree. Every lock is asked for up front (capture.hold_writers).

        The hold is bounded (--max-writers-held): the rows still captured are encoded ahead,
        without a lock, until what is left to encode under the lock fits the bound at the
        encoder's measured pace; under the lock the backlog is read again, and if it no longer
        fits, the locks are let go (a savepoint) and the catch-up goes on outside. A dimension
        change's table rewrite comes on top (plan and the banner say how long)."""
        if not self._lock_timeout_checked:
            capture.check_lock_timeout(conn, ctx.opts.cut_over_lock_timeout)
            self._lock_timeout_checked = True
        rewrite = self._typmod_changes(ctx, conn)
        bound = ctx.opts.max_writers_held
        progress = _Convergence(bound)
        while True:
            if ctx.stop.requested:
                raise Interrupted(f"stopped ({ctx.stop.reason}) during the cut-over's catch-up; nothing of it was "
                                  "committed; re-run to finish", exit_code=ctx.stop.exit_code)
            work = capture.backlog(ctx, conn, self._ahead)  # no lock: writers go on
            if work.predicted_secs(self._pace.value) * _MARGIN > bound:
                progress.again(work, self._pace.value)
                self._encode_ahead(ctx, work)
                continue
            try:
                with conn.transaction():  # a savepoint: let go of the locks if the hold would run long
                    began = capture.hold_writers(ctx, conn, rewrite=rewrite)
                    work = capture.backlog(ctx, conn, self._ahead)
                    if work.predicted_secs(self._pace.value) * _MARGIN > bound - (time.monotonic() - began):
                        raise _OverBound
                    rows = capture.final_catch_up(ctx, conn, self._ahead, work)
                    self._swap(ctx, conn, rewrite=rewrite)
                    held = time.monotonic() - began
            except _OverBound:
                progress.again(work, self._pace.value, under_lock=True)
                continue
            break
        conn.execute(query("record_writers_held"), {"secs": held, "job_id": ctx.active.id})
        log.info("cut_over", writers_held_secs=round(held, 3), rows_caught_up=rows,
                 max_writers_held_secs=bound, tries=progress.tries + 1)

    def _swap(self, ctx: RunContext, conn: psycopg.Connection[Any], *, rewrite: bool) -> None:
        if rewrite:
            # The capture trigger names the column, which blocks a type change: it goes first
            # (that needs ACCESS EXCLUSIVE, which the rewrite takes anyway).
            capture.drop(ctx, conn)
            self._tighten(ctx, conn)
        else:
            capture.stop_capturing(ctx, conn)  # dropped by the next step: readers need not wait here
        conn.execute(query("upsert_registry", registry=ctx.info.registry), ctx.signature.as_dict())
        conn.execute(query("notify_model_changed"), {"payload": json.dumps(ctx.signature.as_dict())})

    def _encode_ahead(self, ctx: RunContext, work: capture.Backlog) -> None:
        """The backlog encoded without a lock (what is known at its version kept), and the
        encoder's pace measured on what was encoded now."""
        started = time.monotonic()
        self._ahead, encoded = capture.encode_ahead(ctx, work, self._ahead)
        self._pace.measured(encoded, time.monotonic() - started)

    def _typmod_changes(self, ctx: RunContext, conn: psycopg.Connection[Any]) -> bool:
        info = ctx.info
        current = conn.execute(query("column_info"), {"table_oid": info.oid, "column": info.column}).fetchone()
        return current is None or current["typmod"] != ctx.signature.dimension

    def _tighten(self, ctx: RunContext, conn: psycopg.Connection[Any]) -> None:
        """The integrity gate: every vector must have the target dimension, or this fails."""
        conn.execute(ctx.info.statement("tighten_typmod", dim=sql.Literal(ctx.signature.dimension)))


class _OverBound(Exception):
    """Under the lock, the rest would hold writers past the bound: let go and catch up again."""


class _Convergence:
    """The cut-over's tries at a backlog that fits the bound; says so when the application
    changes rows faster than the job encodes them (the backlog does not shrink)."""

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self.tries = 0
        self.started = time.monotonic()
        self.smallest: int | None = None
        self.stalled = 0
        self.said = 0.0

    def again(self, work: capture.Backlog, pace: float | None, *, under_lock: bool = False) -> None:
        self.tries += 1
        if self.smallest is None or work.unencoded < self.smallest:
            self.smallest, self.stalled = work.unencoded, 0
        else:
            self.stalled += 1
        log.debug("cut_over_catching_up", keys=work.keys, to_encode=work.unencoded, under_lock=under_lock,
                  predicted_secs=round(work.predicted_secs(pace), 3), tries=self.tries)
        now = time.monotonic()
        if self.stalled >= 3 and now - self.said >= 30.0:
            self.said = now
            secs = now - self.started
            log.warning(
                "catch_up_not_converging",
                application_changes_per_sec=round(work.unencoded / max(secs / self.tries, 1e-6), 1),
                encode_rows_per_sec=round(pace, 1) if pace else None,
                rows_to_encode=work.unencoded, max_writers_held_secs=self.bound,
                detail="the application changes rows faster than the job encodes them; catching up again "
                       "instead of holding writers longer (it cuts over once the rest fits the bound)")


STRATEGIES: dict[str, type[Strategy]] = {"in_place": InPlace}


def for_name(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}: use one of {', '.join(STRATEGIES)}") from None
