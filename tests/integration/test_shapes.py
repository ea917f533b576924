"""The tables applications really have (issue 28): content built by a trigger or a generated column
from other columns, NOT NULL on the vector column, and the rest of the shapes, each through a job with
an application writing where capture matters, and the catalog oracle."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import psycopg
import pytest

from reembed.job import run
from support import catalog
from support.database import REGISTRY_DDL, fetch
from support.fakes import HashEmbedder, hash_vector, job_settings
from support.processes import Background

BUILT_BY_TRIGGER = """
CREATE TABLE knowledge_nodes (id bigint PRIMARY KEY, title text NOT NULL, body text, content text,
                              embedding vector(32));
CREATE FUNCTION build_content() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.content := NEW.title || E'\\n' || coalesce(NEW.body, ''); RETURN NEW; END $$;
CREATE TRIGGER knowledge_build BEFORE INSERT OR UPDATE ON knowledge_nodes
    FOR EACH ROW EXECUTE FUNCTION build_content();
"""
GENERATED = """
CREATE TABLE knowledge_nodes (id bigint PRIMARY KEY, title text NOT NULL, body text,
                              content text GENERATED ALWAYS AS (title || E'\\n' || coalesce(body, '')) STORED,
                              embedding vector(32));
"""


def _table(dsn: str, ddl: str, rows: int = 40) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ddl)
        conn.execute(REGISTRY_DDL)
        conn.execute("INSERT INTO embedding_model (id, model_name, dimension, model_hash) VALUES (1, 'old', 32, 'h')")
        conn.execute("INSERT INTO knowledge_nodes (id, title, body) SELECT i, 'title ' || i, 'body of ' || i"
                     " FROM generate_series(1, %s) i", (rows,))


class _Held:
    def __init__(self) -> None:
        self.reached, self.opened = threading.Event(), threading.Event()


def _held_at_call(emb: HashEmbedder, call: int) -> _Held:
    held, original = _Held(), emb.forward

    def forward(texts: list[str]) -> np.ndarray:
        if emb.calls + 1 == call:
            held.reached.set()
            held.opened.wait(60)
        return original(texts)

    emb.forward = forward  # type: ignore[method-assign]
    return held


def _stale(dsn: str, dim: int) -> list[str]:
    rows = fetch(dsn, "SELECT content, embedding::text AS e FROM knowledge_nodes")
    return [r["content"] for r in rows
            if r["e"] is None or not np.allclose(np.array(json.loads(r["e"])), hash_vector(r["content"], dim),
                                                 atol=1e-6)]


@pytest.mark.parametrize("shape", ["built by a trigger", "a generated column"])
@pytest.mark.parametrize("strategy", ["in_place", "shadow"])
def test_content_changed_by_an_edit_of_another_column_is_captured_and_caught_up(
    dsn: str, shape: str, strategy: str
) -> None:
    """The application edits the title of rows the job has already written; the content (built from
    it) changes without the UPDATE naming it. Capture compares values: every row ends fresh."""
    _table(dsn, BUILT_BY_TRIGGER if shape == "built by a trigger" else GENERATED)
    before = catalog.snapshot(dsn, dims=(32, 48), any_column_order=strategy == "shadow")
    emb = HashEmbedder(48)
    second = _held_at_call(emb, 2)  # the first batch (ids 1-10) is committed; the second waits
    job = Background(lambda: run(job_settings(dsn, batch_size=10, pipeline=False, strategy=strategy,
                                              gate_min_recall=0.0), embedder=emb))
    assert second.reached.wait(60), job.error
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute("UPDATE knowledge_nodes SET title = 'retitled ' || id WHERE id <= 10")
        app.execute("UPDATE knowledge_nodes SET body = NULL WHERE id = 3")
    second.opened.set()
    job.join(timeout=120)
    assert job.error is None and job.result.state == "done", job.error
    assert _stale(dsn, 48) == []
    ignore = ("embedding_previous",) if strategy == "shadow" else ()
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(32, 48), ignore=ignore,
                                                      any_column_order=strategy == "shadow"))


def test_an_update_that_changes_nothing_the_job_reads_is_not_captured(dsn: str) -> None:
    _table(dsn, BUILT_BY_TRIGGER)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE knowledge_nodes ADD COLUMN views int NOT NULL DEFAULT 0")
    emb = HashEmbedder(48)
    second = _held_at_call(emb, 2)
    job = Background(lambda: run(job_settings(dsn, batch_size=10, pipeline=False), embedder=emb))
    assert second.reached.wait(60), job.error
    try:
        with psycopg.connect(dsn, autocommit=True) as app:
            app.execute("UPDATE knowledge_nodes SET views = views + 1")  # the content is rebuilt, unchanged
            captured: Any = app.execute("SELECT count(*) FROM reembed_changes").fetchone()
    finally:
        second.opened.set()
        job.join(timeout=120)
    assert captured[0] == 0
    assert job.error is None and job.result.state == "done", job.error


# ------------------------------------------------------------------ NOT NULL on the vector column

NOT_NULL = """
CREATE TABLE knowledge_nodes (id bigint PRIMARY KEY, content text, embedding vector(32) NOT NULL);
CREATE INDEX knowledge_hnsw ON knowledge_nodes USING hnsw (embedding vector_cosine_ops);
"""


def _not_null_table(dsn: str, *, rows: int = 40, null_text: int = 0) -> None:
    from pgvector.psycopg import register_vector

    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        conn.execute(NOT_NULL)
        conn.execute(REGISTRY_DDL)
        conn.execute("INSERT INTO embedding_model (id, model_name, dimension, model_hash) VALUES (1, 'old', 32, 'h')")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO knowledge_nodes VALUES (%s, %s, %s)",
                            [(i, None if i <= null_text else f"text {i}", hash_vector(f"old {i}", 32))
                             for i in range(1, rows + 1)])


def _settings(dsn: str, **opts: Any) -> Any:
    from dataclasses import replace

    null_content = opts.pop("null_content", "null")
    made = job_settings(dsn, gate_min_recall=0.0, **opts)
    return replace(made, target=replace(made.target, null_content=null_content))


@pytest.mark.parametrize("strategy", ["in_place", "shadow"])
def test_not_null_on_the_vector_column_is_kept_through_a_job_a_swap_and_a_rollback(dsn: str, strategy: str) -> None:
    from reembed.rollback import rollback
    from reembed.settings import RollbackOptions, Settings, Target

    _not_null_table(dsn)
    shadow = strategy == "shadow"
    original = catalog.snapshot(dsn)
    before = catalog.snapshot(dsn, dims=(32, 48), any_column_order=shadow)
    report = run(_settings(dsn, strategy=strategy), embedder=HashEmbedder(48))
    assert report.state == "done", report
    ignore = ("embedding_previous", "knowledge_hnsw_previous") if shadow else ()
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(32, 48), ignore=ignore, any_column_order=shadow))
    assert fetch(dsn, "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'knowledge_nodes'::regclass"
                      " AND attname = 'embedding'") == [{"attnotnull": True}]
    with psycopg.connect(dsn, autocommit=True) as app, pytest.raises(psycopg.errors.NotNullViolation):
        app.execute("INSERT INTO knowledge_nodes (id, content) VALUES (1000, 'no vector')")
    if shadow:
        assert rollback(Settings(target=Target(dsn=dsn)), RollbackOptions()).state == "rolled_back"
        catalog.assert_unchanged(original, catalog.snapshot(dsn))


def test_rows_without_text_in_a_not_null_column_are_refused_by_count_or_encoded_as_the_empty_text(
    dsn: str,
) -> None:
    from reembed.errors import ConfigError
    from support.database import snapshot

    _not_null_table(dsn, null_text=3)
    before = snapshot(dsn)
    with pytest.raises(ConfigError) as refused:
        run(_settings(dsn), embedder=HashEmbedder(48))
    assert "3 rows" in str(refused.value) and "--null-content empty" in str(refused.value)
    assert "nothing was written" in str(refused.value)
    assert snapshot(dsn) == before
    report = run(_settings(dsn, null_content="empty"), embedder=HashEmbedder(48))
    assert report.state == "done", report
    rows = fetch(dsn, "SELECT id, content, embedding::text AS e FROM knowledge_nodes ORDER BY id")
    for row in rows:
        want = hash_vector(row["content"] if row["content"] is not None else "", 48)
        assert np.allclose(np.array(json.loads(row["e"])), want, atol=1e-6), row["id"]


def test_a_row_without_text_written_mid_job_in_a_not_null_column_fails_and_cannot_be_accepted(dsn: str) -> None:
    from reembed.failures import RowsFailed

    _not_null_table(dsn)
    emb = HashEmbedder(48)
    second = _held_at_call(emb, 2)
    job = Background(lambda: run(_settings(dsn, batch_size=10, pipeline=False), embedder=emb))
    assert second.reached.wait(60), job.error
    with psycopg.connect(dsn, autocommit=True) as app:  # an application row with a vector but no text
        app.execute("INSERT INTO knowledge_nodes VALUES (500, NULL, %s)", (json.dumps([0.5] * 32),))
    second.opened.set()
    job.join(timeout=120)
    assert isinstance(job.error, RowsFailed), job.error
    with pytest.raises(RowsFailed, match="NOT NULL"):
        run(_settings(dsn, accept_failed=True), embedder=HashEmbedder(48))
    assert fetch(dsn, "SELECT row_id, error FROM reembed_failed_rows")[0]["row_id"] == "500"
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute("UPDATE knowledge_nodes SET content = 'now it has text' WHERE id = 500")
    report = run(_settings(dsn, retry_failed=True), embedder=HashEmbedder(48))
    assert report.state == "done", report
    assert _stale(dsn, 48) == []


# ------------------------------------------------------------------ text from an expression

FROM_COLUMNS = """
CREATE TABLE knowledge_nodes (id bigint PRIMARY KEY, title text NOT NULL, body text, doc jsonb, views int DEFAULT 0,
                              embedding vector(32));
