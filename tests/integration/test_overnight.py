"""Overnight and from cron: time windows, transient faults, lost locks, OOM, failed rows, progress."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from reembed import db, lease, retry
from reembed.errors import LockHeld, ReembedError
from reembed.job import run
from reembed.settings import ModelSpec
from support.database import (
    Application,
    assert_checkpoint_agrees_with_data,
    ddl_waiting,
    fetch,
    job_rows_done,
    keys,
    make_table,
    one,
    writer_waiting,
)
from support.fakes import Gate, HashEmbedder, hash_vector, stopping_after
from support.fakes import job_settings as settings
from support.models import assert_rows_hold_the_models_vectors
from support.processes import (
    BATCH,
    ROWS,
    Background,
    cli_args,
    events,
    last_report,
    run_cli,
    spawn,
    wait_exit,
    wait_for,
)

# ------------------------------------------------------------------ time windows


def test_max_runtime_commits_the_batch_in_flight_exits_75_and_the_next_run_resumes(dsn: str) -> None:
    make_table(dsn, rows=100, old_dim=32)
    emb = HashEmbedder(32)
    original = emb.forward
    started = time.monotonic()

    def encode_until_the_window_closes(texts: Any) -> Any:
        if emb.calls == 2:  # two batches encoded: the third is in flight when the window closes
            wait_for(lambda: time.monotonic() - started > 1.0, timeout=10, what="the window to close")
        return original(texts)

    emb.forward = encode_until_the_window_closes  # type: ignore[method-assign]
    report = run(settings(dsn, batch_size=10, max_runtime=1.0, pipeline=False), embedder=emb)
    assert report.state == "time_budget" and report.exit_code == 75
    assert one(dsn, "SELECT rows_done FROM reembed_checkpoint_range") == report.rows_updated == 30
    resumed = run(settings(dsn, batch_size=10), embedder=HashEmbedder(32))
    assert resumed.state == "done" and resumed.rows_updated == 70


def test_finalize_is_not_started_when_the_window_cannot_hold_it_and_the_next_run_does_it(dsn: str) -> None:
    make_table(dsn, rows=30, old_dim=32)
    report = run(settings(dsn, max_runtime=4.0), embedder=HashEmbedder(32))  # finalize needs >= 5 s x 1.5
    assert report.exit_code == 75 and report.rows_updated == 30
    assert "finalize postponed" in report.message
    assert one(dsn, "SELECT state FROM reembed_checkpoint") == "finalizing"
    assert one(dsn, "SELECT finalize_steps FROM reembed_checkpoint") == []
    done = run(settings(dsn), embedder=HashEmbedder(32))
    assert done.state == "done" and done.rows_updated == 0
    assert one(dsn, "SELECT state FROM reembed_checkpoint") == "done"


@pytest.mark.slow
@pytest.mark.model
def test_cli_max_runtime_exits_75_with_a_consistent_checkpoint(dsn: str, minilm_path: Path, workdir: Path) -> None:
    make_table(dsn, rows=ROWS)
    ids = keys(dsn)
    log = workdir / "window.log"
    proc = spawn(cli_args(dsn, minilm_path, "--max-runtime", "15s"), cwd=workdir, log=log)
    with Application(dsn) as app:
        # The window counts from the start, model load included: on a slow host it may close
        # before the first batch, and the promise (75, consistent, resumable) still holds.
        wait_for(lambda: job_rows_done(dsn) or events(log, "time_budget_reached") or proc.poll() is not None,
                 timeout=120, what="the first committed batch or the window's end")
        # However fast this machine, the job cannot be done before its window closes: an
        # application transaction holds a row three quarters in, until the window has closed.
        app.hold_row(ids[3 * ROWS // 4])
        wait_for(lambda: events(log, "time_budget_reached") or proc.poll() is not None,
                 timeout=60, what="the window to close")
    assert wait_exit(proc, timeout=60) == 75, log.read_text()[-3000:]
    report = [json.loads(line) for line in log.read_text().splitlines()
              if line.startswith("{") and '"state"' in line and '"event"' not in line][-1]
    assert report["state"] == "time_budget"
    done = one(dsn, "SELECT rows_done FROM reembed_checkpoint_range")
    assert done == report["rows_updated"] < ROWS
    # consistent: the new vectors on exactly the rows up to the cursor, and they are the model's
    last_id = assert_checkpoint_agrees_with_data(dsn, 384)
    if done:
        assert assert_rows_hold_the_models_vectors(dsn, minilm_path, where=f"id <= '{last_id}'::uuid") == done
    again = run_cli(cli_args(dsn, minilm_path), cwd=workdir)
    assert again.returncode == 0 and json.loads(again.stdout)["rows_updated"] == ROWS - done
    assert assert_rows_hold_the_models_vectors(dsn, minilm_path) == ROWS


@pytest.mark.slow
def test_until_closes_the_window_at_that_clock_time_exits_75_and_the_next_run_resumes(
    dsn: str, model48: Path, unlocked_table: list[Any], workdir: Path
) -> None:
    model, ids = model48, unlocked_table
    # --until takes HH:MM: the window closes at the next minute, once that is 25 s away or more
    wait_for(lambda: dt.datetime.now().second <= 35, timeout=40, what="a minute with 25 s left in it")
    closes = (dt.datetime.now().astimezone() + dt.timedelta(minutes=1)).replace(second=0, microsecond=0)
    log = workdir / "until.log"
    with Application(dsn) as app:
        # However fast this machine, the job cannot be done before its window closes: an
        # application transaction holds a row three quarters in until the window has closed.
        app.hold_row(ids[3 * ROWS // 4])
        proc = spawn(cli_args(dsn, model, "--until", closes.strftime("%H:%M")), cwd=workdir, log=log)
        wait_for(lambda: events(log, "time_budget_reached") or proc.poll() is not None,
                 timeout=120, what="the window to close")
    assert wait_exit(proc, timeout=60) == 75, log.read_text()[-3000:]
    (closed,) = events(log, "time_budget_reached")
    at = dt.datetime.fromisoformat(closed["timestamp"].replace("Z", "+00:00"))
    assert abs((at - closes).total_seconds()) < 2.0, (at, closes)  # at the clock time the operator named
    report = last_report(log)
    assert report["state"] == "time_budget"
    done = job_rows_done(dsn)
    assert 0 < done == report["rows_updated"] < ROWS
    assert_checkpoint_agrees_with_data(dsn, 48, model=model)
    again = run_cli(cli_args(dsn, model), cwd=workdir)
    assert again.returncode == 0 and json.loads(again.stdout)["rows_updated"] == ROWS - done
    assert assert_rows_hold_the_models_vectors(dsn, model) == ROWS


# ------------------------------------------------------------- transient faults


@pytest.mark.slow
@pytest.mark.model
def test_terminated_connections_mid_batch_are_survived_and_every_row_is_right(
    dsn: str, minilm_path: Path, workdir: Path
) -> None:
    make_table(dsn, rows=ROWS)
    log = workdir / "terminate.log"
    proc = spawn(cli_args(dsn, minilm_path), cwd=workdir, log=log)
    wait_for(lambda: job_rows_done(dsn) >= 2 * BATCH, timeout=120, what="two committed batches")
    killed = one(dsn, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                      " WHERE application_name LIKE 'reembed %%'")
    assert killed >= 3  # lock, reader, writer (and control)
    assert wait_exit(proc) == 0, log.read_text()[-3000:]
    assert assert_rows_hold_the_models_vectors(dsn, minilm_path) == ROWS
    assert one(dsn, "SELECT rows_done FROM reembed_checkpoint_range") == ROWS
    retries = events(log, "transient_error_retrying")
    assert retries and all(r["attempt"] >= 1 for r in retries)
    assert events(log, "lock_reacquired")


@pytest.mark.slow
@pytest.mark.model
def test_postgresql_restart_mid_run_is_survived_and_every_row_is_right(
    dsn: str, controllable_server: Any, minilm_path: Path, workdir: Path
) -> None:
    make_table(dsn, rows=ROWS)
    log = workdir / "restart.log"
    proc = spawn(cli_args(dsn, minilm_path, "--max-retries", "12"), cwd=workdir, log=log)
    wait_for(lambda: job_rows_done(dsn) >= 2 * BATCH, timeout=120, what="two committed batches")
    controllable_server.restart()
    assert wait_exit(proc) == 0, log.read_text()[-3000:]
    assert assert_rows_hold_the_models_vectors(dsn, minilm_path) == ROWS
    assert one(dsn, "SELECT rows_done FROM reembed_checkpoint_range") == ROWS
    assert events(log, "transient_error_retrying")
    assert one(dsn, "SELECT state FROM reembed_checkpoint") == "done"


@pytest.mark.slow
def test_an_outage_longer_than_max_outage_fails_with_exit_1_consistent_and_a_rerun_resumes(
    dsn: str, controllable_server: Any, model48: Path, unlocked_table: list[Any], workdir: Path
) -> None:
    model, ids = model48, unlocked_table
    app = Application(dsn)  # however fast the machine, the outage lands mid-run: a row is held
    app.hold_row(ids[ROWS // 2])
    log = workdir / "gave-up.log"
    proc = spawn(cli_args(dsn, model, "--max-outage", "3s"), cwd=workdir, log=log)
    try:
        wait_for(lambda: writer_waiting(dsn), timeout=120, what="the run waiting on the held row")
        done = job_rows_done(dsn)
        controllable_server.outage(20.0)  # well past --max-outage; ends the application's transaction too
        with contextlib.suppress(psycopg.Error):
            app.end()
        assert wait_exit(proc, timeout=120) == 1, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("reembed: database error"), last
    assert events(log, "transient_error_retrying")  # it waited, for as long as it was told
    assert job_rows_done(dsn) == done  # nothing lost, nothing half-written
    assert_checkpoint_agrees_with_data(dsn, 48, model=model)
    again = run_cli(cli_args(dsn, model), cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["rows_updated"] == ROWS - done
    assert assert_rows_hold_the_models_vectors(dsn, model) == ROWS


def test_a_real_serialization_failure_is_retried_with_its_attempt_logged(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute("CREATE TABLE counter (id int PRIMARY KEY, n int)")
        setup.execute("INSERT INTO counter VALUES (1, 0)")
    attempts = {"n": 0}
    a = psycopg.connect(dsn)
    b = psycopg.connect(dsn, autocommit=True)

    def bump() -> int:
        attempts["n"] += 1
        with a.transaction():
            a.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            a.execute("SELECT n FROM counter WHERE id = 1").fetchone()
            if attempts["n"] == 1:
                b.execute("UPDATE counter SET n = n + 100 WHERE id = 1")  # a concurrent writer
            return a.execute("UPDATE counter SET n = n + 1 WHERE id = 1 RETURNING n").fetchone()[0]  # type: ignore[index]

    try:
        assert retry.call(bump, what="bump", max_retries=3, initial=0.01) == 101
    finally:
        a.close()
        b.close()
    assert attempts["n"] == 2


def test_ddl_waits_only_briefly_for_its_lock_so_application_queries_do_not_queue_behind_it(dsn: str) -> None:
    make_table(dsn, rows=40, old_dim=64)
    emb = HashEmbedder(32)
    gate = Gate(emb)
    worker = Background(lambda: run(settings(dsn, ddl_lock_timeout="300ms", batch_size=20), embedder=emb))
    gate.reached.wait(30)  # prepared (index dropped, column relaxed): now an application transaction starts
    with Application(dsn) as blocker:
        blocker.hold_table()
        gate.open()
        wait_for(lambda: ddl_waiting(dsn), timeout=30, what="the DDL waiting")
        started = time.monotonic()
        with psycopg.connect(dsn) as app:  # queued behind the DDL's lock request, at most lock_timeout
            app.execute("SELECT count(*) FROM knowledge_nodes").fetchone()
        assert time.monotonic() - started < 3.0
        wait_for(lambda: ddl_waiting(dsn), timeout=30, what="the DDL's next attempt")
    worker.join(timeout=120)
    assert worker.error is None and worker.result.state == "done"
    assert one(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                    "'knowledge_nodes'::regclass AND attname = 'embedding'") == "vector(32)"


# ------------------------------------------------------------------- the lock


class Thief:
    """Another run's lock request, queued behind ours, so that it gets the lock the moment
    our lock's backend goes (no race with our keeper's re-take)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn = psycopg.connect(dsn, autocommit=True, application_name="the other run")
        key = lease.lock_key(one(dsn, "SELECT 'knowledge_nodes'::regclass::oid::bigint"))
        self._thread = threading.Thread(target=self.conn.execute, args=("SELECT pg_advisory_lock(%s)", (key,)))

    def steal(self) -> None:
        self._thread.start()
        wait_for(lambda: one(self.dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'the other run'"
                                       " AND wait_event = 'advisory'"), timeout=30, what="the other run queued")
        assert one(self.dsn, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                             " WHERE application_name LIKE 'reembed lock %%'") == 1
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the other run never got the lock"

    def close(self) -> None:
        self.conn.close()


