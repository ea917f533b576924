"""One job over several tables under one registry (issue 28, point 5): documents and chunks embedded by
the same model, named by one `embedding_model` row, re-embedded by one job whose one cut-over (in place)
or one swap (shadow) flips the registry for all of them at once. The registry never names a model one of
the tables is not in: a trigger on the registry row counts, at the moment of each flip and inside its
transaction, the rows of every table not in the space the row then names."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from reembed.cli import main
from reembed.errors import ConfigError
from reembed.group import run
from reembed.rollback import cleanup, rollback
from reembed.settings import RollbackOptions, Settings, Target, VerifyOptions
from reembed.signals import StopSignal
from reembed.verify import verify
from support import catalog
from support.database import Application, fetch, keys, make_table, one, writer_waiting
from support.fakes import HashEmbedder, job_settings, stopping_after
from support.models import assert_rows_hold_the_models_vectors
from support.processes import BATCH, ROWS, cli_args, events, spawn, wait_exit, wait_for

TABLES = ("knowledge_nodes", "chunks")

# every write of the registry row, with what each table held at that moment (in the writing transaction)
FLIPS = """
CREATE TABLE registry_flips (n serial, model_name text, dimension int, stale_nodes bigint, stale_chunks bigint);
CREATE FUNCTION note_registry_flip() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO registry_flips (model_name, dimension, stale_nodes, stale_chunks)
    SELECT NEW.model_name, NEW.dimension,
           (SELECT count(*) FROM knowledge_nodes WHERE content IS NOT NULL
               AND (embedding IS NULL OR vector_dims(embedding) <> NEW.dimension)),
           (SELECT count(*) FROM chunks WHERE content IS NOT NULL
               AND (embedding IS NULL OR vector_dims(embedding) <> NEW.dimension));
    RETURN NEW;
END $$;
CREATE TRIGGER note_registry_flip AFTER INSERT OR UPDATE ON embedding_model
    FOR EACH ROW EXECUTE FUNCTION note_registry_flip();
