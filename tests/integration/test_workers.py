"""One job on many workers: `--workers N` on this host, a second `reembed run` joining, claims
taken over from dead or stale workers, ranges split for a worker that ran dry, and the job
finalized exactly once, by the last worker out.

The commits are counted by a trigger of the test's own (no column reference, so the job's
inventory leaves it alone) that records every row reembed's writer sessions update: a row the
application never touched is written exactly once, whatever was killed when."""

from __future__ import annotations

import json
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reembed import lease
from reembed.job import run
from support.application import App
from support.database import fetch, job_rows_done, make_id, make_table, one
from support.fakes import HashEmbedder, job_settings, sentence
from support.models import assert_rows_hold_the_models_vectors
from support.processes import cli_run_args, events, last_report, run_cli, spawn, wait_exit, wait_for

COUNT_WRITES = """
CREATE TABLE test_writes (id text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION test_count_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('reembed.writer', true) = 'on' THEN
        INSERT INTO test_writes (id) VALUES (NEW.id::text);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_count_write AFTER UPDATE ON knowledge_nodes FOR EACH ROW EXECUTE FUNCTION test_count_write();
"""


def _count_writes(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(COUNT_WRITES)


def _untouched_written_once(dsn: str, rows: int) -> int:
    """Rows as the test made them (the application never inserted, edited or deleted them): each
    written exactly once by reembed. How many there are."""
    counts = fetch(dsn, "SELECT k.id, k.content, count(w.id) AS n FROM knowledge_nodes k "
                        "LEFT JOIN test_writes w ON w.id = k.id::text GROUP BY k.id, k.content")
    original = {make_id("bigint", i): sentence(i) for i in range(rows)}
    untouched = [r for r in counts if original.get(r["id"]) == r["content"]]
    twice = [r for r in untouched if r["n"] != 1]
    assert not twice, f"{len(twice)} untouched rows written other than once, e.g. {twice[:5]}"
    return len(untouched)


def _args(dsn: str, model: Path, *extra: str) -> list[str]:
    return cli_run_args(dsn, model, "--max-rate", "50", "--stale-after", "20s", "--join", *extra, batch=16, window=16)


def _children(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(proc.pid).children() if p.is_running() and p.status() != "zombie"]
    except psutil.NoSuchProcess:
        return []


def _all_logs(paths: list[Path], name: str) -> list[dict[str, Any]]:
    return [e for p in paths for e in events(p, name)]


@pytest.mark.slow
def test_three_workers_and_an_application_through_sigkills_lose_nothing_write_nothing_twice_finalize_once(
    dsn: str, model48: Path, workdir: Path
) -> None:
    rows = 3000
    make_table(dsn, rows=rows, old_dim=64, id_type="bigint")
    _count_writes(dsn)
    app = App(dsn, workdir, new_model=model48, new_name=str(model48), id_type="bigint", rate=20)
    logs = [workdir / "run.log"]
    joiners: list[subprocess.Popen[bytes]] = []
    rnd = random.Random(18)
    try:
        wait_for(lambda: app.writes() >= 10, timeout=60, what="the application writing")
        proc = spawn(_args(dsn, model48, "--workers", "3", "--ranges", "12"), cwd=workdir, log=logs[0])
        killed = 0
        for round_no in range(3):  # kill a random worker of the job, a joiner takes its place
            target = 300 * (round_no + 1)
            wait_for(lambda: len(_children(proc)) + len([j for j in joiners if j.poll() is None]) >= 2
                     and job_rows_done(dsn) >= target, timeout=180, what="the workers under way")  # noqa: B023
            candidates = _children(proc) + [psutil.Process(j.pid) for j in joiners if j.poll() is None]
            victim = rnd.choice(candidates)
            victim.send_signal(signal.SIGKILL)
            killed += 1
            logs.append(workdir / f"joiner{round_no}.log")
            joiners.append(spawn(_args(dsn, model48), cwd=workdir, log=logs[-1]))
        assert wait_exit(proc, timeout=300) == 0, logs[0].read_text()[-3000:]
        codes = [wait_exit(j, timeout=300) for j in joiners]
        assert all(c in (0, -signal.SIGKILL) for c in codes), (codes, [p.read_text()[-2000:] for p in logs])
        stats = app.stop()
    finally:
        if app.proc.poll() is None:
            app.stop()
        for j in joiners:
            if j.poll() is None:
                j.kill()
    assert stats["errors"] == [], stats["errors"][:5]
    assert killed == 3

    # finalized once, by one of them; every row the new model's encoding of its current content
    assert len(_all_logs(logs, "job_done")) == 1
    assert len(_all_logs(logs, "cut_over")) == 1
    assert one(dsn, "SELECT state FROM reembed_checkpoint") == "done"
    assert one(dsn, "SELECT model_name FROM embedding_model") == str(model48)
    assert assert_rows_hold_the_models_vectors(dsn, model48) >= rows - stats["deletes"] - 5
    untouched = _untouched_written_once(dsn, rows)
    assert untouched > rows // 2
    takeovers = [e for e in _all_logs(logs, "embedding_started") if e.get("taken_over_from")]
    assert takeovers, "no claim of a killed worker was taken over"
    workers = fetch(dsn, "SELECT worker, rows_done FROM reembed_worker")
    # the first, its two, and the joiners that came before the end (a late one finds the job done)
    assert len(workers) >= 4 and sum(1 for w in workers if w["rows_done"] > 0) >= 3
    report = last_report(logs[0])
    assert report["state"] in ("done", "worker_done") and len(report["worker_exit_codes"]) == 2
    print(f"\n[3 workers, 3 SIGKILLs, 3 joiners] {len(workers)} worker processes, {len(takeovers)} claims taken "
          f"over, application {app.writes()} writes; {untouched} untouched rows each written once")


@pytest.mark.slow
def test_a_second_run_joins_the_first_splits_its_range_status_shows_both_and_the_last_out_finalizes(
    dsn: str, model48: Path, workdir: Path
) -> None:
    rows = 1200
    make_table(dsn, rows=rows, old_dim=64, id_type="text")
    _count_writes(dsn)
    first_log, second_log = workdir / "first.log", workdir / "second.log"
    metrics = workdir / "reembed.prom"
    first = spawn(_args(dsn, model48, "--ranges", "1", "--metrics-file", str(metrics)), cwd=workdir, log=first_log)
    second = None
    try:
        wait_for(lambda: job_rows_done(dsn) >= 64, timeout=120, what="the first run under way")
        assert one(dsn, "SELECT count(*) FROM reembed_checkpoint_range") == 1
        second = spawn(_args(dsn, model48), cwd=workdir, log=second_log)
        wait_for(lambda: events(second_log, "job_joined"), timeout=120, what="the second run joining")
        # the second found nothing to claim: it asked, the first cut its range past what it had read
        wait_for(lambda: events(first_log, "range_split"), timeout=60, what="the first run splitting its range")
        wait_for(lambda: one(dsn, "SELECT count(*) FROM reembed_worker WHERE range_no IS NOT NULL "
                                  "AND rows_done > 0") == 2, timeout=180, what="both workers' heartbeats")
        status = json.loads(run_cli(["status", "--dsn", dsn, "--json"], cwd=workdir).stdout)
        assert {w["pid"] for w in status["workers"]} == {first.pid, second.pid}
        for w in status["workers"]:
            assert w["host"] and w["device"] == "cpu" and w["range"] is not None and w["rows"] > 0
            assert w["rows_per_sec"] > 0 and w["heartbeat_age_secs"] < 15 and w["state"] == "running"
        assert status["rows_per_sec"] > 0 and status["eta_secs"] is not None and status["ranges"]["ranges"] >= 2
        text = run_cli(["status", "--dsn", dsn], cwd=workdir).stdout
        assert text.count("worker     ") == 2 and f"pid {second.pid}" in text
        assert wait_exit(first, timeout=300) == 0, first_log.read_text()[-3000:]
        assert wait_exit(second, timeout=300) == 0, second_log.read_text()[-3000:]
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
    split = events(first_log, "range_split")[0]
    claimed = events(second_log, "embedding_started")
    assert any(e["range_no"] == split["new_range_no"] for e in claimed)
    assert split["at"] > (split["after"] or "")  # the cut is past everything the first had read
    states = sorted([last_report(first_log)["state"], last_report(second_log)["state"]])
    assert states == ["done", "worker_done"]
    assert len(events(first_log, "job_done") + events(second_log, "job_done")) == 1
    assert assert_rows_hold_the_models_vectors(dsn, model48) == rows
    assert one(dsn, "SELECT count(*) FROM test_writes") == rows
    assert one(dsn, "SELECT count(DISTINCT id) FROM test_writes") == rows

    # the first run's metrics file, as it left it at exit: the job's figures, every worker's rows
    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}

    def value(name: str) -> float:
        return float(families[name].samples[0].value)

    first_state = last_report(first_log)["state"]
    assert value("reembed_rows_done") == rows and value("reembed_rows_total") >= rows * 0.9
    assert value("reembed_running") == 0 and value("reembed_failed_rows") == 0 and value("reembed_exit_code") == 0
    phases = {s.labels["phase"]: s.value for s in families["reembed_phase"].samples}
    assert sum(phases.values()) == 1 and phases["done" if first_state == "done" else "backfill"] == 1
    assert families["reembed_exit_code"].samples[0].labels["state"] == first_state


