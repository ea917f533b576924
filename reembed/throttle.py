"""A good citizen on the primary: the job holds while the database is unwell, and never goes
faster than --max-rate.

A monitor thread (the coordinator's, on a connection of its own) looks at the database every
CHECK_EVERY seconds; the worker asks it before each batch it hands to its writers
(`Throttle.admit`), and the catch-up before each page, so every batch of the job passes here.
While any check is over its limit the job holds: it keeps its claim and its lock, commits
nothing new (the batches already handed to the writers finish), logs `throttled` once when the
hold starts and `throttle_ended` once when it ends (the reasons, how long), and the job row says
so (`status`). Past a critical limit it stops, resumably (exit 75).

The checks (each off unless its limit is given, except the replica lag):
- replica lag: every replica in `pg_stat_replication`, measured from WAL positions this monitor
  sampled itself (the time since the oldest WAL it saw written that the replica has not
  replayed: unlike `replay_lag`, it grows while replay is paused or stuck) and `replay_lag`,
  whichever is larger; every replication slot whose consumer is not connected (a replica that
  went away keeps its slot, and the primary's WAL piles up for it), by how long its position has
  not moved; and every `--replica-dsn` (a replica `pg_stat_replication` cannot show: a cascaded
  one, one this role may not see) through a heartbeat row of our own that the monitor writes on
  the primary and reads there (gh-ost's way), less that replica's own recovery_min_apply_delay.
  `--exclude-replica NAME` (an application_name or a slot name) leaves one out: a delayed standby
  seen only in pg_stat_replication, a slot of a replica gone for good;
- WAL written per second (`--max-wal-rate`), from the same samples;
- segments waiting for the archiver (`--max-archive-backlog`, when archive_mode is on);
- an autovacuum on the table: one to prevent wraparound by default (it must not be starved),
  any with `--autovacuum-pause any` (the ordinary ones clean up the job's dead rows, and pausing
  for them would mostly slow the job);
- application sessions waiting on locks the job holds (`--max-lock-waits`);
- active application sessions (`--max-load`, `--critical-load`);
- the operator's `--throttle-query` (a first column that is true or > 0 holds) and
  `--throttle-flag-file` (holds while the file exists).
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import structlog

from reembed import checkpoint as ckpt
from reembed import db
from reembed.background import Background
from reembed.errors import ConfigError, InternalError, first_line
from reembed.lease import Lease
from reembed.queries import query
from reembed.settings import RunOptions
from reembed.signals import StopSignal

log = structlog.get_logger()

CHECK_EVERY = 0.5  # seconds between two looks at the database
_SAMPLES_KEPT = 3600.0  # seconds of WAL positions kept for the replica lag
_WAL_RATE_OVER = 5.0  # seconds the WAL rate is measured over


@dataclass(frozen=True)
class Reading:
    """One check over its limit."""

    check: str
    value: float
    limit: float
    critical: bool = False

    def said(self) -> str:
        return f"{self.check} {_fmt(self.check, self.value)} > {_fmt(self.check, self.limit)}"


def _fmt(check: str, value: float) -> str:
    if check == "replica_lag":
        return f"{value:.2f}s"
    if check == "wal_rate":
        return f"{value / 1024**2:.1f}MB/s"
    return f"{value:g}"


def wal_segment_number(name: str, segment_bytes: int) -> int:
    """A WAL file name (timeline, log, segment: 8 hex digits each) -> its segment number."""
    return int(name[8:16], 16) * (0x100000000 // segment_bytes) + int(name[16:24], 16)


class Throttle(Background):
    """The monitor, and the gate every batch passes (`admit`)."""

    def __init__(self, opts: RunOptions, *, stop: StopSignal, conninfo: str, table_oid: int,
                 lease: Lease | None = None, held: db.Kept | None = None) -> None:
        super().__init__("reembed-throttle", join_timeout=10)
        self.opts = opts
        self.stop_signal = stop
        self.conninfo = conninfo
        self.table_oid = table_oid
        self.lease, self.held = lease, held
        self.job_id: int | None = None
        self.enabled = opts.max_rate is not None or self._any_check()
        self._clear = threading.Event()
        self._clear.set()
        self._conn: psycopg.Connection[Any] | None = None
        self._replicas: dict[str, psycopg.Connection[Any] | None] = dict.fromkeys(opts.replica_dsns)
        self._delays: dict[str, float] = {}  # each --replica-dsn's recovery_min_apply_delay, seconds
        self._samples: deque[tuple[float, int]] = deque()  # (monotonic, WAL write position)
        self._first_beat: Any = None
        self._since: float | None = None
        self._reasons: list[str] = []
        self._said_once: set[str] = set()
        self._next_at: float | None = None  # --max-rate: when the next batch may go
        self._rate_lock = threading.Lock()
        self.pauses = 0
        self.secs = 0.0  # time held, all pauses
        self.critical: Reading | None = None

    @classmethod
    def off(cls) -> Throttle:
        return cls(RunOptions(max_replica_lag=None, autovacuum_pause="never"), stop=StopSignal(), conninfo="",
                   table_oid=0)

    def _any_check(self) -> bool:
        o = self.opts
        return any(v is not None for v in (
            o.max_replica_lag, o.critical_replica_lag, o.max_wal_rate, o.max_archive_backlog,
            o.critical_archive_backlog, o.max_lock_waits, o.max_load, o.critical_load, o.throttle_query,
            o.throttle_flag_file)) or bool(o.replica_dsns) or o.autovacuum_pause != "never"

    # ------------------------------------------------------------ the gate

    @property
    def held_now(self) -> bool:
        return not self._clear.is_set()

    def admit(self, rows: int) -> bool:
        """Wait while the job is held, then for --max-rate's turn of `rows` rows. False only when a
        stop came while held (the caller hands over nothing more); a stop otherwise is the caller's
        to see, as it was before throttling (the batch encoded commits)."""
        stop = self.stop_signal
        while not self._clear.is_set():
            if stop.requested:
                return False
            self._clear.wait(0.2)
        if self.opts.max_rate is not None and rows > 0:
            with self._rate_lock:
                now = time.monotonic()
                at = now if self._next_at is None else max(self._next_at, now - 1.0)  # a burst of at most 1 s
                self._next_at = at + rows / self.opts.max_rate
            if at > now:
                stop.wait(at - now)
        return True

    # ------------------------------------------------------------ the monitor

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                readings = self.read()
            except Exception as exc:  # noqa: BLE001 - a check that fails holds nothing; the job's own writes retry
                self._once("check_failed", "throttle_check_failed", error=first_line(exc),
                           detail="the job goes on; the check is tried again")
                self._drop_connection()
                readings = []
            self._apply(readings)
            self._stopped.wait(CHECK_EVERY)

    def read(self) -> list[Reading]:
        """Every check over its limit, now."""
        conn = self._connection()
        o, out = self.opts, []
        lag_checked = o.max_replica_lag is not None or o.critical_replica_lag is not None
        streaming = conn.execute(query("replication_positions")).fetchall() if lag_checked else []
        streaming = [r for r in streaming if r["application_name"] not in o.exclude_replicas]
        if streaming and self.held_now and not self._replicas:
            # Held, the job writes no WAL, and a standby reports how far it replayed only when it
            # receives some (or every wal_receiver_status_interval, 10 s): a heartbeat row keeps
            # its reports current, so the hold ends when the replica has caught up, not seconds later.
            # (Only where a standby streams: nothing is written for nobody.)
            self._write_beat()
        now = time.monotonic()
        if lag_checked or o.max_wal_rate is not None:  # the WAL positions both are measured from
            self._samples.append((now, int(_value(conn, "wal_position", "lsn"))))
            while len(self._samples) > 2 and now - self._samples[0][0] > _SAMPLES_KEPT:
                self._samples.popleft()
        if lag_checked:
            lag = max([self._stream_lag(streaming, now), self._slot_lag(conn, now), self._heartbeat_lag(conn)],
                      default=0.0)
            out += self._over("replica_lag", lag, o.max_replica_lag, o.critical_replica_lag)
        if o.max_wal_rate is not None:
            out += self._over("wal_rate", self._wal_rate(now), o.max_wal_rate, None)
        if o.max_archive_backlog is not None or o.critical_archive_backlog is not None:
            out += self._over("archive_backlog", self._archive_backlog(conn), o.max_archive_backlog,
                              o.critical_archive_backlog)
        if o.autovacuum_pause != "never":
            running = int(_value(conn, "autovacuum_on_table",
                                 "wraparound" if o.autovacuum_pause == "wraparound" else "any",
                                 table_oid=self.table_oid))
            out += self._over("autovacuum", running, 0, None)
        if o.max_lock_waits is not None:
            waits = _value(conn, "lock_waits_on_us", "n")
            out += self._over("lock_waits", int(waits), o.max_lock_waits, None)
        if o.max_load is not None or o.critical_load is not None:
            load = _value(conn, "active_sessions", "n")
            out += self._over("load", int(load), o.max_load, o.critical_load)
        if o.throttle_query is not None and _query_holds(conn, o.throttle_query):
            out.append(Reading("throttle_query", 1, 0))
        if o.throttle_flag_file is not None and Path(o.throttle_flag_file).exists():
            out.append(Reading("flag_file", 1, 0))
        return out

    @staticmethod
    def _over(check: str, value: float, limit: float | None, critical: float | None) -> list[Reading]:
        if critical is not None and value > critical:
            return [Reading(check, value, critical, critical=True)]
        if limit is not None and value > limit:
            return [Reading(check, value, limit)]
        return []

    @property
    def _lag_limit(self) -> float:
        """The smallest replica-lag limit given (a lag past it is said, once, with the way out)."""
        limits = [v for v in (self.opts.max_replica_lag, self.opts.critical_replica_lag) if v is not None]
        return min(limits, default=float("inf"))

    def _behind(self, position: int, now: float) -> float:
        """Seconds since the WAL at `position` stopped being the newest (from our samples; at least
        as old as the oldest sample when it was already behind it)."""
        behind = next((t for t, lsn in self._samples if lsn > position), None)
        return now - behind if behind is not None else 0.0

    def _stream_lag(self, streaming: list[dict[str, Any]], now: float) -> float:
        lag = 0.0
        for r in streaming:
            if r["replay_lsn"] is None:
                self._once("replicas_hidden", "replica_lag_unseen", replica=r["application_name"],
                           detail="pg_stat_replication hides this replica's positions from this role: grant it "
                                  "pg_monitor, or give the replica with --replica-dsn")
                continue
            mine = max(self._behind(int(r["replay_lsn"]), now), float(r["replay_lag"] or 0.0))
            if mine > self._lag_limit and \
                    r["flush_lsn"] is not None and self._behind(int(r["flush_lsn"]), now) < 1.0:
                self._once(f"delayed {r['application_name']}", "replica_replays_late", replica=r["application_name"],
                           replay_lag_secs=round(mine, 1),
                           detail="it receives the WAL at once but replays it late: if it is a delayed standby "
                                  "(recovery_min_apply_delay), the job would wait for it forever; pass "
                                  f"--exclude-replica {r['application_name']}")
            lag = max(lag, mine)
        return lag

    def _slot_lag(self, conn: psycopg.Connection[Any], now: float) -> float:
        """A replication slot whose consumer is not connected (a replica that went away, a subscriber
        that stopped) drops out of pg_stat_replication but keeps the primary's WAL: its lag is how
        long its position has not moved with the WAL."""
        lag = 0.0
        for r in conn.execute(query("idle_replication_slots")).fetchall():
            if r["slot_name"] in self.opts.exclude_replicas:
                continue
            if r["slot_type"] != "physical" and r["wal_status"] in ("reserved", None):
                # a logical slot's consumer may poll it now and then (pg_logical_slot_get_changes): not a
                # replica behind; it counts once it keeps more WAL than max_wal_size (extended, unreserved)
                continue
            mine = self._behind(int(r["position"]), now)
            if mine > self._lag_limit:
                self._once(f"slot {r['slot_name']}", "replication_slot_idle", slot=r["slot_name"],
                           slot_type=r["slot_type"], wal_status=r["wal_status"],
                           retained_wal_mb=round(int(r["retained_bytes"] or 0) / 1024**2, 1),
                           safe_wal_size_mb=None if r["safe_wal_size"] is None
                           else round(int(r["safe_wal_size"]) / 1024**2, 1),
                           detail="its consumer is not connected and the slot keeps the primary's WAL: the job "
                                  "holds until it reconnects; if it is gone for good, drop the slot "
                                  f"(pg_drop_replication_slot), or pass --exclude-replica {r['slot_name']}")
            lag = max(lag, mine)
        return lag

    def _heartbeat_lag(self, conn: psycopg.Connection[Any]) -> float:
        if not self._replicas:
            return 0.0
        beat = self._write_beat()
        if beat is None:
            return 0.0
        lag = 0.0
        for dsn in list(self._replicas):
            try:
                replica = self._replicas[dsn] or db.connect(dsn, role="throttle replica", vectors=False,
                                                            autocommit=True)
                self._replicas[dsn] = replica
                try:
                    row = replica.execute(query("heartbeat_seen"), {"job_id": self.job_id}).fetchone()
                except psycopg.errors.UndefinedTable:  # the replica has not replayed our schema yet
                    row = None
            except (psycopg.Error, ConfigError) as exc:
                self._once(f"replica {dsn}", "replica_unreachable", replica=_safe(dsn), error=first_line(exc),
                           detail="its lag is not known; the job goes on")
                self._replicas[dsn] = None
                continue
            seen = row["beat_at"] if row else None
            self._first_beat = self._first_beat or beat
            delay = self._delays.get(dsn)
            if delay is None:  # a delayed standby replays late on purpose: its delay is not lag
                found = replica.execute(query("apply_delay")).fetchone()
                delay = self._delays[dsn] = float(found["secs"]) if found and found["secs"] else 0.0
            lag = max(lag, (beat - (seen if seen is not None else self._first_beat)).total_seconds() - delay)
        return lag

    def _write_beat(self) -> Any:
        """The job's heartbeat row on the primary, written now; its time (None before the job exists)."""
        if self.job_id is None or self.lease is None or self.held is None:
            return None
        return self.lease.write(_beat, self.job_id, on=self.held, what="throttle_heartbeat")

    def _wal_rate(self, now: float) -> float:
        recent = [(t, lsn) for t, lsn in self._samples if now - t <= _WAL_RATE_OVER]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])

    def _archive_backlog(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute(query("archive_state")).fetchone()
        if row is None or row["mode"] == "off" or row["last_archived_wal"] is None:
            return 0
        size = int(row["segment_bytes"])
        current = wal_segment_number(row["current_wal"], size)
        archived = wal_segment_number(row["last_archived_wal"][:24], size)
        return max(current - archived - 1, 0)

    def _apply(self, readings: list[Reading]) -> None:
        critical = next((r for r in readings if r.critical), None)
        if critical is not None and not self.stop_signal.requested:
            self.critical = critical
            log.error("throttle_critical", reason=critical.said(),
                      detail="stopping after the batch in flight; resumable: run again once the database is well")
            self.stop_signal.request("throttle_critical")
        now = time.monotonic()
        if readings and self._since is None:
            self._since = now
            self._reasons = [r.said() for r in readings]
            self.pauses += 1
            self._clear.clear()
            log.warning("throttled", reasons=self._reasons,
                        detail="the job holds its claim and commits nothing new until every check is under its "
                               "limit")
            self._record(", ".join(self._reasons))
        elif readings:
            for r in readings:
                if not any(s.startswith(r.check + " ") for s in self._reasons):
                    self._reasons.append(r.said())
        elif self._since is not None:
            secs = now - self._since
            self.secs += secs
            log.info("throttle_ended", reasons=self._reasons, secs=round(secs, 2))
            self._since, self._reasons = None, []
            self._clear.set()
            self._record(None, secs=secs)

    def begin(self, job_id: int, *, recorded_hold: str | None) -> None:
        """The run's job is known: a hold recorded by a run that died while held is cleared, and
        the monitor starts (when any check or --max-rate is on)."""
        self.job_id = job_id
        if recorded_hold is not None:
            self._record(None)
        if self.enabled:
            self.start()

    def _record(self, reason: str | None, *, secs: float = 0.0) -> None:
        if self.job_id is None or self.lease is None or self.held is None:
            return
        try:
            self.lease.write(_record_throttle, self.job_id, reason, secs, on=self.held, what="record_throttle")
        except Exception as exc:  # noqa: BLE001 - what status shows must not stop the job
            self._once("record", "throttle_not_recorded", error=first_line(exc))

    def _once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._said_once:
            self._said_once.add(key)
            log.warning(event, **fields)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.conninfo, role="throttle", vectors=False, autocommit=True)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None

    def close(self) -> None:
        """Stop the monitor; a hold still on is ended (and recorded) here; its connections go back."""
        if self._thread.is_alive():
            self.stop()
        if self._since is not None:
            self.secs += time.monotonic() - self._since
            log.info("throttle_ended", reasons=self._reasons, secs=round(time.monotonic() - self._since, 2),
                     detail="the run ended while held")
            self._record(None, secs=time.monotonic() - self._since)
            self._since = None
        self._clear.set()
        self._drop_connection()
        if self.held is not None:
            self.held.release()
        for replica in self._replicas.values():
            if replica is not None:
                replica.close()


