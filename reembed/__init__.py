"""reembed: re-encode a PostgreSQL/pgvector table with a new sentence-transformers model,
as a resumable, checkpointed job.

The library is what the CLI calls:

    from reembed import ModelSpec, RunOptions, Settings, Target, run
    settings = Settings(target=Target(dsn="postgresql://app@db/prod"),
                        model=ModelSpec(model="/models/all-MiniLM-L6-v2"), options=RunOptions(confirm_seconds=0))
    report = run(settings)              # resumes an active job; a no-op when the registry already matches
    print(report.state, report.rows_updated)

`plan(settings)` is the dry run, `status(settings)` the job's progress. Every failure an
operator can act on is a `ReembedError`, whose `exit_code` is the CLI's.
"""

from __future__ import annotations

__version__ = "0.1.0"

from reembed.errors import (
    CheckpointConflict,
    ConfigError,
    DatabaseError,
    Interrupted,
    LockHeld,
    ReembedError,
)
from reembed.job import plan, run
from reembed.report import Report
from reembed.settings import ModelSpec, RunOptions, Settings, Target
from reembed.signals import StopSignal
from reembed.status import Status, status

__all__ = [
    "CheckpointConflict",
    "ConfigError",
    "DatabaseError",
    "Interrupted",
    "LockHeld",
    "ModelSpec",
    "ReembedError",
    "Report",
    "RunOptions",
    "Settings",
    "Status",
    "StopSignal",
    "Target",
    "__version__",
    "plan",
    "run",
    "status",
]
