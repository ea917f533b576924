"""The catalog is sacred (issue 27): a job, a swap, a rollback and a cleanup change exactly what they
exist for, on a production-shaped schema, and `pg_dump --schema-only` before and after is the oracle.
What the application relies on (a soft-delete rule on a view, an INSTEAD OF trigger, a role that may
read only some columns) works the same after each."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import psycopg
import pytest
from pgvector.psycopg import register_vector

from reembed.errors import ConfigError
from reembed.job import plan, run
from reembed.rollback import cleanup, rollback
from reembed.settings import RollbackOptions, Settings, Target
from support import catalog
from support.database import fetch, one
from support.fakes import HashEmbedder, hash_vector, job_settings
from support.production import TABLE, make_production_table

PREVIOUS = ("embedding_previous", "documents_embedding_hnsw_previous")


def settings(dsn: str, **opts: Any) -> Settings:
    opts.setdefault("gate_min_recall", 0.0)
    opts.setdefault("allow_published", True)
    made = job_settings(dsn, **opts)
    return replace(made, target=Target(dsn=dsn, table=TABLE))


def shadow_job(dsn: str, dim: int = 48) -> None:
    report = run(settings(dsn, strategy="shadow"), embedder=HashEmbedder(dim))
    assert report.state == "done", report


def search(dsn: str, role: str, relation: str, dim: int) -> list[int]:
    """The nearest rows to a query vector, as `role` reads them through `relation`."""
    with psycopg.connect(dsn) as conn:
        register_vector(conn)
        conn.execute(f"SET ROLE {role}")
        rows = conn.execute(f"SELECT id FROM {relation} ORDER BY embedding <=> %s LIMIT 5",
                            (hash_vector("query: river mountain", dim),)).fetchall()
        return [r[0] for r in rows]


# ------------------------------------------------------------------ the oracle, each way


def test_an_in_place_dimension_change_leaves_the_catalog_as_it_was_but_the_dimension(dsn: str) -> None:
    make_production_table(dsn, column_bound=False)
    before = catalog.snapshot(dsn, dims=(64, 48))
    report = run(settings(dsn), embedder=HashEmbedder(48))
    assert report.state == "done", report
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48)))
    assert one(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                    " WHERE attrelid = 'app.documents'::regclass AND attname = 'embedding'") == "vector(48)"


def test_a_same_dimension_in_place_job_leaves_the_catalog_exactly_as_it_was(dsn: str) -> None:
    make_production_table(dsn, column_bound=True)
    before = catalog.snapshot(dsn)
    assert run(settings(dsn), embedder=HashEmbedder(64)).state == "done"
    catalog.assert_unchanged(before, catalog.snapshot(dsn))


def test_a_shadow_swap_carries_every_object_grant_and_comment_to_the_new_column(dsn: str) -> None:
    make_production_table(dsn)
    before = catalog.snapshot(dsn, dims=(64, 48), any_column_order=True)
    shadow_job(dsn)
    after = catalog.snapshot(dsn, dims=(64, 48), ignore=PREVIOUS, any_column_order=True)
    catalog.assert_unchanged(before, after)
    assert one(dsn, "SELECT count(*) FROM app.search_hits WHERE vector_dims(embedding) = 48") == \
        one(dsn, "SELECT count(*) FROM app.documents WHERE content IS NOT NULL AND deleted_at IS NULL")


def test_a_rollback_puts_the_catalog_back_exactly_as_it_was_before_the_job(dsn: str) -> None:
    make_production_table(dsn)
    before = catalog.snapshot(dsn)
    shadow_job(dsn)
    report = rollback(Settings(target=Target(dsn=dsn, table=TABLE)), RollbackOptions(leave_stale_null=True))
    assert report.state == "rolled_back", report
    catalog.assert_unchanged(before, catalog.snapshot(dsn))


def test_a_cleanup_leaves_the_catalog_as_it_was_but_the_dimension(dsn: str) -> None:
    make_production_table(dsn)
    before = catalog.snapshot(dsn, dims=(64, 48), any_column_order=True)
    shadow_job(dsn)
    assert cleanup(Settings(target=Target(dsn=dsn, table=TABLE))).state == "cleaned"
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(64, 48), any_column_order=True))


# ------------------------------------------------------------------ what the application relies on


def test_a_soft_delete_rule_on_a_view_still_soft_deletes_after_the_swap_and_after_the_rollback(dsn: str) -> None:
    keys = make_production_table(dsn)
    shadow_job(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM app.live_documents WHERE id = %s", (keys[0],))
    assert one(dsn, "SELECT deleted_at IS NOT NULL FROM app.documents WHERE id = %s", (keys[0],)) is True
    rollback(Settings(target=Target(dsn=dsn, table=TABLE)), RollbackOptions(leave_stale_null=True))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM app.live_documents WHERE id = %s", (keys[1],))
    assert one(dsn, "SELECT deleted_at IS NOT NULL FROM app.documents WHERE id = %s", (keys[1],)) is True
    assert one(dsn, "SELECT count(*) FROM app.documents") == len(keys)


def test_an_instead_of_trigger_on_a_view_still_takes_inserts_after_the_swap(dsn: str) -> None:
    make_production_table(dsn)
    shadow_job(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("INSERT INTO app.live_documents (tenant_id, content, embedding) VALUES (1, 'new text', %s)",
                     (hash_vector("new text", 48),))
    row = fetch(dsn, "SELECT title, vector_dims(embedding) AS d FROM app.documents WHERE content = 'new text'")
    assert row == [{"title": "untitled", "d": 48}]  # the view's column default, through its trigger


def test_a_role_with_a_column_grant_still_searches_after_the_swap_and_after_the_rollback(dsn: str) -> None:
    make_production_table(dsn)
    before_table = search(dsn, "reembed_search", TABLE, 64)
    before_view = search(dsn, "reembed_search", "app.search_hits", 64)
    assert before_table and before_view
    shadow_job(dsn)
    assert search(dsn, "reembed_search", TABLE, 48)
    assert search(dsn, "reembed_search", "app.search_hits", 48)
    rollback(Settings(target=Target(dsn=dsn, table=TABLE)), RollbackOptions(leave_stale_null=True))
    assert search(dsn, "reembed_search", TABLE, 64) == before_table
    assert search(dsn, "reembed_search", "app.search_hits", 64) == before_view


def test_plan_lists_what_the_swap_carries_and_refuses_what_it_cannot_before_any_write(dsn: str) -> None:
    make_production_table(dsn)
    report = plan(settings(dsn, strategy="shadow"), embedder=HashEmbedder(48))
    said = {d["name"]: d["action"] for d in report.details["dependents"]}
    for name in ("app.live_documents", "app.search_hits", "live_documents_soft_delete on app.live_documents",
                 "live_documents_insert on app.live_documents", "documents_embedding_audit on app.documents",
                 "documents_searchable on app.documents"):
        assert said.get(name) == "recreate", (name, said)
    with psycopg.connect(dsn, autocommit=True) as conn:  # something of a view's row type: cannot be carried
        conn.execute("CREATE FUNCTION app.hits() RETURNS SETOF app.search_hits LANGUAGE sql"
                     " AS 'SELECT * FROM app.search_hits'")
        conn.execute("CREATE MATERIALIZED VIEW app.hit_counts AS SELECT count(*) AS n FROM app.search_hits")
    before = catalog.snapshot(dsn)
    with pytest.raises(ConfigError) as refused:
        run(settings(dsn, strategy="shadow"), embedder=HashEmbedder(48))
    message = str(refused.value)
    assert "function app.hits()" in message and "materialized view app.hit_counts" in message, message
    assert "nothing was written" in message
    catalog.assert_unchanged(before, catalog.snapshot(dsn))


def test_the_oracle_sees_a_rule_that_a_swap_would_lose(dsn: str) -> None:
    """The oracle itself: a rule dropped by hand is a difference it names."""
    make_production_table(dsn)
    before = catalog.snapshot(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP RULE live_documents_soft_delete ON app.live_documents")
    with pytest.raises(AssertionError, match="GONE .*live_documents_soft_delete"):
        catalog.assert_unchanged(before, catalog.snapshot(dsn))


def test_long_index_names_that_differ_only_past_63_bytes_go_through_a_shadow_job(dsn: str) -> None:
    from reembed.shadow import PREVIOUS, name_with
    from support.database import make_table

    make_table(dsn, rows=60, old_dim=32, with_index=False)
    long = "idx_knowledge_nodes_embedding_" + "x" * 30  # 60 bytes: a suffix must cut into it
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE INDEX {long}_cos ON knowledge_nodes USING hnsw (embedding vector_cosine_ops)")
        conn.execute(f"CREATE INDEX {long}_ip ON knowledge_nodes USING hnsw (embedding vector_ip_ops)")
    ignore = ("embedding_previous", name_with(f"{long}_cos", PREVIOUS), name_with(f"{long}_ip", PREVIOUS))
    before = catalog.snapshot(dsn, dims=(32, 48), any_column_order=True)
    report = run(replace(job_settings(dsn, strategy="shadow", gate_min_recall=0.0)), embedder=HashEmbedder(48))
    assert report.state == "done", report
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(32, 48), ignore=ignore, any_column_order=True))


# ------------------------------------------------------------------ what a swap could not carry as it is


def _execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _refused_before_any_write(dsn: str, strategy: str, *fragments: str) -> None:
    before = catalog.snapshot(dsn)
    with pytest.raises(ConfigError) as refused:
        run(settings(dsn, strategy=strategy), embedder=HashEmbedder(48))
    message = str(refused.value)
    assert all(f in message for f in fragments) and "nothing was written" in message, message
    catalog.assert_unchanged(before, catalog.snapshot(dsn))


def test_a_view_grant_made_by_a_role_other_than_its_owner_is_refused_before_any_write(dsn: str) -> None:
    make_production_table(dsn)
    _execute(dsn, "GRANT SELECT ON app.search_hits TO reembed_writer WITH GRANT OPTION",
             "SET ROLE reembed_writer; GRANT SELECT ON app.search_hits TO reembed_search; RESET ROLE")
    _refused_before_any_write(dsn, "shadow", "app.search_hits's grant of SELECT", "made by reembed_writer")


def test_a_cast_of_another_vector_column_in_a_view_keeps_its_dimension(dsn: str) -> None:
    make_production_table(dsn)
    _execute(dsn, "ALTER TABLE app.documents ADD COLUMN title_embedding vector(64)",
             "CREATE VIEW app.both_embeddings AS SELECT id, embedding::halfvec(64) AS e,"
             " title_embedding::halfvec(64) AS t FROM app.documents")
    before = catalog.snapshot(dsn, any_column_order=True)
    report = run(settings(dsn, strategy="shadow", allow_shared_registry=True), embedder=HashEmbedder(48))
    assert report.state == "done", report
    after = catalog.snapshot(dsn, ignore=PREVIOUS, any_column_order=True)
    view = [e for e in after.entries if e.name == "both_embeddings" and e.type == "VIEW"][0]
    assert "(embedding)::public.halfvec(48) AS e" in view.body, view.body
    assert "(title_embedding)::public.halfvec(64) AS t" in view.body, view.body
    assert one(dsn, "SELECT count(*) FROM app.both_embeddings") == one(dsn, "SELECT count(*) FROM app.documents")
    gone, new = catalog.difference(before, after)
    assert {e.name for e in gone} == {e.name for e in new} <= {"both_embeddings", "documents", "live_documents",
                                                                "search_hits"}, (gone, new)


def test_an_instead_rule_on_update_is_refused_and_triggers_that_fire_on_the_jobs_writes_are_said(dsn: str) -> None:
    make_production_table(dsn, column_bound=False)
    said = {d["name"]: d["action"] for d in plan(settings(dsn), embedder=HashEmbedder(48)).details["dependents"]}
    assert said.get("documents_touch on \"app\".\"documents\"") == "fires", said
    _execute(dsn, "CREATE RULE frozen AS ON UPDATE TO app.documents WHERE old.tenant_id = 0 DO INSTEAD NOTHING")
    _refused_before_any_write(dsn, "in_place", "frozen", "DO INSTEAD")


@pytest.mark.parametrize("strategy", ["in_place", "shadow"])
def test_an_application_trigger_conditioned_on_reembed_writer_skips_the_jobs_writes_and_fires_on_the_applications(
        dsn: str, strategy: str) -> None:
    """The runbook's way to keep an audit trigger from logging every row the job writes: a WHEN
    that reads `reembed.writer`, which every session of reembed's that writes carries."""
    make_production_table(dsn, column_bound=strategy == "shadow")
    _execute(dsn, "CREATE TABLE app.change_log (document_id bigint, at timestamptz DEFAULT now())",
             "CREATE FUNCTION app.log_change() RETURNS trigger LANGUAGE plpgsql AS"
             " 'BEGIN INSERT INTO app.change_log (document_id) VALUES (NEW.id); RETURN NULL; END'",
             "CREATE TRIGGER documents_change_log AFTER UPDATE ON app.documents FOR EACH ROW"
             " WHEN (current_setting('reembed.writer', true) IS DISTINCT FROM 'on') EXECUTE FUNCTION app.log_change()")
    said = {d["name"]: d["action"] for d in plan(settings(dsn, strategy=strategy, allow_shared_registry=True),
                                                 embedder=HashEmbedder(48)).details["dependents"]}
    assert said.get('documents_change_log on "app"."documents"') == "skips", said
    assert said.get('documents_touch on "app"."documents"') == "fires", said
    report = run(settings(dsn, strategy=strategy, allow_shared_registry=True), embedder=HashEmbedder(48))
    assert report.state == "done", report
    assert one(dsn, "SELECT count(*) FROM app.documents WHERE embedding IS NOT NULL") > 0
    assert one(dsn, "SELECT count(*) FROM app.change_log") == 0  # none of the job's writes logged
    _execute(dsn, "UPDATE app.documents SET title = title || '!' WHERE id = (SELECT min(id) FROM app.documents)")
    assert one(dsn, "SELECT count(*) FROM app.change_log") == 1  # the application's still is


