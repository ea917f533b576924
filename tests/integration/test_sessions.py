"""reembed's sessions behave the same whatever the server's, the database's or the role's defaults
(issue 27): READ COMMITTED under a default of repeatable read or serializable, row security off and a
table whose policies would hide rows refused before any write, keys in one text form whatever the
application session's DateStyle, TimeZone or extra_float_digits, and no transaction of reembed's
left idle forever."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from reembed.errors import ConfigError
from reembed.job import run
from support.database import REGISTRY_DDL, fetch, make_table, one, snapshot
from support.fakes import Gate, HashEmbedder, hash_vector, job_settings
from support.processes import Background, wait_for


def execute(dsn: str, *statements: str, params: Any = None) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement, params)


def database_name(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


def cut_over_waiting(dsn: str) -> bool:
    """Is a session of reembed's waiting for a lock on the registry row right now?"""
    return bool(one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'reembed %%'"
                         " AND wait_event_type = 'Lock' AND query ILIKE '%%embedding_model%%FOR UPDATE%%'"))


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_a_write_committed_while_the_cut_over_waits_is_not_lost_under_any_default_isolation(
    dsn: str, isolation: str
) -> None:
    make_table(dsn, rows=40, old_dim=32, with_index=False)
    execute(dsn, f"ALTER DATABASE {database_name(dsn)} SET default_transaction_isolation = '{isolation}'")
    emb = HashEmbedder(32)
    gate = Gate(emb)  # the main pass waits at its first forward: prepare (and the capture) is done
    job = Background(lambda: run(job_settings(dsn, batch_size=40, cut_over_lock_timeout="10s"), embedder=emb))
    assert gate.reached.wait(60), job.error
    app = psycopg.connect(dsn)  # the application's writing transaction, under the database's default
    assert app.execute("SHOW transaction_isolation").fetchone()[0] == isolation
    app.execute("SELECT 1 FROM embedding_model WHERE id = 1 FOR SHARE")  # the runbook's protocol
    app.execute("INSERT INTO knowledge_nodes (id, content, source) VALUES (gen_random_uuid(), 'late text', 'app')")
    gate.open()
    try:
        wait_for(lambda: cut_over_waiting(dsn) or not job.is_alive(), timeout=120,
                 what="the cut-over waiting for the registry row")
        assert job.is_alive(), job.error
        app.commit()  # committed while the cut-over waits: its catch-up must see it
    finally:
        app.close()
    job.join(timeout=120)
    assert job.error is None and job.result.state == "done", job.error
    (row,) = fetch(dsn, "SELECT embedding::text AS e FROM knowledge_nodes WHERE content = 'late text'")
    assert row["e"] is not None, "the row written while the cut-over waited was left without its vector"
    np.testing.assert_allclose(np.array(json.loads(row["e"])), hash_vector("late text", 32), atol=1e-6)


@pytest.fixture
def rls_role(pg_server: Any, dsn: str) -> str:
    """A login role of the test's own, that may create reembed's tables; its DSN."""
    with pg_server.admin() as conn:
        if conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = 'reembed_owner'").fetchone()[0] == 0:
            conn.execute("CREATE ROLE reembed_owner LOGIN")
    execute(dsn, "GRANT CREATE ON SCHEMA public TO reembed_owner")
    return make_conninfo(dsn, user="reembed_owner")


def _owned_table_with_policy(dsn: str) -> None:
    make_table(dsn, rows=40, old_dim=32)
    execute(dsn, "ALTER TABLE knowledge_nodes OWNER TO reembed_owner",
            "ALTER TABLE embedding_model OWNER TO reembed_owner",
            "ALTER TABLE knowledge_nodes ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY only_some ON knowledge_nodes USING (touched = 7 AND source < 'src-3')")


def test_forced_row_security_is_refused_before_any_write_with_the_way_forward(dsn: str, rls_role: str) -> None:
    _owned_table_with_policy(dsn)
    execute(dsn, "ALTER TABLE knowledge_nodes FORCE ROW LEVEL SECURITY")
    before = snapshot(dsn)
    with pytest.raises(ConfigError) as refused:
        run(job_settings(rls_role, batch_size=16), embedder=HashEmbedder(48))
    message = str(refused.value)
    assert "FORCE ROW LEVEL SECURITY" in message and "BYPASSRLS" in message and "nothing was written" in message
    assert snapshot(dsn) == before


def test_row_security_of_a_table_the_role_does_not_own_is_refused_before_any_write(dsn: str, rls_role: str) -> None:
    make_table(dsn, rows=40, old_dim=32)
    execute(dsn, "ALTER TABLE knowledge_nodes ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY only_some ON knowledge_nodes USING (source < 'src-3')",
            "GRANT ALL ON knowledge_nodes, embedding_model TO reembed_owner")
    before = snapshot(dsn)
    with pytest.raises(ConfigError, match="neither owns it nor has BYPASSRLS"):
        run(job_settings(rls_role, batch_size=16), embedder=HashEmbedder(48))
    assert snapshot(dsn) == before


def test_the_owner_of_a_table_with_row_security_re_embeds_every_row(dsn: str, rls_role: str) -> None:
    _owned_table_with_policy(dsn)
    emb = HashEmbedder(48)
    report = run(job_settings(rls_role, batch_size=16), embedder=emb)
    assert report.state == "done" and report.rows_updated == 40, report
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 48") == 40


