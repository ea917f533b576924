"""One run's context: what every part of the job needs, in one object instead of long
parameter lists. Built by the coordinator (reembed.job) once the lock is held."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reembed import db
from reembed.settings import RunOptions, Settings
from reembed.signals import StopSignal
from reembed.signature import Signature
from reembed.target import TableInfo

if TYPE_CHECKING:
    from reembed.checkpoint import Job
    from reembed.embedder import Embedder
    from reembed.lease import Lease
    from reembed.strategy import Strategy


@dataclass
class RunContext:
    settings: Settings
    info: TableInfo
    embedder: Embedder
    stop: StopSignal
    lease: Lease
    connections: db.Connections
    strategy: Strategy
    started: float  # monotonic
    deadline: float | None = None  # monotonic; None: no time window
    job: Job | None = None
    write_path: str | None = None
    _control: db.Held | None = field(default=None, repr=False)

    @property
    def opts(self) -> RunOptions:
        return self.settings.options

    @property
    def writers(self) -> int:
        """Writer connections: --writers, else 4 beside a CUDA device (one connection absorbs
        ~15k vectors/s, a GPU encodes more) and 1 elsewhere."""
        return writer_count(self.opts, self.embedder)

    @property
    def signature(self) -> Signature:
        return self.embedder.signature

    @property
    def active(self) -> Job:
        assert self.job is not None, "no job yet"
        return self.job

    @property
    def control(self) -> db.Held:
        """The coordinator's connection (its statements and fenced writes)."""
        if self._control is None:
            self._control = self.connections.hold("control")
        return self._control

    def refresh_job(self) -> Job:
        from reembed import checkpoint as ckpt

        self.job = self.lease.read(lambda conn: ckpt.reload(conn, self.active), on=self.control, what="reload_job")
        return self.job

    def close(self) -> None:
        if self._control is not None:
            self._control.release()

    def log_fields(self) -> dict[str, Any]:
        return {"table": self.info.qualified, "column": self.info.column}


def writer_count(opts: RunOptions, embedder: Any) -> int:
    if opts.writers is not None:
        return opts.writers
    return 4 if str(getattr(embedder, "device", "cpu")).startswith("cuda") else 1
