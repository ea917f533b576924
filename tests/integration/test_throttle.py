"""A good citizen: the job holds while a real streaming replica lags (seen through
pg_stat_replication, or through our heartbeat row on a replica given by --replica-dsn), while an
operator's flag file exists, stops past a critical limit (exit 75, resumable), and keeps to
--max-rate. Every job here is the real CLI on the embedded PostgreSQL with a real model."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from reembed.settings import Settings, Target
from reembed.status import status
from support.application import App
from support.database import make_table, one
from support.models import assert_rows_hold_the_models_vectors
from support.processes import cli_run_args, events, last_report, spawn, wait_exit, wait_for

ROWS = 2000


def _args(dsn: str, model: Path, *extra: str) -> list[str]:
    return cli_run_args(dsn, model, "--tokenizer-workers", "0", "--log-level", "debug", *extra, batch=50, window=50)


def _at(event: dict[str, Any]) -> dt.datetime:
    return dt.datetime.fromisoformat(event["timestamp"])


def _rows_done(dsn: str) -> int:
    return int(one(dsn, "SELECT coalesce(sum(rows_done), 0) FROM reembed_checkpoint_range") or 0)


def _started(dsn: str) -> bool:
    return one(dsn, "SELECT to_regclass('reembed_checkpoint_range') IS NOT NULL") and _rows_done(dsn) > 0


def _held(dsn: str) -> str | None:
    reason = status(Settings(target=Target(dsn=dsn))).as_dict().get("throttle", {}).get("reason")
    return str(reason) if reason else None


def _assert_held_once(log: Path, check: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One hold, for `check`, and no batch committed while it lasted (the batch in flight when it
    began aside: a second for it to commit)."""
    held, ended = events(log, "throttled"), events(log, "throttle_ended")
    assert len(held) == 1 and len(ended) == 1, (held, ended)
    assert any(r.startswith(check + " ") for r in held[0]["reasons"]), held[0]
    start, end = _at(held[0]) + dt.timedelta(seconds=1), _at(ended[0])
    during = [e for e in events(log, "batch_committed") if start < _at(e) < end]
    assert during == [], f"{len(during)} batches committed while the job was held"
    assert ended[0]["secs"] > 0
    return held[0], ended[0]


@pytest.mark.parametrize("seen_through", ["pg_stat_replication", "heartbeat"])
def test_replica_lag_holds_the_job_once_and_it_resumes_when_the_replica_catches_up(
    dsn: str, replica: Any, model48: Path, workdir: Path, seen_through: str
) -> None:
    make_table(dsn, rows=ROWS, old_dim=48, with_index=False)
    job_dsn, extra = dsn, []
    if seen_through == "heartbeat":  # a role that pg_stat_replication shows no positions to
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DO $$ BEGIN CREATE ROLE reembed_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
            conn.execute("ALTER TABLE knowledge_nodes OWNER TO reembed_app")
            conn.execute("ALTER TABLE embedding_model OWNER TO reembed_app")
            conn.execute("GRANT CREATE ON SCHEMA public TO reembed_app")
        job_dsn = make_conninfo(dsn, user="reembed_app")
        extra = ["--replica-dsn", replica.dsn(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])]
    log = workdir / "lag.log"
    proc = spawn(_args(job_dsn, model48, "--max-replica-lag", "1s", "--max-rate", "300", *extra), cwd=workdir,
                 log=log)
    try:
        wait_for(lambda: _started(dsn), what="the first commits")
        replica.pause()
        wait_for(lambda: events(log, "throttled"), what="the job to hold on the replica's lag")
        assert "replica_lag" in wait_for(lambda: _held(dsn), what="status to show the hold")
        held_at = _rows_done(dsn)
        assert held_at < ROWS  # held mid-job
    finally:
        replica.resume()
        resumed = dt.datetime.now(dt.UTC)
    assert wait_exit(proc) == 0, log.read_text()[-3000:]
    _, ended = _assert_held_once(log, "replica_lag")
    assert (_at(ended) - resumed).total_seconds() < 4.0  # the hold ends once the replica has caught up
    report = last_report(log)
    assert report["state"] == "done" and report["throttle_pauses"] == 1 and report["throttled_secs"] > 0
    assert len(events(log, "replica_lag_unseen")) == (1 if seen_through == "heartbeat" else 0)
    assert_rows_hold_the_models_vectors(dsn, model48)
    assert _held(dsn) is None


