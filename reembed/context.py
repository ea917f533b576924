"""One run's context, and the two protocols that take it: the strategy and its finalize steps.

`RunContext` is what every part of the job needs, in one object instead of long parameter
lists. What is fixed for the run (settings, the target, the embedder and so the signature, the
stop signal, the deadline, the connections) is frozen; what the coordinator learns as the job
advances (the job row, the strategy of a resumed job) lives in `JobState`, which has one
setter. Nothing here does I/O: the coordinator (reembed.job) builds the context once the lock
is held, and reloads the job row itself.

The strategy protocol and the finalize step are here, below every strategy (reembed.strategy)
and the finalize loop (reembed.finalize), because both take a context and the context names
the strategy: one module, no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg

from reembed import db
from reembed.checkpoint import Job
from reembed.encoding import Embedder
from reembed.errors import InternalError
from reembed.lease import Lease
from reembed.settings import RunOptions, Settings
from reembed.signals import StopSignal
from reembed.signature import Signature
from reembed.target import TableInfo
from reembed.throttle import Throttle


@dataclass(frozen=True)
class FinalizeStep:
    """One step of finalize: applied, and recorded in reembed_checkpoint.finalize_steps."""

    name: str
    apply: Callable[[psycopg.Connection[Any]], None]
    in_transaction: bool = True
    role: str | None = None  # a dedicated connection for the step (None: the coordinator's)
    setup: Callable[[psycopg.Connection[Any]], None] | None = None  # that connection's session settings
    timed: bool = False  # its duration is the report's index_rebuild_secs
    record: bool = True  # False: a phase that runs every time until a later step is recorded
    lock_timeout: str | None = None  # None: --ddl-lock-timeout
    max_backoff: float | None = None  # the longest wait between two tries (None: the default, 5 s)


@dataclass(frozen=True)
class Hold:
    """What a strategy's cut-over holds: readers too, not only writers (`rewrite`: the column's type
    changes, or columns are renamed), and the time its swap takes after the last catch-up (`tail`,
    within --max-writers-held)."""

    rewrite: bool
    tail: float = 0.0


class Strategy(Protocol):
    """How a job makes room for the new vectors, where batches write them, how it finishes."""

    name: str

    def plan(self, ctx: RunContext, job: Job) -> dict[str, Any]:
        """What prepare does for `job` (its recorded inventory), for the log (no writes)."""
        ...

    def prepare(self, ctx: RunContext, conn: psycopg.Connection[Any], job: Job, *,
                resumed_from: Job | None) -> None:
        """Make room for the new vectors, inside prepare's fenced transaction."""
        ...

    def column(self, ctx: RunContext) -> str:
        """The column batches write to."""
        ...

    def finalize_steps(self, ctx: RunContext) -> list[FinalizeStep]:
        """What finalize does, in order; each step recorded when done."""
        ...

    def hold(self, ctx: RunContext) -> Hold:
        """What the cut-over will hold (read from the catalog now, no writes)."""
        ...

    def swap(self, ctx: RunContext, conn: psycopg.Connection[Any], *, rewrite: bool) -> None:
        """The table's part of the cut-over, under its hold, after the last catch-up (capture off, the
        type tightened or the columns swapped). The registry and its NOTIFY are the caller's: a job over
        several tables flips them once for all (reembed.cutover.flip_registry)."""
        ...

    def swapped(self, ctx: RunContext, conn: psycopg.Connection[Any], secs: float) -> None:
        """In the cut-over's transaction, after the swap: what the strategy records of it."""
        ...


class JobState:
    """The job row and the strategy, as the coordinator last set them (`advance`, the one setter)."""

    def __init__(self, strategy: Strategy) -> None:
        self._job: Job | None = None
        self._strategy = strategy

    @property
    def job(self) -> Job | None:
        return self._job

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    def advance(self, job: Job, *, strategy: Strategy | None = None) -> Job:
        """The job row as just read or written (and, for a resumed job, the strategy it started with)."""
        self._job = job
        if strategy is not None:
            self._strategy = strategy
        return job


@dataclass(frozen=True)
class RunContext:
    settings: Settings
    info: TableInfo
    embedder: Embedder
    stop: StopSignal
    lease: Lease
    connections: db.Connections
    control: db.Held  # the coordinator's connection (its statements and fenced writes)
    state: JobState
    started: float  # monotonic
    deadline: float | None = None  # monotonic; None: no time window
    writers: int = 1  # writer connections (writer_count)
    throttle: Throttle = field(default_factory=Throttle.off)  # the gate every batch passes
    old_embedder: Callable[[], Embedder] | None = None  # --old-model, loaded when the quality gate asks
    on_progress: Callable[[], None] | None = None  # at every progress event (--metrics-file)

    @property
    def opts(self) -> RunOptions:
        return self.settings.options

    @property
    def signature(self) -> Signature:
        return self.embedder.signature

    @property
    def strategy(self) -> Strategy:
        return self.state.strategy

    @property
    def active(self) -> Job:
        if self.state.job is None:
            raise InternalError("the run has no job yet: the coordinator records it before any part asks")
        return self.state.job


def writer_count(opts: RunOptions, device: str) -> int:
    """--writers, else 4 beside a CUDA device (one connection absorbs ~15k vectors/s, a GPU
    encodes more) and 1 elsewhere."""
    if opts.writers is not None:
        return opts.writers
    return 4 if str(device).startswith("cuda") else 1

