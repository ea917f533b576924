"""What a run tells its caller: the --json object and the one-line summary."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from reembed.errors import EXIT_OK


@dataclass
class Report:
    state: str  # done | noop | planned | stopped | time_budget | throttle_critical
    exit_code: int = EXIT_OK
    job_id: int | None = None
    rows_updated: int = 0
    rows_skipped: int = 0
    rows_failed: int = 0
    duration_secs: float = 0.0
    index_rebuild_secs: float = 0.0
    model_name: str | None = None
    dimension: int | None = None
    model_hash: str | None = None
    resumed_from: str | None = None
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("details"))
        data["duration_secs"] = round(self.duration_secs, 3)
        data["index_rebuild_secs"] = round(self.index_rebuild_secs, 3)
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), default=str, sort_keys=True)

    def summary(self) -> str:
        if self.state == "noop":
            return self.message
        if self.state == "planned":
            return self.message
        rate = self.details.get("embed_rows_per_sec") or 0.0
        head = {
            "done": "done",
            "stopped": "stopped (resumable)",
            "time_budget": "time budget reached (resumable)",
            "throttle_critical": "stopped by a critical throttle limit (resumable)",
        }.get(self.state, self.state)
        return (
            f"{head}: job {self.job_id}, {self.rows_updated} rows re-embedded, {self.rows_skipped} skipped "
            f"(NULL content), {self.rows_failed} failed, in {self.duration_secs:.1f} s "
            f"(embedding at {rate:.0f} rows/s); "
            f"index rebuild {self.index_rebuild_secs:.1f} s; model {self.model_name} ({self.dimension}-d)"
            + (f"; held {secs:.1f} s by throttling" if (secs := self.details.get("throttled_secs")) else "")
            + (f"; writers held off {held:.2f} s at the cut-over"
               if (held := self.details.get("writers_held_secs")) is not None else "")
            + (f"; {self.message}" if self.message else "")
        )
