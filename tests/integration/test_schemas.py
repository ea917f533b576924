"""The schemas people have (issue 14): everything on the column is found before any write, and
each object is either rebuilt at the new dimension or refused with exit 2 and nothing written.
A real PostgreSQL + pgvector; the test embedder (the job's mechanics, not the model's output)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from reembed.errors import ConfigError
from reembed.job import plan, run
from reembed.signals import StopSignal
from reembed.status import status as job_status
from support import catalog
from support.database import fetch, make_table, one, snapshot
from support.fakes import HashEmbedder, hash_vector, job_settings, stopping_after
from support.processes import cli_args, run_cli

HNSW = "idx_knowledge_nodes_embedding_hnsw"


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def indexes(dsn: str) -> dict[str, dict[str, Any]]:
    """The table's indexes: definition and validity, by name."""
    rows = fetch(dsn, "SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS definition, i.indisvalid AS valid"
                      " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                      " WHERE i.indrelid = 'knowledge_nodes'::regclass")
    return {r["name"]: r for r in rows}


def column_type(dsn: str) -> str:
    return str(one(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                        " WHERE attrelid = 'knowledge_nodes'::regclass AND attname = 'embedding'"))


def assert_every_row_holds_its_new_vector(dsn: str, emb: HashEmbedder, *, atol: float = 1e-6) -> None:
    rows = fetch(dsn, "SELECT content, embedding::text AS e FROM knowledge_nodes WHERE content IS NOT NULL")
    assert rows
    for row in rows:
        got = np.array(json.loads(row["e"]), dtype=np.float32)
        assert np.allclose(got, hash_vector(row["content"], emb.signature.dimension), atol=atol), row["content"]


def assert_nothing_written(dsn: str, before: dict[str, Any]) -> None:
    """Embeddings, indexes and column type as they were; no job recorded."""
    after = snapshot(dsn)
    assert after["rows"] == before["rows"]
    assert after["column"] == before["column"]
    assert after["indexes"] == before["indexes"]
    assert after["registry"] == before["registry"]
    assert not after["tool_tables"] or one(dsn, "SELECT count(*) FROM reembed_checkpoint") == 0


# ------------------------------------------------------------------ handled


def test_a_second_ivfflat_index_is_rebuilt_at_the_new_dimension(dsn: str) -> None:
    make_table(dsn, rows=60)
    execute(dsn, "CREATE INDEX knowledge_ivf ON knowledge_nodes USING ivfflat (embedding vector_l2_ops)"
                 " WITH (lists = 4)")
    before = indexes(dsn)
    catalog_before = catalog.snapshot(dsn, dims=(64, 256))
    emb = HashEmbedder(256)
    report = run(job_settings(dsn, batch_size=16), embedder=emb)
    assert report.state == "done"
    catalog.assert_unchanged(catalog_before, catalog.snapshot(dsn, dims=(64, 256)))
    after = indexes(dsn)
    assert after.keys() == before.keys()
    for name in (HNSW, "knowledge_ivf"):  # the same definition (no dimension in it), valid, on the new column
        assert after[name]["definition"] == before[name]["definition"] and after[name]["valid"]
    assert column_type(dsn) == "vector(256)"
    assert_every_row_holds_its_new_vector(dsn, emb)


def test_an_hnsw_index_on_a_halfvec_cast_is_rebuilt_with_the_cast_at_the_new_dimension(dsn: str) -> None:
    make_table(dsn, rows=60, with_index=False)
    execute(dsn, "CREATE INDEX knowledge_half ON knowledge_nodes"
                 " USING hnsw ((embedding::halfvec(64)) halfvec_cosine_ops) WITH (m = 8)")
    catalog_before = catalog.snapshot(dsn, dims=(64, 256))
    emb = HashEmbedder(256)
    report = run(job_settings(dsn, batch_size=16), embedder=emb)
    assert report.state == "done"
    catalog.assert_unchanged(catalog_before, catalog.snapshot(dsn, dims=(64, 256)))
    half = indexes(dsn)["knowledge_half"]
    assert half["valid"]
    assert half["definition"] == ("CREATE INDEX knowledge_half ON public.knowledge_nodes USING hnsw "
                                  "(((embedding)::halfvec(256)) halfvec_cosine_ops) WITH (m='8')")
    assert_every_row_holds_its_new_vector(dsn, emb)
    with psycopg.connect(dsn) as conn:  # the index serves the new vectors
        conn.execute("SET enable_seqscan = off")
        probe = "[" + ",".join(str(x) for x in hash_vector("anything", 256)) + "]"
        plan_text = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT id FROM knowledge_nodes ORDER BY embedding::halfvec(256) <=> %s::halfvec(256) LIMIT 3",
            (probe,)).fetchall())
    assert "knowledge_half" in plan_text


