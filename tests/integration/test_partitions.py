"""Partitioned tables (issue 28, point 1): rows walked across partitions through the parent; every
index on the column rebuilt the way PostgreSQL allows (the parent ON ONLY, each partition's index
CONCURRENTLY under its own name, attached); the shadow strategy, rollback and cleanup; what is on one
partition only found and judged; partitions attached or detached during a job found and taken in.
The catalog oracle (pg_dump --schema-only before and after) holds for every job here."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import structlog
from pgvector.psycopg import register_vector

from reembed.errors import ConfigError, ReembedError
from reembed.job import plan, run
from reembed.rollback import cleanup, rollback
from reembed.settings import RollbackOptions, Settings, Target
from reembed.signals import StopSignal
from reembed.status import status
from support import catalog
from support.database import fetch, one
from support.fakes import Gate, HashEmbedder, SlowHashEmbedder, hash_vector, job_settings, stopping_after
from support.partitioned import FIRST, TABLE, index_tree, make_partitioned_table, vectors_by_dimension
from support.processes import Background, cli_run_args, events, spawn, wait_exit, wait_for


def settings(dsn: str, **opts: Any) -> Settings:
    opts.setdefault("gate_min_recall", 0.0)
    made = job_settings(dsn, **opts)
    return replace(made, target=Target(dsn=dsn, table=TABLE))


def content_rows(dsn: str) -> int:
    return int(one(dsn, "SELECT count(*) FROM app.items WHERE content IS NOT NULL"))


# ------------------------------------------------------------------ in place


@pytest.mark.parametrize("by", ["range", "hash", "list"])
def test_an_in_place_dimension_change_rebuilds_every_partitions_index_under_its_own_name(dsn: str, by: str) -> None:
    make_partitioned_table(dsn, by=by)
    before_tree = index_tree(dsn)
    before = catalog.snapshot(dsn, dims=(64, 48))
    report = run(settings(dsn), embedder=HashEmbedder(48))
    assert report.state == "done", report
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48)))
    assert vectors_by_dimension(dsn) == {48: content_rows(dsn), None: int(one(
        dsn, "SELECT count(*) FROM app.items WHERE content IS NULL"))}
    assert index_tree(dsn) == before_tree and all(valid for _, _, valid in before_tree)
    steps = one(dsn, "SELECT finalize_steps FROM reembed_checkpoint")
    leaves = [table for table, index, _ in before_tree if table != TABLE and index != "app.items_1_embedding_idx"]
    assert "build_index items_embedding_hnsw on only" in steps, steps
    assert {f"build_index items_embedding_hnsw on {t}" for t in leaves} <= set(steps), steps


def test_a_same_dimension_in_place_job_reindexes_each_partitions_index_and_changes_nothing_else(dsn: str) -> None:
    make_partitioned_table(dsn, by="range", local_index=True)
    before = catalog.snapshot(dsn)
    report = run(settings(dsn, drop_hnsw_first=False), embedder=HashEmbedder(64))
    assert report.state == "done", report
    catalog.assert_unchanged(before, catalog.snapshot(dsn))
    steps = one(dsn, "SELECT finalize_steps FROM reembed_checkpoint")
    assert "build_index items_embedding_hnsw on app.items_1a" in steps, steps
    assert vectors_by_dimension(dsn)[64] == content_rows(dsn)


def test_without_concurrent_builds_each_partitions_index_is_built_in_a_transaction_of_its_own(dsn: str) -> None:
    make_partitioned_table(dsn, by="hash", local_index=True)
    before = catalog.snapshot(dsn, dims=(64, 32))
    report = run(settings(dsn, concurrent_index=False), embedder=HashEmbedder(32))
    assert report.state == "done", report
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 32)))
    assert all(valid for _, _, valid in index_tree(dsn))


# ------------------------------------------------------------------ shadow, rollback, cleanup


def previous_names(tree: list[tuple[str, str, bool]]) -> tuple[str, ...]:
    """What the oracle leaves out after a swap: the previous column and every previous index (the
    parent's and each partition's), by the names the swap gives them."""
    from reembed.shadow import PREVIOUS, name_with

    return ("embedding_previous", *(name_with(index.split(".")[-1], PREVIOUS) for _, index, _ in tree))


@pytest.mark.parametrize("by", ["range", "list"])
def test_a_shadow_swap_gives_every_partitions_index_its_name_and_keeps_the_previous_ones(dsn: str, by: str) -> None:
    make_partitioned_table(dsn, by=by, local_index=True)
    tree = index_tree(dsn)
    ignore = (*previous_names(tree), f"{FIRST[by]}_l2_previous")
    before = catalog.snapshot(dsn, dims=(64, 48), any_column_order=True)
    report = run(settings(dsn, strategy="shadow"), embedder=HashEmbedder(48))
    assert report.state == "done", report
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48), ignore=ignore, any_column_order=True))
    assert index_tree(dsn) == tree  # the new vectors' indexes, under the live names
    assert vectors_by_dimension(dsn)[48] == content_rows(dsn)
    previous = index_tree(dsn, "app.items_embedding_hnsw_previous")
    assert len(previous) == len(tree) and all(valid for _, _, valid in previous)


def test_a_rollback_after_a_shadow_swap_puts_every_partition_back_as_it_was(dsn: str) -> None:
    make_partitioned_table(dsn, by="range", local_index=True)
    before = catalog.snapshot(dsn)
    assert run(settings(dsn, strategy="shadow"), embedder=HashEmbedder(48)).state == "done"
    report = rollback(Settings(target=Target(dsn=dsn, table=TABLE)), RollbackOptions(leave_stale_null=True))
    assert report.state == "rolled_back", report
    catalog.assert_unchanged(before, catalog.snapshot(dsn))
    assert vectors_by_dimension(dsn)[64] == content_rows(dsn)


def test_a_cleanup_after_a_shadow_swap_drops_the_previous_column_on_every_partition(dsn: str) -> None:
    make_partitioned_table(dsn, by="hash")
    before = catalog.snapshot(dsn, dims=(64, 48), any_column_order=True)
    assert run(settings(dsn, strategy="shadow"), embedder=HashEmbedder(48)).state == "done"
    assert cleanup(Settings(target=Target(dsn=dsn, table=TABLE))).state == "cleaned"
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48), any_column_order=True))
    assert one(dsn, "SELECT count(*) FROM pg_attribute WHERE attname = 'embedding_previous'") == 0


# ------------------------------------------------------------------ partitions attached or detached during a job


def test_partitions_attached_and_detached_during_an_in_place_job_are_taken_in(dsn: str) -> None:
    """One attached with rows behind the job's cursor (never walked: captured when finalize finds it),
    one created through the table (its rows captured by the cloned triggers), one detached: the job
    finishes, the attached ones' rows and indexes are the job's, the detached one is left alone."""
    make_partitioned_table(dsn, by="range")
    emb = HashEmbedder(48)
    gate = Gate(emb)  # prepare is done, the first page read: the cursor is past the start of the key space
    before = catalog.snapshot(dsn, dims=(64, 48))
    with structlog.testing.capture_logs() as logs:
        job = Background(lambda: run(settings(dsn, batch_size=32), embedder=emb))
        assert gate.reached.wait(60), job.error
        with psycopg.connect(dsn, autocommit=True) as conn:
            register_vector(conn)
            conn.execute("CREATE TABLE app.items_neg (LIKE app.items INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
            conn.execute("INSERT INTO app.items_neg (id, content, embedding) SELECT -k, 'attached ' || k, %s"
                         " FROM generate_series(1, 20) k", (hash_vector("old", 64),))
            conn.execute("ALTER TABLE app.items ATTACH PARTITION app.items_neg FOR VALUES FROM (MINVALUE) TO (0)")
            conn.execute("CREATE TABLE app.items_new PARTITION OF app.items FOR VALUES FROM (10000) TO (11000)")
            conn.execute("INSERT INTO app.items (id, content, embedding) SELECT 10000 + k, 'created ' || k, %s"
                         " FROM generate_series(1, 20) k", (hash_vector("old", 64),))
            conn.execute("ALTER TABLE app.items DETACH PARTITION app.items_2")
        gate.open()
        job.join(timeout=300)
    assert job.error is None and job.result.state == "done", job.error
    events = {e["event"]: e for e in logs}
    assert events["partitions_attached"]["partitions"] == ["app.items_neg", "app.items_new"], events
    assert events["partitions_detached"]["partitions"] == ["app.items_2"], events
    assert vectors_by_dimension(dsn) == {48: content_rows(dsn), None: int(one(
        dsn, "SELECT count(*) FROM app.items WHERE content IS NULL"))}
    tree = {table: (index, valid) for table, index, valid in index_tree(dsn)}
    assert tree["app.items_neg"] == ("app.items_neg_embedding_idx", True), tree
    assert tree["app.items_new"][1] and "app.items_2" not in tree, tree
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48)),
                             allowed=[r"items_neg", r"items_new", r"\bitems_2\b", r"items_2_"])


class AttachingEmbedder(HashEmbedder):
    """Attaches a partition to the table the first time it encodes `marker` (the catch-up's row): after
    finalize took the partitions in, before the cut-over."""

    def __init__(self, dsn: str, dim: int, marker: str) -> None:
        super().__init__(dim)
        self.dsn, self.marker, self.attached = dsn, marker, False

    def forward(self, texts: list[str]) -> Any:
        if not self.attached and any(self.marker in t for t in texts):
            self.attached = True
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("SET lock_timeout = '30s'")
                conn.execute("CREATE TABLE app.items_late PARTITION OF app.items FOR VALUES FROM (20000) TO (21000)")
        return super().forward(texts)


def test_a_partition_attached_before_the_cut_over_fails_it_whole_and_a_rerun_takes_it_in(dsn: str) -> None:
    make_partitioned_table(dsn, by="range")
    before = catalog.snapshot(dsn, dims=(64, 48))
    emb = AttachingEmbedder(dsn, 48, marker="written late")
    gate = Gate(emb)
    job = Background(lambda: run(settings(dsn, batch_size=32), embedder=emb))
    assert gate.reached.wait(60), job.error
    with psycopg.connect(dsn, autocommit=True) as conn:  # behind the cursor: only the catch-up encodes it
        conn.execute("INSERT INTO app.items (id, content) VALUES (0, 'written late')")
    gate.open()
    job.join(timeout=300)
    assert isinstance(job.error, ReembedError) and "changed while the job finalized" in str(job.error), job.error
    assert "attached: app.items_late" in str(job.error)
    assert one(dsn, "SELECT model_name FROM embedding_model") == "old-model"  # nothing of the cut-over
    said = status(Settings(target=Target(dsn=dsn, table=TABLE))).as_dict()["table_state"]
    assert "items_embedding_hnsw built again on 0 of its 5 partitions" in said, said
    assert one(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                    " WHERE attrelid = 'app.items'::regclass AND attname = 'embedding'") == "vector"
    report = run(settings(dsn, batch_size=32), embedder=HashEmbedder(48))
    assert report.state == "done", report
    assert dict((t, v) for t, _, v in index_tree(dsn))["app.items_late"] is True
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48)), allowed=[r"items_late"])


def test_a_partition_created_during_a_shadow_job_gets_its_twin_and_is_swapped_with_the_others(dsn: str) -> None:
    make_partitioned_table(dsn, by="range")
    tree = index_tree(dsn)
    emb = HashEmbedder(48)
    gate = Gate(emb)
    before = catalog.snapshot(dsn, dims=(64, 48), any_column_order=True)
    job = Background(lambda: run(settings(dsn, strategy="shadow", batch_size=32), embedder=emb))
    assert gate.reached.wait(60), job.error
    with psycopg.connect(dsn, autocommit=True) as conn:  # as pg_partman makes next month's: through the table
        register_vector(conn)
        conn.execute("CREATE TABLE app.items_new PARTITION OF app.items FOR VALUES FROM (10000) TO (11000)")
        conn.execute("INSERT INTO app.items (id, content, embedding) SELECT 10000 + k, 'created ' || k, %s"
                     " FROM generate_series(1, 20) k", (hash_vector("old", 64),))
    gate.open()
    job.join(timeout=300)
    assert job.error is None and job.result.state == "done", job.error
    after = {table: index for table, index, _ in index_tree(dsn)}
    assert after["app.items_new"] == "app.items_new_embedding_idx", after  # the name PostgreSQL gave it, kept
    previous = {table: index for table, index, _ in index_tree(dsn, "app.items_embedding_hnsw_previous")}
    assert previous["app.items_new"] == "app.items_new_embedding_idx_previous", previous
    assert one(dsn, "SELECT count(*) FROM app.items_new WHERE vector_dims(embedding) = 48") == 20
    ignore = (*previous_names(tree), "items_new_embedding_idx_previous")
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48), ignore=ignore, any_column_order=True),
                             allowed=[r"items_new"])


# ------------------------------------------------------------------ a crash in the middle of the partitions' builds


def build_phase(dsn: str, partition: str) -> str | None:
    """The phase of an index build on `partition` now (pg_stat_progress_create_index), if one runs."""
    return one(dsn, "SELECT phase FROM pg_stat_progress_create_index WHERE relid = %s::regclass", (partition,))


def test_sigkill_during_the_partitions_index_builds_then_a_rerun_finishes_them(dsn: str, model48: Path,
                                                                                workdir: Path) -> None:
    """The CLI killed while a partition's index is half built (CONCURRENTLY: an invalid index left behind,
    waiting for an application's open transaction on that partition), after an earlier partition's was
    built and attached: the re-run builds nothing twice, drops the leftover and finishes."""
    make_partitioned_table(dsn, by="range")
    tree = index_tree(dsn)
    before = catalog.snapshot(dsn, dims=(64, 48), any_column_order=True)
    args = cli_run_args(dsn, model48, "--table", TABLE, "--strategy", "shadow", "--gate-min-recall", "0")
    proc = spawn(args, cwd=workdir, log=workdir / "first.log")
    wait_for(lambda: one(dsn, "SELECT to_regclass('reembed_checkpoint') IS NOT NULL") and one(
        dsn, "SELECT shadow IS NOT NULL FROM reembed_checkpoint"), timeout=180, what="prepare")
    app = psycopg.connect(dsn)  # an application's write to items_2 (not through the table), left open
    try:
        app.execute("INSERT INTO app.items_2 (id, content) VALUES (2999, 'open write')")
        wait_for(lambda: build_phase(dsn, "app.items_2") or proc.poll() is not None, timeout=240,
                 what="the build on items_2 waiting for the open write")
        assert proc.poll() is None, (workdir / "first.log").read_text()[-3000:]
        steps = one(dsn, "SELECT finalize_steps FROM reembed_checkpoint")
        assert "build_index items_embedding_hnsw_reembed1 on app.items_0" in steps, steps
        proc.kill()
        assert wait_exit(proc) == -9
        # its sessions end too, as when the server notices the client gone (else the orphaned build
        # finishes by itself once the write commits, and the re-run finds it valid: also handled)
        ours = "FROM pg_stat_activity WHERE application_name LIKE 'reembed%%'"
        one(dsn, f"SELECT count(pg_terminate_backend(pid)) {ours}")
        wait_for(lambda: one(dsn, f"SELECT count(*) = 0 {ours}"), timeout=60, what="the killed run's sessions to end")
    finally:
        app.rollback()
        app.close()
    leftover = one(dsn, "SELECT NOT indisvalid FROM pg_index"
                        " WHERE indexrelid = 'app.items_2_embedding_idx_reembed1'::regclass")
    assert leftover is True  # what CONCURRENTLY leaves behind
    log = workdir / "second.log"
    rerun = spawn(args, cwd=workdir, log=log)
    assert wait_exit(rerun, timeout=300) == 0, log.read_text()[-3000:]
    built = [e["index"] for e in events(log, "index_build_started")]
    assert "items_0_search_reembed1" not in built and "items_2_embedding_idx_reembed1" in built, built
    assert [e["index"] for e in events(log, "invalid_index_dropped")] == ["items_2_embedding_idx_reembed1"]
    assert index_tree(dsn) == tree
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48), ignore=previous_names(tree),
                                                      any_column_order=True))


def test_sigkill_during_an_in_place_jobs_partition_builds_then_a_rerun_finishes_them(dsn: str, model48: Path,
                                                                                       workdir: Path) -> None:
    """In place, after the cut-over: the parent index made ON ONLY the table, the first partition's
    index half built (CONCURRENTLY, waiting for a report's older snapshot) when the CLI is killed."""
    make_partitioned_table(dsn, by="hash")
    tree = index_tree(dsn)
    before = catalog.snapshot(dsn, dims=(64, 48))
    holder = psycopg.connect(dsn)  # an application's transaction on the registry: the cut-over waits for it
    report_view = psycopg.connect(dsn)
    try:
        holder.execute("SELECT 1 FROM embedding_model WHERE id = 1 FOR SHARE")
        proc = spawn(cli_run_args(dsn, model48, "--table", TABLE), cwd=workdir, log=workdir / "first.log")
        wait_for(lambda: one(dsn, "SELECT to_regclass('reembed_checkpoint') IS NOT NULL") and one(
            dsn, "SELECT state = 'finalizing' FROM reembed_checkpoint") or proc.poll() is not None, timeout=240,
            what="finalize")
        report_view.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")  # a snapshot older than every build
        report_view.execute("SELECT count(*) FROM embedding_model").fetchone()
        holder.rollback()
        wait_for(lambda: build_phase(dsn, "app.items_0") == "waiting for old snapshots" or proc.poll() is not None,
                 timeout=240, what="the first partition's build waiting for the older snapshot")
        assert proc.poll() is None, (workdir / "first.log").read_text()[-3000:]
        steps = one(dsn, "SELECT finalize_steps FROM reembed_checkpoint")
        assert "cut_over" in steps and "build_index items_embedding_hnsw on only" in steps, steps
        proc.kill()
        assert wait_exit(proc) == -9
        ours = "FROM pg_stat_activity WHERE application_name LIKE 'reembed%%'"
        one(dsn, f"SELECT count(pg_terminate_backend(pid)) {ours}")
        wait_for(lambda: one(dsn, f"SELECT count(*) = 0 {ours}"), timeout=60, what="the killed run's sessions to end")
    finally:
        holder.close()
        report_view.close()
    said = status(Settings(target=Target(dsn=dsn, table=TABLE))).as_dict()["table_state"]
    assert "items_embedding_hnsw built again on 0 of its 4 partitions" in said, said
    log = workdir / "second.log"
    assert wait_exit(spawn(cli_run_args(dsn, model48, "--table", TABLE), cwd=workdir, log=log), timeout=300) == 0, \
        log.read_text()[-3000:]
    assert [e["index"] for e in events(log, "invalid_index_dropped")] == ["items_0_search"]
    assert index_tree(dsn) == tree
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48)))