def test_a_flag_file_holds_the_job_until_it_is_removed(dsn: str, model48: Path, workdir: Path) -> None:
    make_table(dsn, rows=ROWS, old_dim=48, with_index=False)
    flag, log = workdir / "hold-reembed", workdir / "flag.log"
    proc = spawn(_args(dsn, model48, "--throttle-flag-file", str(flag), "--max-rate", "300"), cwd=workdir, log=log)
    try:
        wait_for(lambda: _started(dsn), what="the first commits")
        flag.touch()
        wait_for(lambda: events(log, "throttled"), what="the job to hold on the flag file")
        assert wait_for(lambda: _held(dsn), what="status to show the hold").startswith("flag_file")
        assert "throttle   HELD" in status(Settings(target=Target(dsn=dsn))).text()
    finally:
        flag.unlink(missing_ok=True)
    assert wait_exit(proc) == 0, log.read_text()[-3000:]
    _assert_held_once(log, "flag_file")
    assert_rows_hold_the_models_vectors(dsn, model48)


def test_a_job_killed_while_held_under_an_application_writing_throughout_resumes_right(
    dsn: str, model48: Path, workdir: Path
) -> None:
    """An application writing (and reading) throughout, the registry read FOR SHARE first; the
    job held by a flag file and SIGKILLed in the hold; a re-run clears the hold it recorded and
    finishes: no application error, every row the model's encoding of its current content."""
    make_table(dsn, rows=ROWS, old_dim=48)  # with the HNSW index: dropped at prepare, built at the end
    app = App(dsn, workdir, new_model=model48, new_name="static48")
    flag, log = workdir / "hold-reembed", workdir / "held.log"
    try:
        wait_for(lambda: app.writes() >= 10, what="the application writing")
        proc = spawn(_args(dsn, model48, "--model-name", "static48", "--throttle-flag-file", str(flag),
                           "--max-rate", "300"), cwd=workdir, log=log)
        wait_for(lambda: _started(dsn), what="the first commits")
        flag.touch()
        wait_for(lambda: _held(dsn), what="the hold recorded on the job")
        writes_at_hold = app.writes()
        wait_for(lambda: app.writes() >= writes_at_hold + 10, what="the application writing while the job is held")
        proc.kill()  # SIGKILL in the hold
        assert wait_exit(proc) == -9
        assert one(dsn, "SELECT state FROM reembed_checkpoint") == "embedding" and _held(dsn) is not None
        flag.unlink()
        again = workdir / "again.log"
        assert wait_exit(spawn(_args(dsn, model48, "--model-name", "static48"), cwd=workdir, log=again)) == 0, \
            again.read_text()[-3000:]
        assert _held(dsn) is None  # the dead run's hold is not shown any more
        wait_for(lambda: app.stats().get("writes_with_new_model", 0) >= 5, what="the application on the new model")
    finally:
        flag.unlink(missing_ok=True)
        stats = app.stop()
    assert stats["errors"] == [], stats["errors"][:5]
    assert stats["read_errors"] == [], stats["read_errors"][:5]
    assert stats["edits"] and stats["inserts"] and stats["reads"]
    assert one(dsn, "SELECT model_name FROM embedding_model") == "static48"
    assert one(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'reembed_capture_%%'") == 0
    assert one(dsn, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'idx_knowledge_nodes_embedding_hnsw'::regclass")
    assert_rows_hold_the_models_vectors(dsn, model48)


def test_a_critical_limit_stops_the_job_resumably_with_exit_75(dsn: str, model48: Path, workdir: Path) -> None:
    make_table(dsn, rows=ROWS, old_dim=48, with_index=False)
    busy = psycopg.connect(dsn, autocommit=True)  # an application statement running throughout

    def application() -> None:
        with contextlib.suppress(psycopg.errors.QueryCanceled):
            busy.execute("SELECT pg_sleep(120)")

    sleeper = threading.Thread(target=application, daemon=True)
    sleeper.start()
    log = workdir / "critical.log"
    try:
        wait_for(lambda: one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"),
                 what="the application's statement")
        proc = spawn(_args(dsn, model48, "--critical-load", "0", "--max-rate", "300"), cwd=workdir, log=log)
        assert wait_exit(proc) == 75, log.read_text()[-3000:]
    finally:
        busy.cancel()
        sleeper.join(10)
        busy.close()
    report = last_report(log)
    assert report["state"] == "throttle_critical" and report["message"].startswith("load 1 > 0")
    assert len(events(log, "throttle_critical")) == 1
    assert one(dsn, "SELECT state FROM reembed_checkpoint") == "embedding"
    again = workdir / "again.log"
    assert wait_exit(spawn(_args(dsn, model48), cwd=workdir, log=again)) == 0, again.read_text()[-3000:]
    assert_rows_hold_the_models_vectors(dsn, model48)


def test_max_rate_holds_the_commit_rate_within_ten_percent(dsn: str, model48: Path, workdir: Path) -> None:
    make_table(dsn, rows=3000, old_dim=48, with_index=False)
    log = workdir / "rate.log"
    assert wait_exit(spawn(_args(dsn, model48, "--max-rate", "600"), cwd=workdir, log=log)) == 0
    commits = events(log, "batch_committed")
    assert sum(c["rows"] for c in commits) == 3000
    secs = (_at(commits[-1]) - _at(commits[0])).total_seconds()
    rate = sum(c["rows"] for c in commits[1:]) / secs  # the rows committed after the first commit, over the time
    assert 540 <= rate <= 660, f"{rate:.0f} rows/s under --max-rate 600"


# ------------------------------------------------------------------ replicas that lie (issue 27)


def _slow_job(dsn: str, **opts: Any) -> Any:
    from reembed.job import run
    from support.fakes import SlowHashEmbedder, job_settings

    return run(job_settings(dsn, batch_size=20, pipeline=False, **opts),
               embedder=SlowHashEmbedder(32, rows_per_sec=100))


def test_a_replication_slot_whose_replica_went_away_counts_as_lag_until_excluded(dsn: str) -> None:
    """A replica that disconnected keeps its slot: it is gone from pg_stat_replication (lag 0 there)
    while the primary keeps WAL for it. Its lag grows with the WAL it has not taken."""
    import structlog

    make_table(dsn, rows=400, old_dim=32, id_type="bigint", with_index=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_physical_replication_slot('reembed_test_gone', true)")
    try:
        with structlog.testing.capture_logs() as logs:
            stopped = _slow_job(dsn, critical_replica_lag=2.0)
        assert stopped.exit_code == 75 and "replica_lag" in stopped.message, stopped
        idle = [e for e in logs if e["event"] == "replication_slot_idle"]
        assert idle and idle[0]["slot"] == "reembed_test_gone" and "--exclude-replica" in idle[0]["detail"], idle
        done = _slow_job(dsn, critical_replica_lag=2.0, exclude_replicas=("reembed_test_gone",))
        assert done.state == "done", done
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot('reembed_test_gone')")


def test_a_hold_writes_no_heartbeat_where_no_replica_streams(dsn: str, workdir: Path) -> None:
    from support.processes import Background

    make_table(dsn, rows=200, old_dim=32, id_type="bigint", with_index=False)
    flag = workdir / "hold"
    flag.write_text("held by the operator")
    job = Background(lambda: _slow_job(dsn, throttle_flag_file=str(flag)))
    wait_for(lambda: _held(dsn) or not job.is_alive(), timeout=60, what="the job holding on the flag file")
    # held with the replica-lag check on (the default): monitor passes go by, and nothing is written
    wait_for(lambda: one(dsn, "SELECT throttled_since < now() - interval '2 seconds' FROM reembed_checkpoint"),
             timeout=30, what="the hold to last a few monitor passes")
    assert one(dsn, "SELECT count(*) FROM reembed_heartbeat") == 0
    flag.unlink()
    job.join(timeout=120)
    assert job.error is None and job.result.state == "done", job.error
    assert one(dsn, "SELECT count(*) FROM reembed_heartbeat") == 0


def test_a_delayed_standby_is_named_and_excluded_not_waited_for_forever(dsn: str, replica: Any) -> None:
    import structlog

    make_table(dsn, rows=400, old_dim=32, id_type="bigint", with_index=False)
    with psycopg.connect(replica.dsn("postgres"), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET recovery_min_apply_delay = '1h'")
        conn.execute("SELECT pg_reload_conf()")
    name = one(dsn, "SELECT application_name FROM pg_stat_replication")
    with structlog.testing.capture_logs() as logs:
        stopped = _slow_job(dsn, critical_replica_lag=2.0)
    assert stopped.exit_code == 75, stopped
    late = [e for e in logs if e["event"] == "replica_replays_late"]
    assert late and late[0]["replica"] == name and f"--exclude-replica {name}" in late[0]["detail"], late
    done = _slow_job(dsn, critical_replica_lag=2.0, exclude_replicas=(name,))
    assert done.state == "done", done