def test_a_trigger_that_copies_the_row_type_is_refused_before_the_shadow_column_is_added(dsn: str) -> None:
    make_production_table(dsn, column_bound=False)
    _execute(dsn, "CREATE TABLE app.documents_history (LIKE app.documents, changed_at timestamptz DEFAULT now())",
             "CREATE FUNCTION app.keep_history() RETURNS trigger LANGUAGE plpgsql AS"
             " 'BEGIN INSERT INTO app.documents_history SELECT OLD.*; RETURN NEW; END'",
             "CREATE TRIGGER documents_history BEFORE UPDATE ON app.documents FOR EACH ROW"
             " EXECUTE FUNCTION app.keep_history()")
    before = catalog.snapshot(dsn)
    with pytest.raises(ConfigError) as refused:
        run(settings(dsn, strategy="shadow", allow_shared_registry=True), embedder=HashEmbedder(48))
    assert "a write like the job's fails on" in str(refused.value) and "nothing was written" in str(refused.value)
    catalog.assert_unchanged(before, catalog.snapshot(dsn))
    assert one(dsn, "SELECT count(*) FROM app.documents_history") == 0


def test_rollback_refuses_while_an_index_made_on_the_new_column_would_go_with_it(dsn: str) -> None:
    make_production_table(dsn)
    shadow_job(dsn)
    _execute(dsn, "CREATE INDEX documents_embedding_l2 ON app.documents USING hnsw (embedding vector_l2_ops)")
    before = catalog.snapshot(dsn)
    with pytest.raises(ConfigError, match="documents_embedding_l2 created on .* after the swap"):
        rollback(Settings(target=Target(dsn=dsn, table=TABLE)), RollbackOptions(leave_stale_null=True))
    catalog.assert_unchanged(before, catalog.snapshot(dsn))
    _execute(dsn, "DROP INDEX app.documents_embedding_l2")
    assert rollback(Settings(target=Target(dsn=dsn, table=TABLE)),
                    RollbackOptions(leave_stale_null=True)).state == "rolled_back"
