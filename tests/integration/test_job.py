"""The job's promises, in-process against a real PostgreSQL + pgvector."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reembed.errors import ConfigError
from reembed.job import run
from reembed.settings import ModelSpec, RunOptions, Settings, Target
from reembed.signals import StopSignal
from support.database import Application, fetch, keys, make_table, one, snapshot, writer_waiting
from support.fakes import Gate, HashEmbedder, job_settings, stopping_after
from support.models import assert_rows_hold_the_models_vectors
from support.processes import Background, wait_for


def settings(dsn: str, model: str = "unused", **opts: Any) -> Settings:
    opts.setdefault("confirm_seconds", 0)
    return Settings(target=Target(dsn=dsn), model=ModelSpec(model=model), options=RunOptions(**opts))


def parse_vec(text: str) -> np.ndarray:
    return np.array(json.loads(text), dtype=np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.model
def test_every_stored_vector_is_the_models_encoding_of_its_content(dsn: str, minilm: Any, minilm_path: Path) -> None:
    make_table(dsn, rows=120, old_dim=384, null_every=9)
    report = run(settings(dsn, batch_size=32), embedder=minilm)
    assert report.state == "done" and report.rows_updated == 120 - 14
    assert assert_rows_hold_the_models_vectors(dsn, minilm_path) == 120 - 14  # SentenceTransformer.encode's


@pytest.mark.model
def test_64d_to_384d_tightens_column_rebuilds_index_updates_registry_and_touches_nothing_else(
    dsn: str, minilm: Any
) -> None:
    make_table(dsn, rows=80, old_dim=64)
    before = snapshot(dsn)
    before_others = fetch(dsn, "SELECT id, content, source, touched FROM knowledge_nodes ORDER BY id")
    report = run(settings(dsn, batch_size=16), embedder=minilm)
    after = snapshot(dsn)

    assert report.rows_updated == 80 and report.dimension == 384
    assert after["column"] == "vector(384)"
    assert after["indexes"] == [
        {"indexname": "idx_knowledge_nodes_embedding_hnsw",
         "indexdef": "CREATE INDEX idx_knowledge_nodes_embedding_hnsw ON public.knowledge_nodes "
                     "USING hnsw (embedding vector_cosine_ops) WITH (m='8', ef_construction='32')"},
        before["indexes"][1],  # the primary key, untouched
    ]
    assert one(dsn, "SELECT bool_and(indisvalid) FROM pg_index WHERE indrelid = 'knowledge_nodes'::regclass")
    (reg,) = after["registry"]
    assert (reg["model_name"], reg["dimension"], reg["model_hash"]) == (
        minilm.signature.name, 384, minilm.signature.hash)
    others = "SELECT id, content, source, touched FROM knowledge_nodes ORDER BY id"
    assert fetch(dsn, others) == before_others
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 384") == 80
    # the index serves the new space
    probe = minilm.encode(["note 3: database index vector"])[0]
    import psycopg

    with psycopg.connect(dsn) as conn:
        conn.execute("SET enable_seqscan = off")
        query = "SELECT id FROM knowledge_nodes ORDER BY embedding <=> %s::vector LIMIT 5"
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + query, (str(probe.tolist()),)))
        hits = conn.execute(query, (str(probe.tolist()),)).fetchall()
    assert "idx_knowledge_nodes_embedding_hnsw" in plan and len(hits) == 5


def test_null_content_gets_null_embedding_and_counts_as_skipped(dsn: str) -> None:
    make_table(dsn, rows=60, null_every=7)
    emb = HashEmbedder(32)
    report = run(settings(dsn, batch_size=10), embedder=emb)
    nulls = one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE content IS NULL")
    assert nulls == 9
    assert report.rows_skipped == nulls and report.rows_updated == 60 - nulls
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE content IS NULL AND embedding IS NULL") == nulls
    assert emb.texts_seen == 60 - nulls


def test_empty_and_huge_texts_are_encoded_and_counted(dsn: str, minilm: Any) -> None:
    texts = {0: "", 1: "word " * 5000, 2: "short"}
    make_table(dsn, rows=3, old_dim=384, content=lambda i: texts[i])
    report = run(settings(dsn), embedder=minilm)
    assert report.rows_updated == 3 and report.rows_skipped == 0
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 384") == 3


@pytest.mark.parametrize("id_type", ["uuid", "bigint", "text"])
def test_any_orderable_single_column_key_is_walked_completely(dsn: str, id_type: str) -> None:
    make_table(dsn, rows=95, id_type=id_type, old_dim=32)
    emb = HashEmbedder(32)
    report = run(settings(dsn, batch_size=10), embedder=emb)
    assert report.rows_updated == 95
    from support.fakes import hash_vector

    for row in fetch(dsn, "SELECT content, embedding::text AS e FROM knowledge_nodes"):
        assert cosine(parse_vec(row["e"]), hash_vector(row["content"], 32)) > 0.9999
    last = one(dsn, "SELECT last_id FROM reembed_checkpoint_range")
    assert last == one(dsn, "SELECT k.id::text AS top FROM knowledge_nodes k ORDER BY k.id DESC LIMIT 1")


def test_rerun_after_completion_is_a_noop_that_writes_nothing(dsn: str) -> None:
    make_table(dsn, rows=30)
    emb = HashEmbedder(32)
    run(settings(dsn), embedder=emb)
    before = snapshot(dsn)
    jobs = fetch(dsn, "SELECT * FROM reembed_checkpoint")
    emb2 = HashEmbedder(32)
    report = run(settings(dsn), embedder=emb2)
    assert report.state == "noop" and report.exit_code == 0 and report.rows_updated == 0
    assert emb2.calls == 0
    assert snapshot(dsn) == before
    assert fetch(dsn, "SELECT * FROM reembed_checkpoint") == jobs


def _job_state(dsn: str) -> dict[str, Any]:
    """The job's rows, its ranges, its captured changes and the triggers on the table."""
    return {
        "jobs": fetch(dsn, "SELECT * FROM reembed_checkpoint ORDER BY job_id"),
        "ranges": fetch(dsn, "SELECT * FROM reembed_checkpoint_range ORDER BY job_id, range_no"),
        "changes": fetch(dsn, "SELECT * FROM reembed_changes ORDER BY job_id, row_id"),
        "triggers": fetch(dsn, "SELECT tgname, tgenabled FROM pg_trigger"
                               " WHERE tgrelid = 'knowledge_nodes'::regclass AND NOT tgisinternal ORDER BY tgname"),
    }


