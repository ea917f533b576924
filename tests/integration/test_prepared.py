"""Prepared statements across a job (issue 27): what survives and what does not, as the runbook and
`plan` say. An application's driver prepares a statement after a few executions (psycopg after 5,
pgx and JDBC likewise); PostgreSQL re-plans it after DDL, but refuses, at every later execution, one
whose result's columns changed ("cached plan must not change result type"): a `SELECT *` once a
shadow column is added, and anything that returns the column once its dimension changes. Statements
that name their columns and do not return the vector survive everything; `DEALLOCATE ALL` (psycopg
then forgets its own cache) recovers the others."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from pgvector.psycopg import register_vector

from reembed.job import plan, run
from support.database import make_table
from support.fakes import HashEmbedder, hash_vector, job_settings

STATEMENTS = {
    "star": "SELECT * FROM knowledge_nodes WHERE id = %s",
    "returns the vector": "SELECT id, embedding FROM knowledge_nodes WHERE id = %s",
    "names other columns": "SELECT id, content FROM knowledge_nodes WHERE id = %s",
    "searches": "SELECT id FROM knowledge_nodes ORDER BY embedding <=> %s LIMIT 3",
    "writes": "UPDATE knowledge_nodes SET touched = touched + 1 WHERE id = %s",
}


def _execute(conn: psycopg.Connection[Any], name: str, key: Any, dim: int) -> str:
    arg = hash_vector("a query", dim) if name == "searches" else key
    try:
        conn.execute(STATEMENTS[name], (arg,), prepare=True)
    except psycopg.errors.FeatureNotSupported as exc:
        return f"fails: {str(exc).splitlines()[0]}"
    return "survives"


CASES = {  # (strategy, new dimension): what each prepared statement does after the job
    ("shadow", 48): {"star": "fails", "returns the vector": "fails", "names other columns": "survives",
                     "searches": "survives", "writes": "survives"},
    ("shadow", 32): {"star": "fails", "returns the vector": "survives", "names other columns": "survives",
                     "searches": "survives", "writes": "survives"},
    ("in_place", 48): {"star": "fails", "returns the vector": "fails", "names other columns": "survives",
                       "searches": "survives", "writes": "survives"},
    ("in_place", 32): {"star": "survives", "returns the vector": "survives", "names other columns": "survives",
                       "searches": "survives", "writes": "survives"},
}


@pytest.mark.parametrize(("strategy", "dim"), sorted(CASES), ids=[f"{s}-{d}d" for s, d in sorted(CASES)])
def test_what_prepared_statements_survive_a_job_and_deallocate_all_recovers_the_rest(
    dsn: str, strategy: str, dim: int
) -> None:
    keys = make_table(dsn, rows=60, old_dim=32)
    app = psycopg.connect(dsn, autocommit=True)
    register_vector(app)
    try:
        for name in STATEMENTS:  # prepared on the server before the job starts
            assert _execute(app, name, keys[0], 32) == "survives"
        said = plan(job_settings(dsn, strategy=strategy), embedder=HashEmbedder(dim)).details["strategies"]
        broken = said[strategy]["prepared_statements_broken"]  # plan says what will fail
        assert bool(broken) == any(v == "fails" for v in CASES[(strategy, dim)].values()), broken
        assert ("SELECT *" in " ".join(broken)) == (CASES[(strategy, dim)]["star"] == "fails")
        report = run(job_settings(dsn, strategy=strategy, gate_min_recall=0.0), embedder=HashEmbedder(dim))
        assert report.state == "done", report
        after = {name: _execute(app, name, keys[0], dim) for name in STATEMENTS}
        assert {k: v.split(":")[0] for k, v in after.items()} == CASES[(strategy, dim)], after
        assert all("cached plan must not change result type" in v for v in after.values() if v != "survives")
        app.execute("DEALLOCATE ALL")  # what the application does on that error: prepare them again
        assert {name: _execute(app, name, keys[0], dim) for name in STATEMENTS} == dict.fromkeys(STATEMENTS,
                                                                                                "survives")
    finally:
        app.close()