"""

# what depends on the second table's column: a second (expression) ANN index, a comment, a column grant
CHUNKS_DEPENDENTS = """
CREATE INDEX chunks_embedding_half ON chunks USING hnsw ((embedding::halfvec(64)) halfvec_cosine_ops);
COMMENT ON COLUMN chunks.embedding IS 'chunk vectors';
DO $$ BEGIN CREATE ROLE chunk_reader; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
GRANT SELECT (id, embedding) ON chunks TO chunk_reader;
"""
# and a view search reads (in place refuses it: PostgreSQL cannot change the type of a column a view uses)
CHUNKS_VIEW = """
CREATE VIEW chunk_search AS SELECT id, content, embedding FROM chunks WHERE touched = 7;
COMMENT ON VIEW chunk_search IS 'what search reads';
"""


def two_tables(dsn: str, *, rows: int = 120, chunks: int = 90, old_dim: int = 64, index: bool = True) -> None:
    make_table(dsn, rows=rows, old_dim=old_dim, with_index=index)
    make_table(dsn, rows=chunks, old_dim=old_dim, with_index=index, table="chunks", registry=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(FLIPS)


def group_settings(dsn: str, *tables: str, **opts: Any) -> Settings:
    opts.setdefault("gate_min_recall", 0.0)  # the test embedder's vectors are random: no recall to gate on
    made = job_settings(dsn, **opts)
    targets = tuple(Target(dsn=dsn, table=t) for t in tables or TABLES)
    return replace(made, target=targets[0], targets=targets)


def flips(dsn: str) -> list[dict[str, Any]]:
    return fetch(dsn, "SELECT model_name, dimension, stale_nodes, stale_chunks FROM registry_flips ORDER BY n")


def column_type(dsn: str, table: str, column: str = "embedding") -> str:
    return str(one(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                        " WHERE attrelid = %s::regclass AND attname = %s", (table, column)))


def jobs(dsn: str) -> list[dict[str, Any]]:
    return fetch(dsn, "SELECT job_id, table_name, state, group_id, finalize_steps FROM reembed_checkpoint"
                      " ORDER BY job_id")


def written(dsn: str) -> dict[str, Any]:
    """Everything a refused run must leave as it was: the rows, the registry, reembed's tables."""
    out: dict[str, Any] = {t: fetch(dsn, f"SELECT to_jsonb(x)::text AS r FROM {t} x ORDER BY 1") for t in TABLES}
    out["registry"] = fetch(dsn, "SELECT model_name, dimension, model_hash, updated_at FROM embedding_model")
    out["flips"] = flips(dsn)
    if one(dsn, "SELECT to_regclass('reembed_checkpoint') IS NOT NULL"):
        out["jobs"] = fetch(dsn, "SELECT to_jsonb(c)::text AS r FROM reembed_checkpoint c ORDER BY job_id")
        out["ranges"] = fetch(dsn, "SELECT to_jsonb(r)::text AS r FROM reembed_checkpoint_range r ORDER BY 1")
    return out


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The CLI in this process: its exit code, stdout and stderr (logs at warning and above only)."""
    capsys.readouterr()
    code = main([*argv, "--log-level", "warning"])
    out, err = capsys.readouterr()
    return code, out, err


def stopped_group(dsn: str, *, calls: int = 3) -> None:
    """A group job stopped (as by Ctrl-C) while it embeds its first table: both tables prepared."""
    stop = StopSignal()
    report = run(group_settings(dsn, batch_size=16, window_rows=16), stop=stop,
                 embedder=stopping_after(HashEmbedder(48), stop, calls=calls))
    assert report.exit_code == 130, report
    assert [(j["state"], j["group_id"]) for j in jobs(dsn)] == [("embedding", 1), ("embedding", 1)]


# ------------------------------------------------------------------ in place: one cut-over


def test_two_tables_are_embedded_and_cut_over_together_the_registry_flipped_once(dsn: str) -> None:
    two_tables(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(CHUNKS_DEPENDENTS)
    before = catalog.snapshot(dsn, dims=(64, 48))
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN reembed_model_changed")
        report = run(group_settings(dsn), embedder=HashEmbedder(48))
        notes = list(listener.notifies(timeout=1.0, stop_after=5))

    assert report.state == "done" and report.exit_code == 0, report
    assert [(t["table"], t["state"], t["rows_updated"]) for t in report.details["tables"]] == [
        ('"public"."knowledge_nodes"', "done", 120), ('"public"."chunks"', "done", 90)]
    assert report.rows_updated == 210
    # one flip, and at that moment (in its transaction) neither table held a vector of another space
    assert flips(dsn) == [{"model_name": "test-hash-48", "dimension": 48, "stale_nodes": 0, "stale_chunks": 0}]
    assert [json.loads(n.payload)["model_name"] for n in notes] == ["test-hash-48"]
    for table in TABLES:
        assert column_type(dsn, table) == "vector(48)"
        assert one(dsn, f"SELECT count(*) FROM {table} WHERE vector_dims(embedding) <> 48") == 0
    assert [(j["state"], j["group_id"]) for j in jobs(dsn)] == [("done", 1), ("done", 1)]
    # only the dimension changed: both tables, their indexes (the expression one too), comment and grant
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48)))
    assert one(dsn, "SELECT indexdef FROM pg_indexes WHERE indexname = 'chunks_embedding_half'").count("(48)") == 1
    # verify reads each table against the registry's model
    verdict = verify(group_settings(dsn), VerifyOptions(every_row=True), embedder=HashEmbedder(48))
    assert verdict.exit_code == 0 and [t["rows_checked"] for t in verdict.as_dict()["tables"]] == [120, 90]
    # a second run has nothing to do, and writes nothing
    again = run(group_settings(dsn), embedder=HashEmbedder(48))
    assert again.state == "noop" and len(flips(dsn)) == 1


@pytest.mark.slow
def test_a_job_killed_on_the_second_table_resumes_there_and_redoes_no_committed_row(
    dsn: str, model48: Path, workdir: Path
) -> None:
    # 48 -> 48 without an HNSW index: prepare takes no lock a held row blocks, so the application can hold
    # a row of the second table from the start and the job stops there, its earlier batches committed
    two_tables(dsn, rows=ROWS, chunks=ROWS, old_dim=48, index=False)
    held_at = 10 * BATCH + 3
    tables = ("--table", "knowledge_nodes", "--table", "chunks")
    with Application(dsn) as app:
        app.hold_row(keys(dsn, "chunks")[held_at], table="chunks")
        proc = spawn(cli_args(dsn, model48, *tables), cwd=workdir, log=workdir / "first.log")
        try:
            wait_for(lambda: writer_waiting(dsn) and one(
                dsn, "SELECT sum(r.rows_done) FROM reembed_checkpoint_range r JOIN reembed_checkpoint c"
                     " USING (job_id) WHERE c.table_name = '\"public\".\"chunks\"'") == 10 * BATCH,
                timeout=180, what="the job's writer waiting on the held row of the second table")
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    state = {j["table_name"]: (j["state"], j["finalize_steps"]) for j in jobs(dsn)}
    assert state == {'"public"."knowledge_nodes"': ("finalizing", []), '"public"."chunks"': ("embedding", [])}
    assert flips(dsn) == []  # the registry still names the old model: no table was cut over
    assert one(dsn, "SELECT model_name FROM embedding_model") == "old-model"

    log = workdir / "rerun.log"
    rerun = spawn(cli_args(dsn, model48, *tables, "--log-level", "debug"), cwd=workdir, log=log)
    assert wait_exit(rerun) == 0, log.read_text()[-3000:]

    committed = events(log, "batch_committed")
    assert sum(e["rows"] for e in committed) == ROWS - 10 * BATCH  # the second table's rest, nothing else
    started = events(log, "embedding_started")
    assert [(e["job_id"], e["rows_done"]) for e in started] == [(2, 10 * BATCH)]
    for table in TABLES:
        assert_rows_hold_the_models_vectors(dsn, model48, table=table)
    assert [(f["model_name"], f["stale_nodes"], f["stale_chunks"]) for f in flips(dsn)] == [(str(model48), 0, 0)]
    assert [j["state"] for j in jobs(dsn)] == ["done", "done"]


def _group_cut_over_waiting_on_a_row(dsn: str) -> bool:
    """One reembed connection holds both tables against writers and waits on a row lock: inside the
    group's cut-over, its last catch-up waiting on the application."""
    return bool(one(dsn, """
        SELECT count(*) FROM pg_stat_activity a
         WHERE a.application_name LIKE 'reembed control%%' AND a.wait_event_type = 'Lock'
           AND (SELECT count(DISTINCT l.relation) FROM pg_locks l WHERE l.pid = a.pid AND l.granted
                   AND l.mode = 'ShareRowExclusiveLock'
                   AND l.relation IN ('knowledge_nodes'::regclass, 'chunks'::regclass)) = 2"""))