def test_different_target_is_refused_while_a_job_is_active(dsn: str) -> None:
    make_table(dsn, rows=50)
    stop = StopSignal()
    first = stopping_after(HashEmbedder(32), stop, calls=2)
    stopped = run(settings(dsn, batch_size=10, pipeline=False), embedder=first, stop=stop)
    assert stopped.exit_code == 130
    before, job_before = snapshot(dsn), _job_state(dsn)
    assert [t["tgname"] for t in job_before["triggers"]] == ["reembed_capture_1_ins", "reembed_capture_1_upd"]
    assert job_before["jobs"][0]["state"] == "embedding" and job_before["ranges"][0]["rows_done"] == 20
    with pytest.raises(ConfigError, match=r"re-run with that model to resume it, or pass --abandon-active"):
        run(settings(dsn, batch_size=10), embedder=HashEmbedder(16))
    assert snapshot(dsn) == before
    assert _job_state(dsn) == job_before  # the job, its cursor, its capture: untouched


def test_abandon_active_drops_the_old_job_and_re_embeds_everything_with_the_new_model(dsn: str) -> None:
    make_table(dsn, rows=50)
    stop = StopSignal()
    first = stopping_after(HashEmbedder(32), stop, calls=1, reason="SIGTERM")
    assert run(settings(dsn, batch_size=10, pipeline=False), embedder=first, stop=stop).exit_code == 143
    report = run(settings(dsn, batch_size=10, abandon_active=True), embedder=HashEmbedder(16))
    assert report.state == "done" and report.rows_updated == 50
    states = [r["state"] for r in fetch(dsn, "SELECT state FROM reembed_checkpoint ORDER BY job_id")]
    assert states == ["abandoned", "done"]
    after = snapshot(dsn)
    assert after["column"] == "vector(16)"
    assert [i["indexname"] for i in after["indexes"]] == ["idx_knowledge_nodes_embedding_hnsw", "knowledge_nodes_pkey"]
    assert after["registry"][0]["model_name"] == "test-hash-16"


def test_plan_writes_nothing_and_reports_what_run_would_do(dsn: str) -> None:
    make_table(dsn, rows=40, null_every=10)
    before = snapshot(dsn)
    report = run(settings(dsn, batch_size=16, dry_run=True), embedder=HashEmbedder(32))
    assert snapshot(dsn) == before and before["tool_tables"] is False
    d = report.as_dict()
    assert d["state"] == "planned" and d["rows_to_update"] == 40 and d["embedder_batches"] == 3
    assert d["would_alter_typmod"] is True
    assert d["current_signature"]["model_name"] == "old-model"
    assert d["target_signature"] == {"model_name": "test-hash-32", "dimension": 32, "model_hash": "sha256:test-hash-32"}
    assert d["estimated_walltime_secs"] is not None