def test_expression_and_partial_indexes_are_rebuilt_or_carried(dsn: str) -> None:
    make_table(dsn, rows=60)
    execute(
        dsn,
        "CREATE INDEX knowledge_bq ON knowledge_nodes"
        " USING hnsw ((binary_quantize(embedding)::bit(64)) bit_hamming_ops)",
        "CREATE INDEX knowledge_part_ann ON knowledge_nodes USING hnsw (embedding vector_l2_ops)"
        " WHERE source <> 'src-1'",
        "CREATE INDEX knowledge_embedded ON knowledge_nodes (source) WHERE embedding IS NOT NULL",
        "CREATE STATISTICS knowledge_stats ON source, (embedding IS NULL) FROM knowledge_nodes",
    )
    before = indexes(dsn)
    report = plan(job_settings(dsn, batch_size=16), embedder=HashEmbedder(256))
    said = {d["name"]: d["action"] for d in report.details["dependents"]}
    assert said == {HNSW: "rebuild", "knowledge_bq": "rebuild", "knowledge_part_ann": "rebuild",
                    "knowledge_embedded": "carried", "statistics object knowledge_stats": "carried"}
    assert "knowledge_bq (dropped now, built again at the end at the new dimension)" in report.message
    assert indexes(dsn) == before  # plan writes nothing

    emb = HashEmbedder(256)
    catalog_before = catalog.snapshot(dsn, dims=(64, 256))
    assert run(job_settings(dsn, batch_size=16), embedder=emb).state == "done"
    catalog.assert_unchanged(catalog_before, catalog.snapshot(dsn, dims=(64, 256)))
    after = indexes(dsn)
    assert after.keys() == before.keys() and all(i["valid"] for i in after.values())
    assert after["knowledge_bq"]["definition"] == before["knowledge_bq"]["definition"].replace("bit(64)", "bit(256)")
    assert after["knowledge_part_ann"]["definition"] == before["knowledge_part_ann"]["definition"]
    assert after["knowledge_embedded"]["definition"] == before["knowledge_embedded"]["definition"]
    assert one(dsn, "SELECT count(*) FROM pg_statistic_ext WHERE stxname = 'knowledge_stats'") == 1
    assert_every_row_holds_its_new_vector(dsn, emb)


def test_a_halfvec_column_is_reembedded_in_its_own_type_and_keeps_its_opclass(dsn: str) -> None:
    make_table(dsn, rows=60, with_index=False)
    execute(dsn, "ALTER TABLE knowledge_nodes ALTER COLUMN embedding TYPE halfvec(64)",
            "CREATE INDEX knowledge_half ON knowledge_nodes USING hnsw (embedding halfvec_cosine_ops)")
    emb = HashEmbedder(256)
    report = run(job_settings(dsn, batch_size=16), embedder=emb)
    assert report.state == "done" and report.rows_updated == 60
    assert column_type(dsn) == "halfvec(256)"
    half = indexes(dsn)["knowledge_half"]
    assert half["valid"] and "halfvec_cosine_ops" in half["definition"]
    assert_every_row_holds_its_new_vector(dsn, emb, atol=2e-3)  # float16's precision
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 256") == 60


