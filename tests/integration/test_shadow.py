"""--strategy shadow: search keeps serving the old vectors until one atomic swap, with a quality
gate before it and an exact rollback after it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import structlog
from pgvector.psycopg import register_vector

from reembed.embedder import SentenceTransformerEmbedder
from reembed.errors import ConfigError
from reembed.job import plan, run
from reembed.rollback import cleanup, rollback
from reembed.settings import ModelSpec, RollbackOptions, RunOptions, Settings, Target
from reembed.signals import StopSignal
from reembed.status import status
from support import catalog
from support.application import App, Reader
from support.database import Application, fetch, job_rows_done, make_table, one
from support.fakes import WORDS, HashEmbedder, hash_vector, stopping_after
from support.fakes import job_settings as settings
from support.models import assert_rows_hold_the_models_vectors
from support.processes import BATCH, ROWS, Background, cli_args, cli_run_args, events, run_cli, spawn, wait_for
from support.scripts import corpus, fastmodel

VIEW = "CREATE VIEW recent_nodes AS SELECT id, content, embedding FROM knowledge_nodes WHERE touched = 7"


def vectors(dsn: str, column: str) -> dict[str, np.ndarray | None]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        rows = conn.execute(f"SELECT id, {column}::vector FROM knowledge_nodes").fetchall()
        return {str(k): None if v is None else np.asarray(v.to_numpy()) for k, v in rows}


def columns(dsn: str) -> dict[str, str]:
    return {r["attname"]: r["t"] for r in fetch(dsn, "SELECT attname, format_type(atttypid, atttypmod) AS t"
                                                   " FROM pg_attribute WHERE attrelid = 'knowledge_nodes'::regclass"
                                                   " AND attnum > 0 AND NOT attisdropped")}


def test_a_shadow_job_swaps_in_the_new_column_keeps_the_previous_and_recreates_the_view(dsn: str) -> None:
    make_table(dsn, rows=120, old_dim=32)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(VIEW)
        conn.execute("COMMENT ON VIEW recent_nodes IS 'what search reads'")
    emb = HashEmbedder(48)
    listener = psycopg.connect(dsn, autocommit=True)
    listener.execute("LISTEN reembed_model_changed")
    catalog_before = catalog.snapshot(dsn, dims=(32, 48), any_column_order=True)
    report = run(settings(dsn, strategy="shadow", gate_min_recall=0.0), embedder=emb)
    assert report.state == "done", report
    catalog.assert_unchanged(catalog_before, catalog.snapshot(
        dsn, dims=(32, 48), ignore=("embedding_previous", "idx_knowledge_nodes_embedding_hnsw_previous"),
        any_column_order=True))
    told = [json.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
    listener.close()
    assert told and told[0]["model_name"] == "test-hash-48" and told[0]["dimension"] == 48, told
    cols = columns(dsn)
    assert cols["embedding"] == "vector(48)" and cols["embedding_previous"] == "vector(32)"
    new = vectors(dsn, "embedding")
    old = vectors(dsn, "embedding_previous")
    for key, content in ((str(r["id"]), r["content"]) for r in fetch(dsn, "SELECT id, content FROM knowledge_nodes")):
        assert np.allclose(new[key], hash_vector(content, 48), atol=1e-6)
        assert np.allclose(old[key], hash_vector(f"old:{content}", 32), atol=1e-6)
    assert one(dsn, "SELECT count(*) FROM recent_nodes WHERE vector_dims(embedding) = 48") == 120
    assert one(dsn, "SELECT obj_description('recent_nodes'::regclass, 'pg_class')") == "what search reads"
    idx = {r["indexname"]: r["indexdef"] for r in fetch(dsn, "SELECT indexname, indexdef FROM pg_indexes"
                                                            " WHERE tablename = 'knowledge_nodes'")}
    assert "(embedding vector_cosine_ops)" in idx["idx_knowledge_nodes_embedding_hnsw"]
    assert "(embedding_previous vector_cosine_ops)" in idx["idx_knowledge_nodes_embedding_hnsw_previous"]
    assert one(dsn, "SELECT model_name FROM embedding_model") == "test-hash-48"
    job = fetch(dsn, "SELECT * FROM reembed_checkpoint")[0]
    assert job["state"] == "done" and job["previous_state"] == "kept" and job["gate"]["passed"]
    print(job["gate"])


# ------------------------------------------------------------------ rollback and cleanup


def _old_model_table(dsn: str, old: Path, rows: int = 150) -> Any:
    """The table embedded by a real model `old` (an in-place job), the registry naming it."""
    make_table(dsn, rows=rows, old_dim=48)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(VIEW)
        conn.execute("GRANT SELECT ON recent_nodes TO PUBLIC")
    spec = ModelSpec(model=str(old), device="cpu")
    report = run(Settings(target=Target(dsn=dsn), model=spec, options=RunOptions(confirm_seconds=0)),
                 embedder=SentenceTransformerEmbedder(spec))
    assert report.state == "done", report
    return spec


def _application_writes_after_the_swap(dsn: str, dim: int = 32) -> dict[str, list[str]]:
    """Inserts, content edits, a delete, and an edit of another column, by the application with
    the new (hash) model, as it would after the swap."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        keys = [str(r[0]) for r in conn.execute("SELECT id FROM knowledge_nodes ORDER BY id LIMIT 12").fetchall()]
        inserted = []
        for i in range(5):
            key = str(uuid.uuid4())
            text = f"written after the swap {i}: river mountain"
            conn.execute("INSERT INTO knowledge_nodes (id, content, source, embedding) VALUES (%s, %s, 'app', %s)",
                         (key, text, hash_vector(text, dim)))
            inserted.append(key)
        for key in keys[:5]:
            text = f"edited after the swap {key}"
            conn.execute("UPDATE knowledge_nodes SET content = %s, embedding = %s WHERE id = %s",
                         (text, hash_vector(text, dim), key))
        conn.execute("DELETE FROM knowledge_nodes WHERE id = %s", (keys[5],))
        conn.execute("UPDATE knowledge_nodes SET touched = 7 WHERE id = ANY(%s::uuid[])", (keys[6:8],))
    return {"inserted": inserted, "edited": keys[:5], "deleted": keys[5:6], "touched": keys[6:8]}