@pytest.mark.slow
def test_a_job_killed_inside_the_group_cut_over_swaps_nothing_and_the_rerun_cuts_both_over_once(
    dsn: str, model48: Path, workdir: Path
) -> None:
    """SIGKILL while the one cut-over holds both tables (its last catch-up waiting on a row the
    application holds): no table is cut over, the registry still names the old model, both jobs keep
    capturing; the rerun cuts both over in one flip, the application's edits re-embedded."""
    two_tables(dsn, rows=ROWS, chunks=ROWS, old_dim=48, index=False)
    chunk_keys = keys(dsn, "chunks")
    tables = ("--table", "knowledge_nodes", "--table", "chunks")
    with Application(dsn) as tail, Application(dsn) as holder:
        tail.hold_row(chunk_keys[-1], table="chunks")  # the job's main pass waits on the second table's last row
        proc = spawn(cli_args(dsn, model48, *tables, "--cut-over-lock-timeout", "5s"), cwd=workdir,
                     log=workdir / "first.log")
        try:
            wait_for(lambda: writer_waiting(dsn) and one(
                dsn, "SELECT sum(r.rows_done) FROM reembed_checkpoint_range r JOIN reembed_checkpoint c"
                     " USING (job_id) WHERE c.table_name = '\"public\".\"chunks\"'") >= ROWS - BATCH,
                timeout=180, what="the main pass waiting on the second table's last row")
            with psycopg.connect(dsn, autocommit=True) as app:  # edits of rows already done: captured
                for key in chunk_keys[:BATCH // 2]:
                    app.execute("UPDATE chunks SET content = 'edited by the application during the job, ' || id"
                                " WHERE id = %s", (key,))
                app.execute("UPDATE knowledge_nodes SET content = 'edited too, ' || id WHERE id = %s",
                            (keys(dsn)[0],))
            holder.hold_row(chunk_keys[0], table="chunks")  # the first captured key: the last catch-up waits on it
            tail.end()
            wait_for(lambda: _group_cut_over_waiting_on_a_row(dsn), timeout=180,
                     what="the group cut-over holding both tables, waiting on the application's row")
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [(j["state"], "cut_over" in j["finalize_steps"]) for j in jobs(dsn)] == [("finalizing", False)] * 2
    assert flips(dsn) == [] and one(dsn, "SELECT model_name FROM embedding_model") == "old-model"
    for table in TABLES:  # both still capture the application's writes
        assert one(dsn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass"
                        " AND tgname LIKE 'reembed_capture_%%' AND tgenabled <> 'D'", (table,)) >= 1
    log = workdir / "rerun.log"
    rerun = spawn(cli_args(dsn, model48, *tables), cwd=workdir, log=log)
    assert wait_exit(rerun) == 0, log.read_text()[-3000:]
    for table in TABLES:
        assert_rows_hold_the_models_vectors(dsn, model48, table=table)
        assert one(dsn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass"
                        " AND tgname LIKE 'reembed_capture_%%'", (table,)) == 0
    assert one(dsn, "SELECT count(*) FROM chunks WHERE content LIKE 'edited by the application%%'") == BATCH // 2
    assert [(f["model_name"], f["stale_nodes"], f["stale_chunks"]) for f in flips(dsn)] == [(str(model48), 0, 0)]
    assert [j["state"] for j in jobs(dsn)] == ["done", "done"]


# ------------------------------------------------------------------ shadow: one swap, one rollback


def test_a_shadow_job_over_two_tables_swaps_both_at_once_and_rolls_both_back(dsn: str) -> None:
    two_tables(dsn, old_dim=64)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(CHUNKS_DEPENDENTS)
        conn.execute(CHUNKS_VIEW)
    before = catalog.snapshot(dsn, dims=(64, 48), any_column_order=True)
    exact_before = catalog.snapshot(dsn)
    rows_before = {t: fetch(dsn, f"SELECT id, embedding::text AS e FROM {t} ORDER BY id") for t in TABLES}

    report = run(group_settings(dsn, strategy="shadow"), embedder=HashEmbedder(48))

    assert report.state == "done", report
    assert flips(dsn) == [{"model_name": "test-hash-48", "dimension": 48, "stale_nodes": 0, "stale_chunks": 0}]
    for table in TABLES:
        assert column_type(dsn, table) == "vector(48)"
        assert column_type(dsn, table, "embedding_previous") == "vector(64)"
    assert one(dsn, "SELECT count(*) FROM chunk_search WHERE vector_dims(embedding) = 48") == 90
    previous = ("embedding_previous", "idx_knowledge_nodes_embedding_hnsw_previous",
                "idx_chunks_embedding_hnsw_previous", "chunks_embedding_half_previous")
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48), ignore=previous, any_column_order=True))

    # one table alone is not rolled back: they were swapped together
    with pytest.raises(ConfigError, match="swapped public.knowledge_nodes.embedding, public.chunks.embedding "
                                        "together"):
        rollback(replace(group_settings(dsn, "chunks"), model=None), RollbackOptions())
    assert len(flips(dsn)) == 1

    back = rollback(replace(group_settings(dsn), model=None), RollbackOptions())

    assert back.state == "rolled_back", back
    assert flips(dsn)[1:] == [{"model_name": "old-model", "dimension": 64, "stale_nodes": 0, "stale_chunks": 0}]
    for table in TABLES:
        assert column_type(dsn, table) == "vector(64)"
        assert fetch(dsn, f"SELECT id, embedding::text AS e FROM {table} ORDER BY id") == rows_before[table]
    assert one(dsn, "SELECT model_name FROM embedding_model") == "old-model"
    catalog.assert_unchanged(exact_before, catalog.snapshot(dsn))