def test_a_2048d_target_on_a_halfvec_column_builds_its_hnsw_index(dsn: str) -> None:
    make_table(dsn, rows=30, with_index=False)
    execute(dsn, "ALTER TABLE knowledge_nodes ALTER COLUMN embedding TYPE halfvec(64)",
            "CREATE INDEX knowledge_half ON knowledge_nodes USING hnsw (embedding halfvec_l2_ops)")
    report = run(job_settings(dsn, batch_size=16), embedder=HashEmbedder(2048))
    assert report.state == "done"
    assert column_type(dsn) == "halfvec(2048)" and indexes(dsn)["knowledge_half"]["valid"]


def test_a_same_dimension_job_goes_through_a_view_and_reindexes_an_ivfflat_index(dsn: str) -> None:
    make_table(dsn, rows=60)
    execute(dsn, "CREATE VIEW knowledge_view AS SELECT id, embedding FROM knowledge_nodes",
            "CREATE INDEX knowledge_ivf ON knowledge_nodes USING ivfflat (embedding vector_l2_ops) WITH (lists = 4)")
    emb = HashEmbedder(64)
    report = run(job_settings(dsn, batch_size=16), embedder=emb)
    assert report.state == "done"
    assert column_type(dsn) == "vector(64)"
    assert one(dsn, "SELECT count(*) FROM knowledge_view WHERE embedding IS NOT NULL") == 60
    assert all(i["valid"] for i in indexes(dsn).values())
    assert_every_row_holds_its_new_vector(dsn, emb)


# ------------------------------------------------------------------ refused

REFUSED = {
    "view": ("CREATE VIEW knowledge_view AS SELECT id, embedding FROM knowledge_nodes", "view knowledge_view"),
    "materialized view": ("CREATE MATERIALIZED VIEW knowledge_mv AS SELECT id, embedding FROM knowledge_nodes",
                          "materialized view knowledge_mv"),
    "policy": ("ALTER TABLE knowledge_nodes ENABLE ROW LEVEL SECURITY; "
               "CREATE POLICY knowledge_policy ON knowledge_nodes USING (embedding IS NOT NULL)",
               "policy knowledge_policy"),
    "trigger": ("CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$; "
                "CREATE TRIGGER knowledge_touch BEFORE UPDATE OF embedding ON knowledge_nodes "
                "FOR EACH ROW EXECUTE FUNCTION keep()", "trigger knowledge_touch"),
    "generated column": ("ALTER TABLE knowledge_nodes ADD COLUMN half halfvec(64) "
                         "GENERATED ALWAYS AS (embedding::halfvec(64)) STORED", "generated column"),
    "default": ("ALTER TABLE knowledge_nodes ALTER COLUMN embedding SET DEFAULT "
                "array_fill(0.125::real, ARRAY[64])::vector", "default"),
    "check constraint": ("ALTER TABLE knowledge_nodes ADD CONSTRAINT knowledge_dims "
                         "CHECK (vector_dims(embedding) = 64)", "constraint knowledge_dims"),
    "publication": ("CREATE PUBLICATION knowledge_pub FOR TABLE knowledge_nodes", "publication knowledge_pub"),
    "rule": ("CREATE RULE knowledge_rule AS ON UPDATE TO knowledge_nodes WHERE NEW.embedding IS NULL "
             "DO INSTEAD NOTHING", "rule knowledge_rule"),
}


@pytest.mark.parametrize("shape", sorted(REFUSED))
def test_a_dimension_change_is_refused_before_any_write(dsn: str, shape: str) -> None:
    make_table(dsn, rows=40)
    ddl, named = REFUSED[shape]
    execute(dsn, ddl)
    before = snapshot(dsn)
    catalog_before = catalog.snapshot(dsn)
    with pytest.raises(ConfigError) as refused:
        plan(job_settings(dsn), embedder=HashEmbedder(256))
    assert named in str(refused.value) and "nothing was written" in str(refused.value)
    with pytest.raises(ConfigError) as again:
        run(job_settings(dsn, batch_size=16), embedder=HashEmbedder(256))
    assert named in str(again.value)
    assert_nothing_written(dsn, before)
    catalog.assert_unchanged(catalog_before, catalog.snapshot(dsn))


