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