@pytest.mark.slow
def test_a_run_that_lost_its_lock_to_another_stops_with_exit_3_before_committing_again(
    dsn: str, static_model_dir: Any, workdir: Path
) -> None:
    # Same dimension and no index: the job's start takes no table lock that the row lock below would block.
    make_table(dsn, rows=ROWS, old_dim=48, with_index=False)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE knowledge_nodes SET embedding = NULL")  # so that a written row shows
    app = Application(dsn)  # an application transaction holds the last row: the last batch waits on it
    app.hold_row(keys(dsn)[-1])
    log = workdir / "lost.log"
    proc = spawn(cli_args(dsn, static_model_dir(48)), cwd=workdir, log=log)
    thief = Thief(dsn)
    try:
        wait_for(lambda: writer_waiting(dsn), timeout=120, what="the last batch's write waiting")
        thief.steal()
        app.end()  # the write goes on: its commit must see that the lock is no longer ours
        assert wait_exit(proc, timeout=60) == 3, log.read_text()[-3000:]
        assert events(log, "lock_lost")
        assert one(dsn, "SELECT state FROM reembed_checkpoint") == "embedding"
        done = job_rows_done(dsn)
        assert done < ROWS  # the last batch was not committed
        assert_checkpoint_agrees_with_data(dsn, 48)
    finally:
        app.end()
        thief.close()
    again = run_cli(cli_args(dsn, static_model_dir(48)), cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert assert_rows_hold_the_models_vectors(dsn, static_model_dir(48)) == ROWS


def test_a_finalize_step_is_not_committed_once_another_run_has_the_lock(dsn: str) -> None:
    make_table(dsn, rows=40, old_dim=64)
    emb = HashEmbedder(32)
    gate = Gate(emb)
    worker = Background(lambda: run(settings(dsn, ddl_lock_timeout="300ms", batch_size=20), embedder=emb))
    gate.reached.wait(30)
    thief = Thief(dsn)
    with Application(dsn) as blocker:  # holds finalize's ALTER TABLE back
        blocker.hold_table()
        gate.open()
        wait_for(lambda: ddl_waiting(dsn), timeout=30, what="finalize's DDL waiting")
        thief.steal()
    worker.join(timeout=120)
    try:
        assert isinstance(worker.error, LockHeld), (worker.result, worker.error)
        row = fetch(dsn, "SELECT state, finalize_steps FROM reembed_checkpoint")[0]
        assert row["state"] == "finalizing" and row["finalize_steps"] == []
        assert one(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                        "'knowledge_nodes'::regclass AND attname = 'embedding'") == "vector"
        assert one(dsn, "SELECT model_name FROM embedding_model") == "old-model"
    finally:
        thief.close()
    again = run(settings(dsn), embedder=HashEmbedder(32))
    assert again.state == "done"
    assert one(dsn, "SELECT model_name FROM embedding_model") == HashEmbedder(32).signature.name


def test_lock_connections_ask_the_server_for_tcp_keepalives(dsn: str) -> None:
    conn = db.connect(dsn, role="lock", vectors=False)
    try:
        options = conn.pgconn.options.decode()
    finally:
        conn.close()
    for setting in ("tcp_keepalives_idle=60", "tcp_keepalives_interval=10", "tcp_keepalives_count=6"):
        assert setting in options


def _ghost_holder(dsn: str, heartbeat_age: str) -> psycopg.Connection[Any]:
    """A stopped job, and a 'holder' that keeps the lock with a heartbeat `heartbeat_age` old."""
    from reembed.signals import StopSignal

    stop = StopSignal()
    emb = stopping_after(HashEmbedder(32), stop, calls=1, reason="SIGTERM")
    assert run(settings(dsn, batch_size=10, pipeline=False), embedder=emb, stop=stop).exit_code == 143
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE reembed_checkpoint SET heartbeat_at = now() - %s::interval, holder = 'gpu-7:4242'",
                  (heartbeat_age,))
    ghost = psycopg.connect(dsn, autocommit=True, application_name="reembed lock gpu-7:4242")
    oid = one(dsn, "SELECT 'knowledge_nodes'::regclass::oid::bigint")
    assert ghost.execute("SELECT pg_try_advisory_lock(%s)", (lease.lock_key(oid),)).fetchone()[0]  # type: ignore[index]
    return ghost