def test_a_2048d_target_with_an_hnsw_index_on_vector_is_refused_with_the_way_out(dsn: str) -> None:
    make_table(dsn, rows=40)
    before = snapshot(dsn)
    with pytest.raises(ConfigError) as refused:
        run(job_settings(dsn, batch_size=16), embedder=HashEmbedder(2048))
    message = str(refused.value)
    assert HNSW in message and "at most 2000" in message and "halfvec" in message
    assert_nothing_written(dsn, before)


def test_a_published_table_goes_ahead_once_the_operator_says_the_subscribers_take_it(dsn: str) -> None:
    make_table(dsn, rows=40)
    execute(dsn, "CREATE PUBLICATION knowledge_pub FOR TABLE knowledge_nodes")
    report = run(job_settings(dsn, batch_size=16, allow_published=True), embedder=HashEmbedder(256))
    assert report.state == "done" and column_type(dsn) == "vector(256)"


def test_the_cli_refuses_a_view_with_exit_2_and_one_line(dsn: str, model48: Path, workdir: Path) -> None:
    make_table(dsn, rows=20)
    execute(dsn, "CREATE VIEW knowledge_view AS SELECT id, embedding FROM knowledge_nodes")
    before = snapshot(dsn)
    done = run_cli(cli_args(dsn, model48), cwd=workdir)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("reembed:")]
    assert len(errors) == 1 and "view knowledge_view" in errors[0] and "vector(48)" in errors[0]
    assert_nothing_written(dsn, before)


# ------------------------------------------------------------------ after prepare


def test_a_view_added_mid_job_is_refused_on_resume_and_the_table_state_is_said(dsn: str) -> None:
    make_table(dsn, rows=80)
    stop = StopSignal()
    emb = stopping_after(HashEmbedder(256), stop, calls=2)
    first = run(job_settings(dsn, batch_size=16, pipeline=False), embedder=emb, stop=stop)
    assert first.state == "stopped"
    execute(dsn, "CREATE VIEW knowledge_view AS SELECT id, embedding FROM knowledge_nodes")
    done_before = one(dsn, "SELECT rows_done FROM reembed_checkpoint_range")

    with pytest.raises(ConfigError) as refused:
        run(job_settings(dsn, batch_size=16), embedder=HashEmbedder(256))
    message = str(refused.value)
    assert "view knowledge_view" in message and f"index {HNSW} dropped" in message and "re-run" in message
    assert one(dsn, "SELECT rows_done FROM reembed_checkpoint_range") == done_before  # nothing more written
    said = job_status(job_settings(dsn)).as_dict()
    assert f"index {HNSW} dropped" in said["table_state"] and "without its dimension" in said["table_state"]

    execute(dsn, "DROP VIEW knowledge_view")
    emb = HashEmbedder(256)
    final = run(job_settings(dsn, batch_size=16), embedder=emb)
    assert final.state == "done" and indexes(dsn)[HNSW]["valid"] and column_type(dsn) == "vector(256)"
    assert job_status(job_settings(dsn)).as_dict()["table_state"] is None
    assert_every_row_holds_its_new_vector(dsn, emb)


class _Loud(HashEmbedder):
    """Vectors past float16's range for texts that mention 'note 7:' (a model that does not normalise)."""

    def forward(self, texts: list[str]) -> np.ndarray:
        out = super().forward(texts)
        for i, text in enumerate(texts):
            if text.startswith("note 7:"):
                out[i] *= 1e6
        return out


def test_a_vector_beyond_halfvecs_range_fails_its_row_not_the_batch(dsn: str) -> None:
    make_table(dsn, rows=40, with_index=False)
    execute(dsn, "ALTER TABLE knowledge_nodes ALTER COLUMN embedding TYPE halfvec(64)")
    emb = _Loud(256)
    report = run(job_settings(dsn, batch_size=16, accept_failed=True), embedder=emb)
    assert report.state == "done" and report.rows_failed == 1
    (failed,) = fetch(dsn, "SELECT k.content, f.error FROM reembed_failed_rows f"
                           " JOIN knowledge_nodes k ON k.id::text = f.row_id")
    assert failed["content"].startswith("note 7:") and "halfvec's range" in failed["error"]
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 256") == 39
    assert column_type(dsn) == "halfvec(256)"