"""


def _expression_settings(dsn: str, expression: str, **opts: Any) -> Any:
    from dataclasses import replace

    made = job_settings(dsn, gate_min_recall=0.0, **opts)
    return replace(made, target=replace(made.target, content=expression))


def _expected(row: dict[str, Any]) -> str:
    return row["title"] + "\n" + (row["body"] or "")


@pytest.mark.parametrize("strategy", ["in_place", "shadow"])
def test_text_made_by_an_expression_is_encoded_captured_by_the_columns_it_reads_and_recorded(
    dsn: str, strategy: str
) -> None:
    _table(dsn, FROM_COLUMNS)
    expression = "title || E'\\n' || coalesce(body, '')"
    emb = HashEmbedder(48)
    second = _held_at_call(emb, 2)
    job = Background(lambda: run(_expression_settings(dsn, expression, batch_size=10, pipeline=False,
                                                      strategy=strategy), embedder=emb))
    assert second.reached.wait(60), job.error
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute("UPDATE knowledge_nodes SET body = 'rewritten ' || id WHERE id <= 5")  # read by the text
        app.execute("UPDATE knowledge_nodes SET views = views + 1 WHERE id > 5")  # not read by it
        captured = app.execute("SELECT count(DISTINCT row_id) FROM reembed_changes").fetchone()
    second.opened.set()
    job.join(timeout=120)
    assert job.error is None and job.result.state == "done", job.error
    assert captured is not None and captured[0] == 5
    rows = fetch(dsn, "SELECT title, body, embedding::text AS e FROM knowledge_nodes")
    stale = [r["title"] for r in rows if not np.allclose(np.array(json.loads(r["e"])), hash_vector(_expected(r), 48),
                                                         atol=1e-6)]
    assert stale == []
    assert fetch(dsn, "SELECT content_expr FROM reembed_checkpoint") == [{"content_expr": expression}]


def test_a_json_field_is_text_enough(dsn: str) -> None:
    _table(dsn, FROM_COLUMNS)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE knowledge_nodes SET doc = jsonb_build_object('text', 'doc of ' || id)")
    assert run(_expression_settings(dsn, "doc->>'text'"), embedder=HashEmbedder(48)).state == "done"
    rows = fetch(dsn, "SELECT doc->>'text' AS t, embedding::text AS e FROM knowledge_nodes")
    assert all(np.allclose(np.array(json.loads(r["e"])), hash_vector(r["t"], 48), atol=1e-6) for r in rows)


@pytest.mark.parametrize(("expression", "said"), [
    ("title || nosuchcolumn", "is not an expression over a row"),
    ("title; DROP TABLE knowledge_nodes", "is not an expression over a row"),
    ("knowledge_nodes::text", "reads the whole row of"),
    ("embedding::text", "reads the vector column"),
    ("'the same for every row'", "or none of its columns"),
])
def test_an_expression_that_is_not_a_rows_text_is_refused_before_any_write(dsn: str, expression: str,
                                                                            said: str) -> None:
    from reembed.errors import ConfigError
    from support.database import snapshot

    _table(dsn, FROM_COLUMNS)
    before = snapshot(dsn)
    with pytest.raises(ConfigError, match=said):
        run(_expression_settings(dsn, expression), embedder=HashEmbedder(48))
    assert snapshot(dsn) == before
    assert fetch(dsn, "SELECT to_regclass('knowledge_nodes') IS NOT NULL AS there") == [{"there": True}]


def test_the_text_a_model_reads_is_in_its_hash(model48: Any) -> None:
    from reembed.embedder import fingerprint
    from reembed.settings import ModelSpec, Target

    spec = ModelSpec(model=str(model48))
    plain = fingerprint(spec.for_target(Target()))
    assert plain == fingerprint(spec)  # a plain column's hash is what it always was
    assert fingerprint(spec.for_target(Target(content="title || body")))[1] != plain[1]
    assert fingerprint(spec.for_target(Target(null_content="empty")))[1] != plain[1]


def test_plan_says_what_the_text_is_made_of_and_what_not_null_keeps(dsn: str) -> None:
    from reembed.job import plan

    _table(dsn, FROM_COLUMNS)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE knowledge_nodes SET embedding = array_fill(0.5::real, ARRAY[32])::vector")
        conn.execute("ALTER TABLE knowledge_nodes ALTER COLUMN embedding SET NOT NULL")
    report = plan(_expression_settings(dsn, "title || ' ' || coalesce(body, '')"), embedder=HashEmbedder(48))
    assert report.details["text"]["reads"] == ["title", "body"] and report.details["not_null"] is True
    assert "capture compares title, body" in report.message and "is NOT NULL: kept" in report.message


# ------------------------------------------------------------------ several tables under one registry


def test_a_table_that_shares_the_registry_but_is_not_in_the_job_is_named_and_refused_unless_told(
    dsn: str,
) -> None:
    from reembed.errors import ConfigError
    from support.database import make_table, snapshot

    make_table(dsn, rows=30, old_dim=32)
    with psycopg.connect(dsn, autocommit=True) as conn:  # chunks of the same documents, the same model
        conn.execute("CREATE TABLE chunks (id bigint PRIMARY KEY, body text, chunk_embedding vector(32))")
    before = snapshot(dsn)
    with pytest.raises(ConfigError) as refused:
        run(job_settings(dsn), embedder=HashEmbedder(48))
    message = str(refused.value)
    assert "public.chunks.chunk_embedding" in message and "--allow-shared-registry" in message, message
    assert "nothing was written" in message
    assert snapshot(dsn) == before
    report = run(job_settings(dsn, allow_shared_registry=True), embedder=HashEmbedder(48))
    assert report.state == "done", report


# ------------------------------------------------------------------ composite primary keys

COMPOSITE = """
CREATE TABLE knowledge_nodes (tenant_id int, id bigint, content text, embedding vector(32),
                              PRIMARY KEY (tenant_id, id));