def _job_with_ranges(dsn: str, ranges: int) -> Any:
    """A job stopped after its first commit, its key space in `ranges` ranges."""
    from reembed.signals import StopSignal
    from support.fakes import stopping_after

    stop = StopSignal()
    emb = stopping_after(HashEmbedder(32), stop, calls=1, reason="SIGTERM")
    report = run(job_settings(dsn, batch_size=10, pipeline=False, ranges=ranges), embedder=emb, stop=stop)
    assert report.exit_code == 143
    assert one(dsn, "SELECT count(*) FROM reembed_checkpoint_range") == ranges
    return lease.lock_key(one(dsn, "SELECT 'knowledge_nodes'::regclass::oid::bigint"))


def test_claims_of_a_dead_worker_and_of_a_stale_one_are_taken_over_from_their_cursors(dsn: str) -> None:
    make_table(dsn, rows=200, old_dim=32, id_type="bigint")
    key = _job_with_ranges(dsn, 4)
    # A live worker elsewhere: it holds the lock shared (so a new run joins instead of releasing
    # every claim) and claims range 1 with a heartbeat an hour old; range 2's claimant is dead.
    ghost = psycopg.connect(dsn, autocommit=True, application_name="reembed lock gpu-7:4242")
    dead = psycopg.connect(dsn, autocommit=True)
    dead_pid = dead.info.backend_pid
    dead.close()
    try:
        assert ghost.execute("SELECT pg_try_advisory_lock_shared(%s)", (key,)).fetchone()[0]  # type: ignore[index]
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("UPDATE reembed_checkpoint_range SET claimed_by = 'gpu-7:4242/0', claimed_pid = %s, "
                      "heartbeat_at = now() - interval '1 hour' WHERE range_no = 1", (ghost.info.backend_pid,))
            c.execute("UPDATE reembed_checkpoint_range SET claimed_by = 'gpu-8:99/0', claimed_pid = %s, "
                      "heartbeat_at = now() WHERE range_no = 2", (dead_pid,))
        done_before = one(dsn, "SELECT sum(rows_done) FROM reembed_checkpoint_range")
        report = run(job_settings(dsn, batch_size=10, stale_after=60.0, join=True), embedder=HashEmbedder(32))
        # it took both over and did every range; the ghost still holds the lock: the last out finalizes
        assert report.state == "worker_done" and report.exit_code == 0
        assert report.rows_updated == 200 - done_before  # nothing committed was done again
        ranges = fetch(dsn, "SELECT range_no, done, claimed_by FROM reembed_checkpoint_range ORDER BY range_no")
        assert all(r["done"] for r in ranges)
        assert one(dsn, "SELECT state FROM reembed_checkpoint") == "embedding"
    finally:
        ghost.close()
    report = run(job_settings(dsn, batch_size=10), embedder=HashEmbedder(32))
    assert report.state == "done" and report.rows_updated == 0
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 32") == 200