def test_break_stale_lock_terminates_a_stale_holder_and_takes_over(dsn: str) -> None:
    make_table(dsn, rows=40, old_dim=32)
    ghost = _ghost_holder(dsn, "1 hour")
    try:
        status = run_cli(["status", "--dsn", dsn, "--json"], cwd=Path("/"))
        data = json.loads(status.stdout)
        assert data["stale"] is True and data["holder"]["who"] == "reembed lock gpu-7:4242"
        text = run_cli(["status", "--dsn", dsn], cwd=Path("/")).stdout
        assert "it probably died; `reembed run --break-stale-lock` takes over" in text

        with pytest.raises(ReembedError, match="is being re-embedded by 'reembed lock gpu-7:4242'") as held:
            run(settings(dsn, batch_size=10), embedder=HashEmbedder(32))
        assert held.value.exit_code == 3
        report = run(settings(dsn, batch_size=10, break_stale_lock=True), embedder=HashEmbedder(32))
        assert report.state == "done" and report.rows_updated == 30
        with pytest.raises(psycopg.OperationalError):
            ghost.execute("SELECT 1")
    finally:
        ghost.close()


def test_break_stale_lock_never_breaks_a_live_holder(dsn: str) -> None:
    make_table(dsn, rows=40, old_dim=32)
    ghost = _ghost_holder(dsn, "5 seconds")
    try:
        alive = "whose heartbeat is [0-9]+ s old: it is alive; not breaking its lock"
        with pytest.raises(ReembedError, match=alive) as held:
            run(settings(dsn, batch_size=10, break_stale_lock=True), embedder=HashEmbedder(32))
        assert held.value.exit_code == 3
        assert ghost.execute("SELECT 1").fetchone() == (1,)
    finally:
        ghost.close()


