"""--strategy shadow: search keeps serving the old vectors until one atomic swap, with a quality
gate before it and an exact rollback after it."""

from __future__ import annotations

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from reembed.job import run
from support.database import fetch, make_table, one
from support.fakes import HashEmbedder, hash_vector
from support.fakes import job_settings as settings

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
    report = run(settings(dsn, strategy="shadow", gate_min_recall=0.0), embedder=emb)
    assert report.state == "done", report
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