def test_a_live_workers_fresh_claim_is_left_alone(dsn: str) -> None:
    make_table(dsn, rows=120, old_dim=32, id_type="bigint")
    key = _job_with_ranges(dsn, 3)
    ghost = psycopg.connect(dsn, autocommit=True, application_name="reembed lock gpu-7:4242")
    try:
        assert ghost.execute("SELECT pg_try_advisory_lock_shared(%s)", (key,)).fetchone()[0]  # type: ignore[index]
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("UPDATE reembed_checkpoint_range SET claimed_by = 'gpu-7:4242/0', claimed_pid = %s, "
                      "heartbeat_at = now() WHERE range_no = 2", (ghost.info.backend_pid,))
        # the worker waits for the live claim (asking it to split): a time window ends the wait
        report = run(job_settings(dsn, batch_size=10, max_runtime=8.0, join=True), embedder=HashEmbedder(32))
        assert report.exit_code == 75
        ranges = {r["range_no"]: r for r in fetch(dsn, "SELECT * FROM reembed_checkpoint_range")}
        assert ranges[0]["done"] and ranges[1]["done"] and not ranges[2]["done"]
        assert ranges[2]["claimed_by"] == "gpu-7:4242/0" and ranges[2]["rows_done"] == 0
    finally:
        ghost.close()