# --------------------------------------------------------------------- the model


def test_cuda_oom_halves_the_token_budget_until_it_fits_and_keeps_that_budget(
    dsn: str, static_model_dir: Any
) -> None:
    import structlog
    import torch

    from reembed.embedder import SentenceTransformerEmbedder

    make_table(dsn, rows=60, old_dim=48)
    emb = SentenceTransformerEmbedder(ModelSpec(model=str(static_model_dir(48)), device="cpu"))
    real, forward = emb.model.encode, emb.model.forward
    tried: list[int] = []

    def tight_memory(features: Any, **kw: Any) -> Any:  # the device holds 64 tokens at a time
        tried.append(int(features["input_ids"].numel()))
        if tried[-1] > 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(features, **kw)

    emb.model.forward = tight_memory
    with structlog.testing.capture_logs() as logs:
        report = run(settings(dsn, batch_size=20, max_batch_tokens=512, tokenizer_workers=0), embedder=emb)
    assert report.state == "done" and report.rows_updated == 60
    halved = [e["max_batch_tokens"] for e in logs if e["event"] == "token_budget_halved"]
    assert halved == [256, 128, 64]  # halved until a batch fits, then kept: no later batch fails
    failed = [n for n in tried if n > 64]
    assert len(failed) == 3 and tried[:3] == failed and all(n <= 64 for n in tried[3:])
    emb.model.forward = forward
    rows = fetch(dsn, "SELECT content, embedding::text AS e FROM knowledge_nodes")
    want = real([r["content"] for r in rows])
    for row, vec in zip(rows, want, strict=True):
        np.testing.assert_allclose(np.array(json.loads(row["e"])), vec, atol=1e-5)


