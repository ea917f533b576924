"""Index builds beside long transactions (issue 27): a CONCURRENTLY build waits for every older
snapshot as long as it lasts (it was cancelled by --ddl-lock-timeout at its very end, and the retry's
plain DROP INDEX of the invalid leftover queued an ACCESS EXCLUSIVE request every query waited behind);
`status` shows the wait; the application's queries never stall."""

from __future__ import annotations

import time

import psycopg
import structlog

from reembed.job import run
from reembed.status import status
from support.database import make_table, one
from support.fakes import Gate, HashEmbedder, job_settings
from support.processes import Background, wait_for

DDL_LOCK_TIMEOUT = 2.0


def test_a_concurrent_build_waits_out_an_old_snapshot_and_no_query_stalls_meanwhile(dsn: str) -> None:
    keys = make_table(dsn, rows=80, old_dim=32)
    emb = HashEmbedder(48)
    gate = Gate(emb)  # prepare is done (the shadow column added); the main pass waits
    with structlog.testing.capture_logs() as logs:
        job = Background(lambda: run(job_settings(dsn, strategy="shadow", gate_min_recall=0.0, batch_size=80,
                                                  ddl_lock_timeout=f"{int(DDL_LOCK_TIMEOUT * 1000)}ms"),
                                     embedder=emb))
        assert gate.reached.wait(60), job.error
        report_view = psycopg.connect(dsn)  # a report that runs long: a snapshot older than the build
        report_view.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        report_view.execute("SELECT count(*) FROM knowledge_nodes").fetchone()
        gate.open()
        try:
            def waiting() -> bool:
                build = status(job_settings(dsn)).as_dict().get("index_build")
                return bool(build and "old snapshots" in build["phase"]) or not job.is_alive()

            wait_for(waiting, timeout=120, what="the build waiting for the older snapshot")
            assert job.is_alive(), job.error
            # the application's lookups while the build waits, past --ddl-lock-timeout
            slowest, until = 0.0, time.monotonic() + 2 * DDL_LOCK_TIMEOUT
            with psycopg.connect(dsn, autocommit=True) as app:
                while time.monotonic() < until:
                    started = time.monotonic()
                    app.execute("SELECT content FROM knowledge_nodes WHERE id = %s", (keys[0],)).fetchone()
                    slowest = max(slowest, time.monotonic() - started)
            build = status(job_settings(dsn)).as_dict()["index_build"]
            assert build is not None and "old snapshots" in build["phase"], build
            said = status(job_settings(dsn)).text()
            assert "index      building" in said and "waiting for" in said, said
        finally:
            report_view.rollback()
            report_view.close()
        job.join(timeout=120)
    assert job.error is None and job.result.state == "done", job.error
    assert slowest < 1.0, slowest
    events = [e["event"] for e in logs]
    assert "invalid_index_dropped" not in events and "transient_error_retrying" not in events, events
    assert one(dsn, "SELECT bool_and(indisvalid) FROM pg_index WHERE indrelid = 'knowledge_nodes'::regclass")