# ------------------------------------------------------------------ an application writing throughout


class Writer(threading.Thread):
    """An application writing through the table until stopped, by the runbook's protocol (the registry
    row FOR SHARE, the vector of the model it names): inserts across partitions, content edits, rows
    moved to another partition by a change of key (a DELETE and an INSERT to PostgreSQL), deletes."""

    def __init__(self, dsn: str, keys: list[int]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.keys = dsn, list(keys)
        self.stopped = threading.Event()
        self.done: dict[str, int] = {"insert": 0, "edit": 0, "move": 0, "delete": 0}
        self.error: BaseException | None = None
        self.next_key = 5000
        self.start()

    def vector(self, model: str, text: str) -> Any:
        return hash_vector(f"old:{text}", 64) if model == "old-model" else hash_vector(text, 48)

    def run(self) -> None:
        rng = random.Random(7)
        try:
            with psycopg.connect(self.dsn) as conn:
                register_vector(conn)
                while not self.stopped.is_set():
                    with conn.transaction():
                        model = conn.execute("SELECT model_name FROM embedding_model WHERE id = 1 FOR SHARE"
                                             ).fetchone()[0]
                        self.one(conn, rng, model)
                    time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - examined by the test
            self.error = exc

    def one(self, conn: psycopg.Connection[Any], rng: random.Random, model: str) -> None:
        what = rng.choice(["insert", "edit", "move", "move", "delete"])
        key = rng.choice(self.keys)
        if what == "insert":
            self.next_key += rng.randint(1, 40)
            text = f"inserted {self.next_key}"
            conn.execute("INSERT INTO app.items (id, content, embedding) VALUES (%s, %s, %s)",
                         (self.next_key, text, self.vector(model, text)))
            self.keys.append(self.next_key)
        elif what == "edit":
            text = f"edited {key} {rng.random()}"
            conn.execute("UPDATE app.items SET content = %s, embedding = %s WHERE id = %s",
                         (text, self.vector(model, text), key))
        elif what == "move":  # to a key of another partition (items_0 <-> items_2, or to the default one)
            self.next_key += rng.randint(1, 40)
            to = rng.choice([rng.randint(2000, 2999), self.next_key])
            if to in self.keys:
                return
            conn.execute("UPDATE app.items SET id = %s WHERE id = %s", (to, key))
            self.keys[self.keys.index(key)] = to
        else:
            conn.execute("DELETE FROM app.items WHERE id = %s", (key,))
            self.keys.remove(key)
        self.done[what] += 1

    def stop(self) -> dict[str, int]:
        self.stopped.set()
        self.join(timeout=60)
        assert self.error is None, self.error
        return self.done


@pytest.mark.parametrize("strategy", ["in_place", "shadow"])
def test_an_application_writing_across_partitions_throughout_leaves_no_row_stale(dsn: str, strategy: str) -> None:
    keys = make_partitioned_table(dsn, by="range", rows=400)
    tree = index_tree(dsn)
    ignore = previous_names(tree) if strategy == "shadow" else ()
    before = catalog.snapshot(dsn, dims=(64, 48), any_column_order=True)
    app = Writer(dsn, keys)
    try:
        report = run(settings(dsn, strategy=strategy, batch_size=16),
                     embedder=SlowHashEmbedder(48, rows_per_sec=150))
        wait_for(lambda: sum(app.done.values()) > 20, timeout=60, what="writes after the job")
    finally:
        done = app.stop()
    assert report.state == "done", report
    assert done["move"] > 5 and done["edit"] > 5, done
    rows = fetch(dsn, "SELECT id, content, embedding::text AS e FROM app.items")
    stale = [r["id"] for r in rows if r["content"] is not None and (
        r["e"] is None or not np.allclose(np.array(json.loads(r["e"])), hash_vector(r["content"], 48), atol=1e-5))]
    assert stale == [], (len(stale), stale[:10], done)
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48), ignore=ignore, any_column_order=True))


