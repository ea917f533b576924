"""The lease and the claims under faults (issue 27): a heartbeat that waits on a row never holds up a
writer's fence, and a claim or a split whose commit landed but whose acknowledgement was lost is not
done twice (no range stranded, claimed by a live worker that no longer works on it)."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg

from reembed import checkpoint as ckpt
from reembed import db, lease
from reembed.batches import prepare_session
from reembed.job import run
from reembed.settings import Target
from reembed.signals import StopSignal
from reembed.target import inspect_target
from support.database import fetch, make_table
from support.fakes import HashEmbedder, job_settings, stopping_after
from support.processes import Background, wait_for


def _job_with_ranges(dsn: str, ranges: int) -> None:
    stop = StopSignal()
    emb = stopping_after(HashEmbedder(32), stop, calls=1, reason="SIGTERM")
    report = run(job_settings(dsn, batch_size=10, pipeline=False, ranges=ranges), embedder=emb, stop=stop)
    assert report.exit_code == 143


def _job(conn: psycopg.Connection[Any]) -> ckpt.Job:
    found = ckpt.active_job(conn, inspect_target(conn, Target()))
    assert found is not None
    return found


def test_a_heartbeat_waiting_on_a_row_never_holds_up_the_fence(dsn: str) -> None:
    """Only the lock's connection drops while a writer's transaction holds its range's row: the
    keeper takes the lock again and beats the worker's claims, which waits for that row; the
    writer's fence must verify the lock meanwhile (it once waited for the keeper's mutex, held
    through that beat: a hang without end, the application's rows of the batch locked throughout)."""
    make_table(dsn, rows=60, old_dim=32, id_type="bigint")
    _job_with_ranges(dsn, 3)
    control = db.connect(dsn, role="test", vectors=False, autocommit=True)
    info = inspect_target(control, Target(dsn=dsn))
    job = _job(control)
    connections = db.Connections(dsn, size=4, configure=prepare_session(info))
    held = lease.try_lock(dsn, info.oid, table=info.qualified, shared=True)
    keeper = lease.Lease(held, connections, table_oid=info.oid, table=info.qualified, stop=StopSignal())
    keeper.job_id = job.id
    writer = connections.hold("writer")
    try:
        conn = writer.conn
        conn.execute("BEGIN")
        conn.execute("UPDATE reembed_checkpoint_range SET updated_at = now() WHERE range_no = 0")  # a commit's row
        beats = threading.Event()

        def beat(c: psycopg.Connection[Any], pid: int) -> None:  # what a worker beats: its claims
            beats.set()
            c.execute("UPDATE reembed_checkpoint_range SET heartbeat_at = now() WHERE job_id = %s", (job.id,))

        keeper.on_beat(beat)
        gone = keeper.backend_pid
        with psycopg.connect(dsn, autocommit=True) as admin:  # only the lock's connection drops
            admin.execute("SELECT pg_terminate_backend(%s)", (gone,))
            wait_for(lambda: not admin.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND locktype = "
                                               "'advisory'", (gone,)).fetchone()[0], timeout=30,
                     what="the lock's backend to let go")
        keeper._since_beat = lease.HEARTBEAT_EVERY
        ticking = Background(keeper._tick)  # the keeper: the lock taken again, then its beat waits for the row
        assert beats.wait(30), ticking.error
        started = time.monotonic()
        verify = Background(keeper.ensure)  # what the writer's fence does when it does not see the lock
        verify.join(timeout=10)
        took = time.monotonic() - started
        hung = verify.is_alive()
        conn.execute("ROLLBACK")  # the writer's transaction ends either way (a hung keeper is let go)
        verify.join(timeout=30)
        ticking.join(timeout=30)
        assert not hung, "the fence waited on the keeper, which waited on the fence's own row"
        assert verify.error is None and took < 5.0, (verify.error, took)
        assert keeper.lock.alive() and keeper.backend_pid != gone
    finally:
        writer.release()
        if keeper._heartbeat is not None:
            keeper._heartbeat.release()
        keeper.lock.release()  # its thread was never started: its ticks are the test's
        connections.close()
        control.close()


def test_a_claim_retried_after_its_commit_landed_takes_the_same_range_not_a_second(dsn: str) -> None:
    make_table(dsn, rows=60, old_dim=32, id_type="bigint")
    _job_with_ranges(dsn, 4)
    with psycopg.connect(dsn, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        job = _job(conn)
        key = lease.lock_key(int(conn.execute("SELECT 'knowledge_nodes'::regclass::oid::bigint AS o").fetchone()["o"]))
        pid = conn.info.backend_pid
        with conn.transaction():
            first = ckpt.claim(conn, job, "host:1/0", pid=pid, key=key, stale_secs=90)
        # the acknowledgement was lost: the retry runs the claim again
        with conn.transaction():
            again = ckpt.claim(conn, job, "host:1/0", pid=pid, key=key, stale_secs=90)
        with conn.transaction():
            other = ckpt.claim(conn, job, "host:2/0", pid=pid, key=key, stale_secs=90)
    assert first is not None and again is not None and other is not None
    assert again.range_no == first.range_no and again.taken_from is None
    assert other.range_no != first.range_no
    mine = fetch(dsn, "SELECT range_no FROM reembed_checkpoint_range WHERE claimed_by = 'host:1/0'")
    assert [r["range_no"] for r in mine] == [first.range_no]


def test_a_split_retried_after_its_commit_landed_is_not_cut_again(dsn: str) -> None:
    make_table(dsn, rows=200, old_dim=32, id_type="bigint")
    _job_with_ranges(dsn, 1)
    with psycopg.connect(dsn, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        job = _job(conn)
        with conn.transaction():
            rng = ckpt.claim(conn, job, "host:1/0", pid=conn.info.backend_pid, key=1, stale_secs=90)
        assert rng is not None and rng.upper_id is None
        assert ckpt.split_landed(conn, rng) is None  # not cut yet
        with conn.transaction():
            new = ckpt.split(conn, rng, at="301", keep=40, give=100)
        landed = ckpt.split_landed(conn, rng)  # the retry, with the range as the worker last knew it
    assert landed == ("301", new)
    ranges = fetch(dsn, "SELECT range_no, lower_id, upper_id FROM reembed_checkpoint_range ORDER BY range_no")
    assert [(r["lower_id"], r["upper_id"]) for r in ranges] == [(None, "301"), ("301", None)]


def test_a_worker_commits_beat_its_claim(dsn: str) -> None:
    """A commit on a claim is a sign of life: the claim's heartbeat moves with the cursor."""
    make_table(dsn, rows=60, old_dim=32, id_type="bigint")
    _job_with_ranges(dsn, 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE reembed_checkpoint_range SET heartbeat_at = now() - interval '1 hour'")
    report = run(job_settings(dsn, batch_size=10, pipeline=False), embedder=HashEmbedder(32))
    assert report.state == "done"
    (row,) = fetch(dsn, "SELECT heartbeat_at > now() - interval '5 minutes' AS fresh FROM reembed_checkpoint_range")
    assert row["fresh"]