def check_options(opts: RunOptions, conninfo: str) -> None:
    """Before any write: the operator's --throttle-query runs, each --replica-dsn answers
    (ConfigError, exit 2, if not)."""
    if opts.throttle_query is not None:
        try:
            with db.connect(conninfo, role="throttle", vectors=False, autocommit=True) as conn:
                _query_holds(conn, opts.throttle_query)
        except psycopg.Error as exc:
            raise ConfigError(f"--throttle-query fails: {first_line(exc)}; fix the query (it must return one "
                              "row whose first column is true or a number > 0 to hold the job)") from exc
    for dsn in opts.replica_dsns:
        try:
            db.connect(dsn, role="throttle replica", vectors=False, autocommit=True).close()
        except ConfigError as exc:
            raise ConfigError(f"--replica-dsn {_safe(dsn)}: {exc}") from exc


def _query_holds(conn: psycopg.Connection[Any], statement: str) -> bool:
    """The operator's query: a first column that is true or > 0 holds the job."""
    row = conn.execute(statement).fetchone()  # the operator's own SQL, as given
    if row is None:
        return False
    value = next(iter(row.values())) if isinstance(row, dict) else row[0]
    return bool(value) and (not isinstance(value, int | float) or value > 0)


def _value(conn: psycopg.Connection[Any], name: str, column: str, **params: Any) -> Any:
    """One value of a statement that returns one row."""
    row = conn.execute(query(name), params).fetchone()
    if row is None:
        raise InternalError(f"{name} returned no row")
    return row[column]


def _beat(conn: psycopg.Connection[Any], job_id: int) -> Any:
    return _value(conn, "write_heartbeat", "beat_at", job_id=job_id)


def _record_throttle(conn: psycopg.Connection[Any], job_id: int, reason: str | None, secs: float) -> None:
    conn.execute(query("record_throttle"), {"job_id": job_id, "reason": reason, "secs": secs})
    ckpt.record_history(conn, job_id, now=True)  # the hold's start or end, in the job's history


def _safe(dsn: str) -> str:
    """A DSN without its password, for a log line."""
    return re.sub(r"(password=)\S+|(://[^:/@]+:)[^@]+@", lambda m: (m.group(1) or m.group(2)) + "***"
                  + ("" if m.group(1) else "@"), dsn)