# ------------------------------------------------------------------ plan, and what is on one partition


def test_plan_names_the_partitions_the_builds_one_partition_at_a_time_and_the_table_mid_job(dsn: str) -> None:
    make_partitioned_table(dsn, by="range", local_index=True)
    before = catalog.snapshot(dsn)
    report = plan(settings(dsn), embedder=HashEmbedder(48))
    details = report.details
    assert [p["name"] for p in details["partitions"]] == [
        "app.items_0", "app.items_1", "app.items_2", "app.items_rest", "app.items_1a", "app.items_1b"]
    build = {b["index"]: b for b in details["partition_index_builds"]}["items_embedding_hnsw"]
    assert [p["index"] for p in build["partition_indexes"]] == [
        "items_0_search", "items_2_embedding_idx", "items_rest_embedding_idx", "items_1a_embedding_idx",
        "items_1b_embedding_idx"]
    assert build["steps"] == 7 and sum(p["rows"] for p in build["partition_indexes"]) == 240
    said = {d["name"]: d for d in details["dependents"]}
    assert said["items_0_l2"]["action"] == "rebuild" and said["items_0_l2"]["relation"] == ["app", "items_0"]
    assert "search over the table, or any one partition, is unavailable" in details["mid_job"]
    message = " ".join(report.message.split())  # as wrapped for the terminal, unwrapped
    assert "5 partitions (app.items_0 (FOR VALUES FROM ('0') TO ('1000'))" in message, message
    assert "items_embedding_hnsw: built on each of 5 partitions (CONCURRENTLY, attached below" in message, message
    assert details["cost"]["wal_bytes"] > 240 * 48 * 4 and details["rows_to_update"] == 240
    shadow = plan(settings(dsn, strategy="shadow"), embedder=HashEmbedder(48)).details
    assert "a shadow column on every partition" in shadow["mid_job"]
    catalog.assert_unchanged(before, catalog.snapshot(dsn))  # a plan writes nothing