def test_stop_request_commits_the_batch_in_flight_and_a_rerun_resumes_exactly_there(dsn: str) -> None:
    make_table(dsn, rows=100, old_dim=32, with_index=False)  # prepare takes no lock the held row blocks
    ids = keys(dsn)
    stop = StopSignal()
    with Application(dsn) as app:
        app.hold_row(ids[35])  # the fourth batch (rows 30-39) is being written when the stop comes
        job = Background(lambda: run(settings(dsn, batch_size=10), embedder=HashEmbedder(32), stop=stop))
        wait_for(lambda: writer_waiting(dsn) or job.error, timeout=60, what="the writer of the fourth batch")
        assert one(dsn, "SELECT rows_done FROM reembed_checkpoint_range") == 30
        stop.request("SIGINT")  # later batches may be encoded already: none of them commits
    job.join(timeout=60)
    assert job.error is None, job.error
    report = job.result
    assert report.state == "stopped" and report.exit_code == 130
    last_id = one(dsn, "SELECT last_id FROM reembed_checkpoint_range")
    done = one(dsn, "SELECT rows_done FROM reembed_checkpoint_range")
    assert done == report.rows_updated == 40 and last_id == str(ids[39])
    # data and checkpoint agree exactly: new vectors on exactly the rows up to last_id
    from support.fakes import hash_vector

    rows = fetch(dsn, "SELECT id::text AS id, content, embedding::text AS e FROM knowledge_nodes ORDER BY id")
    new = [cosine(parse_vec(r["e"]), hash_vector(r["content"], 32)) > 0.9999 for r in rows]
    assert new == [r["id"] <= last_id for r in rows]

    again = HashEmbedder(32)
    resumed = run(settings(dsn, batch_size=10), embedder=again)
    assert resumed.resumed_from == last_id
    assert resumed.rows_updated == 100 - done and again.texts_seen == 100 - done
    assert one(dsn, "SELECT state FROM reembed_checkpoint") == "done"


def test_dimension_mismatch_is_refused_before_any_write(dsn: str) -> None:
    make_table(dsn, rows=10)
    before = snapshot(dsn)
    s = settings(dsn)
    s = replace(s, model=replace(s.model, dimension=768))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="model produces 32 dimensions but --dimension is 768"):
        run(s, embedder=HashEmbedder(32))
    assert snapshot(dsn) == before


def _index(dsn: str) -> dict[str, Any]:
    """The HNSW index as the catalogs have it: which relation (oid), which file, what, and valid."""
    return fetch(dsn, "SELECT c.oid, c.relfilenode, pg_get_indexdef(c.oid) AS def, i.indisvalid AS valid"
                      " FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid"
                      " WHERE c.relname = 'idx_knowledge_nodes_embedding_hnsw'")[0]


def test_same_dimension_keeps_typmod_and_rebuilds_index(dsn: str) -> None:
    make_table(dsn, rows=40, old_dim=32)
    before = _index(dsn)
    report = run(settings(dsn, batch_size=16), embedder=HashEmbedder(32))
    assert report.state == "done"
    after = snapshot(dsn)
    assert after["column"] == "vector(32)"
    index = _index(dsn)
    assert index["oid"] != before["oid"]  # dropped at prepare, built anew at the end
    assert index["def"] == before["def"] and index["valid"]
    steps = one(dsn, "SELECT finalize_steps FROM reembed_checkpoint")
    assert steps == ["cut_over", "drop_capture", "build_index", "done"]


def test_keeping_the_index_through_the_writes_reindexes_it_at_the_end(dsn: str) -> None:
    make_table(dsn, rows=40, old_dim=32)
    before = _index(dsn)
    report = run(settings(dsn, batch_size=16, drop_hnsw_first=False, concurrent_index=False), embedder=HashEmbedder(32))
    assert report.state == "done"
    assert one(dsn, "SELECT index_dropped FROM reembed_checkpoint") is False
    index = _index(dsn)
    assert index["oid"] == before["oid"]  # the same index, kept through the writes ...
    assert index["relfilenode"] != before["relfilenode"]  # ... and REINDEXed into a new file at the end
    assert index["def"] == before["def"] and index["valid"]


def test_an_empty_table_finalizes_straight_away(dsn: str) -> None:
    make_table(dsn, rows=0, old_dim=64)
    report = run(settings(dsn), embedder=HashEmbedder(32))
    assert report.state == "done" and report.rows_updated == 0
    after = snapshot(dsn)
    assert after["column"] == "vector(32)" and after["registry"][0]["dimension"] == 32
    assert after["indexes"][0]["indexname"] == "idx_knowledge_nodes_embedding_hnsw"


def test_several_writers_commit_in_key_order_so_the_checkpoint_never_names_an_uncommitted_row(dsn: str) -> None:
    make_table(dsn, rows=100, old_dim=64)
    first = keys(dsn)[0]

    def writers(state: str, waiting: bool = False) -> int:
        return int(one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'reembed writer%%'"
                            " AND state = %s AND (wait_event_type = 'Lock') = %s", (state, waiting)))

    emb = HashEmbedder(32)
    gate = Gate(emb)  # prepared (its DDL done), the first batch read: now the application holds a row
    job = Background(lambda: run(job_settings(dsn, batch_size=10, writers=3), embedder=emb))
    gate.reached.wait(30)
    with Application(dsn) as app:
        app.hold_row(first)  # the first batch's write waits for this row
        gate.open()
        # The first batch waits on the row; the next two wrote their rows and wait for their turn.
        wait_for(lambda: writers("active", waiting=True) == 1 and writers("idle in transaction") == 2,
                 timeout=60, what="one writer waiting on the row, two waiting for their turn")
        assert one(dsn, "SELECT last_id FROM reembed_checkpoint_range") is None
        assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 32") == 0
    job.join(timeout=120)
    assert job.error is None and job.result.state == "done" and job.result.rows_updated == 100
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 32") == 100
    assert one(dsn, "SELECT rows_done FROM reembed_checkpoint_range") == 100