def _poisoned(dsn: str) -> None:
    make_table(dsn, rows=50, old_dim=32,
               content=lambda i: f"POISON row {i}" if i in (5, 17, 33) else f"fine row {i}")


def test_rows_the_model_cannot_take_are_recorded_skipped_and_block_finalize(dsn: str) -> None:
    _poisoned(dsn)
    with pytest.raises(ReembedError, match="3 rows could not be encoded") as failed:
        run(settings(dsn, batch_size=10), embedder=HashEmbedder(32, poison="POISON"))
    assert failed.value.exit_code == 1
    bad = fetch(dsn, "SELECT r.error, r.attempts, k.content, k.embedding IS NULL AS null_vec FROM reembed_failed_rows r"
                     " JOIN knowledge_nodes k ON k.id::text = r.row_id ORDER BY k.content")
    assert [b["content"] for b in bad] == ["POISON row 17", "POISON row 33", "POISON row 5"]
    assert all(b["null_vec"] and b["attempts"] == 1 and "cannot encode" in b["error"] for b in bad)
    good = fetch(dsn, "SELECT content, embedding::text AS e FROM knowledge_nodes WHERE content LIKE 'fine%%'")
    assert len(good) == 47
    for row in good:
        assert float(np.array(json.loads(row["e"])) @ hash_vector(row["content"], 32)) > 0.9999
    assert one(dsn, "SELECT state FROM reembed_checkpoint") == "finalizing"
    status = json.loads(run_cli(["status", "--dsn", dsn, "--json"], cwd=Path("/")).stdout)
    assert status["failed_rows"] == 3

    fixed = run(settings(dsn, batch_size=10, retry_failed=True), embedder=HashEmbedder(32))
    assert fixed.state == "done" and one(dsn, "SELECT count(*) FROM reembed_failed_rows") == 0
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 32") == 50