def test_what_is_on_one_partition_only_is_judged_before_any_write(dsn: str) -> None:
    make_partitioned_table(dsn, by="range")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE VIEW app.first_items AS SELECT id, embedding FROM app.items_0")
        conn.execute("CREATE FUNCTION app.noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END $$")
        conn.execute("CREATE TRIGGER items_2_audit AFTER UPDATE OF embedding ON app.items_2"
                     " FOR EACH ROW EXECUTE FUNCTION app.noop()")
    before = catalog.snapshot(dsn)
    for strategy in ("in_place", "shadow"):
        with pytest.raises(ConfigError) as refused:
            run(settings(dsn, strategy=strategy), embedder=HashEmbedder(48))
        message = str(refused.value)
        assert "(on partition app.items_0)" in message and "(on partition app.items_2)" in message, message
        assert "items_2_audit on table app.items_2" in message and "nothing was written" in message, message
    catalog.assert_unchanged(before, catalog.snapshot(dsn))
    assert one(dsn, "SELECT to_regclass('reembed_checkpoint') IS NULL")
    # the same dimension changes no type: in place leaves them untouched
    assert run(settings(dsn, drop_hnsw_first=False), embedder=HashEmbedder(64)).state == "done"
    catalog.assert_unchanged(before, catalog.snapshot(dsn))