def test_cleanup_after_a_shadow_group_drops_every_tables_previous_column_together(dsn: str) -> None:
    two_tables(dsn)
    assert run(group_settings(dsn, strategy="shadow"), embedder=HashEmbedder(48)).state == "done"
    with pytest.raises(ConfigError, match=r"give exactly these tables \(--table public.knowledge_nodes --table "
                                          r"public.chunks\) to clean up"):
        cleanup(group_settings(dsn, "knowledge_nodes"))
    assert [column_type(dsn, t, "embedding_previous") for t in TABLES] == ["vector(64)", "vector(64)"]

    assert cleanup(group_settings(dsn)).state == "cleaned"

    assert one(dsn, "SELECT count(*) FROM pg_attribute WHERE attname = 'embedding_previous' AND NOT attisdropped"
                    " AND attrelid IN ('knowledge_nodes'::regclass, 'chunks'::regclass)") == 0
    # and a new job over both may start
    assert run(group_settings(dsn), embedder=HashEmbedder(32)).state == "done"
    assert [f["model_name"] for f in flips(dsn)] == ["test-hash-48", "test-hash-32"]


def test_abandon_active_with_every_table_drops_the_group_and_starts_one_with_the_new_model(dsn: str) -> None:
    two_tables(dsn)
    stopped_group(dsn)
    with pytest.raises(ConfigError, match="is re-embedding with test-hash-48"):
        run(group_settings(dsn), embedder=HashEmbedder(32))

    report = run(group_settings(dsn, abandon_active=True), embedder=HashEmbedder(32))

    assert report.state == "done", report
    assert [(j["state"], j["group_id"]) for j in jobs(dsn)] == [("abandoned", 1), ("abandoned", 1), ("done", 3),
                                                               ("done", 3)]
    assert flips(dsn) == [{"model_name": "test-hash-32", "dimension": 32, "stale_nodes": 0, "stale_chunks": 0}]
    for table in TABLES:
        assert column_type(dsn, table) == "vector(32)"
        assert one(dsn, "SELECT count(*) FROM pg_indexes WHERE indexname = %s", (f"idx_{table}_embedding_hnsw",)) == 1