@pytest.fixture
def old48(static_model_dir: Any) -> Path:
    return static_model_dir(48)


def test_rollback_re_embeds_exactly_the_rows_written_after_the_swap_with_the_old_model(
    dsn: str, old48: Path
) -> None:
    spec = _old_model_table(dsn, old48)
    catalog_before = catalog.snapshot(dsn)
    assert run(settings(dsn, strategy="shadow", gate_min_recall=0.0), embedder=HashEmbedder(32)).state == "done"
    wrote = _application_writes_after_the_swap(dsn)
    assert one(dsn, "SELECT count(DISTINCT row_id) FROM reembed_after_swap") == 10
    target = Target(dsn=dsn)
    with pytest.raises(ConfigError, match="10 rows were written after the swap"):
        rollback(Settings(target=target), RollbackOptions())
    assert columns(dsn)["embedding"] == "vector(32)"  # refused: nothing written
    report = rollback(Settings(target=target, model=spec), RollbackOptions(batch_size=4))
    assert report.rows_updated == 10 and report.state == "rolled_back", report
    catalog.assert_unchanged(catalog_before, catalog.snapshot(dsn))  # back exactly as before the job
    cols = columns(dsn)
    assert cols["embedding"] == "vector(48)" and "embedding_previous" not in cols, cols
    assert_rows_hold_the_models_vectors(dsn, old48)  # every row the old model's encoding of its content
    assert one(dsn, "SELECT model_name FROM embedding_model") == spec.registry_name
    assert one(dsn, "SELECT count(*) FROM recent_nodes WHERE vector_dims(embedding) = 48") == \
        one(dsn, "SELECT count(*) FROM knowledge_nodes")
    assert one(dsn, "SELECT has_table_privilege('public', 'recent_nodes', 'SELECT')")
    assert one(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'reembed%%'") == 0
    assert one(dsn, "SELECT count(*) FROM reembed_after_swap") == 0
    assert "idx_knowledge_nodes_embedding_hnsw" in {r["indexname"] for r in fetch(
        dsn, "SELECT indexname FROM pg_indexes WHERE tablename = 'knowledge_nodes'")}
    assert one(dsn, "SELECT previous_state FROM reembed_checkpoint ORDER BY job_id DESC LIMIT 1") == "rolled_back"
    assert wrote["inserted"]
    with pytest.raises(ConfigError, match="nothing to roll back"):
        rollback(Settings(target=target, model=spec), RollbackOptions())
    with pytest.raises(ConfigError, match="nothing to clean up"):
        cleanup(Settings(target=target))


def test_rollback_without_the_old_model_leaves_the_stale_rows_null_when_told(dsn: str, old48: Path) -> None:
    _old_model_table(dsn, old48)
    assert run(settings(dsn, strategy="shadow", gate_min_recall=0.0), embedder=HashEmbedder(32)).state == "done"
    wrote = _application_writes_after_the_swap(dsn)
    report = rollback(Settings(target=Target(dsn=dsn)), RollbackOptions(leave_stale_null=True))
    assert report.details["left_null"] == 10, report
    nulls = {str(r["id"]) for r in fetch(dsn, "SELECT id FROM knowledge_nodes WHERE embedding IS NULL")}
    assert nulls == set(wrote["inserted"]) | set(wrote["edited"])
    assert_rows_hold_the_models_vectors(dsn, old48, where="embedding IS NOT NULL")


def test_cleanup_drops_the_previous_column_and_the_recording_and_a_new_job_may_start(dsn: str) -> None:
    make_table(dsn, rows=80, old_dim=32)
    assert run(settings(dsn, strategy="shadow", gate_min_recall=0.0), embedder=HashEmbedder(48)).state == "done"
    with pytest.raises(ConfigError, match="reembed cleanup"):  # no second job while the previous is kept
        run(settings(dsn, strategy="shadow"), embedder=HashEmbedder(24))
    _application_writes_after_the_swap(dsn, dim=48)
    report = cleanup(Settings(target=Target(dsn=dsn)))
    assert report.state == "cleaned", report
    cols = columns(dsn)
    assert "embedding_previous" not in cols and cols["embedding"] == "vector(48)"
    assert {r["indexname"] for r in fetch(dsn, "SELECT indexname FROM pg_indexes WHERE tablename = 'knowledge_nodes'"
                                          " AND indexname LIKE '%%previous'")} == set()
    assert one(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'reembed%%'") == 0
    assert one(dsn, "SELECT count(*) FROM reembed_after_swap") == 0
    with pytest.raises(ConfigError, match="nothing to clean up"):
        cleanup(Settings(target=Target(dsn=dsn)))
    assert run(settings(dsn, strategy="shadow", gate_min_recall=0.0), embedder=HashEmbedder(24)).state == "done"


# ------------------------------------------------------------------------- the quality gate


@pytest.fixture(scope="module")
def constant48(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A real sentence-transformers model that is broken: every text gets the same vector."""
    path = tmp_path_factory.mktemp("constant48")
    return fastmodel.save_static_model(path, tokenizer_dir=minilm_path, dim=48, constant=True)


def _nothing_swapped(dsn: str, old_dim: int, model_name: str) -> None:
    cols = columns(dsn)
    assert cols["embedding"] == f"vector({old_dim})" and "embedding_previous" not in cols, cols
    assert one(dsn, "SELECT model_name FROM embedding_model") == model_name
    assert one(dsn, "SELECT state FROM reembed_checkpoint ORDER BY job_id DESC LIMIT 1") == "finalizing"


def test_the_gate_refuses_a_model_that_returns_constant_vectors_and_the_job_stays_resumable(
    dsn: str, constant48: Path, workdir: Path
) -> None:
    texts = corpus.docstrings(limit=200, seed=11)
    make_table(dsn, rows=len(texts), old_dim=32, content=lambda i: texts[i])
    before = vectors(dsn, "embedding")
    log = workdir / "run.log"
    proc = spawn(cli_run_args(dsn, constant48, "--strategy", "shadow"), cwd=workdir, log=log)
    assert proc.wait(timeout=300) == 1, log.read_text()[-3000:]
    assert "the quality gate refused the swap" in log.read_text()
    gate = events(log, "gate_done")[-1]
    assert gate["passed"] is False and gate["self_recall"] and max(gate["self_recall"].values()) < 0.9, gate
    assert gate["recall_new"] < 0.5, gate
    _nothing_swapped(dsn, 32, "old-model")
    after = vectors(dsn, "embedding")  # the live column untouched: search served the old vectors throughout
    assert after.keys() == before.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    shown = run_cli(["status", "--dsn", dsn], cwd=workdir)
    assert "gate       REFUSED" in shown.stdout and "phase gate" in shown.stdout, shown.stdout
    again = run_cli(cli_run_args(dsn, constant48, "--strategy", "shadow", "--skip-gate"), cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert '"event": "gate_skipped"' in again.stderr
    assert columns(dsn)["embedding"] == "vector(48)"


@pytest.mark.model
def test_the_gate_refuses_a_model_worse_than_the_old_one_on_the_tables_own_rows(
    dsn: str, minilm_path: Path, minilm: Any, workdir: Path
) -> None:
    """The old column holds all-MiniLM-L6-v2; the new model is the same network cut to 16 tokens:
    queries made from a row's later sentences no longer find it."""
    texts = [t for t in corpus.docstrings(limit=600, seed=13) if len(t) > 300][:250]
    make_table(dsn, rows=len(texts), old_dim=384, content=lambda i: texts[i])
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        rows = conn.execute("SELECT id, content FROM knowledge_nodes").fetchall()
        encoded = minilm.encode([c for _, c in rows])
        with conn.cursor() as cur:
            cur.executemany("UPDATE knowledge_nodes SET embedding = %s WHERE id = %s",
                            [(v, k) for (k, _), v in zip(rows, encoded, strict=True)])
        sig = minilm.signature
        conn.execute("UPDATE embedding_model SET model_name = %s, dimension = 384, model_hash = %s",
                     (sig.name, sig.hash))
    worse = ("--strategy", "shadow", "--max-seq-length", "16", "--model-name", "minilm-16",
             "--old-model", str(minilm_path), "--old-model-name", sig.name)
    log = workdir / "run.log"
    proc = spawn(cli_run_args(dsn, minilm_path, *worse), cwd=workdir, log=log)
    assert proc.wait(timeout=600) == 1, log.read_text()[-3000:]
    gate = events(log, "gate_done")[-1]
    print(f"\n[gate] new (16 tokens) recall@10 {gate['recall_new']:.3f}, old {gate['recall_old']:.3f}, "
          f"self-recall {gate['self_recall']}, {gate['queries']} queries, {gate['secs']:.2f} s")
    assert gate["recall_old"] >= 0.8 and gate["recall_new"] < gate["recall_old"] - 0.05, gate
    assert "worse than the old model's" in log.read_text()
    _nothing_swapped(dsn, 384, sig.name)
    # the thresholds are options: a looser one passes the same job at its gate, and it swaps
    again = run_cli(cli_run_args(dsn, minilm_path, *worse, "--gate-max-regression", "0.6"), cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert one(dsn, "SELECT model_name FROM embedding_model") == "minilm-16"
    assert one(dsn, "SELECT (gate->>'passed')::boolean FROM reembed_checkpoint ORDER BY job_id DESC LIMIT 1")


# ------------------------------------------- an application and a search reader throughout


def _closely(predicate: Callable[[], Any], *, timeout: float, what: str) -> None:
    """wait_for, every 10 ms: a phase that lasts half a second is caught inside."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def _cut_over_waiting_for_the_registry(dsn: str) -> int:
    return int(one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'reembed control%%'"
                        " AND wait_event_type = 'Lock' AND query ILIKE '%%embedding_model%%FOR UPDATE%%'"))


@pytest.mark.slow
def test_search_serves_one_vector_space_through_a_shadow_job_killed_in_every_phase(
    dsn: str, model48: Path, workdir: Path
) -> None:
    """A dimension change (64 -> 48) with the application writing and a reader searching the
    column (and a view over it) throughout; SIGKILL in the backfill, the index build, the gate
    and the swap, a re-run after each: no query fails, no answer mixes spaces, every row current."""
    make_table(dsn, rows=ROWS, old_dim=64, id_type="bigint")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(VIEW)
    name = str(model48)
    app = App(dsn, workdir, new_model=model48, new_name=name, id_type="bigint", rate=20)
    reader = Reader(dsn, workdir, new_model=model48, new_name=name, view="recent_nodes")
    args = ("--strategy", "shadow", "--gate-min-recall", "0", "--cut-over-lock-timeout", "5s")
    first_key = one(dsn, "SELECT min(id) FROM knowledge_nodes")
    # Each phase held open by what a live system does, so that the kill lands in it: the backfill
    # throttled, the index build waiting for an application's open write (CREATE INDEX CONCURRENTLY
    # waits for writers), the swap waiting for a writer's hold on the registry row; the gate runs
    # about half a second (every row a query), watched closely (the registry held behind it too).
    phases: dict[str, tuple[tuple[str, ...], Callable[[Application], None], Callable[[Path], Any]]] = {
        "backfill": (("--max-rate", "100"), lambda h: None, lambda log: job_rows_done(dsn) >= 3 * BATCH),
        "index": ((), lambda h: h.conn.execute("UPDATE knowledge_nodes SET touched = 7 WHERE id = %s", (first_key,)),
                  lambda log: events(log, "index_build_started")),
        "gate": (("--gate-queries", "480"), lambda h: h.hold_registry(), lambda log: events(log, "gate_started")),
        "swap": ((), lambda h: h.hold_registry(),
                 lambda log: events(log, "gate_done") and _cut_over_waiting_for_the_registry(dsn)),
    }
    killed: dict[str, list[str]] = {}
    try:
        wait_for(lambda: app.writes() >= 10 and reader.queries() >= 10, timeout=60, what="the application going")
        for phase, (extra, hold, reached) in phases.items():
            log = workdir / f"run-{phase}.log"
            with Application(dsn) as holder:
                hold(holder)
                proc = spawn(cli_args(dsn, model48, *args, *extra), cwd=workdir, log=log)
                _closely(lambda log=log, reached=reached, proc=proc: reached(log) or proc.poll() is not None,
                         timeout=180,
                         what=f"the job in its {phase} phase")
                proc.kill()
                assert proc.wait(timeout=60) == -9, log.read_text()[-3000:]
            killed[phase] = [e for e in ("index_build_started", "gate_started", "gate_done", "cut_over")
                             if events(log, e)]
            assert one(dsn, "SELECT model_name FROM embedding_model") == "old-model"
            assert columns(dsn)["embedding"] == "vector(64)"  # the live column: untouched until the swap
            before = app.writes(), reader.queries()
            wait_for(lambda before=before: app.writes() > before[0] + 5 and reader.queries() > before[1] + 5,
                     timeout=60, what="the application and the reader going on after the kill")
        assert killed["backfill"] == [] and killed["index"] == ["index_build_started"], killed
        assert "gate_started" in killed["gate"] and "cut_over" not in killed["gate"], killed
        assert "gate_done" in killed["swap"] and "cut_over" not in killed["swap"], killed
        final = run_cli(cli_args(dsn, model48, *args), cwd=workdir)
        assert final.returncode == 0, final.stderr[-3000:]
        wait_for(lambda: app.stats().get("writes_with_new_model", 0) >= 10 and reader.queries(name) >= 20,
                 timeout=90, what="the application and the reader on the new model")
    finally:
        stats, seen = app.stop(), reader.stop()
    assert list(killed) == list(phases)
    assert stats["errors"] == [] and stats["read_errors"] == [], (stats["errors"][:3], stats["read_errors"][:3])
    assert seen["errors"] == [], seen["errors"][:5]
    assert seen["mismatched"] == [], seen["mismatched"][:5]
    assert seen["self_found"] >= 0.9 * seen["queries"], seen
    assert seen["by_model"].get("old-model", 0) > 20 and seen["by_model"][name] >= 20 and seen["view_queries"]
    print(f"\n[shadow, killed in {', '.join(killed)}] reader {seen['queries']} queries ({seen['by_model']}), "
          f"self found {seen['self_found']}, application {app.writes()} writes")
    cols = columns(dsn)
    assert cols["embedding"] == "vector(48)" and cols["embedding_previous"] == "vector(64)"
    assert_rows_hold_the_models_vectors(dsn, model48)
    assert one(dsn, "SELECT count(*) FROM recent_nodes WHERE vector_dims(embedding) <> 48") == 0
    assert one(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'reembed_capture%%'") == 0


# ------------------------------------------------------------- the schemas people have

RICH = """
CREATE INDEX nodes_l2_partial ON knowledge_nodes USING hnsw (embedding vector_l2_ops) WHERE source <> 'app';
CREATE INDEX nodes_half ON knowledge_nodes USING hnsw ((embedding::halfvec(32)) halfvec_cosine_ops) WITH (m = 12);
CREATE INDEX nodes_with_vector ON knowledge_nodes (id) WHERE embedding IS NOT NULL;
CREATE VIEW v1 WITH (security_barrier = true) AS SELECT id, content, embedding FROM knowledge_nodes;
COMMENT ON COLUMN v1.embedding IS 'the vectors';
GRANT SELECT ON v1 TO pg_monitor;
CREATE VIEW v2 AS SELECT id FROM v1 WHERE embedding IS NOT NULL;
CREATE FUNCTION nodes_touch() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN NEW.touched := NEW.touched + 1; RETURN NEW; END $$;
CREATE TRIGGER nodes_vector_changed BEFORE UPDATE OF embedding ON knowledge_nodes
  FOR EACH ROW EXECUTE FUNCTION nodes_touch();
COMMENT ON TRIGGER nodes_vector_changed ON knowledge_nodes IS 'counts re-embeddings';
ALTER TABLE knowledge_nodes ENABLE ROW LEVEL SECURITY;
CREATE POLICY with_vectors ON knowledge_nodes FOR SELECT TO pg_monitor USING (embedding IS NOT NULL);
"""


def _depends_on(dsn: str, kind: str, name: str) -> str:
    """The column of knowledge_nodes that `name` (a view, trigger or policy) depends on."""
    classid = {"view": "pg_rewrite", "trigger": "pg_trigger", "policy": "pg_policy"}[kind]
    object_id = {"view": "(SELECT oid FROM pg_rewrite WHERE ev_class = %(name)s::regclass)",
                 "trigger": "(SELECT oid FROM pg_trigger WHERE tgname = %(name)s)",
                 "policy": "(SELECT oid FROM pg_policy WHERE polname = %(name)s)"}[kind]
    return str(one(dsn, f"SELECT string_agg(a.attname, ',' ORDER BY a.attname) FROM pg_depend d JOIN pg_attribute a"
                        " ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid"
                        f" WHERE d.classid = '{classid}'::regclass"
                        f" AND d.objid = {object_id} AND d.refobjid = 'knowledge_nodes'::regclass"
                        " AND a.attname LIKE 'embedding%%'", {"name": name}))


def test_a_shadow_swap_carries_partial_and_expression_indexes_views_on_views_triggers_and_policies(
    dsn: str
) -> None:
    make_table(dsn, rows=150, old_dim=32)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RICH)
    report = run(settings(dsn, strategy="shadow", gate_min_recall=0.0), embedder=HashEmbedder(48))
    assert report.state == "done", report
    gate = report.details["gate"]
    assert set(gate["self_recall"]) == {"idx_knowledge_nodes_embedding_hnsw_reembed1", "nodes_half_reembed1"}, gate
    idx = {r["indexname"]: r["indexdef"] for r in fetch(dsn, "SELECT indexname, indexdef FROM pg_indexes"
                                                            " WHERE tablename = 'knowledge_nodes'")}
    assert "USING hnsw (embedding vector_l2_ops) WHERE (source <> 'app'::text)" in idx["nodes_l2_partial"]
    assert "((embedding)::halfvec(48)) halfvec_cosine_ops) WITH (m='12')" in idx["nodes_half"], idx["nodes_half"]
    assert "WHERE (embedding IS NOT NULL)" in idx["nodes_with_vector"]
    assert "halfvec(32)" in idx["nodes_half_previous"] and "embedding_previous" in idx["nodes_l2_partial_previous"]
    for kind, name in (("view", "v1"), ("trigger", "nodes_vector_changed"), ("policy", "with_vectors")):
        assert _depends_on(dsn, kind, name) == "embedding", (kind, name)
    assert one(dsn, "SELECT reloptions::text FROM pg_class WHERE relname = 'v1'") == "{security_barrier=true}"
    assert one(dsn, "SELECT has_table_privilege('pg_monitor', 'v1', 'SELECT')")
    assert one(dsn, "SELECT col_description('v1'::regclass, 3)") == "the vectors"
    assert one(dsn, "SELECT count(*) FROM v2") == 150
    assert one(dsn, "SELECT obj_description(oid, 'pg_trigger') FROM pg_trigger WHERE tgname = 'nodes_vector_changed'") \
        == "counts re-embeddings"
    key = one(dsn, "SELECT min(id::text) FROM knowledge_nodes")
    before = one(dsn, "SELECT touched FROM knowledge_nodes WHERE id = %s", (key,))
    with psycopg.connect(dsn, autocommit=True) as conn:  # the trigger now fires on the new column
        conn.execute("UPDATE knowledge_nodes SET embedding = embedding WHERE id = %s", (key,))
    assert one(dsn, "SELECT touched FROM knowledge_nodes WHERE id = %s", (key,)) == before + 1


def test_a_materialized_view_on_the_column_is_refused_before_any_write(dsn: str) -> None:
    make_table(dsn, rows=40, old_dim=32)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE MATERIALIZED VIEW mv AS SELECT id, embedding FROM knowledge_nodes")
    with pytest.raises(ConfigError, match=r"materialized view .*mv.* holds a copy of the column's values"):
        run(settings(dsn, strategy="shadow"), embedder=HashEmbedder(48))
    assert "embedding_reembed1" not in columns(dsn)
    assert one(dsn, "SELECT to_regclass('reembed_checkpoint') IS NULL")  # not even reembed's own tables


def test_plan_compares_both_strategies_and_recommends_one_writing_nothing(dsn: str) -> None:
    make_table(dsn, rows=200, old_dim=32)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(VIEW)  # refused in place on a dimension change: PostgreSQL cannot retype a viewed column
    report = plan(settings(dsn, strategy="shadow"), embedder=HashEmbedder(48))
    s = report.details["strategies"]
    assert s["recommended"] == "shadow" and s["shadow"]["refused"] is None, s
    assert "recent_nodes" in s["in_place"]["refused"], s
    assert s["shadow"]["search_unavailable_secs"] == 0 and s["in_place"]["search_unavailable_secs"] > 0
    assert s["shadow"]["kept_until_cleanup_bytes"] >= 200 * (8 + 4 * 48)
    assert s["shadow"]["extra_disk_bytes"] > s["in_place"]["extra_disk_bytes"]
    assert "Recommended: --strategy shadow (search is served from the column" in report.message
    assert one(dsn, "SELECT to_regclass('reembed_checkpoint') IS NULL") and "embedding_reembed1" not in columns(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP VIEW recent_nodes")
        conn.execute("DROP INDEX idx_knowledge_nodes_embedding_hnsw")
        conn.execute("DELETE FROM embedding_model")
    again = plan(settings(dsn, strategy="shadow"), embedder=HashEmbedder(48)).details["strategies"]
    assert again["recommended"] == "in_place", again  # no search served from the column: nothing to keep serving


@pytest.mark.slow
def test_rollback_killed_mid_way_and_run_again_re_embeds_every_stale_row_once_the_application_writing(
    dsn: str, old48: Path, workdir: Path
) -> None:
    """The real CLI: a SIGKILL after rollback's first committed page, then a re-run: every row the
    old model's encoding of its current content; a third run has nothing to do (exit 2)."""
    _old_model_table(dsn, old48, rows=100)
    assert run(settings(dsn, strategy="shadow", gate_min_recall=0.0), embedder=HashEmbedder(32)).state == "done"
    docs = corpus.docstrings(limit=400)
    texts = [f"after the swap {i}: " + " ".join(doc.split()[:20]) for i, doc in enumerate(docs)]
    with psycopg.connect(dsn, autocommit=True) as conn:  # the application after the swap: 400 new rows
        register_vector(conn)
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO knowledge_nodes (id, content, source, embedding) VALUES (%s, %s, 'app', %s)",
                            [(uuid.uuid4(), text, hash_vector(text, 32)) for text in texts])
    assert one(dsn, "SELECT count(*) FROM reembed_after_swap") == len(texts)
    back = ["rollback", "--dsn", dsn, "--model", str(old48), "--batch-size", "4", "--log-format", "json"]
    log = workdir / "rollback.log"
    proc = spawn(back, cwd=workdir, log=log)
    _closely(lambda: events(log, "rollback_page") or proc.poll() is not None, timeout=120, what="a page rolled back")
    proc.kill()
    assert proc.wait(timeout=60) == -9, log.read_text()[-2000:]
    left = one(dsn, "SELECT count(DISTINCT row_id) FROM reembed_after_swap")
    assert 0 < left < len(texts), left  # some pages committed, with their records settled
    assert columns(dsn)["embedding"] == "vector(32)"  # not swapped back yet
    again = run_cli(back, cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert columns(dsn)["embedding"] == "vector(48)"
    assert_rows_hold_the_models_vectors(dsn, old48)
    third = run_cli(back, cwd=workdir)
    assert third.returncode == 2 and "nothing to roll back" in third.stderr, third.stderr
    assert run_cli(["cleanup", "--dsn", dsn], cwd=workdir).returncode == 2


def test_a_shadow_job_stopped_by_its_time_window_resumes_and_search_was_never_touched(dsn: str) -> None:
    make_table(dsn, rows=200, old_dim=32)
    before = vectors(dsn, "embedding")
    stop = StopSignal()
    emb = stopping_after(HashEmbedder(48), stop, calls=2, reason="time_budget")
    report = run(settings(dsn, strategy="shadow", gate_min_recall=0.0, batch_size=16, window_rows=16), embedder=emb,
                 stop=stop)
    assert report.exit_code == 75 and report.state == "time_budget", report
    assert one(dsn, "SELECT model_name FROM embedding_model") == "old-model"
    after = vectors(dsn, "embedding")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    shown = status(Settings(target=Target(dsn=dsn)))
    assert shown.data["strategy"] == "shadow" and shown.data["phase"] == "backfill", shown.data
    done = run(settings(dsn, strategy="shadow", gate_min_recall=0.0, batch_size=16), embedder=HashEmbedder(48))
    assert done.state == "done" and done.resumed_from is not None, done
    assert status(Settings(target=Target(dsn=dsn))).data["phase"] == "swapped, previous kept"


def test_a_halfvec_column_gets_a_halfvec_shadow_and_its_index_at_the_new_dimension(dsn: str) -> None:
    make_table(dsn, rows=100, old_dim=32, with_index=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE knowledge_nodes ALTER COLUMN embedding TYPE halfvec(32)")
        conn.execute("CREATE INDEX nodes_half_hnsw ON knowledge_nodes USING hnsw (embedding halfvec_cosine_ops)")
    report = run(settings(dsn, strategy="shadow", gate_min_recall=0.0), embedder=HashEmbedder(48))
    assert report.state == "done", report
    cols = columns(dsn)
    assert cols["embedding"] == "halfvec(48)" and cols["embedding_previous"] == "halfvec(32)"
    assert "(embedding halfvec_cosine_ops)" in one(dsn, "SELECT pg_get_indexdef('nodes_half_hnsw'::regclass)")
    assert report.details["gate"]["self_recall"]["nodes_half_hnsw_reembed1"] >= 0.9
    new = vectors(dsn, "embedding")
    for key, content in ((str(r["id"]), r["content"]) for r in fetch(dsn, "SELECT id, content FROM knowledge_nodes")):
        assert np.allclose(new[key], hash_vector(content, 48), atol=2e-3)


def test_abandoning_a_shadow_job_drops_its_shadow_column_and_the_new_job_starts_clean(dsn: str) -> None:
    make_table(dsn, rows=120, old_dim=32)
    stop = StopSignal()
    first = run(settings(dsn, strategy="shadow", batch_size=16, window_rows=16),
                embedder=stopping_after(HashEmbedder(48), stop, calls=2, reason="time_budget"), stop=stop)
    assert first.state == "time_budget" and "embedding_reembed1" in columns(dsn)
    with pytest.raises(ConfigError, match="--abandon-active"):
        run(settings(dsn, strategy="shadow"), embedder=HashEmbedder(24))
    second = run(settings(dsn, strategy="shadow", abandon_active=True, gate_min_recall=0.0), embedder=HashEmbedder(24))
    assert second.state == "done", second
    cols = columns(dsn)
    assert "embedding_reembed1" not in cols and cols["embedding"] == "vector(24)", cols
    assert not [r for r in fetch(dsn, "SELECT indexname FROM pg_indexes WHERE indexname LIKE '%%reembed1'")]
    assert one(dsn, "SELECT state FROM reembed_checkpoint WHERE job_id = 1") == "abandoned"


class _Inserting(threading.Thread):
    """An application inserting rows with increasing keys, `rate` rows a second in transactions of
    20 (its embedding NULL: the rows are for a rollback to re-embed), each transaction's time kept."""

    def __init__(self, dsn: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rate = dsn, rate
        self.stop = threading.Event()
        self.inserted = 0
        self.longest = 0.0
        self.errors: list[str] = []

    def run(self) -> None:
        rng = np.random.default_rng(5)
        key = 10_000_000
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                started = time.monotonic()
                rows = [(key + i, f"inserted {key + i}: " + " ".join(rng.choice(WORDS, size=6))) for i in range(20)]
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        cur.executemany("INSERT INTO knowledge_nodes (id, content, source) VALUES (%s, %s, 'app')",
                                        rows)
                except psycopg.Error as exc:
                    self.errors.append(str(exc)[:200])
                    continue
                key += 20
                self.inserted += 20
                took = time.monotonic() - started
                self.longest = max(self.longest, took)
                self.stop.wait(max(0.0, 20 / self.rate - took))


@pytest.mark.slow
@pytest.mark.model
def test_a_rollback_under_inserts_outpacing_the_old_model_ends_and_holds_writers_within_the_bound(
    dsn: str, minilm_path: Path, minilm: Any
) -> None:
    """Inserts with increasing keys at ~600 rows/s, faster than all-MiniLM-L6-v2 encodes here: the
    rollback's passes end (each at the newest record it saw), its swap back waits outside any lock
    until the backlog fits, and once the application slows it swaps back holding writers under 1 s;
    every row written before the swap back holds the old model's vector."""
    make_table(dsn, rows=150, id_type="bigint", old_dim=384)
    spec = ModelSpec(model=str(minilm_path), device="cpu")
    assert run(Settings(target=Target(dsn=dsn), model=spec, options=RunOptions(confirm_seconds=0)),
               embedder=minilm).state == "done"
    assert run(settings(dsn, strategy="shadow", gate_min_recall=0.0), embedder=HashEmbedder(32)).state == "done"
    app = _Inserting(dsn, rate=600)
    app.start()
    with structlog.testing.capture_logs() as logs:
        back = Background(lambda: rollback(Settings(target=Target(dsn=dsn), model=spec),
                                           RollbackOptions(batch_size=64)))
        try:
            wait_for(lambda: sum(e["event"] == "cut_over_catching_up" for e in list(logs)) >= 2 or not back.is_alive(),
                     timeout=300, what="the swap back catching up outside its locks")
            assert back.is_alive(), back.error  # the application outpaces the old model: not over yet
            assert app.inserted >= 600, app.inserted
            app.rate = 20.0  # the application slows down: the swap back catches up and happens
            back.join(timeout=300)
        finally:
            app.stop.set()
            app.join(30)
    assert back.error is None, back.error
    report = back.result
    assert report.state == "rolled_back", report
    assert report.details["writers_held_secs"] <= 1.0, report.details
    assert app.errors == [] and app.longest < 2.0, (app.errors[:3], app.longest)
    assert columns(dsn)["embedding"] == "vector(384)"
    print(f"\n[rollback under inserts] {app.inserted} rows inserted, writers held "
          f"{report.details['writers_held_secs']:.3f} s after {report.details['tries']} tries, "
          f"the application's longest insert {app.longest:.3f} s")
    # the table's own rows, and a sample of the application's (all of them: minutes of encoding here)
    assert_rows_hold_the_models_vectors(dsn, minilm_path, where="embedding IS NOT NULL AND (id < 10000000 OR"
                                                               " id % 40 = 0)")
    # after the swap back the application's inserts are no longer recorded (its rows keep the NULL it
    # wrote); every one before it was caught up: the NULLs are a suffix of its keys
    written = one(dsn, "SELECT max(id) FROM knowledge_nodes WHERE source = 'app' AND embedding IS NOT NULL")
    unwritten = one(dsn, "SELECT min(id) FROM knowledge_nodes WHERE source = 'app' AND embedding IS NULL")
    assert written is not None and (unwritten is None or written < unwritten), (written, unwritten)


@pytest.mark.parametrize("strategy", ["shadow", "in_place"])
def test_a_cut_over_whose_commit_landed_but_whose_answer_was_lost_is_not_done_again(
        dsn: str, strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection goes between the cut-over's COMMIT and its answer (the commit landed; the
    client sees a bare OperationalError, as when the server or the network drops it then): the retry
    finds the step recorded by that commit and does not swap again (a second swap would rename the
    columns back, or fail on names taken), and the job finishes as one that never lost it."""
    from reembed.lease import Lease

    make_table(dsn, rows=120, old_dim=32)
    if strategy == "shadow":  # in place, PostgreSQL cannot retype a column a view reads
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(VIEW)
    before = catalog.snapshot(dsn, dims=(32, 48), any_column_order=True)
    original = Lease._retried
    lost: list[str] = []

    def answer_lost(self: Lease, fn: Callable[[], Any], *, what: str, patient: bool,
                    max_backoff: float | None = None) -> Any:
        def once() -> Any:
            result = fn()  # committed
            if not lost:
                lost.append(what)
                raise psycopg.OperationalError("server closed the connection unexpectedly (after the commit)")
            return result
        return original(self, once if what == "cut_over" else fn, what=what, patient=patient,
                        max_backoff=max_backoff)

    monkeypatch.setattr(Lease, "_retried", answer_lost)
    with structlog.testing.capture_logs() as logs:
        report = run(settings(dsn, strategy=strategy, gate_min_recall=0.0), embedder=HashEmbedder(48))
    assert lost == ["cut_over"], lost  # the cut-over ran, and its answer was lost once
    assert report.state == "done", report
    said = [e["event"] for e in logs]
    assert "cut_over_landed" in said and "cut_over" not in said, said
    ignore = ("embedding_previous", "idx_knowledge_nodes_embedding_hnsw_previous") if strategy == "shadow" else ()
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(32, 48), ignore=ignore, any_column_order=True))
    new = vectors(dsn, "embedding")
    for r in fetch(dsn, "SELECT id, content FROM knowledge_nodes"):
        assert np.allclose(new[str(r["id"])], hash_vector(r["content"], 48), atol=1e-6)
    job = fetch(dsn, "SELECT finalize_steps AS steps, state FROM reembed_checkpoint")[0]
    assert job["state"] == "done" and list(job["steps"]).count("cut_over") == 1, job