# ------------------------------------------------------------------ stopped, resumed, abandoned


def test_a_partition_attached_while_a_job_was_stopped_is_taken_in_when_it_resumes(dsn: str) -> None:
    make_partitioned_table(dsn, by="range")
    before = catalog.snapshot(dsn, dims=(64, 48))
    stop = StopSignal()
    first = stopping_after(HashEmbedder(48), stop, calls=2)
    assert run(settings(dsn, batch_size=32, pipeline=False, ranges=3), embedder=first, stop=stop).exit_code == 130
    with psycopg.connect(dsn, autocommit=True) as conn:  # rows behind every cursor: only its capture finds them
        register_vector(conn)
        conn.execute("CREATE TABLE app.items_neg (LIKE app.items INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        conn.execute("INSERT INTO app.items_neg (id, content, embedding) SELECT -k, 'attached ' || k, %s"
                     " FROM generate_series(1, 10) k", (hash_vector("old", 64),))
        conn.execute("ALTER TABLE app.items ATTACH PARTITION app.items_neg FOR VALUES FROM (MINVALUE) TO (0)")
    with structlog.testing.capture_logs() as logs:
        report = run(settings(dsn, batch_size=32, ranges=3), embedder=HashEmbedder(48))
    assert report.state == "done", report
    events = [e["event"] for e in logs]
    assert events.index("partitions_attached") < events.index("finalize_started"), events  # found at resume
    assert one(dsn, "SELECT count(*) FROM app.items_neg WHERE vector_dims(embedding) = 48") == 10
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48)), allowed=[r"items_neg"])


