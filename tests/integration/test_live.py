"""Live tables: an application keeps writing while reembed runs; nothing it writes is lost or
left stale, and it is held off only briefly at the cut-over."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from reembed.failures import RowsFailed
from reembed.job import run
from reembed.settings import ModelSpec, RunOptions, Settings, Target
from support.application import App
from support.database import Application, fetch, job_rows_done, keys, make_table, one, writer_waiting
from support.fakes import Gate, HashEmbedder
from support.fakes import job_settings as settings
from support.models import assert_rows_hold_the_models_vectors
from support.processes import (
    BATCH,
    ROWS,
    Background,
    cli_args,
    cli_run_args,
    events,
    last_report,
    run_cli,
    spawn,
    wait_for,
)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_every_row_is_the_new_encoding_of_its_current_content(dsn: str, model: Path) -> int:
    """SentenceTransformer.encode of each row's current content, element by element."""
    return assert_rows_hold_the_models_vectors(dsn, model)


def assert_final(dsn: str, dim: int, model_name: str, *, index: bool = True) -> None:
    assert one(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                    "'knowledge_nodes'::regclass AND attname = 'embedding'") == f"vector({dim})"
    if index:
        assert one(dsn, "SELECT indisvalid FROM pg_index"
                        " WHERE indexrelid = 'idx_knowledge_nodes_embedding_hnsw'::regclass")
    assert one(dsn, "SELECT model_name FROM embedding_model") == model_name
    assert one(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'reembed_capture_%%'") == 0
    assert one(dsn, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'reembed_capture_%%'") == 0
    assert one(dsn, "SELECT count(*) FROM reembed_changes") == 0
    assert one(dsn, "SELECT state FROM reembed_checkpoint ORDER BY job_id DESC LIMIT 1") == "done"


# -------------------------------------------------------------- the application writes


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("old_dim", [384, 64], ids=["same-dimension", "dimension-change"])
def test_an_application_writing_throughout_loses_nothing_and_leaves_nothing_stale(
    dsn: str, minilm_path: Path, minilm: Any, workdir: Path, old_dim: int
) -> None:
    make_table(dsn, rows=ROWS, old_dim=old_dim)
    name = minilm.signature.name
    app = App(dsn, workdir, new_model=minilm_path, new_name=name)
    try:
        wait_for(lambda: app.writes() >= 20, timeout=60, what="the application writing")
        log = workdir / "run.log"
        proc = spawn(cli_args(dsn, minilm_path, "--model-name", name), cwd=workdir, log=log)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        writes_during = app.writes()
        wait_for(lambda: app.stats().get("writes_with_new_model", 0) >= 10, timeout=60,
                 what="the application writing with the new model")
    finally:
        stats = app.stop()
    report = last_report(log)
    assert stats["errors"] == [], stats["errors"][:5]
    assert writes_during >= 50 and stats["edits"] and stats["inserts"] and stats["null_inserts"]
    cut = events(log, "cut_over")[-1]
    print(f"\n[{old_dim}->384] app writes {app.writes()}, rows caught up by catch-up {report['catch_up_rows']}, "
          f"writers held off by the cut-over {cut['writers_held_secs']:.3f} s (reported "
          f"{report['writers_held_secs']:.3f} s), longest application write {stats['max_write_secs']:.3f} s")
    assert report["writers_held_secs"] == pytest.approx(cut["writers_held_secs"], abs=1e-3)
    assert report["writers_held_secs"] < 5.0
    assert events(log, "catch_up_done")
    assert_final(dsn, 384, name)
    assert_every_row_is_the_new_encoding_of_its_current_content(dsn, minilm_path)


def test_a_row_edited_between_the_jobs_read_and_write_is_not_overwritten_and_is_caught_up(dsn: str) -> None:
    make_table(dsn, rows=40, old_dim=32)
    emb = HashEmbedder(32)
    gate = Gate(emb)  # the first batch is read and tokenized; its forward waits
    worker = Background(lambda: run(settings(dsn, batch_size=40, pipeline=False), embedder=emb))
    assert gate.reached.wait(30), worker.error
    key = one(dsn, "SELECT id FROM knowledge_nodes ORDER BY id LIMIT 1")
    with psycopg.connect(dsn, autocommit=True) as app:  # the application edits a row of that batch
        app.execute("UPDATE knowledge_nodes SET content = 'edited by the application' WHERE id = %s", (key,))
    gate.open()
    worker.join(timeout=120)
    assert worker.error is None and worker.result.state == "done"
    from support.fakes import hash_vector

    (row,) = fetch(dsn, "SELECT content, embedding::text AS e FROM knowledge_nodes WHERE id = %s", (key,))
    assert row["content"] == "edited by the application"
    np.testing.assert_allclose(np.array(json.loads(row["e"])), hash_vector("edited by the application", 32),
                               rtol=1e-5, atol=1e-6)
    assert worker.result.rows_updated == 39  # the edited row did not count as done by the main pass
    assert one(dsn, "SELECT catchup_rows FROM reembed_checkpoint") == 1  # fewer than a batch: the cut-over did it
    assert one(dsn, "SELECT count(*) FROM reembed_changes") == 0


def test_a_row_deleted_then_inserted_again_while_a_catch_up_encodes_its_page_is_caught_up(dsn: str) -> None:
    """A catch-up page reads its captured keys' rows; one is gone (deleted by the application). While the
    page is encoded the application inserts that key again: its capture commits with it, after the page
    was read. Settling the page forgets the gone key only if it is still gone: the new row is caught up
    (forgetting it unconditionally dropped the insert's capture too, and the row kept what the
    application wrote)."""
    make_table(dsn, rows=20, old_dim=32, with_index=False)
    j, k, l_, m = keys(dsn)[:4]  # the first batch: read before the first forward waits
    emb = HashEmbedder(32)
    marked, release = threading.Event(), threading.Event()
    original = emb.forward

    def forward(texts: list[str]) -> np.ndarray:
        if any("HOLD ME" in t for t in texts) and not release.is_set():
            marked.set()
            release.wait(60)
        return original(texts)

    emb.forward = forward  # type: ignore[method-assign]
    gate = Gate(emb)
    worker = Background(lambda: run(settings(dsn, batch_size=4, pipeline=False), embedder=emb))
    try:
        assert gate.reached.wait(60), worker.error
        with psycopg.connect(dsn, autocommit=True) as app:
            app.execute("UPDATE knowledge_nodes SET content = 'HOLD ME, edited' WHERE id = %s", (j,))
            app.execute("UPDATE knowledge_nodes SET content = content || ' edited' WHERE id = ANY(%s)", ([l_, m],))
            app.execute("DELETE FROM knowledge_nodes WHERE id = %s", (k,))
        gate.open()
        assert marked.wait(60), worker.error  # a catch-up pass encodes the page [j, k, l, m]: k was gone
        with psycopg.connect(dsn, autocommit=True) as app:
            app.execute("INSERT INTO knowledge_nodes (id, content, source) VALUES (%s, 'back again', 'app')", (k,))
    finally:
        release.set()
        gate.open()
    worker.join(timeout=120)
    assert worker.error is None and worker.result.state == "done", (worker.error, worker.result)
    from support.fakes import hash_vector

    (row,) = fetch(dsn, "SELECT embedding::text AS e FROM knowledge_nodes WHERE id = %s", (k,))
    assert row["e"] is not None, "the row inserted again was never caught up"
    np.testing.assert_allclose(np.array(json.loads(row["e"])), hash_vector("back again", 32), rtol=1e-5, atol=1e-6)
    assert one(dsn, "SELECT count(*) FROM reembed_changes") == 0


def test_rows_deleted_during_the_job_are_settled_on_a_table_whose_name_shadows_reembeds_alias(dsn: str) -> None:
    """Keys gone when a catch-up page reads them are forgotten by a statement that looks for them in
    the table; a table named `c` (the statement's own alias for the captured rows) is found too."""
    from dataclasses import replace

    make_table(dsn, rows=20, old_dim=32, with_index=False, table="c")
    gone = keys(dsn, "c")[:5]  # the first batch: read before the first forward waits
    emb = HashEmbedder(32)
    gate = Gate(emb)
    worker = Background(lambda: run(replace(settings(dsn, batch_size=4, pipeline=False),
                                            target=Target(dsn=dsn, table="c")), embedder=emb))
    try:
        assert gate.reached.wait(60), worker.error
        with psycopg.connect(dsn, autocommit=True) as app:
            app.execute("DELETE FROM c WHERE id = ANY(%s)", (gone,))
    finally:
        gate.open()
    worker.join(timeout=120)
    assert worker.error is None and worker.result.state == "done", (worker.error, worker.result)
    assert one(dsn, "SELECT count(*) FROM reembed_changes") == 0
    assert one(dsn, "SELECT count(*) FROM c") == 15


# ---------------------------------------------------------------------------- faults


@contextlib.contextmanager
def _paused_at_the_end(dsn: str, workdir: Path, model: Path, *, captured: int, extra: tuple[str, ...] = (),
                       before_run: Callable[[], Any] = lambda: None) -> Iterator[tuple[Any, Path, Application]]:
    """A run whose main pass waits on its last row while `captured` rows are inserted behind its
    cursor (negative keys), the first of which an application transaction then holds. (No HNSW
    index and the same dimension: prepare takes no lock that the held row would block.)
    Everything started here is stopped on the way out."""
    make_table(dsn, rows=ROWS, id_type="bigint", old_dim=48, with_index=False)
    last = one(dsn, "SELECT max(id) FROM knowledge_nodes")
    tail, holder = Application(dsn), Application(dsn)
    tail.hold_row(last)
    before_run()
    log = workdir / "run.log"
    proc = spawn(cli_args(dsn, model, *extra), cwd=workdir, log=log)
    try:
        wait_for(lambda: job_rows_done(dsn) >= BATCH, timeout=120, what="the main pass under way")
        with psycopg.connect(dsn, autocommit=True) as app:
            for k in range(1, captured + 1):
                app.execute("INSERT INTO knowledge_nodes (id, content, source) VALUES (%s, %s, 'app')",
                            (-k, f"written by the application during the job, number {k}"))
        if captured:
            holder.hold_row(-captured)  # the first captured key in key order
        tail.end()
        yield proc, log, holder
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        holder.end()
        tail.end()


def _inside_the_cut_over(dsn: str, log: Path) -> None:
    """The table held against writers, the cut-over's last catch-up waiting on the held row."""
    wait_for(lambda: events(log, "catch_up_done") and _waiting_write(dsn) and _holding_writers(dsn),
             timeout=120, what="the cut-over waiting on the application's row")


@contextlib.contextmanager
def _held_in_the_cut_over(dsn: str, workdir: Path, model: Path, *,
                          lock_timeout: str) -> Iterator[tuple[Any, Path, Application]]:
    """A run inside its cut-over (writers held off), its last catch-up waiting on a row an
    application holds until the test ends it (or the cut-over's `lock_timeout` runs out)."""
    with _paused_at_the_end(dsn, workdir, model, captured=BATCH // 2,
                            extra=("--cut-over-lock-timeout", lock_timeout)) as (proc, log, holder):
        _inside_the_cut_over(dsn, log)
        yield proc, log, holder


def _assert_done_right(dsn: str, model: Path) -> None:
    assert_final(dsn, 48, str(model), index=False)
    assert_every_row_is_the_new_encoding_of_its_current_content(dsn, model)


def _holding_writers(dsn: str) -> int:
    return int(one(dsn, "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE "
                        "a.application_name LIKE 'reembed control%%' AND l.mode = 'ShareRowExclusiveLock'"
                        " AND l.granted AND l.relation = 'knowledge_nodes'::regclass"))


def _control_waiting_on(dsn: str, statement: str) -> int:
    """Is the coordinator waiting on a lock in a statement ILIKE `statement` right now?"""
    return int(one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'reembed control%%'"
                        " AND wait_event_type = 'Lock' AND query ILIKE %s", (statement,)))


def _waiting_write(dsn: str) -> int:
    return _control_waiting_on(dsn, "UPDATE%reembed_stage%")


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["catch-up", "cut-over"])
def test_sigkill_during_a_catch_up_pass_or_the_cut_over_then_a_rerun_finishes_right(
    dsn: str, model48: Path, workdir: Path, phase: str
) -> None:
    captured = 3 * BATCH if phase == "catch-up" else BATCH // 2
    with _paused_at_the_end(dsn, workdir, model48, captured=captured,
                            extra=("--cut-over-lock-timeout", "5s")) as (proc, log, _holder):
        if phase == "catch-up":
            wait_for(lambda: events(log, "catch_up_pass_started") and _waiting_write(dsn), timeout=120,
                     what="a catch-up pass waiting on the application's row")
        else:
            _inside_the_cut_over(dsn, log)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    job = fetch(dsn, "SELECT state, finalize_steps FROM reembed_checkpoint")[0]
    assert job["state"] == "finalizing" and "cut_over" not in job["finalize_steps"]
    assert one(dsn, "SELECT model_name FROM embedding_model") == "old-model"
    assert one(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'reembed_capture_%%' AND tgenabled <> 'D'") == 2
    rerun = run_cli(cli_args(dsn, model48), cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_done_right(dsn, model48)


@pytest.mark.slow
def test_readers_never_wait_while_the_cut_over_holds_writers_off(
    dsn: str, model48: Path, workdir: Path
) -> None:
    with _held_in_the_cut_over(dsn, workdir, model48, lock_timeout="60s") as (proc, log, holder):
        key = one(dsn, "SELECT max(id) FROM knowledge_nodes")
        reads = {
            "scan": ("SELECT count(*), count(embedding) FROM knowledge_nodes", None),
            "by key": ("SELECT id, content, embedding FROM knowledge_nodes WHERE id = %s", (key,)),
            "registry": ("SELECT model_name, dimension FROM embedding_model WHERE id = 1", None),
            "nearest": ("SELECT id FROM knowledge_nodes WHERE embedding IS NOT NULL ORDER BY embedding <-> "
                        "(SELECT embedding FROM knowledge_nodes WHERE id = %s) LIMIT 5", (key,)),
        }
        latency: dict[str, float] = {}
        with psycopg.connect(dsn, autocommit=True) as reader:
            reader.execute("SET statement_timeout = '10s'")
            for name, (statement, params) in reads.items():
                began = time.monotonic()
                reader.execute(statement, params).fetchall()
                latency[name] = time.monotonic() - began
            with psycopg.connect(dsn) as writer:  # the hold is real: a writer waits
                writer.execute("SET lock_timeout = '300ms'")
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    writer.execute("UPDATE knowledge_nodes SET content = content WHERE id = %s", (key,))
        assert _holding_writers(dsn)  # still inside the cut-over: every read above ran during the hold
        print(f"\nreads while the cut-over held writers off: {latency}")
        assert max(latency.values()) < 0.5, latency
        holder.end()
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    _assert_done_right(dsn, model48)


def _cut_over_waiting_for_the_registry(dsn: str) -> int:
    return _control_waiting_on(dsn, "%embedding_model%FOR UPDATE%")


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["catch-up", "cut-over"])
def test_an_application_writing_and_reading_through_a_sigkill_in_catch_up_or_the_cut_over_loses_nothing(
    dsn: str, model48: Path, workdir: Path, phase: str
) -> None:
    apps: list[App] = []

    def start_app() -> None:
        apps.append(App(dsn, workdir, new_model=model48, new_name=str(model48), id_type="bigint"))

    captured = 3 * BATCH if phase == "catch-up" else 0
    try:
        with _paused_at_the_end(dsn, workdir, model48, captured=captured, before_run=start_app,
                                extra=("--cut-over-lock-timeout", "5s")) as (proc, log, holder):
            if phase == "catch-up":
                wait_for(lambda: events(log, "catch_up_pass_started") and _waiting_write(dsn), timeout=120,
                         what="a catch-up pass waiting on the application's row")
            else:  # a writer of the protocol holds the registry row: the cut-over waits for it
                holder.hold_registry()
                wait_for(lambda: events(log, "catch_up_done") and _cut_over_waiting_for_the_registry(dsn),
                         timeout=120, what="the cut-over waiting for the registry row")
            writes_before_kill = apps[0].writes()
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        assert one(dsn, "SELECT model_name FROM embedding_model") == "old-model"
        wait_for(lambda: apps[0].writes() >= writes_before_kill + 20, timeout=60,
                 what="the application writing on after the kill")
        rerun = run_cli(cli_args(dsn, model48), cwd=workdir)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        wait_for(lambda: apps[0].stats().get("writes_with_new_model", 0) >= 10, timeout=60,
                 what="the application writing with the new model")
    finally:
        stats = apps[0].stop() if apps else {}
    assert stats["errors"] == [] and stats["read_errors"] == [], (stats["errors"][:3], stats["read_errors"][:3])
    assert stats["reads"] > 50 and stats["edits"] and stats["inserts"] and stats["deletes"]
    print(f"\n[kill in {phase}] application: {apps[0].writes()} writes, {stats['reads']} reads, longest write "
          f"{stats['max_write_secs']:.3f} s, longest read {stats['max_read_secs']:.3f} s")
    _assert_done_right(dsn, model48)


@pytest.mark.slow
def test_an_application_writing_and_reading_through_a_sigkill_among_windows_and_writers_loses_nothing(
    dsn: str, model48: Path, workdir: Path
) -> None:
    """The main pass as the feed runs it: windows of four transactions, a tokenizer process, three
    writers committing in key order. Killed while a writer waits on an application's row and the
    writers after it wait for their turn; the application writes and reads on throughout."""
    make_table(dsn, rows=ROWS, id_type="bigint", old_dim=48, with_index=False)
    middle = keys(dsn)[ROWS // 2]
    app = App(dsn, workdir, new_model=model48, new_name=str(model48), id_type="bigint")
    try:
        wait_for(lambda: app.writes() >= 20, timeout=60, what="the application writing")
        log = workdir / "run.log"
        with Application(dsn) as holder:
            holder.hold_row(middle)
            proc = spawn(cli_run_args(dsn, model48, "--writers", "3", "--tokenizer-workers", "1", batch=BATCH,
                                      window=4 * BATCH), cwd=workdir, log=log)
            try:
                wait_for(lambda: writer_waiting(dsn) and _writers_waiting_for_their_turn(dsn) >= 1,
                         timeout=120, what="a writer on the held row, a later one waiting for its turn")
                done = job_rows_done(dsn)
                assert 0 < done < ROWS // 2 + BATCH
                writes_before_kill = app.writes()
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=60) == -signal.SIGKILL
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert job_rows_done(dsn) == done  # what was in flight rolled back, nothing beyond the checkpoint
        wait_for(lambda: app.writes() >= writes_before_kill + 20, timeout=60,
                 what="the application writing on after the kill")
        rerun = run_cli(cli_run_args(dsn, model48, "--writers", "3", batch=BATCH), cwd=workdir)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        wait_for(lambda: app.stats().get("writes_with_new_model", 0) >= 10, timeout=60,
                 what="the application writing with the new model")
    finally:
        stats = app.stop()
    assert stats["errors"] == [] and stats["read_errors"] == [], (stats["errors"][:3], stats["read_errors"][:3])
    assert stats["reads"] > 20 and stats["edits"] and stats["inserts"]
    _assert_done_right(dsn, model48)


def _writers_waiting_for_their_turn(dsn: str) -> int:
    """Writers with their rows written, their transaction open, waiting (in reembed) for an earlier batch."""
    return int(one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'reembed writer%%'"
                        " AND state = 'idle in transaction'"))