@pytest.mark.parametrize("key_type", ["timestamptz", "double precision"])
def test_keys_captured_from_an_application_session_of_any_datestyle_or_float_format_are_caught_up(
    dsn: str, key_type: str
) -> None:
    execute(dsn, f"CREATE TABLE knowledge_nodes (id {key_type} PRIMARY KEY, content text, embedding vector(32))",
            REGISTRY_DDL,
            "INSERT INTO embedding_model (id, model_name, dimension, model_hash) VALUES (1, 'old', 32, 'h')")
    key = ("timestamptz '2024-03-05 01:02:03.456789+00' + make_interval(secs => i)" if key_type == "timestamptz"
           else "i / 3.0::float8")
    execute(dsn, f"INSERT INTO knowledge_nodes SELECT {key}, 'text ' || i FROM generate_series(1, 30) i")
    emb = HashEmbedder(32)
    second = _held_at_call(emb, 2)  # the first batch of 10 is committed; the second waits at its forward
    job = Background(lambda: run(job_settings(dsn, batch_size=10, pipeline=False), embedder=emb))
    assert second.reached.wait(60), job.error
    with psycopg.connect(dsn, autocommit=True) as app:  # an application session of other habits
        app.execute("SET DateStyle = 'SQL, DMY'")
        app.execute("SET TimeZone = 'America/New_York'")
        app.execute("SET extra_float_digits = 0")
        # rows the job has written already: only the capture trigger knows they changed
        app.execute("UPDATE knowledge_nodes SET content = 'edited ' || content"
                    " WHERE id IN (SELECT id FROM knowledge_nodes ORDER BY id LIMIT 10)")
    assert one(dsn, "SELECT count(DISTINCT row_id) FROM reembed_changes") == 10
    second.open()
    job.join(timeout=120)
    assert job.error is None and job.result.state == "done", job.error
    rows = fetch(dsn, "SELECT content, embedding::text AS e FROM knowledge_nodes")
    stale = [r["content"] for r in rows
             if r["e"] is None or not np.allclose(np.array(json.loads(r["e"])), hash_vector(r["content"], 32),
                                                  atol=1e-6)]
    assert stale == []


class _Held:
    def __init__(self) -> None:
        self.reached, self._open = threading.Event(), threading.Event()

    def open(self) -> None:
        self._open.set()


def _held_at_call(emb: HashEmbedder, call: int) -> _Held:
    """`emb`'s forward call number `call` waits until open()."""
    held, original = _Held(), emb.forward

    def forward(texts: list[str]) -> np.ndarray:
        if emb.calls + 1 == call:
            held.reached.set()
            held._open.wait(60)
        return original(texts)

    emb.forward = forward  # type: ignore[method-assign]
    return held


def test_every_session_of_reembeds_runs_read_committed_without_row_security_and_times_out_idle(dsn: str) -> None:
    from reembed import db

    execute(dsn, f"ALTER DATABASE {database_name(dsn)} SET default_transaction_isolation = 'serializable'",
            f"ALTER DATABASE {database_name(dsn)} SET idle_in_transaction_session_timeout = 0")
    with db.connect(dsn, role="test", vectors=False) as conn:
        row = conn.execute("SELECT current_setting('transaction_isolation') AS i, current_setting('row_security') AS r,"
                           " current_setting('idle_in_transaction_session_timeout') AS t").fetchone()
    assert row == {"i": "read committed", "r": "off", "t": "1min"}
    execute(dsn, f"ALTER DATABASE {database_name(dsn)} SET statement_timeout = '1s'",
            f"ALTER DATABASE {database_name(dsn)} SET lock_timeout = '1s'")
    with db.connect(dsn, role="test", vectors=False) as conn:
        row = conn.execute("SELECT current_setting('statement_timeout') AS s, current_setting('lock_timeout') AS l"
                           ).fetchone()
    assert row == {"s": "0", "l": "0"}


def test_an_application_trigger_that_writes_a_table_under_row_security_works_on_the_jobs_writes(
    dsn: str, rls_role: str
) -> None:
    """reembed reads with row_security off (a policy would raise, not filter), but its writes fire the
    application's triggers as the application's do: an audit table's policies apply to them."""
    make_table(dsn, rows=40, old_dim=32)
    execute(dsn, "ALTER TABLE knowledge_nodes OWNER TO reembed_owner",  # reembed runs as the table's owner
            "ALTER TABLE embedding_model OWNER TO reembed_owner",
            "CREATE TABLE audit_log (id text, at timestamptz DEFAULT now())",  # someone else's, under RLS
            "ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY audit_insert ON audit_log FOR INSERT WITH CHECK (true)",
            "GRANT INSERT ON audit_log TO PUBLIC",
            "CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS"
            " 'BEGIN INSERT INTO audit_log (id) VALUES (NEW.id::text); RETURN NULL; END'",
            "CREATE TRIGGER knowledge_audit AFTER UPDATE ON knowledge_nodes FOR EACH ROW EXECUTE FUNCTION audit()")
    report = run(job_settings(rls_role, batch_size=16), embedder=HashEmbedder(48))
    assert report.state == "done", report
    assert one(dsn, "SELECT count(*) FROM audit_log") >= 40


def test_a_databases_statement_timeout_does_not_cancel_the_jobs_statements(dsn: str) -> None:
    make_table(dsn, rows=300, old_dim=32)
    execute(dsn, f"ALTER DATABASE {database_name(dsn)} SET statement_timeout = '20ms'")
    report = run(job_settings(dsn, batch_size=300), embedder=HashEmbedder(512))  # an HNSW build of 512-d rows
    assert report.state == "done", report
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET statement_timeout = 0")
        assert conn.execute("SELECT count(*) FROM knowledge_nodes WHERE vector_dims(embedding) = 512"
                            ).fetchone()[0] == 300