def test_accept_failed_finalizes_with_their_embedding_null_and_says_so(dsn: str) -> None:
    _poisoned(dsn)
    with pytest.raises(ReembedError):
        run(settings(dsn, batch_size=10), embedder=HashEmbedder(32, poison="POISON"))
    with pytest.raises(ReembedError, match="3 rows could not be encoded"):  # the same model fails them again
        run(settings(dsn, retry_failed=True), embedder=HashEmbedder(32, poison="POISON"))
    assert [r["attempts"] for r in fetch(dsn, "SELECT attempts FROM reembed_failed_rows")] == [2, 2, 2]
    report = run(settings(dsn, accept_failed=True), embedder=HashEmbedder(32, poison="POISON"))
    assert report.state == "done"
    assert "3 rows that the model could not encode were accepted: their embedding is NULL" in report.message
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE embedding IS NULL") == 3
    assert one(dsn, "SELECT count(*) FROM reembed_failed_rows WHERE accepted") == 3
    assert one(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                    "'knowledge_nodes'::regclass AND attname = 'embedding'") == "vector(32)"


def test_a_device_fault_fails_the_run_with_exit_1_blames_no_row_and_keeps_the_checkpoint(dsn: str) -> None:
    import torch

    make_table(dsn, rows=50, old_dim=64)
    emb = HashEmbedder(32)
    real = emb.forward

    def faulting(texts: Any) -> Any:  # CUDA faults are sticky: the third batch and every call after it
        if emb.calls >= 2:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return real(texts)

    emb.forward = faulting  # type: ignore[method-assign]
    with pytest.raises(ReembedError, match="the device failed .*illegal memory access") as failed:
        run(settings(dsn, batch_size=10, pipeline=False), embedder=emb)
    assert failed.value.exit_code == 1
    assert one(dsn, "SELECT count(*) FROM reembed_failed_rows") == 0  # no row blamed
    assert one(dsn, "SELECT rows_done FROM reembed_checkpoint_range") == 20
    assert_checkpoint_agrees_with_data(dsn, 32)
    resumed = run(settings(dsn, batch_size=10), embedder=HashEmbedder(32))
    assert resumed.state == "done" and resumed.rows_updated == 30


def test_a_non_finite_vector_is_a_failed_row_with_its_reason_never_written(dsn: str) -> None:
    _poisoned(dsn)
    emb = HashEmbedder(32)
    real = emb.forward

    def nan_for_poison(texts: Any) -> Any:  # what an fp16 overflow or a 0/0 normalisation gives
        vectors = real(texts)
        vectors[[i for i, t in enumerate(texts) if "POISON" in t]] = np.nan
        return vectors

    emb.forward = nan_for_poison  # type: ignore[method-assign]
    with pytest.raises(ReembedError, match="3 rows could not be encoded"):
        run(settings(dsn, batch_size=10), embedder=emb)
    bad = fetch(dsn, "SELECT r.error, k.embedding IS NULL AS null_vec FROM reembed_failed_rows r"
                     " JOIN knowledge_nodes k ON k.id::text = r.row_id")
    assert len(bad) == 3 and all(b["null_vec"] and "non-finite" in b["error"] for b in bad)
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 32") == 47


def test_progress_events_carry_rows_rate_and_eta_in_json_log_mode(dsn: str, static_model_dir: Any,
                                                                  workdir: Path) -> None:
    make_table(dsn, rows=3000)
    out = run_cli(["run", "--dsn", dsn, "--model", str(static_model_dir(48)), "--no-confirm", "--batch-size", "8",
                   "--progress-interval", "0.05", "--log-format", "json"], cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    progress = [json.loads(line) for line in out.stderr.splitlines() if '"event": "progress"' in line]
    assert progress, out.stderr[-2000:]
    last = progress[-1]
    assert last["rows_total"] == 3000 and 0 < last["rows_done"] <= 3000
    assert last["rows_per_sec"] > 0 and last["eta_secs"] is not None and 0 < last["percent"] <= 100