# ------------------------------------------------------------------ refusals: exit 2, nothing written


def test_a_run_naming_some_of_a_groups_tables_is_refused_and_writes_nothing(
    dsn: str, model48: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    two_tables(dsn)
    stopped_group(dsn)
    before = written(dsn)
    base = ("run", "--dsn", dsn, "--model", str(model48), "--no-confirm")
    code, out, err = run_main(capsys, *base, "--table", "chunks")
    assert (code, out) == (2, "")
    assert err == ("reembed: public.chunks.embedding is one of the 2 tables of job group 1 (public.knowledge_nodes."
                   "embedding, public.chunks.embedding), which cut over together: run with exactly these tables "
                   "(--table public.knowledge_nodes --table public.chunks, or a --targets file naming them) to resume "
                   "it, or pass --abandon-active with all of them (and any more) to start over; nothing was written\n")
    # the same with --abandon-active: the other table would be left mid-job
    code, out, err = run_main(capsys, *base, "--table", "knowledge_nodes", "--abandon-active")
    assert code == 2 and err.startswith("reembed: public.knowledge_nodes.embedding is one of the 2 tables of job "
                                        "group 1") and err.count("\n") == 1
    assert written(dsn) == before
    # and a library caller's run over one of them
    with pytest.raises(ConfigError, match="is one of the 2 tables of job group 1"):
        run(group_settings(dsn, "knowledge_nodes"), embedder=HashEmbedder(48))
    assert written(dsn) == before
    # naming exactly the group's tables resumes it
    assert run(group_settings(dsn), embedder=HashEmbedder(48)).state == "done"
    assert len(flips(dsn)) == 1


def test_bad_targets_are_refused_before_any_write(
    dsn: str, model48: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    two_tables(dsn)
    make_table(dsn, rows=10, old_dim=32, table="small_chunks", registry=False)  # under a registry of its own
    before = written(dsn)
    base = ("run", "--dsn", dsn, "--model", str(model48), "--no-confirm")
    refusals = {
        "missing": (("--table", "knowledge_nodes", "--table", "no_such_table"), "no_such_table"),
        "twice": (("--table", "chunks", "--table", "knowledge_nodes", "--table", "chunks"), "named twice"),
        "other dimension": (("--table", "knowledge_nodes", "--table", "chunks", "--table", "small_chunks"),
                            "public.small_chunks.embedding (32-d) is not in the space embedding_model names"),
        "column count": (("--table", "knowledge_nodes", "--table", "chunks", "--column", "embedding",
                          "--column", "embedding", "--column", "embedding"), "--column is given 3 times"),
        "workers": (("--table", "knowledge_nodes", "--table", "chunks", "--workers", "2"),
                    "--workers: a job over several tables runs on one worker process"),
        "bridge": (("--table", "knowledge_nodes", "--table", "chunks", "--strategy", "shadow", "--bridge"),
                   "--bridge fits a map on one table's rows"),
    }
    for what, (argv, said) in refusals.items():
        code, out, err = run_main(capsys, *base, *argv)
        assert (code, out) == (2, ""), (what, err)
        assert err.startswith("reembed: ") and err.count("\n") == 1 and said in err, (what, err)
    targets = tmp_path / "targets.toml"
    targets.write_text('[[target]]\ntable = "knowledge_nodes"\n\n[[target]]\ntable = "public.knowledge_nodes"\n')
    code, out, err = run_main(capsys, *base, "--targets", str(targets))
    assert code == 2 and "same table" in err and err.count("\n") == 1, err
    assert one(dsn, "SELECT to_regclass('reembed_checkpoint')") is None  # not even reembed's own tables
    assert written(dsn) == before


def test_a_table_under_the_registry_left_out_of_the_job_is_named_and_refused(
    dsn: str, capsys: pytest.CaptureFixture[str], model48: Path
) -> None:
    two_tables(dsn)
    make_table(dsn, rows=10, table="notes", registry=False)
    before = written(dsn)
    code, out, err = run_main(capsys, "run", "--dsn", dsn, "--model", str(model48), "--no-confirm",
                              "--table", "knowledge_nodes", "--table", "chunks")
    assert (code, out) == (2, "")
    assert err.startswith("reembed: public.notes.embedding also holds 64-d vectors") and err.count("\n") == 1, err
    assert "chunks" not in err.split(" also ")[0]  # the job's own tables are not the others
    assert written(dsn) == before


# ------------------------------------------------------------------ plan and status show each table


def test_plan_and_status_show_each_table_of_the_job(
    dsn: str, model48: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    two_tables(dsn)
    targets = tmp_path / "targets.toml"
    targets.write_text('[[target]]\ntable = "knowledge_nodes"\n\n[[target]]\ntable = "chunks"\n')
    before = written(dsn)
    code, out, err = run_main(capsys, "plan", "--dsn", dsn, "--model", str(model48), "--targets", str(targets),
                              "--json")
    assert code == 0, err
    planned = json.loads(out)
    assert planned["state"] == "planned"
    assert planned["group"]["tables"] == ["public.knowledge_nodes.embedding", "public.chunks.embedding"]
    assert planned["group"]["one"] == "cut-over" and planned["group"]["rows_to_update"] == 210
    assert [t["rows_to_update"] for t in planned["tables"]] == [120, 90]
    code, out, err = run_main(capsys, "plan", "--dsn", dsn, "--model", str(model48), "--table", "knowledge_nodes",
                              "--table", "chunks")
    assert code == 0, err
    assert out.startswith(f"plan: one job over 2 tables under one registry, with {model48} (48-d)")
    assert "public.knowledge_nodes.embedding, public.chunks.embedding: embedded one after the other" in out
    assert planned["group"]["estimated_walltime_secs"] is not None and "encoding    about ? in all" not in out
    assert written(dsn) == before

    stopped_group(dsn)
    code, out, err = run_main(capsys, "status", "--dsn", dsn, "--table", "knowledge_nodes", "--table", "chunks",
                              "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["group"]["id"] == 1 and shown["group"]["state"] == "embedding"
    assert [(t["table"], t["column"], t["state"]) for t in shown["tables"]] == [
        ('"public"."knowledge_nodes"', "embedding", "embedding"), ('"public"."chunks"', "embedding", "embedding")]
    code, out, err = run_main(capsys, "status", "--dsn", dsn, "--table", "knowledge_nodes", "--table", "chunks")
    assert code == 0, err
    assert out.startswith("job over 2 tables under one registry: group 1, embedding; one cut-over when every table "
                          "is ready\n")
    assert out.count("group      job group 1 with") == 2
    # one table's status names the group it is in
    code, out, err = run_main(capsys, "status", "--dsn", dsn, "--table", "chunks", "--json")
    assert code == 0 and json.loads(out)["group"]["others"] == ["public.knowledge_nodes.embedding"]


def test_the_group_cut_over_waits_for_its_tables_locks_within_one_lock_timeout_in_all(dsn: str) -> None:
    """The cut-over holds the registry row and the earlier tables while it waits for a later one's
    lock. An application that wrote the last table and then reads the registry row FOR SHARE (the
    readers' protocol) waits on the cut-over for as long as it waits in all: bounded by one
    --cut-over-lock-timeout, not one per table, the application is never PostgreSQL's deadlock victim
    (with a timeout per table, the waits on two tables each released just in time summed past a
    400 ms deadlock_timeout and the application was aborted)."""
    import threading
    import time

    from reembed import capture, db
    from reembed.target import inspect_target

    make_table(dsn, rows=3, old_dim=8, id_type="bigint")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in ("chunks", "notes"):
            conn.execute(f"CREATE TABLE {name} (LIKE knowledge_nodes INCLUDING ALL)")
    order = ["knowledge_nodes", "chunks", "notes"]  # their oids' order: the cut-over's
    with db.connect(dsn, role="control", vectors=False, autocommit=True) as conn:
        tables = [(inspect_target(conn, Target(dsn=dsn, table=t)), False) for t in order]
    assert [i.oid for i, _ in tables] == sorted(i.oid for i, _ in tables)

    def cut_over_waiting_on(table: str) -> bool:
        return bool(one(dsn, "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE NOT l.granted "
                             "AND l.relation = %s::regclass AND a.application_name = 'the cut-over'", (table,)))

    def holding(table: str) -> Any:  # an application transaction on `table`, ended 150 ms into the cut-over's wait
        conn = psycopg.connect(dsn)
        conn.execute(f"INSERT INTO {table} (id, content, source) VALUES (1000, 'held', 'app')")

        def release() -> None:  # (or at once if the cut-over gave up before it came to this table)
            deadline = time.monotonic() + 120
            while "cut_over" not in outcome and time.monotonic() < deadline:
                if cut_over_waiting_on(table):  # polled closely: the wait's length is what is tested
                    time.sleep(0.15)  # the application's transaction: 150 ms more of its work, then its commit
                    break
                time.sleep(0.005)
            conn.commit()
            conn.close()
        return threading.Thread(target=release)

    outcome: dict[str, Any] = {}
    holders = [holding("knowledge_nodes"), holding("chunks")]
    app = psycopg.connect(dsn)
    app.execute("SET deadlock_timeout = '400ms'")
    app.execute("INSERT INTO notes (id, content, source) VALUES (1000, 'app', 'app')")  # the last table first

    def cut_over() -> None:
        with psycopg.connect(dsn, application_name="the cut-over", row_factory=dict_row) as conn, conn.transaction():
            conn.execute("SET LOCAL lock_timeout = '200ms'")
            started = time.monotonic()
            try:
                capture.hold_tables(conn, ("public", "embedding_model"), tables)
                outcome["cut_over"] = "held"
            except psycopg.errors.LockNotAvailable:
                outcome["cut_over"] = "gave up"
            outcome["waited"] = time.monotonic() - started
            raise psycopg.Rollback()

    for h in holders:
        h.start()
    cutting = threading.Thread(target=cut_over)
    cutting.start()
    # the cut-over holding the registry row (or, on a machine slow enough to miss that, already over)
    wait_for(lambda: "cut_over" in outcome or cut_over_waiting_on("knowledge_nodes"), timeout=120,
             what="the cut-over holding the registry row")
    try:
        app.execute("SELECT model_name FROM embedding_model WHERE id = 1 FOR SHARE")  # the readers' protocol
        app.commit()
    finally:
        app.close()
        cutting.join(60)
        for h in holders:
            h.join(60)
    # the application's transaction committed (above: no DeadlockDetected); the cut-over gave up
    # first, within its one lock timeout on the server's clock, and retries later
    assert outcome["cut_over"] == "gave up", outcome
