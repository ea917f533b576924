"""`--metrics-file PATH`: the job in the Prometheus text format, for node_exporter's textfile
collector (where cron jobs report), written with prometheus_client's `write_to_textfile`
(a temporary file renamed over the old one: a scrape never reads half a file) at every
progress event and at exit.

The figures are the job's, whichever worker writes them: what `reembed status` reads from
PostgreSQL (rows done by every worker, their summed rate, the ETA, failed rows, the phase),
plus this process's exit state. A failure to write them is logged, never the job's failure.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from reembed import db
from reembed.errors import first_line
from reembed.settings import Settings
from reembed.status import PHASES, status_on

log = structlog.get_logger()

MIN_INTERVAL = 2.0  # seconds between two writes at progress events (exit always writes)


class Metrics:
    def __init__(self, path: str, settings: Settings) -> None:
        self.path = path
        self.settings = settings
        self._conn: Any = None
        self._mutex = threading.Lock()
        self._last = 0.0

    def progress(self) -> None:
        """At a progress event (any thread): the job's figures, now."""
        if time.monotonic() - self._last >= MIN_INTERVAL:
            self.write(running=True)

    def exit(self, exit_code: int, state: str) -> None:
        self.write(running=False, exit_code=exit_code, state=state)
        self.close()

    def write(self, *, running: bool, exit_code: int | None = None, state: str | None = None) -> None:
        with self._mutex:
            self._last = time.monotonic()
            try:
                data = self._read()
                write_to_textfile(self.path, _registry(data, running=running, exit_code=exit_code, state=state))
            except Exception as exc:  # noqa: BLE001 - metrics never fail the job
                log.warning("metrics_not_written", path=self.path, error=first_line(exc))
                self._drop()

    def _read(self) -> dict[str, Any]:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.settings.target.conninfo(), role="metrics", vectors=False, autocommit=True)
        with db.translated():
            return status_on(self._conn, self.settings, self.settings.options.stale_after).data

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def close(self) -> None:
        with self._mutex:
            self._drop()


def _registry(d: dict[str, Any], *, running: bool, exit_code: int | None, state: str | None) -> CollectorRegistry:
    reg = CollectorRegistry()
    labels = {"table": d.get("table", ""), "column": d.get("column", "")}
    names = list(labels)

    def gauge(name: str, doc: str, value: float | None, extra: dict[str, str] | None = None) -> None:
        if value is None:
            return
        g = Gauge(name, doc, [*names, *(extra or {})], registry=reg)
        g.labels(**labels, **(extra or {})).set(value)

    gauge("reembed_job_id", "The job these figures are of", d.get("job_id"))
    gauge("reembed_rows_total", "Rows in the table when the job started (estimate)", d.get("rows_total"))
    gauge("reembed_rows_done", "Rows re-embedded by every worker (NULL content included)",
          (d.get("rows_done") or 0) + (d.get("rows_skipped") or 0) if d.get("job_id") else None)
    gauge("reembed_rows_per_second", "The job's rate: every live worker's, summed", d.get("rows_per_sec") or 0.0)
    gauge("reembed_eta_seconds", "Seconds to the end of the backfill at the current rate", d.get("eta_secs"))
    gauge("reembed_failed_rows", "Rows the model could not encode (recorded, skipped)", d.get("failed_rows"))
    live = [w for w in d.get("workers") or [] if w["state"] in ("running", "dry")]
    gauge("reembed_workers", "Workers on the job with a fresh heartbeat", len(live))
    phase = d.get("phase") or ("none" if d.get("state") is None else d["state"])
    g = Gauge("reembed_phase", "1 for the job's phase", [*names, "phase"], registry=reg)
    for p in sorted({*PHASES, phase}):
        g.labels(**labels, phase=p).set(1.0 if p == phase else 0.0)
    gauge("reembed_running", "1 while this run goes on, 0 once it exited", 1.0 if running else 0.0)
    if exit_code is not None:
        gauge("reembed_exit_code", "This run's exit code (0 done or nothing to do, 75 a time window, ...)",
              exit_code, {"state": state or ""})
        gauge("reembed_last_exit_timestamp_seconds", "When this run exited (Unix time)", time.time())
    gauge("reembed_last_update_timestamp_seconds", "When this file was written (Unix time)", time.time())
    return reg
