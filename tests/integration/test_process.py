"""Promises about the process: the real CLI in a subprocess, killed, interrupted, raced."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from support.database import (
    Application,
    assert_checkpoint_agrees_with_data,
    ddl_waiting,
    fetch,
    job_rows_done,
    keys,
    make_table,
    one,
    snapshot,
    writer_waiting,
)
from support.fakes import hash_vector, sentence
from support.models import assert_rows_hold_the_models_vectors
from support.processes import BATCH, ROWS, events, last_report, run_cli, spawn, wait_exit, wait_for
from support.processes import cli_args as run_args

pytestmark = [pytest.mark.slow, pytest.mark.model]


def vectors(dsn: str) -> dict[str, np.ndarray | None]:
    rows = fetch(dsn, "SELECT id::text AS id, embedding::text AS e FROM knowledge_nodes")
    return {r["id"]: (np.array(json.loads(r["e"]), dtype=np.float32) if r["e"] else None) for r in rows}


def test_sigkill_mid_embedding_then_rerun_resumes_at_checkpoint_and_matches_an_uninterrupted_run(
    dsn: str, second_dsn: str, minilm_path: Path, workdir: Path
) -> None:
    make_table(dsn, rows=ROWS, null_every=25)
    make_table(second_dsn, rows=ROWS, null_every=25)
    ids = keys(dsn)
    log = workdir / "killed.log"
    proc = spawn(run_args(dsn, minilm_path), cwd=workdir, log=log)
    with Application(dsn) as app:
        wait_for(lambda: job_rows_done(dsn) >= 3 * BATCH, timeout=120, what="three committed batches")
        # An application transaction holds a row three quarters in: however fast the machine,
        # the kill lands in the middle of the embedding phase.
        app.hold_row(ids[3 * ROWS // 4])
        proc.send_signal(signal.SIGKILL)
        assert wait_exit(proc) == -signal.SIGKILL

    assert one(dsn, "SELECT state FROM reembed_checkpoint") == "embedding"
    last_id = assert_checkpoint_agrees_with_data(dsn, 384)
    done = one(dsn, "SELECT rows_done FROM reembed_checkpoint_range")
    assert 0 < done < ROWS

    rerun = run_cli(run_args(dsn, minilm_path), cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads(rerun.stdout)
    nulls = one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE content IS NULL")
    after_last = one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE id > %s::uuid AND content IS NOT NULL",
                     (last_id,))
    assert report["resumed_from"] == last_id
    assert report["rows_updated"] == after_last  # exactly the rows after the checkpoint

    clean = run_cli(run_args(second_dsn, minilm_path), cwd=workdir)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert json.loads(clean.stdout)["rows_updated"] == ROWS - nulls

    a, b = snapshot(dsn), snapshot(second_dsn)
    assert a["column"] == b["column"] == "vector(384)"
    assert a["indexes"] == b["indexes"]
    assert [(r["model_name"], r["dimension"], r["model_hash"]) for r in a["registry"]] == [
        (r["model_name"], r["dimension"], r["model_hash"]) for r in b["registry"]]
    va, vb = vectors(dsn), vectors(second_dsn)
    assert va.keys() == vb.keys()
    for key, vec in va.items():
        other = vb[key]
        if vec is None or other is None:
            assert vec is None and other is None
        else:
            np.testing.assert_allclose(vec, other, atol=1e-5)
    others = "SELECT id, content, source, touched FROM knowledge_nodes ORDER BY id"
    assert fetch(dsn, others) == fetch(second_dsn, others)


def test_sigkill_during_finalize_then_rerun_completes_finalize(dsn: str, minilm_path: Path, workdir: Path) -> None:
    make_table(dsn, rows=ROWS)  # enough rows that the lock below is taken long before finalize starts
    log = workdir / "finalize.log"
    with Application(dsn) as blocker:
        proc = spawn(run_args(dsn, minilm_path), cwd=workdir, log=log)
        wait_for(lambda: job_rows_done(dsn) >= BATCH, timeout=120, what="embedding under way")
        # An application transaction holds a lock that the typmod change must wait for.
        blocker.hold_table()
        wait_for(lambda: ddl_waiting(dsn), timeout=120, what="finalize waiting on the lock")
        assert one(dsn, "SELECT state FROM reembed_checkpoint") == "finalizing"
        proc.send_signal(signal.SIGKILL)
        assert wait_exit(proc) == -signal.SIGKILL
    assert one(dsn, "SELECT finalize_steps FROM reembed_checkpoint") == []
    assert one(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                    " WHERE attrelid = 'knowledge_nodes'::regclass AND attname = 'embedding'") == "vector"

    rerun = run_cli(run_args(dsn, minilm_path), cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads(rerun.stdout)
    assert report["state"] == "done" and report["rows_updated"] == 0
    steps = one(dsn, "SELECT finalize_steps FROM reembed_checkpoint")
    assert steps == ["cut_over", "drop_capture", "build_index", "done"]
    after = snapshot(dsn)
    assert after["column"] == "vector(384)"
    assert after["indexes"][0]["indexname"] == "idx_knowledge_nodes_embedding_hnsw"
    assert after["registry"][0]["dimension"] == 384


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_after_a_consistent_checkpoint_and_a_rerun_finishes(
    dsn: str, minilm_path: Path, workdir: Path, sig: signal.Signals, code: int
) -> None:
    make_table(dsn, rows=ROWS)
    ids = keys(dsn)
    log = workdir / "signal.log"
    proc = spawn(run_args(dsn, minilm_path), cwd=workdir, log=log)
    with Application(dsn) as app:  # at its end, the batch in flight may commit
        wait_for(lambda: job_rows_done(dsn) >= BATCH, timeout=120, what="a committed batch")
        app.hold_row(ids[3 * ROWS // 4])
        proc.send_signal(sig)
    assert wait_exit(proc, timeout=60) == code, log.read_text()[-3000:]
    report = last_report(log)
    assert report["state"] == "stopped" and report["exit_code"] == code
    assert one(dsn, "SELECT state FROM reembed_checkpoint") == "embedding"
    assert_checkpoint_agrees_with_data(dsn, 384)
    assert one(dsn, "SELECT rows_done FROM reembed_checkpoint_range") == report["rows_updated"] < ROWS

    rerun = run_cli(run_args(dsn, minilm_path), cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["rows_updated"] == ROWS - report["rows_updated"]
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 384") == ROWS


@pytest.mark.parametrize("flags", [(), ("--no-join",)], ids=["cron-overlap", "no-join"])
def test_a_second_run_not_asked_to_join_exits_3_within_seconds_and_writes_nothing_while_status_shows_the_first(
    dsn: str, minilm_path: Path, workdir: Path, flags: tuple[str, ...]
) -> None:
    make_table(dsn, rows=ROWS)
    ids = keys(dsn)
    proc = spawn(run_args(dsn, minilm_path), cwd=workdir, log=workdir / "first.log")
    app = Application(dsn)
    try:
        wait_for(lambda: job_rows_done(dsn) >= BATCH, timeout=120, what="the first run under way")
        # An application transaction holds a row near the end: the first run cannot finish
        # while this test looks at it, however fast the machine.
        app.hold_row(ids[-BATCH])
        jobs_before = fetch(dsn, "SELECT job_id, target_model_name, started_at FROM reembed_checkpoint")

        started = time.monotonic()
        # a cron overlap: the same command line again (with --join it joins as a worker: test_workers.py)
        second = run_cli([*run_args(dsn, minilm_path), *flags], cwd=workdir, timeout=60)
        elapsed = time.monotonic() - started
        assert second.returncode == 3, second.stderr[-2000:]
        assert elapsed < 15
        assert second.stdout == ""
        assert "is being re-embedded by 'reembed lock " in second.stderr
        assert fetch(dsn, "SELECT job_id, target_model_name, started_at FROM reembed_checkpoint") == jobs_before

        status = run_cli(["status", "--dsn", dsn, "--json"], cwd=workdir, timeout=60)
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["state"] == "embedding" and data["rows_done"] >= BATCH
        assert data["rows_total"] == ROWS and data["holder"]["who"].startswith("reembed lock ")
        assert data["last_id"] is not None and data["stale"] is False
        text = run_cli(["status", "--dsn", dsn], cwd=workdir, timeout=60)
        assert "state embedding" in text.stdout and f"/ {ROWS} rows" in text.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        app.end()
        wait_exit(proc)


def test_rerun_after_completion_exits_0_quietly_and_updates_nothing(
    dsn: str, static_model_dir: Any, workdir: Path
) -> None:
    make_table(dsn, rows=50)
    model = static_model_dir(48)
    first = run_cli(["run", "--dsn", dsn, "--model", str(model), "--no-confirm"], cwd=workdir)
    assert first.returncode == 0, first.stderr
    before = snapshot(dsn)
    again = run_cli(["run", "--dsn", dsn, "--model", str(model), "--no-confirm"], cwd=workdir)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert snapshot(dsn) == before


def test_plan_cli_prints_the_plan_and_writes_nothing(dsn: str, static_model_dir: Any, workdir: Path) -> None:
    make_table(dsn, rows=50)
    before = snapshot(dsn)
    out = run_cli(["plan", "--dsn", dsn, "--model", str(static_model_dir(48)), "--json"], cwd=workdir)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["state"] == "planned" and data["rows_to_update"] == 50 and data["would_alter_typmod"] is True
    for key in ("rows_updated", "rows_skipped", "duration_secs", "index_rebuild_secs", "model_name", "dimension",
                "model_hash"):
        assert key in data
    assert snapshot(dsn) == before


def _max_seq(log: Path, name: str) -> int:
    return max((e["seq"] for e in events(log, name)), default=-1)


def test_sigkill_with_a_read_an_encode_and_a_write_all_in_flight_loses_and_repeats_nothing(
    dsn: str, minilm_path: Path, workdir: Path
) -> None:
    make_table(dsn, rows=ROWS)
    ids = [str(k) for k in keys(dsn)]
    log = workdir / "inflight.log"
    proc = spawn(run_args(dsn, minilm_path, "--log-level", "debug"), cwd=workdir, log=log)
    with Application(dsn) as blocker:
        seen = wait_for(lambda: job_rows_done(dsn), timeout=120, what="the first committed batch")
        blocked_seq = seen // BATCH + 8  # a batch well ahead of the writer
        blocker.hold_row(ids[blocked_seq * BATCH])
        # The writer waits inside batch `blocked_seq`'s transaction, while the encoder has
        # encoded the next batch and the reader has read further still.
        wait_for(lambda: _max_seq(log, "batch_committed") == blocked_seq - 1
                 and _max_seq(log, "batch_encoded") >= blocked_seq + 1
                 and _max_seq(log, "batch_read") >= blocked_seq + 2
                 and writer_waiting(dsn),
                 timeout=120, what="read, encode and write all in flight")
        proc.send_signal(signal.SIGKILL)
        assert wait_exit(proc) == -signal.SIGKILL
    last_id = assert_checkpoint_agrees_with_data(dsn, 384)
    assert last_id == ids[blocked_seq * BATCH - 1]
    rerun = run_cli(run_args(dsn, minilm_path), cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads(rerun.stdout)
    assert report["resumed_from"] == last_id and report["rows_updated"] == ROWS - blocked_seq * BATCH
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 384") == ROWS


def test_ctrl_c_during_the_warning_banner_aborts_with_nothing_written(
    dsn: str, static_model_dir: Any, workdir: Path
) -> None:
    make_table(dsn, rows=20)
    before = snapshot(dsn)
    log = workdir / "banner.log"
    proc = spawn(["run", "--dsn", dsn, "--model", str(static_model_dir(48)), "--json"], cwd=workdir, log=log)
    wait_for(lambda: "Press Ctrl-C within 5 seconds" in log.read_text(), timeout=60, what="the warning banner")
    proc.send_signal(signal.SIGINT)
    assert wait_exit(proc) == 130
    assert last_report(log)["message"] == "aborted before any write"
    assert snapshot(dsn) == before and before["tool_tables"] is False


def test_status_watch_refreshes_until_interrupted(dsn: str, workdir: Path) -> None:
    import sys

    from reembed.job import run
    from reembed.signals import StopSignal
    from support.fakes import HashEmbedder, job_settings, stopping_after

    make_table(dsn, rows=50)
    stop = StopSignal()  # a job stopped after two batches of ten
    stopped = run(job_settings(dsn, batch_size=10, pipeline=False),
                  embedder=stopping_after(HashEmbedder(32), stop, calls=2), stop=stop)
    assert stopped.exit_code == 130
    proc = subprocess.Popen([sys.executable, "-m", "reembed", "status", "--dsn", dsn, "--json", "--watch", "0.05"],
                            cwd=workdir, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["state"] == "embedding" and first["rows_done"] == 20
        # the job resumes and finishes while status watches: a later refresh shows it
        assert run(job_settings(dsn, batch_size=10), embedder=HashEmbedder(32)).state == "done"
        seen = [json.loads(proc.stdout.readline()) for _ in range(3)]
        while seen[-1]["state"] != "done" and len(seen) < 2000:
            seen.append(json.loads(proc.stdout.readline()))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        if proc.stdout:
            proc.stdout.close()
    assert seen[-1]["state"] == "done" and seen[-1]["rows_done"] == 50


def test_a_second_ctrl_c_stops_at_once_and_rolls_back_the_batch_in_flight(
    dsn: str, model48: Path, unlocked_table: list[Any], workdir: Path
) -> None:
    model, ids = model48, unlocked_table
    log = workdir / "twice.log"
    with Application(dsn) as app:
        app.hold_row(ids[ROWS // 2])  # the batch in flight waits on it for as long as the test likes
        proc = spawn(run_args(dsn, model), cwd=workdir, log=log)
        wait_for(lambda: writer_waiting(dsn), timeout=120, what="a batch's write waiting on the held row")
        done = job_rows_done(dsn)
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: events(log, "stop_requested"), timeout=30, what="the first Ctrl-C taken")
        assert proc.poll() is None  # the first Ctrl-C waits for the batch in flight, which waits on the row
        proc.send_signal(signal.SIGINT)
        assert wait_exit(proc, timeout=30) == 130, log.read_text()[-3000:]  # at once: the row is still held
        wait_for(lambda: one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'reembed %%'")
                 == 0, timeout=30, what="every connection of the run gone")
    assert job_rows_done(dsn) == done  # the batch in flight rolled back
    assert_checkpoint_agrees_with_data(dsn, 48, model=model)
    rerun = run_cli(run_args(dsn, model), cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["rows_updated"] == ROWS - done
    assert assert_rows_hold_the_models_vectors(dsn, model) == ROWS


def test_non_default_names_and_a_quoted_schema_qualified_table_are_re_embedded(
    dsn: str, static_model_dir: Any, workdir: Path
) -> None:
    import psycopg
    from pgvector.psycopg import register_vector

    model = static_model_dir(48)
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        conn.execute('CREATE SCHEMA "Tenant A"')
        conn.execute('CREATE TABLE "Tenant A"."Notes" (note_id bigint PRIMARY KEY, "Body" text, kept text,'
                     ' "Vec" vector(16))')
        conn.execute('CREATE INDEX "notes vec hnsw" ON "Tenant A"."Notes" USING hnsw ("Vec" vector_l2_ops)'
                     " WITH (m = 12, ef_construction = 40)")
        conn.execute('CREATE TABLE "Tenant A"."Model Registry" (id int PRIMARY KEY CHECK (id = 1),'
                     " model_name text NOT NULL, dimension int NOT NULL, model_hash text NOT NULL,"
                     " created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now())")
        conn.execute('INSERT INTO "Tenant A"."Model Registry" (id, model_name, dimension, model_hash)'
                     " VALUES (1, 'old', 16, 'sha256:old')")
        with conn.cursor() as cur:
            cur.executemany('INSERT INTO "Tenant A"."Notes" VALUES (%s, %s, %s, %s)',
                            [(i, None if i % 10 == 0 else sentence(i), f"kept {i}",
                              hash_vector(f"old {i}", 16)) for i in range(60)])
    index_def = "SELECT pg_get_indexdef('\"Tenant A\".\"notes vec hnsw\"'::regclass)"
    kept = 'SELECT note_id, kept FROM "Tenant A"."Notes" ORDER BY note_id'
    before_def, before_kept = one(dsn, index_def), fetch(dsn, kept)
    names = ["--table", '"Tenant A"."Notes"', "--column", "Vec", "--content-column", "Body",
             "--index", "notes vec hnsw", "--registry", '"Tenant A"."Model Registry"']
    out = run_cli(["run", "--dsn", dsn, "--model", str(model), "--no-confirm", "--json", "--batch-size", "16",
                   *names], cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["state"] == "done" and report["rows_updated"] == 54 and report["rows_skipped"] == 6
    assert one(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                    " WHERE attrelid = '\"Tenant A\".\"Notes\"'::regclass AND attname = 'Vec'") == "vector(48)"
    assert one(dsn, index_def) == before_def
    assert one(dsn, "SELECT indisvalid FROM pg_index WHERE indexrelid = '\"Tenant A\".\"notes vec hnsw\"'::regclass")
    registry = fetch(dsn, 'SELECT model_name, dimension FROM "Tenant A"."Model Registry"')
    assert registry == [{"model_name": str(model), "dimension": 48}]
    assert assert_rows_hold_the_models_vectors(dsn, model, table=("Tenant A", "Notes"), column="Vec",
                                               content="Body", key="note_id") == 54
    assert fetch(dsn, kept) == before_kept
    again = run_cli(["run", "--dsn", dsn, "--model", str(model), "--no-confirm", *names], cwd=workdir)
    assert (again.returncode, again.stdout) == (0, "")  # the same target: nothing to do, nothing said
