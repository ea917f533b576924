"""reembed: re-encode a PostgreSQL/pgvector table with a new sentence-transformers model,
as a resumable, checkpointed job.

The library is what the CLI calls:

    from reembed import ModelSpec, RunOptions, Settings, Target, run
    settings = Settings(target=Target(dsn="postgresql://app@db/prod"),
                        model=ModelSpec(model="/models/all-MiniLM-L6-v2"), options=RunOptions(confirm_seconds=0))
    report = run(settings)              # resumes an active job; a no-op when the registry already matches
    print(report.state, report.rows_updated)

`plan(settings)` is the dry run, `status(settings)` the job's progress, `evaluate(settings, EvalOptions(models=...))`
`reembed eval`'s comparison of candidate models on the table's own rows; after a shadow job's swap
(`RunOptions(strategy="shadow")`), `rollback(settings, RollbackOptions())` and `cleanup(settings)`;
`fit_bridge(settings, BridgeOptions())` fits and installs a bridge without a job (`RunOptions(bridge=True)`:
the job's own).
Every failure an operator can act on is a `ReembedError`, whose `exit_code` is the CLI's.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names are; at run time each module loads on first use (below)
    from reembed.bridging import bridge_command as fit_bridge
    from reembed.errors import (
        CheckpointConflict,
        ConfigError,
        DatabaseError,
        Interrupted,
        LockHeld,
        ReembedError,
    )
    from reembed.evaluate import Comparison, evaluate
    from reembed.group import plan, run
    from reembed.report import Report
    from reembed.rollback import cleanup, rollback
    from reembed.settings import BridgeOptions, EvalOptions, ModelSpec, RollbackOptions, RunOptions, Settings, Target
    from reembed.signals import StopSignal
    from reembed.status import Status, status

# Lazy, so that `import reembed.tokens` in a spawned tokenizer process loads that module alone
# (not psycopg, the pool and the whole job: a measured 0.2 s more per process start).
_WHERE = {
    "CheckpointConflict": "errors", "ConfigError": "errors", "DatabaseError": "errors", "Interrupted": "errors",
    "LockHeld": "errors", "ReembedError": "errors", "plan": "group", "run": "group", "Report": "report",
    "ModelSpec": "settings", "RunOptions": "settings", "Settings": "settings", "Target": "settings",
    "StopSignal": "signals", "Status": "status", "status": "status", "rollback": "rollback", "cleanup": "rollback",
    "RollbackOptions": "settings", "evaluate": "evaluate", "Comparison": "evaluate", "EvalOptions": "settings",
    "BridgeOptions": "settings", "fit_bridge": "bridging",
}


_NAMED = {"fit_bridge": "bridge_command"}  # the module's own name for it


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"reembed.{_WHERE[name]}"), _NAMED.get(name, name))
    raise AttributeError(f"module 'reembed' has no attribute {name!r}")


__all__ = [
    "BridgeOptions",
    "CheckpointConflict",
    "Comparison",
    "ConfigError",
    "DatabaseError",
    "EvalOptions",
    "Interrupted",
    "LockHeld",
    "ModelSpec",
    "ReembedError",
    "Report",
    "RollbackOptions",
    "RunOptions",
    "Settings",
    "Status",
    "StopSignal",
    "Target",
    "__version__",
    "cleanup",
    "evaluate",
    "fit_bridge",
    "plan",
    "rollback",
    "run",
    "status",
]