CREATE INDEX knowledge_hnsw ON knowledge_nodes USING hnsw (embedding vector_cosine_ops);
"""


def _composite_table(dsn: str, rows: int = 120) -> None:
    from pgvector.psycopg import register_vector

    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        conn.execute(COMPOSITE)
        conn.execute(REGISTRY_DDL)
        conn.execute("INSERT INTO embedding_model (id, model_name, dimension, model_hash) VALUES (1, 'old', 32, 'h')")
        with conn.cursor() as cur:  # three tenants, ids interleaved: key order is (tenant, id)
            cur.executemany("INSERT INTO knowledge_nodes VALUES (%s, %s, %s, %s)",
                            [(i % 3, i, f"text {i}", hash_vector(f"old {i}", 32)) for i in range(rows)])


@pytest.mark.parametrize("strategy", ["in_place", "shadow"])
def test_a_composite_primary_key_is_walked_in_ranges_captured_and_caught_up(dsn: str, strategy: str) -> None:
    _composite_table(dsn)
    shadow = strategy == "shadow"
    before = catalog.snapshot(dsn, dims=(32, 48), any_column_order=shadow)
    emb = HashEmbedder(48)
    second = _held_at_call(emb, 2)
    job = Background(lambda: run(job_settings(dsn, batch_size=10, pipeline=False, ranges=4, strategy=strategy,
                                              gate_min_recall=0.0), embedder=emb))
    assert second.reached.wait(60), job.error
    done = fetch(dsn, "SELECT last_id FROM reembed_checkpoint_range WHERE last_id IS NOT NULL")
    assert done and json.loads(done[0]["last_id"]), done  # the cursor: the key's columns, as text
    with psycopg.connect(dsn, autocommit=True) as app:  # rows already written, and an insert
        app.execute("UPDATE knowledge_nodes SET content = 'edited ' || id WHERE (tenant_id, id) IN "
                    "(SELECT tenant_id, id FROM knowledge_nodes ORDER BY tenant_id, id LIMIT 5)")
        app.execute("INSERT INTO knowledge_nodes (tenant_id, id, content, embedding) VALUES (7, 1, 'new tenant',"
                    " array_fill(0.1::real, ARRAY[32])::vector)")
    second.opened.set()
    job.join(timeout=120)
    assert job.error is None and job.result.state == "done", job.error
    assert _stale(dsn, 48) == []
    ranges = fetch(dsn, "SELECT lower_id, upper_id FROM reembed_checkpoint_range ORDER BY range_no")
    assert len(ranges) == 4 and ranges[0]["lower_id"] is None and ranges[-1]["upper_id"] is None
    bounds = [json.loads(r["upper_id"]) for r in ranges[:-1]]
    assert bounds == sorted(bounds, key=lambda k: (int(k[0]), int(k[1]))), bounds  # in key order
    ignore = ("embedding_previous", "knowledge_hnsw_previous") if shadow else ()
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(32, 48), ignore=ignore, any_column_order=shadow))


def test_a_composite_key_table_is_verified_and_resumed_by_the_cli(dsn: str, model48: Any, workdir: Any) -> None:
    from support.processes import cli_run_args, run_cli

    _composite_table(dsn, rows=300)
    first = run_cli(cli_run_args(dsn, model48, "--max-rate", "100", "--max-runtime", "4s", batch=16), cwd=workdir)
    assert first.returncode in (0, 75), first.stderr[-2000:]
    done = run_cli(cli_run_args(dsn, model48, "--workers", "2", "--ranges", "4", batch=16), cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    verified = run_cli(["verify", "--dsn", dsn, "--model", str(model48), "--all", "--json"], cwd=workdir)
    assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-2000:]
    assert json.loads(verified.stdout)["counts"]["agree"] == 300