@pytest.mark.parametrize("id_type", ["bigint", "uuid", "text"])
def test_prepare_cuts_the_key_space_at_sampled_quantiles_of_any_orderable_key(dsn: str, id_type: str) -> None:
    make_table(dsn, rows=400, old_dim=32, id_type=id_type)
    _job_with_ranges(dsn, 8)
    ranges = fetch(dsn, "SELECT range_no, lower_id, upper_id, rows_estimate FROM reembed_checkpoint_range "
                        "ORDER BY range_no")
    cast = {"bigint": "bigint", "uuid": "uuid", "text": "text"}[id_type]
    assert ranges[0]["lower_id"] is None and ranges[-1]["upper_id"] is None
    for a, b in zip(ranges, ranges[1:], strict=False):
        assert a["upper_id"] == b["lower_id"]
    sizes = [one(dsn, f"SELECT count(*) FROM knowledge_nodes WHERE (%(lo)s::text IS NULL OR id > %(lo)s::{cast}) "
                      f"AND (%(hi)s::text IS NULL OR id <= %(hi)s::{cast})", {"lo": r["lower_id"], "hi": r["upper_id"]})
             for r in ranges]
    assert sum(sizes) == 400 and all(40 <= s <= 60 for s in sizes), sizes  # the whole table is the sample here
    report = run(job_settings(dsn, batch_size=10), embedder=HashEmbedder(32))
    assert report.state == "done"
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 32") == 400


@pytest.mark.slow
def test_sigterm_to_workers_n_reaches_each_worker_which_commits_and_lets_its_claim_go(
    dsn: str, model48: Path, workdir: Path
) -> None:
    make_table(dsn, rows=1500, old_dim=64, id_type="bigint")
    log = workdir / "run.log"
    proc = spawn(_args(dsn, model48, "--workers", "2", "--ranges", "6"), cwd=workdir, log=log)
    try:
        wait_for(lambda: job_rows_done(dsn) and one(dsn, "SELECT count(*) FROM reembed_checkpoint_range WHERE "
                                                         "claimed_by IS NOT NULL AND NOT done AND rows_done > 0") == 2,
                 timeout=240, what="both workers committing")
        proc.send_signal(signal.SIGTERM)  # to the first process only: it forwards it
        assert wait_exit(proc, timeout=120) == 143, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    report = last_report(log)
    assert report["state"] == "stopped" and report["worker_exit_codes"] == [143]
    # a range a worker finished keeps its name (history); what it still held, it let go
    assert one(dsn, "SELECT count(*) FROM reembed_checkpoint_range WHERE claimed_by IS NOT NULL AND NOT done") == 0
    assert sorted(r["state"] for r in fetch(dsn, "SELECT state FROM reembed_worker")) == ["stopped", "stopped"]
    done = job_rows_done(dsn)
    assert 0 < done < 1500
    rerun = run_cli(_args(dsn, model48, "--max-rate", "100000"), cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["rows_updated"] == 1500 - done  # nothing committed was done again
    assert assert_rows_hold_the_models_vectors(dsn, model48) == 1500


def test_workers_n_with_no_join_has_its_own_workers_join_and_exits_0(dsn: str, model48: Path, workdir: Path) -> None:
    """--no-join is about other runs: the processes --workers N starts are this job's own and join it
    (they used to get --no-join too, each exited 3, and so did the run, after finishing the job)."""
    make_table(dsn, rows=600, old_dim=64, id_type="bigint")
    done = run_cli(cli_run_args(dsn, model48, "--max-rate", "50", "--workers", "2", "--no-join", "--ranges", "4",
                                batch=16, window=16), cwd=workdir, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["worker_exit_codes"] == [0], report
    assert one(dsn, "SELECT count(*) FROM reembed_worker WHERE rows_done > 0") == 2
    assert one(dsn, "SELECT state FROM reembed_checkpoint") == "done"