@pytest.mark.slow
def test_a_connection_lost_inside_the_cut_over_is_retried_and_the_run_finishes_right(
    dsn: str, model48: Path, workdir: Path
) -> None:
    with _held_in_the_cut_over(dsn, workdir, model48, lock_timeout="5s") as (proc, log, holder):
        assert one(dsn, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE application_name LIKE 'reembed control%%'") >= 1
        holder.end()
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    assert events(log, "transient_error_retrying")
    _assert_done_right(dsn, model48)


@pytest.mark.slow
@pytest.mark.parametrize("then", ["lock-released", "sigkill"])
def test_a_cut_over_whose_table_lock_is_held_elsewhere_keeps_the_changes_settled_names_the_holder_and_finishes(
    dsn: str, model48: Path, workdir: Path, then: str
) -> None:
    """A session holding SHARE UPDATE EXCLUSIVE (a manual VACUUM, an ANALYZE, a CREATE INDEX
    CONCURRENTLY, an autovacuum that may not be cancelled) refuses every cut-over lock request,
    for as long as it runs, while the application edits a hot set of rows. Between refused tries
    the job writes and settles what the application changed, so its captured changes stay few (they
    grew by one row per write, 123,578 rows for 300 keys, when the tries waited inside one retry
    loop), and it says who holds the lock. Once the lock is let go it cuts over, every row right; or,
    SIGKILLed among its refused tries and write-aheads, a rerun finishes right."""
    make_table(dsn, rows=ROWS, id_type="bigint", old_dim=48, with_index=False)
    last = one(dsn, "SELECT max(id) FROM knowledge_nodes")
    hot = [r["id"] for r in fetch(dsn, "SELECT id FROM knowledge_nodes ORDER BY id LIMIT 20")]
    tail, vacuum = Application(dsn), Application(dsn)
    tail.hold_row(last)  # the main pass waits on its last row until the lock below is held
    log = workdir / "run.log"
    proc = spawn(cli_args(dsn, model48, "--cut-over-lock-timeout", "200ms", "--log-level", "debug"), cwd=workdir,
                 log=log)
    writes, stop = [0], threading.Event()

    def application() -> None:
        with psycopg.connect(dsn, autocommit=True) as app:
            while not stop.is_set():
                key = hot[writes[0] % len(hot)]
                app.execute("UPDATE knowledge_nodes SET content = %s WHERE id = %s",
                            (f"edited by the application, edit {writes[0]}", key))
                writes[0] += 1
                stop.wait(0.01)

    writer = threading.Thread(target=application, daemon=True)
    try:
        wait_for(lambda: job_rows_done(dsn) >= BATCH, timeout=120, what="the main pass under way")
        vacuum.conn.execute("LOCK TABLE knowledge_nodes IN SHARE UPDATE EXCLUSIVE MODE")
        holder = one(dsn, "SELECT pid FROM pg_locks WHERE relation = 'knowledge_nodes'::regclass"
                          " AND mode = 'ShareUpdateExclusiveLock' AND granted")
        writer.start()
        tail.end()
        wait_for(lambda: events(log, "cut_over_lock_not_granted"), timeout=180, what="the cut-over refused its lock")
        said = events(log, "cut_over_lock_not_granted")[0]
        assert f"pid {holder} " in said["held_by"] and "ShareUpdateExclusiveLock" in said["held_by"], said
        since = writes[0]
        wait_for(lambda: writes[0] >= since + 600, timeout=180, what="600 more of the application's edits")
        # still refused, still waiting: what the application changed meanwhile was written and settled
        assert proc.poll() is None and "cut_over" not in (one(dsn, "SELECT finalize_steps FROM reembed_checkpoint"))
        pending = one(dsn, "SELECT count(*) FROM reembed_changes")
        print(f"\ncaptured changes pending after {writes[0] - since} edits of {len(hot)} rows, the lock refused: "
              f"{pending}")
        assert pending < 300, (pending, writes[0] - since)
        assert events(log, "cut_over_wrote_ahead")
        if then == "sigkill":
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
            assert one(dsn, "SELECT model_name FROM embedding_model") == "old-model"
        stop.set()  # (this application does not embed: its edits after the cut-over would be its own to embed)
        writer.join(timeout=30)
        vacuum.end()
        if then == "sigkill":
            rerun = run_cli(cli_args(dsn, model48), cwd=workdir)
            assert rerun.returncode == 0, rerun.stderr[-3000:]
            report = json.loads(rerun.stdout)
        else:
            assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
            report = last_report(log)
    finally:
        stop.set()
        if writer.is_alive():
            writer.join(timeout=30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        vacuum.end()
        tail.end()
    held = report["writers_held_secs"]
    assert held < 2.0, held
    _assert_done_right(dsn, model48)


@pytest.mark.parametrize("accept", [False, True], ids=["refused", "accept-failed"])
def test_a_row_the_model_cannot_take_written_while_the_cut_over_waits_for_its_lock_still_refuses_the_cut_over(
    dsn: str, accept: bool
) -> None:
    """Between refused lock requests the job writes ahead what the application changed; a row the model
    cannot take is neither written NULL nor settled there: it stays captured, and the cut-over, once
    its locks are granted, refuses it (without --accept-failed) as it would have, nothing swapped;
    with --accept-failed it writes it NULL and records it accepted (not left pending)."""
    make_table(dsn, rows=50, old_dim=32)
    emb = HashEmbedder(32, poison="POISON")
    gate = Gate(emb)  # the first batch waits: the capture trigger is in place, no cut-over lock asked for yet
    worker = Background(lambda: run(settings(dsn, batch_size=10, cut_over_lock_timeout="200ms", accept_failed=accept),
                                    embedder=emb))
    with Application(dsn) as vacuum:
        try:
            assert gate.reached.wait(60), worker.error
            vacuum.conn.execute("LOCK TABLE knowledge_nodes IN SHARE UPDATE EXCLUSIVE MODE")
            gate.open()
            key, fine = (r["id"] for r in fetch(dsn, "SELECT id FROM knowledge_nodes ORDER BY id LIMIT 2"))
            wait_for(lambda: one(dsn, "SELECT count(*) FROM pg_locks WHERE relation = 'knowledge_nodes'::regclass"
                                      " AND mode = 'ShareRowExclusiveLock' AND NOT granted") > 0,
                     timeout=120, what="the cut-over asking for its lock (refused from now on)")
            with psycopg.connect(dsn, autocommit=True) as app:
                app.execute("UPDATE knowledge_nodes SET content = 'POISON written during the wait' WHERE id = %s",
                            (key,))
                app.execute("UPDATE knowledge_nodes SET content = 'fine, written during the wait' WHERE id = %s",
                            (fine,))
            # a write ahead ran: the fine edit is settled with its new vector, the poisoned one recorded failed
            wait_for(lambda: one(dsn, "SELECT count(*) FROM reembed_failed_rows WHERE row_id = %s",
                                 (str(key),)) == 1, timeout=120, what="the poisoned edit tried by a write ahead")
            wait_for(lambda: one(dsn, "SELECT count(*) FROM reembed_changes WHERE row_id = %s", (str(fine),)) == 0,
                     timeout=120, what="the fine edit settled by a write ahead")
            assert one(dsn, "SELECT count(*) FROM reembed_changes WHERE row_id = %s", (str(key),)) >= 1
            assert one(dsn, "SELECT embedding IS NOT NULL FROM knowledge_nodes WHERE id = %s", (key,))
            assert worker.is_alive()
        finally:
            gate.open()
            vacuum.end()
        worker.join(timeout=120)
    if accept:
        assert worker.error is None and worker.result.state == "done", (worker.error, worker.result)
        assert one(dsn, "SELECT embedding IS NULL FROM knowledge_nodes WHERE id = %s", (key,))
        assert fetch(dsn, "SELECT row_id, accepted FROM reembed_failed_rows") == [{"row_id": str(key),
                                                                                  "accepted": True}]
    else:
        assert isinstance(worker.error, RowsFailed), worker.error
        assert "cannot be encoded" in str(worker.error)
        assert one(dsn, "SELECT model_name FROM embedding_model") == "old-model"
        assert "cut_over" not in one(dsn, "SELECT finalize_steps FROM reembed_checkpoint")
    from support.fakes import hash_vector

    (row,) = fetch(dsn, "SELECT embedding::text AS e FROM knowledge_nodes WHERE id = %s", (fine,))
    np.testing.assert_allclose(np.array(json.loads(row["e"])), hash_vector("fine, written during the wait", 32),
                               rtol=1e-5, atol=1e-6)


def test_the_cut_over_notifies_listeners_with_the_new_signature(dsn: str) -> None:
    make_table(dsn, rows=30, old_dim=32)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN reembed_model_changed")
        emb = HashEmbedder(24)
        assert run(settings(dsn, batch_size=10), embedder=emb).state == "done"
        notes = list(listener.notifies(timeout=5, stop_after=1))
    assert [json.loads(n.payload) for n in notes] == [emb.signature.as_dict()]


@pytest.mark.slow
def test_the_server_down_for_30_seconds_mid_run_is_waited_out_and_every_row_is_right(
    dsn: str, controllable_server: Any, model48: Path, unlocked_table: list[Any], workdir: Path
) -> None:
    model, ids = model48, unlocked_table
    log = workdir / "outage.log"
    app = Application(dsn)  # however fast the machine, the outage lands mid-run: a row is held
    app.hold_row(ids[ROWS // 2])
    proc = spawn(cli_args(dsn, model), cwd=workdir, log=log)
    wait_for(lambda: writer_waiting(dsn), timeout=120, what="the run waiting on the held row")
    controllable_server.outage(30.0)  # ends the application's transaction too
    with contextlib.suppress(psycopg.Error):
        app.end()
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    waits = events(log, "transient_error_retrying")
    for line in waits + events(log, "transient_error_over") + events(log, "lock_reacquired"):
        print("\n" + json.dumps({k: v for k, v in line.items() if k not in ("timestamp", "level", "detail")}))
    assert 1 <= len(waits) <= 2, [w["step"] for w in waits]  # each wait logged once, not per attempt and role
    assert events(log, "transient_error_over")
    _assert_done_right(dsn, model)


# ------------------------------------------------------------------- the triggers


def test_abandon_and_a_finished_job_leave_no_trigger_behind(dsn: str) -> None:
    from reembed.signals import StopSignal
    from support.fakes import stopping_after

    make_table(dsn, rows=50, old_dim=32)
    stop = StopSignal()
    first = stopping_after(HashEmbedder(32), stop, calls=2)
    assert run(settings(dsn, batch_size=10, pipeline=False), embedder=first, stop=stop).exit_code == 130
    assert one(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'reembed_capture_1_%%'") == 2
    with psycopg.connect(dsn, autocommit=True) as app:  # captured while the crashed job waits
        app.execute("UPDATE knowledge_nodes SET content = 'changed meanwhile'"
                    " WHERE id = (SELECT id FROM knowledge_nodes ORDER BY id LIMIT 1)")
    assert one(dsn, "SELECT count(*) FROM reembed_changes WHERE job_id = 1") == 1
    status = json.loads(run_cli(["status", "--dsn", dsn, "--json"], cwd=Path("/")).stdout)
    assert status["capture"] == {"trigger": "reembed_capture_1", "installed": True, "pending_changes": 1}
    report = run(settings(dsn, batch_size=10, abandon_active=True), embedder=HashEmbedder(16))
    assert report.state == "done"
    assert one(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'reembed_capture_%%'") == 0
    assert one(dsn, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'reembed_capture_%%'") == 0
    assert one(dsn, "SELECT count(*) FROM reembed_changes") == 0


def test_a_trigger_left_by_an_abandoned_job_on_another_column_is_dropped_and_an_active_ones_kept(dsn: str) -> None:
    from reembed.signals import StopSignal
    from support.fakes import stopping_after

    make_table(dsn, rows=30, old_dim=32)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("ALTER TABLE knowledge_nodes ADD COLUMN summary_vec vector(32)")
    stop = StopSignal()  # a job on the other column, stopped: still active, its capture stays
    other = stopping_after(HashEmbedder(32), stop, calls=1)
    # two columns of one dimension under one registry: each job is told the other column may stay
    other_settings = Settings(target=Target(dsn=dsn, column="summary_vec"), model=ModelSpec(model="unused"),
                              options=RunOptions(confirm_seconds=0, batch_size=10, pipeline=False,
                                                 allow_shared_registry=True))
    assert run(other_settings, embedder=other, stop=stop).exit_code == 130
    report = run(settings(dsn, batch_size=10, allow_shared_registry=True), embedder=HashEmbedder(32))
    assert report.state == "done"
    assert [r["tgname"] for r in fetch(dsn, "SELECT tgname FROM pg_trigger WHERE tgname LIKE 'reembed_capture_%%'"
                                            " ORDER BY 1")] == ["reembed_capture_1_ins", "reembed_capture_1_upd"]
    with psycopg.connect(dsn, autocommit=True) as c:  # now that job is abandoned by hand, triggers left behind
        c.execute("UPDATE reembed_checkpoint SET state = 'abandoned' WHERE job_id = 1")
    again = run(settings(dsn, batch_size=10, abandon_active=True, allow_shared_registry=True),
                embedder=HashEmbedder(24))
    assert again.state == "done"
    assert one(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'reembed_capture_%%'") == 0