@pytest.mark.parametrize("strategy", ["in_place", "shadow"])
def test_abandoning_a_job_on_a_partitioned_table_and_starting_another_leaves_every_name_as_it_was(
        dsn: str, strategy: str) -> None:
    make_partitioned_table(dsn, by="range", local_index=True)
    tree = index_tree(dsn)
    before = catalog.snapshot(dsn, dims=(64, 32), any_column_order=True)
    stop = StopSignal()
    first = stopping_after(HashEmbedder(48), stop, calls=2)
    stopped = run(settings(dsn, strategy=strategy, batch_size=32, pipeline=False), embedder=first, stop=stop)
    assert stopped.exit_code == 130
    report = run(settings(dsn, strategy=strategy, abandon_active=True), embedder=HashEmbedder(32))
    assert report.state == "done", report
    assert index_tree(dsn) == tree
    ignore = (*previous_names(tree), "items_0_l2_previous") if strategy == "shadow" else ()
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 32), ignore=ignore, any_column_order=True))


def test_a_rollback_after_partitions_were_created_and_dropped_since_the_swap_swaps_back_the_rest(dsn: str) -> None:
    make_partitioned_table(dsn, by="range")
    tree = index_tree(dsn)
    before = catalog.snapshot(dsn)
    assert run(settings(dsn, strategy="shadow"), embedder=HashEmbedder(48)).state == "done"
    with psycopg.connect(dsn, autocommit=True) as conn:  # next month's made, an old one dropped, after the swap
        register_vector(conn)
        conn.execute("CREATE TABLE app.items_new PARTITION OF app.items FOR VALUES FROM (10000) TO (11000)")
        conn.execute("INSERT INTO app.items (id, content, embedding) VALUES (10001, 'after the swap', %s)",
                     (hash_vector("after the swap", 48),))
        conn.execute("DROP TABLE app.items_2")
    report = rollback(Settings(target=Target(dsn=dsn, table=TABLE)), RollbackOptions(leave_stale_null=True))
    assert report.state == "rolled_back" and report.details["left_null"] == 1, report
    after = {table: (index, valid) for table, index, valid in index_tree(dsn)}
    assert {t: v for t, v in after.items() if t != "app.items_new"} == {
        table: (index, valid) for table, index, valid in tree if table != "app.items_2"}
    assert after["app.items_new"][1] is True  # the index PostgreSQL gave it below the previous one, valid
    catalog.assert_unchanged(before, catalog.snapshot(dsn), allowed=[r"items_new", r"\bitems_2\b", r"items_2_"])


def test_a_partition_attached_with_its_own_view_on_the_column_is_refused_and_the_job_finishes_once_it_is_gone(
        dsn: str) -> None:
    make_partitioned_table(dsn, by="range")
    before = catalog.snapshot(dsn, dims=(64, 48))
    emb = HashEmbedder(48)
    gate = Gate(emb)
    job = Background(lambda: run(settings(dsn, batch_size=32), embedder=emb))
    assert gate.reached.wait(60), job.error
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE app.items_neg (LIKE app.items INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        conn.execute("CREATE VIEW app.neg_view AS SELECT id, embedding FROM app.items_neg")
        conn.execute("ALTER TABLE app.items ATTACH PARTITION app.items_neg FOR VALUES FROM (MINVALUE) TO (0)")
    gate.open()
    job.join(timeout=300)
    assert isinstance(job.error, ConfigError), job.error
    message = str(job.error)
    assert "have objects of their own on embedding" in message and "app.neg_view" in message, message
    assert "the job is intact" in message
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP VIEW app.neg_view")
    assert run(settings(dsn, batch_size=32), embedder=HashEmbedder(48)).state == "done"
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48)), allowed=[r"items_neg"])
