"""The bridge (issue 29): the application moves to the new model on day one and search stays good while
the re-embed runs. Two real, different embedding spaces, offline: all-MiniLM-L6-v2 (384-d, unit
vectors) and model2vec's distillation of it (64-d static token vectors, not normalised)."""

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
from pgvector.psycopg import register_vector
from psycopg.conninfo import make_conninfo

from reembed import bridge, db
from reembed.bridging import bridge_command
from reembed.cli import main
from reembed.embedder import SentenceTransformerEmbedder, fingerprint
from reembed.errors import ConfigError
from reembed.fitting import BridgeRefused
from reembed.gate import make_query
from reembed.job import plan, run
from reembed.rollback import cleanup, rollback
from reembed.settings import BridgeOptions, ModelSpec, RollbackOptions, Settings, Target
from reembed.signals import StopSignal
from reembed.status import status
from reembed.target import inspect_target
from support import catalog
from support.application import BridgeApp
from support.database import fetch, make_table, one, snapshot
from support.fakes import HashEmbedder
from support.fakes import job_settings as settings
from support.models import assert_rows_hold_the_models_vectors, distilled_minilm
from support.processes import events, run_cli, spawn, wait_exit, wait_for
from support.scripts import corpus

pytestmark = pytest.mark.model

DOCS = [d for d in corpus.docstrings(limit=2000, seed=21, low=120) if len(d.split()) >= 16][:700]
VIEW = "CREATE VIEW recent_nodes AS SELECT id, content, embedding FROM knowledge_nodes WHERE touched = 7"


@pytest.fixture(scope="session")
def distilled_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return distilled_minilm(tmp_path_factory.mktemp("models"), dims=64)


@pytest.fixture(scope="session")
def distilled(distilled_path: Path) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(ModelSpec(model=str(distilled_path), device="cpu"))


@pytest.fixture(scope="session")
def encoded(minilm: Any, distilled: Any) -> dict[str, np.ndarray]:
    """DOCS encoded once by each model."""
    return {"minilm": np.asarray(minilm.encode(DOCS), dtype=np.float32),
            "distilled": np.asarray(distilled.encode(DOCS), dtype=np.float32)}


def old_table(dsn: str, model: Path, vectors: np.ndarray, *, column_type: str = "vector", rows: int | None = None,
              view: bool = False) -> ModelSpec:
    """knowledge_nodes holding DOCS embedded by `model` (its HNSW cosine index), the registry naming it."""
    n = rows or len(DOCS)
    dim = vectors.shape[1]
    make_table(dsn, rows=n, old_dim=dim, id_type="bigint", content=lambda i: DOCS[i], with_index=False)
    spec = ModelSpec(model=str(model), device="cpu")
    name, model_hash = fingerprint(spec)
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        keys = [r[0] for r in conn.execute("SELECT id FROM knowledge_nodes ORDER BY id").fetchall()]
        with conn.cursor() as cur:  # make_table's key i is 3i + 1: in key order, DOCS in order
            cur.executemany("UPDATE knowledge_nodes SET embedding = %s WHERE id = %s",
                            [(vectors[i], k) for i, k in enumerate(keys)])
        if column_type == "halfvec":
            conn.execute(f"ALTER TABLE knowledge_nodes ALTER COLUMN embedding TYPE halfvec({dim})")
        conn.execute(f"CREATE INDEX idx_knowledge_nodes_embedding_hnsw ON knowledge_nodes"
                     f" USING hnsw (embedding {column_type}_cosine_ops)")
        conn.execute("UPDATE embedding_model SET model_name = %s, dimension = %s, model_hash = %s",
                     (name, dim, model_hash))
        conn.execute("CREATE SEQUENCE app_keys START 10000000")
        if view:
            conn.execute(VIEW)
        conn.execute("ANALYZE knowledge_nodes")
    return spec


def queries(n: int, seed: int = 3, *, rows: int = len(DOCS)) -> list[tuple[int, str]]:
    """(key, query) for `n` of the first `rows` rows: one of the row's sentences, as the gate makes them."""
    rng = random.Random(seed)
    made = [(3 * i + 1, q) for i in rng.sample(range(rows), rows) if (q := make_query(DOCS[i], rng))]
    return made[:n]


def found(dsn: str, asked: list[tuple[int, str]], model: Any, *, bridged: bool,
          function: str = "reembed_query") -> float:
    """Success@10 through the column's index: how often a query's row is among its ten nearest."""
    vectors = np.asarray(model.encode([q for _, q in asked]), dtype=np.float32)
    target = f"(SELECT {function}(%s))" if bridged else "%s"
    hits = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        for (key, _), v in zip(asked, vectors, strict=True):
            rows = conn.execute(f"SELECT id FROM knowledge_nodes ORDER BY embedding <=> {target} LIMIT 10", (v,))
            hits += any(k == key for (k,) in rows.fetchall())
    return hits / len(asked)


def the_map(dsn: str, function: str = "reembed_query") -> tuple[np.ndarray, np.ndarray, bool]:
    """The current bridge's map as stored: (weight new x old, bias, normalize)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        bridge_id, normalize = conn.execute("SELECT bridge_id, normalize FROM reembed_bridge WHERE function_name = %s"
                                            " AND state IN ('mapping', 'identity')", (function,)).fetchone()
        rows = conn.execute("SELECT w, b FROM reembed_bridge_map WHERE bridge_id = %s ORDER BY i",
                            (bridge_id,)).fetchall()
    return np.stack([w.to_numpy() for w, _ in rows], axis=1), np.array([b for _, b in rows]), normalize


def through_sql(dsn: str, vectors: np.ndarray, function: str = "reembed_query") -> np.ndarray:
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        return np.stack([conn.execute(f"SELECT {function}(%s)", (v,)).fetchone()[0].to_numpy() for v in vectors])


def definition(dsn: str, function: str = "reembed_query") -> str:
    return str(one(dsn, f"SELECT pg_get_functiondef('{function}(vector)'::regprocedure)"))


def bridge_entries(dsn: str, function: str) -> list[catalog.Entry]:
    """The dump's entries of the bridge's function (its definition, its comment)."""
    return [e for e in catalog.entries(catalog.dump(dsn))
            if e.name.startswith((f"{function}(", f"FUNCTION {function}("))]


def assert_same_dump(before: str, after: str) -> None:
    """`pg_dump --schema-only` the same, entry by entry, reembed's own included."""
    gone, new = catalog.difference(catalog.Snapshot(tuple(catalog.entries(before))),
                                   catalog.Snapshot(tuple(catalog.entries(after))))
    assert not gone and not new, "\n".join([*(f"- {e}" for e in gone), *(f"+ {e}" for e in new)])


def assert_maps(dsn: str, model: Any, function: str = "reembed_query") -> None:
    """The SQL function computes the stored map: q @ W + b (unit length when the old vectors are)."""
    weight, bias, normalize = the_map(dsn, function)
    vectors = np.asarray(model.encode([q for _, q in queries(5, seed=9)]), dtype=np.float32)
    want = vectors.astype(np.float64) @ weight + bias
    if normalize:
        want /= np.linalg.norm(want, axis=1, keepdims=True)
    got = through_sql(dsn, vectors, function)
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=1e-4), np.abs(got - want).max()


# ---------------------------------------------------------------- reembed bridge, alone


@pytest.mark.timeout(1800)  # the real CLI loads MiniLM and encodes the sample on two shared cores
def test_reembed_bridge_installs_a_function_that_finds_the_rows_with_new_model_queries_on_the_old_vectors(
    dsn: str, minilm_path: Path, minilm: Any, distilled_path: Path, distilled: Any, encoded: dict[str, Any],
    workdir: Path
) -> None:
    """The column holds the distilled model's 64-d vectors; the application's new model is MiniLM (384-d)."""
    old_table(dsn, distilled_path, encoded["distilled"], rows=500)
    before = catalog.snapshot(dsn)
    asked = queries(200, rows=500)
    old_own = found(dsn, asked, distilled, bridged=False)
    done = run_cli(["bridge", "--dsn", dsn, "--model", str(minilm_path), "--sample", "500", "--json",
                    "--log-format", "json"], cwd=workdir, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    figures = report["bridge"]
    assert report["state"] == "installed" and report["function"] == '"public"."reembed_query"(vector)', report
    assert figures["old_dimension"] == 64 and figures["new_dimension"] == 384 and not figures["normalize"]
    assert figures["held_out"] == 100 and figures["train"] == 400
    bridged = found(dsn, asked, minilm, bridged=True)
    print(f"\n[bridge MiniLM -> distilled-64] success@10 on {len(asked)} queries through the index: old model "
          f"{old_own:.3f}, bridged {bridged:.3f} ({bridged / old_own:.0%}); held-out: {json.dumps(figures)}")
    assert bridged >= 0.75 * old_own, (bridged, old_own)
    assert figures["recall_vs_old"] > figures["old_vs_new"]  # nearer the old model's neighbours than MiniLM is
    assert_maps(dsn, minilm)
    # the catalog: exactly the function (and its comment) more; reembed's own tables apart
    catalog.assert_unchanged(before, catalog.snapshot(dsn))
    assert sorted(e.type for e in bridge_entries(dsn, "reembed_query")) == ["COMMENT", "FUNCTION"]
    assert "SECURITY DEFINER" in definition(dsn) and "array_agg" in definition(dsn)
    shown = run_cli(["status", "--dsn", dsn], cwd=workdir)
    assert 'bridge     "public"."reembed_query"(vector) maps' in shown.stdout, shown.stdout
    again = run_cli(["bridge", "--dsn", dsn, "--drop"], cwd=workdir)
    assert again.returncode == 0 and "dropped" in again.stdout, again.stderr
    assert bridge_entries(dsn, "reembed_query") == []
    catalog.assert_unchanged(before, catalog.snapshot(dsn))


def test_a_bridge_under_the_minimum_recall_is_refused_with_exit_2_and_nothing_written(
    dsn: str, minilm_path: Path, distilled_path: Path, encoded: dict[str, Any], workdir: Path
) -> None:
    old_table(dsn, minilm_path, encoded["minilm"], rows=300)
    before = catalog.dump(dsn)
    done = run_cli(["bridge", "--dsn", dsn, "--model", str(distilled_path), "--sample", "300",
                    "--bridge-min-recall", "0.99"], cwd=workdir)
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("reembed: the bridge was refused: recall@10 against the old model's neighbours ")
    assert "< --bridge-min-recall 0.99" in message and "nothing was written" in message
    assert_same_dump(before, catalog.dump(dsn))  # not even reembed's own tables


def test_the_bridge_is_refused_in_place_and_by_a_job_for_another_model_before_any_write(
    dsn: str, minilm_path: Path, distilled_path: Path, distilled: Any, encoded: dict[str, Any], workdir: Path
) -> None:
    old_table(dsn, minilm_path, encoded["minilm"], rows=300)
    refused = run_cli(["run", "--dsn", dsn, "--model", str(distilled_path), "--bridge", "--no-confirm"], cwd=workdir)
    assert refused.returncode == 2 and "--bridge needs --strategy shadow" in refused.stderr, refused.stderr
    with pytest.raises(ConfigError, match="--bridge needs --strategy shadow"):
        run(settings(dsn, bridge=True), embedder=distilled)
    assert one(dsn, "SELECT to_regclass('reembed_checkpoint') IS NULL")
    bridge_command(Settings(target=Target(dsn=dsn), model=ModelSpec(model=str(distilled_path))),
                   BridgeOptions(sample=300, min_recall=0.0), embedder=distilled)
    before = catalog.dump(dsn)
    with pytest.raises(ConfigError, match="in place, the column holds both models' vectors"):
        run(settings(dsn), embedder=distilled)  # in place under a bridge: it would never be the identity
    with pytest.raises(ConfigError, match="maps .* into .*knowledge_nodes.*embedding: the application encodes"):
        run(settings(dsn, strategy="shadow"), embedder=HashEmbedder(48))  # a job for another model
    with pytest.raises(ConfigError, match="holds .*vectors already"):
        bridge_command(Settings(target=Target(dsn=dsn), model=ModelSpec(model=str(minilm_path))), BridgeOptions())
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE FUNCTION taken(v vector) RETURNS vector LANGUAGE sql AS 'SELECT v'")
    with pytest.raises(ConfigError, match="exists and is not a bridge of reembed's"):
        bridge_command(Settings(target=Target(dsn=dsn), model=ModelSpec(model=str(distilled_path))),
                       BridgeOptions(function="taken"), embedder=distilled)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP FUNCTION taken(vector)")
    assert_same_dump(before, catalog.dump(dsn))
    assert one(dsn, "SELECT count(*) FROM reembed_checkpoint") == 0
    nothing = run_cli(["bridge", "--dsn", dsn, "--drop", "--bridge-function", "other"], cwd=workdir)
    assert nothing.returncode == 2 and "has no bridge of that name" in nothing.stderr, nothing.stderr


# ------------------------------------------------ run --bridge: the job's bridge, swap, rollback, cleanup


def test_run_bridge_fits_from_the_jobs_rows_the_swap_makes_it_the_identity_and_rollback_maps_again(
    dsn: str, minilm_path: Path, minilm: Any, distilled_path: Path, distilled: Any, encoded: dict[str, Any]
) -> None:
    """The column holds MiniLM's 384-d unit vectors; the new model is the distilled one (64-d): a
    dimension decrease, the map's output made unit length."""
    old = old_table(dsn, minilm_path, encoded["minilm"], view=True)
    opts = {"strategy": "shadow", "bridge": True, "bridge_sample": 500, "old_model": old, "gate_min_recall": 0.0,
            "gate_max_regression": 1.0, "bridge_function": "search_bridge"}
    preview = plan(settings(dsn, **opts), embedder=distilled).details["bridge_preview"]
    assert preview["recall_vs_old"] > 0 and preview["queries"] > 0, preview
    assert one(dsn, "SELECT to_regclass('reembed_checkpoint') IS NULL")  # the plan wrote nothing
    before = catalog.snapshot(dsn, dims=(384, 64), any_column_order=True)
    report = run(settings(dsn, **opts), embedder=distilled)
    assert report.state == "done", report
    gate = report.details["gate"]
    print(f"\n[gate, distilled-64 replacing MiniLM] recall@10 new {gate['recall_new']:.3f}, old "
          f"{gate['recall_old']:.3f}, bridged {gate['recall_bridge']:.3f} on {gate['queries']} queries")
    assert {"recall_new", "recall_old", "recall_bridge"} <= gate.keys() and gate["bridge"].endswith("(vector)")
    bridges = fetch(dsn, "SELECT * FROM reembed_bridge")
    assert [(b["state"], b["job_id"], b["normalize"]) for b in bridges] == [("identity", 1, True)], bridges
    figures = bridges[0]["figures"]
    assert figures["old_dimension"] == 384 and figures["new_dimension"] == 64 and figures["train"] == 400
    v = np.asarray(distilled.encode(["a connection pool"]), dtype=np.float32)
    assert np.allclose(through_sql(dsn, v, "search_bridge"), v, atol=1e-6)  # the identity
    assert definition(dsn, "search_bridge").rstrip().endswith("SELECT q\n$function$")
    after = catalog.snapshot(dsn, dims=(384, 64), ignore=("embedding_previous",
                                                           "idx_knowledge_nodes_embedding_hnsw_previous"),
                             any_column_order=True)
    catalog.assert_unchanged(before, after, allowed=["search_bridge"])
    assert [e.type for e in bridge_entries(dsn, "search_bridge")] == ["FUNCTION", "COMMENT"]

    back = rollback(Settings(target=Target(dsn=dsn), model=old), RollbackOptions())
    assert back.state == "rolled_back", back
    assert one(dsn, "SELECT state FROM reembed_bridge") == "mapping"
    assert "array_agg" in definition(dsn, "search_bridge") and "l2_normalize" in definition(dsn, "search_bridge")
    assert_maps(dsn, distilled, "search_bridge")
    assert np.allclose(np.linalg.norm(through_sql(dsn, v, "search_bridge"), axis=1), 1.0, atol=1e-5)
    catalog.assert_unchanged(before, catalog.snapshot(dsn, dims=(384, 64), any_column_order=True),
                             allowed=["search_bridge"])

    again = run(settings(dsn, **opts), embedder=distilled)  # a second job keeps the bridge it finds
    assert again.state == "done", again
    assert [(b["bridge_id"], b["state"]) for b in fetch(dsn, "SELECT * FROM reembed_bridge")] == [(1, "identity")]
    cleaned = cleanup(Settings(target=Target(dsn=dsn)))
    assert cleaned.state == "cleaned", cleaned
    assert one(dsn, "SELECT state FROM reembed_bridge") == "identity"  # kept: applications keep calling it
    assert one(dsn, "SELECT count(*) FROM reembed_bridge_map") == 0
    assert np.allclose(through_sql(dsn, v, "search_bridge"), v, atol=1e-6)
    line = [x for x in status(Settings(target=Target(dsn=dsn))).text().splitlines() if x.startswith("bridge")]
    assert line and "is the identity" in line[0], line


def test_a_bridge_installed_with_reembed_bridge_is_kept_by_the_job_and_made_the_identity_at_its_swap(
    dsn: str, minilm_path: Path, distilled_path: Path, distilled: Any, encoded: dict[str, Any]
) -> None:
    old_table(dsn, minilm_path, encoded["minilm"], rows=400)
    bridge_command(Settings(target=Target(dsn=dsn), model=ModelSpec(model=str(distilled_path))),
                   BridgeOptions(sample=400, min_recall=0.0), embedder=distilled)
    report = run(settings(dsn, strategy="shadow", gate_min_recall=0.0), embedder=distilled)  # no --bridge
    assert report.state == "done", report
    assert [(b["state"], b["job_id"]) for b in fetch(dsn, "SELECT * FROM reembed_bridge")] == [("identity", None)]
    assert "recall_bridge" in report.details["gate"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_workers_install_the_jobs_bridge_once_while_the_backfill_runs(
    dsn: str, minilm_path: Path, distilled_path: Path, encoded: dict[str, Any], workdir: Path
) -> None:
    old_table(dsn, minilm_path, encoded["minilm"])
    total = len(DOCS)
    log = workdir / "run.log"
    args = ["run", "--dsn", dsn, "--model", str(distilled_path), "--strategy", "shadow", "--bridge",
            "--bridge-sample", "100", "--workers", "2", "--ranges", "4", "--batch-size", "25", "--window-rows", "25",
            "--max-rate", "8", "--gate-min-recall", "0", "--no-confirm", "--log-format", "json", "--json"]
    proc = spawn(args, cwd=workdir, log=log)
    try:
        wait_for(lambda: proc.poll() is not None or one(dsn, "SELECT count(*) FROM pg_tables WHERE tablename ="
                                                             " 'reembed_bridge'") and one(
                     dsn, "SELECT count(*) FROM reembed_bridge WHERE state = 'mapping'"),
                 timeout=300, what="the bridge installed")
        done_then = one(dsn, "SELECT sum(rows_done) FROM reembed_checkpoint_range")
        assert proc.poll() is None and done_then < total, (done_then, log.read_text()[-3000:])
    finally:
        assert wait_exit(proc, timeout=600) == 0, log.read_text()[-3000:]
    installed = events(log, "bridge_installed")
    assert len(installed) == 1, installed  # two workers watched; one fitted and installed it
    assert [b["state"] for b in fetch(dsn, "SELECT state FROM reembed_bridge")] == ["identity"]
    print(f"\n[workers] bridge installed with {done_then} of {total} rows committed: {installed[0]}")


def test_a_resumed_job_keeps_the_bridge_it_installed(dsn: str, minilm_path: Path, encoded: dict[str, Any]) -> None:
    """Stopped (a time window) once its bridge is installed; the next run neither fits nor replaces it."""
    old_table(dsn, minilm_path, encoded["minilm"], rows=400)
    stop = StopSignal()
    emb = HashEmbedder(48)
    original = emb.forward

    def forward(texts: list[str]) -> np.ndarray:  # past the sample, wait for the bridge, then end the window
        if threading.current_thread().name == "reembed-bridge":  # the bridge's fragments: not the backfill
            return original(texts)
        if emb.texts_seen >= 200 and not stop.requested:
            wait_for(lambda: one(dsn, "SELECT count(*) FROM pg_tables WHERE tablename = 'reembed_bridge'")
                     and one(dsn, "SELECT count(*) FROM reembed_bridge"), timeout=120, what="the bridge")
            stop.request("time_budget")
        return original(texts)

    emb.forward = forward  # type: ignore[method-assign]
    opts = {"strategy": "shadow", "bridge": True, "bridge_sample": 100, "bridge_min_recall": 0.0,
            "gate_min_recall": 0.0, "batch_size": 20, "window_rows": 20}
    first = run(settings(dsn, **opts), embedder=emb, stop=stop)
    assert first.state == "time_budget", first
    installed = fetch(dsn, "SELECT bridge_id, state, updated_at FROM reembed_bridge")
    assert [(b["bridge_id"], b["state"]) for b in installed] == [(1, "mapping")]
    assert status(Settings(target=Target(dsn=dsn))).data["bridges"][0]["state"] == "mapping"
    second = run(settings(dsn, **opts), embedder=HashEmbedder(48))
    assert second.state == "done" and second.resumed_from is not None, second
    assert [(b["bridge_id"], b["state"]) for b in fetch(dsn, "SELECT * FROM reembed_bridge")] == [(1, "identity")]


def test_a_rollback_under_a_bridge_into_the_new_models_space_is_refused_before_any_write(
    dsn: str, minilm_path: Path, encoded: dict[str, Any]
) -> None:
    """After the swap the column holds the job's model; a bridge installed then (`reembed bridge` for a
    third model) maps into that space. Swapped back, the column would hold the old model's vectors and
    the bridge would map into a space it no longer holds (different vector dimensions 384 and 48)."""
    old_table(dsn, minilm_path, encoded["minilm"], rows=300)
    assert run(settings(dsn, strategy="shadow", gate_min_recall=0.0), embedder=HashEmbedder(48)).state == "done"
    bridge_command(Settings(target=Target(dsn=dsn), model=ModelSpec(model="unused")),
                   BridgeOptions(sample=300, min_recall=0.0, function="other_query"),
                   embedder=HashEmbedder(16, name="third"))
    before = snapshot(dsn)
    with pytest.raises(ConfigError, match="the bridge .*other_query.* maps third's vectors into test-hash-48's "
                                          "space.*nothing was written") as caught:
        rollback(Settings(target=Target(dsn=dsn)), RollbackOptions())
    assert caught.value.exit_code == 2
    assert snapshot(dsn) == before
    bridge_command(Settings(target=Target(dsn=dsn)), BridgeOptions(drop=True, function="other_query"))
    assert rollback(Settings(target=Target(dsn=dsn)), RollbackOptions()).state == "rolled_back"
    assert one(dsn, "SELECT vector_dims(embedding) FROM knowledge_nodes LIMIT 1") == 384


def test_a_repeatable_read_search_older_than_a_re_fit_maps_with_its_map_and_one_older_than_the_bridge_fails(
    dsn: str, minilm_path: Path, encoded: dict[str, Any]
) -> None:
    """The function's body is read from the catalog as it is now, its map rows with the caller's
    snapshot: a repeatable-read transaction that began before a re-fit found none of the new map's
    rows and ranked by NULL (arbitrary rows, no error). It maps with the map it began under; one that
    began before the first install fails instead of ranking by NULL."""
    old_table(dsn, minilm_path, encoded["minilm"], rows=300)
    model = Settings(target=Target(dsn=dsn), model=ModelSpec(model="unused"))
    v = HashEmbedder(48).encode(["a connection pool"])[0]
    with psycopg.connect(dsn) as early:
        register_vector(early)
        early.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        early.execute("SELECT count(*) FROM knowledge_nodes").fetchone()  # its snapshot: before any bridge
        bridge_command(model, BridgeOptions(sample=300, min_recall=0.0), embedder=HashEmbedder(48))
        first = through_sql(dsn, np.array([v]))[0]
        with psycopg.connect(dsn) as reader:
            register_vector(reader)
            reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            reader.execute("SELECT count(*) FROM knowledge_nodes").fetchone()  # its snapshot: the first map
            bridge_command(model, BridgeOptions(sample=200, min_recall=0.0), embedder=HashEmbedder(48))  # re-fit
            second = through_sql(dsn, np.array([v]))[0]
            assert not np.allclose(first, second, atol=1e-4)
            mapped = reader.execute("SELECT reembed_query(%s)", (v,)).fetchone()[0]
            assert mapped is not None and np.allclose(mapped.to_numpy(), first, atol=1e-5)
            near = reader.execute("SELECT id FROM knowledge_nodes ORDER BY embedding <=> (SELECT reembed_query(%s)) "
                                  "LIMIT 5", (v,)).fetchall()
            assert near == fetch_ids(dsn, first)
        with pytest.raises(psycopg.errors.DataException, match="at least 1 dimension"):
            early.execute("SELECT reembed_query(%s)", (v,)).fetchone()
    assert [b["state"] for b in fetch(dsn, "SELECT state FROM reembed_bridge ORDER BY bridge_id")] == [
        "replaced", "mapping"]


def fetch_ids(dsn: str, vector: np.ndarray) -> list[tuple[int]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        return conn.execute("SELECT id FROM knowledge_nodes ORDER BY embedding <=> %s LIMIT 5",
                            (vector.astype(np.float32),)).fetchall()


def test_a_jobs_bridge_is_fitted_with_no_transaction_open(
    dsn: str, minilm_path: Path, encoded: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fit takes minutes at the default sample (86 s for 10,000 pairs 384 -> 64 on two cores): in a
    transaction it was ended by the session's 60 s idle-in-transaction timeout, and retried the same
    way, after the whole backfill. No transaction of reembed's is open across it."""
    from reembed import fitting

    old_table(dsn, minilm_path, encoded["minilm"], rows=300)
    real_fit = fitting.fit
    seen: list[int] = []

    def fit(*args: Any, **kwargs: Any) -> Any:
        entered = one(dsn, "SELECT clock_timestamp()")
        fitted = real_fit(*args, **kwargs)
        seen.append(one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                             "AND application_name LIKE 'reembed %%' AND xact_start <= %(at)s", {"at": entered}))
        return fitted

    monkeypatch.setattr(fitting, "fit", fit)
    opts = {"strategy": "shadow", "bridge": True, "bridge_sample": 100, "bridge_min_recall": 0.0,
            "gate_min_recall": 0.0, "batch_size": 20}
    report = run(settings(dsn, **opts), embedder=HashEmbedder(48))
    assert report.state == "done", report
    assert seen == [0], seen  # one fit, and no transaction of reembed's open from before it to after it
    assert [b["state"] for b in fetch(dsn, "SELECT state FROM reembed_bridge")] == ["identity"]


def test_a_refused_bridge_stops_the_run_before_anything_is_installed_and_the_job_resumes_without_it(
    dsn: str, minilm_path: Path, encoded: dict[str, Any]
) -> None:
    old_table(dsn, minilm_path, encoded["minilm"], rows=300)
    opts = {"strategy": "shadow", "bridge_sample": 100, "gate_min_recall": 0.0, "batch_size": 20}
    with pytest.raises(BridgeRefused, match="the bridge was refused: recall@10 .* < --bridge-min-recall 0.9") as caught:
        run(settings(dsn, bridge=True, bridge_min_recall=0.9, **opts), embedder=HashEmbedder(48))
    assert caught.value.exit_code == 1
    assert one(dsn, "SELECT state FROM reembed_bridge") == "refused"
    assert one(dsn, "SELECT count(*) FROM pg_proc WHERE proname = 'reembed_query'") == 0
    assert one(dsn, "SELECT model_name FROM embedding_model") == str(minilm_path)  # nothing swapped
    assert "REFUSED" in status(Settings(target=Target(dsn=dsn))).text()
    done = run(settings(dsn, **opts), embedder=HashEmbedder(48))  # the operator goes on without it
    assert done.state == "done" and done.resumed_from is not None, done


# --------------------------------------------------------------------------------- halfvec


def test_a_halfvec_column_is_searched_and_written_through_the_bridge_with_its_index(
    dsn: str, minilm_path: Path, distilled_path: Path, distilled: Any, encoded: dict[str, Any]
) -> None:
    old_table(dsn, minilm_path, encoded["minilm"], column_type="halfvec", rows=400)
    bridge_command(Settings(target=Target(dsn=dsn), model=ModelSpec(model=str(distilled_path))),
                   BridgeOptions(sample=400, min_recall=0.0), embedder=distilled)
    asked = queries(60)
    q = np.asarray(distilled.encode([asked[0][1]])[0], dtype=np.float32)
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("SET enable_seqscan = off")
        shown = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT id FROM knowledge_nodes ORDER BY embedding <=> (SELECT reembed_query(%s)) LIMIT 10",
            (q,)).fetchall())
        conn.execute("INSERT INTO knowledge_nodes (id, content, source, embedding)"
                     " VALUES (-1, 'written through the bridge', 'app', reembed_query(%s))", (q,))
        stored = conn.execute("SELECT embedding::vector FROM knowledge_nodes WHERE id = -1").fetchone()[0].to_numpy()
    assert "Index Scan using idx_knowledge_nodes_embedding_hnsw" in shown, shown
    assert np.allclose(stored, through_sql(dsn, q[None])[0], atol=2e-3)  # halfvec's precision
    assert found(dsn, asked, distilled, bridged=True) > 0.3


# ------------------------------------------- a search application on the bridge protocol throughout


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_an_application_on_the_new_model_alone_searches_through_the_job_its_swap_and_a_rollback(
    dsn: str, minilm_path: Path, minilm: Any, distilled_path: Path, distilled: Any, encoded: dict[str, Any],
    workdir: Path
) -> None:
    """64-d distilled vectors in the column, MiniLM (384-d) in the application from its first query:
    `reembed bridge`, then a shadow job with a dimension change and its swap, then a rollback. No
    query or write fails; recall is measured before (the old model's own), during (bridged), after
    the swap (the identity) and after the rollback (bridged again)."""
    rows = 500
    old = old_table(dsn, distilled_path, encoded["distilled"], rows=rows)
    asked = queries(120, rows=rows)
    before = found(dsn, asked, distilled, bridged=False)
    bridge_command(Settings(target=Target(dsn=dsn), model=ModelSpec(model=str(minilm_path))),
                   BridgeOptions(sample=rows), embedder=minilm)
    installed = time.time()
    app = BridgeApp(dsn, workdir, new_model=minilm_path, rate=8)
    try:
        wait_for(lambda: app.queries() >= 30, timeout=180, what="the application searching through the bridge")
        job = run(settings(dsn, strategy="shadow", old_model=old, gate_min_recall=0.0, gate_max_regression=1.0,
                           batch_size=64), embedder=minilm)
        assert job.state == "done", job
        swapped = one(dsn, "SELECT extract(epoch FROM swapped_at)::float8 FROM reembed_checkpoint")
        # the rows the application wrote through the bridge during the job (old space, in the live column)
        # were captured and re-embedded into the shadow: every row holds MiniLM's vector of its content now
        assert_rows_hold_the_models_vectors(dsn, minilm_path)
        # the counts asserted below are of searches timed after each change (+1 s): wait for those, not for any
        wait_for(lambda: app.searches_since(swapped + 1.0) >= 20, timeout=180, what="searches after the swap")
        back_started = time.time()
        back = rollback(Settings(target=Target(dsn=dsn), model=old), RollbackOptions())
        assert back.state == "rolled_back", back
        back_done = time.time()
        wait_for(lambda: app.searches_since(back_done + 1.0) >= 20, timeout=180, what="searches after the rollback")
    finally:
        stats = app.stop()
    assert stats["errors"] == [] and stats["write_errors"] == [], (stats["errors"][:3], stats["write_errors"][:3])
    searches = stats["searches"]

    def recall(begin: float, end: float) -> tuple[float, int]:
        hits = [h for t, h in searches if begin < t < end]
        return (sum(hits) / len(hits), len(hits)) if hits else (0.0, 0)

    during, n_during = recall(installed, swapped)
    after, n_after = recall(swapped + 1.0, back_started)
    again, n_again = recall(back_done + 1.0, time.time())
    gate = job.details["gate"]
    print(f"\n[application on MiniLM alone] success@10: before (the old model's own) {before:.3f}; during the job "
          f"(bridged) {during:.3f} on {n_during}; after the swap (identity) {after:.3f} on {n_after}; after the "
          f"rollback (bridged) {again:.3f} on {n_again}; the gate: new {gate['recall_new']:.3f}, old "
          f"{gate['recall_old']:.3f}, bridged {gate['recall_bridge']:.3f}; writes {stats['inserts']} inserts, "
          f"{stats['edits']} edits")
    assert n_during >= 30 and n_after >= 20 and n_again >= 20
    assert during >= 0.6 * before and again >= 0.6 * before and after >= 0.6 * before, (before, during, after, again)
    assert stats["inserts"] > 5
    # every row the application did not write holds the old model's vector again; its own rows a 64-d one
    assert_rows_hold_the_models_vectors(dsn, distilled_path, where="source <> 'app'")
    assert one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE source = 'app'"
                    " AND (embedding IS NULL OR vector_dims(embedding) <> 64)") == 0
    assert one(dsn, "SELECT state FROM reembed_bridge") == "mapping"


def test_bridge_usage_errors_exit_2_with_one_line_and_nothing_written(
    dsn: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make_table(dsn, rows=10)
    model = tmp_path / "model"  # a model directory that cannot load: every refusal comes before any encoding
    model.mkdir()
    (model / "config.json").write_text("{}")
    bridge = ["bridge", "--dsn", dsn, "--model", str(model)]
    job = ["run", "--dsn", dsn, "--model", str(model), "--strategy", "shadow", "--bridge", "--no-confirm"]
    system = ("a schema of PostgreSQL's own (pg_catalog, pg_toast*, pg_temp*: a function in pg_temp vanishes with "
              "reembed's session): name it in a schema of the application's (--bridge-function schema.name); "
              "nothing was written")
    nosuch = ('schema "nosuch" does not exist, so the bridge "nosuch"."f"(vector) cannot be installed there: create '
              "the schema, or name the bridge in another (--bridge-function schema.name); nothing was written")
    cases = [
        (["bridge", "--dsn", dsn], "bridge needs the new model: give --model (a local model directory), or --drop"),
        (["bridge", "--dsn", dsn, "--model", "m", "--sample", "0"], "--sample must be a positive integer, got 0"),
        (["bridge", "--dsn", dsn, "--model", "m", "--bridge-min-recall", "1.5"],
         "--bridge-min-recall must be between 0 and 1, got 1.5"),
        (["run", "--dsn", dsn, "--model", "m", "--strategy", "shadow", "--bridge", "--bridge-sample", "0"],
         "--bridge-sample must be a positive integer, got 0"),
        (["plan", "--dsn", dsn, "--model", "m", "--bridge"],
         "--bridge needs --strategy shadow: in place, the column holds both models' vectors until the end, so no "
         "map into it can be right; nothing was written"),
        (["bridge", "--dsn", dsn, "--drop"], 'nothing to drop: "public"."knowledge_nodes".embedding has no bridge of '
                                             "that name"),
        # a function in pg_temp would vanish with reembed's session; PostgreSQL's schemas are not the application's
        ([*bridge, "--bridge-function", "pg_temp.f"],
         f'the bridge "pg_temp"."f"(vector) would be in "pg_temp", {system}'),
        ([*job, "--bridge-function", "pg_temp_3.f"],
         f'the bridge "pg_temp_3"."f"(vector) would be in "pg_temp_3", {system}'),
        ([*job, "--bridge-function", "pg_toast.f"],
         f'the bridge "pg_toast"."f"(vector) would be in "pg_toast", {system}'),
        ([*bridge, "--bridge-function", "pg_catalog.f"],
         f'the bridge "pg_catalog"."f"(vector) would be in "pg_catalog", {system}'),
        # a schema that does not exist: found before the sample is encoded, and before a job's first write
        ([*bridge, "--bridge-function", "nosuch.f"], nosuch),
        ([*job, "--bridge-function", "nosuch.f"], nosuch),
        (["bridge", "--dsn", dsn, "--drop", "--bridge-function", "a.b.c"],
         "cannot read function name 'a.b.c': write it as function or schema.function"),
        ([*job, "--bridge-function", "a.b.c"],
         "cannot read function name 'a.b.c': write it as function or schema.function"),
    ]
    for argv, said in cases:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err == f"reembed: {said}\n", argv
    assert one(dsn, "SELECT to_regclass('reembed_checkpoint') IS NULL")
    assert one(dsn, "SELECT to_regclass('reembed_bridge') IS NULL")
    assert one(dsn, "SELECT count(*) FROM pg_proc WHERE proname = 'f'") == 0


def hash_bridge(dsn: str, *, rows: int, emb: HashEmbedder | None = None) -> None:
    """`reembed bridge` with the test embedder (48-d) on make_table's table."""
    bridge_command(Settings(target=Target(dsn=dsn), model=ModelSpec(model="unused")),
                   BridgeOptions(sample=rows, min_recall=0.0), embedder=emb or HashEmbedder(48))


def test_bridge_drop_is_refused_while_objects_depend_on_the_function_naming_them_and_nothing_changes(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_table(dsn, rows=60, old_dim=32, id_type="bigint")
    hash_bridge(dsn, rows=60)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE VIEW bridged AS SELECT id, reembed_query(embedding) AS q FROM knowledge_nodes")
        conn.execute("CREATE FUNCTION search_near(q vector) RETURNS SETOF bigint LANGUAGE sql BEGIN ATOMIC"
                     " SELECT id FROM knowledge_nodes ORDER BY embedding <=> reembed_query(q) LIMIT 10; END")
    before, rows = catalog.dump(dsn), one(dsn, "SELECT count(*) FROM reembed_bridge_map")
    capsys.readouterr()
    assert main(["bridge", "--dsn", dsn, "--drop"]) == 2
    assert capsys.readouterr().err == (
        'reembed: function search_near(vector); view bridged depend on "public"."reembed_query"(vector): dropping '
        "it would break them (or drop them with it); change or drop them first, then drop the bridge; nothing was "
        "dropped\n")
    assert_same_dump(before, catalog.dump(dsn))
    assert one(dsn, "SELECT state FROM reembed_bridge") == "mapping"
    assert one(dsn, "SELECT count(*) FROM reembed_bridge_map") == rows > 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP FUNCTION search_near(vector)")
    assert main(["bridge", "--dsn", dsn, "--drop"]) == 2
    assert capsys.readouterr().err.startswith('reembed: view bridged depends on "public"."reembed_query"(vector): ')
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP VIEW bridged")
    assert main(["bridge", "--dsn", dsn, "--drop"]) == 0
    assert one(dsn, "SELECT state FROM reembed_bridge") == "dropped"
    assert one(dsn, "SELECT count(*) FROM pg_proc WHERE proname = 'reembed_query'") == 0


def _role(conn: psycopg.Connection[Any], name: str, login: str) -> None:
    conn.execute(f"DO $$ BEGIN CREATE ROLE {name} {login}; EXCEPTION WHEN duplicate_object THEN NULL; END $$")


@pytest.fixture
def table_owner(pg_server: Any, dsn: str) -> str:
    """make_table's table owned by a login role that is not a superuser (a superuser has every role's
    rights) and may create in public, as a job's role is; its DSN. reembed_bridge_other: another role."""
    with pg_server.admin() as conn:
        _role(conn, "reembed_bridger", "LOGIN")
        _role(conn, "reembed_bridge_other", "NOLOGIN")
    make_table(dsn, rows=60, old_dim=32)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("GRANT CREATE ON SCHEMA public TO reembed_bridger")
        conn.execute("ALTER TABLE knowledge_nodes OWNER TO reembed_bridger")
        conn.execute("ALTER TABLE embedding_model OWNER TO reembed_bridger")
    return make_conninfo(dsn, user="reembed_bridger")


def test_a_bridge_schema_the_role_may_not_create_in_is_refused_before_any_encoding_or_write(
    dsn: str, table_owner: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app")
        conn.execute("GRANT USAGE ON SCHEMA app TO reembed_bridger")
    said = ('role "reembed_bridger" may not create functions in schema "app" (no CREATE on it), so the bridge '
            '"app"."f"(vector) cannot be installed there: GRANT CREATE ON SCHEMA "app" TO "reembed_bridger", or '
            "name the bridge in another schema (--bridge-function schema.name); nothing was written")
    before = snapshot(dsn)
    emb = HashEmbedder(48)
    with pytest.raises(ConfigError) as refused:
        bridge_command(Settings(target=Target(dsn=table_owner), model=ModelSpec(model="unused")),
                       BridgeOptions(sample=60, min_recall=0.0, function="app.f"), embedder=emb)
    assert str(refused.value) == said and refused.value.exit_code == 2
    with pytest.raises(ConfigError) as refused:
        run(settings(table_owner, strategy="shadow", bridge=True, bridge_function="app.f"), embedder=emb)
    assert str(refused.value) == said
    assert emb.texts_seen == 0  # nothing encoded
    assert snapshot(dsn) == before
    assert one(dsn, "SELECT to_regclass('reembed_checkpoint') IS NULL AND to_regclass('reembed_bridge') IS NULL")
    assert one(dsn, "SELECT count(*) FROM pg_proc WHERE proname = 'f'") == 0


def test_a_bridge_owned_by_another_role_is_refused_before_any_write_with_the_way_forward(
    dsn: str, table_owner: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The job's swap, rollback's swap back, cleanup, a re-fit and --drop all redefine or drop the
    function: refused up front when the role reembed runs as has not its owner's rights."""
    hash_bridge(table_owner, rows=60)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER FUNCTION reembed_query(vector) OWNER TO reembed_bridge_other")
    said = ('the bridge "public"."reembed_query"(vector) is owned by role "reembed_bridge_other", and '
            '"reembed_bridger", the role reembed runs as, has not its rights: the swap, rollback\'s swap back and a '
            "re-fit redefine it, cleanup comments it and --drop drops it, which only its owner may; run `ALTER "
            'FUNCTION "public"."reembed_query"("public"."vector") OWNER TO "reembed_bridger"`, or run reembed as '
            '"reembed_bridge_other"; nothing was written')
    before, function = snapshot(dsn), definition(dsn)
    capsys.readouterr()
    assert main(["bridge", "--dsn", table_owner, "--drop"]) == 2
    assert capsys.readouterr().err == f"reembed: {said}\n"
    emb = HashEmbedder(48)
    with pytest.raises(ConfigError) as refused:  # the job for the bridge's model: its swap would fail
        run(settings(table_owner, strategy="shadow", gate_min_recall=0.0), embedder=emb)
    assert str(refused.value) == said and refused.value.exit_code == 2
    with pytest.raises(ConfigError) as refused:  # a re-fit for it
        hash_bridge(table_owner, rows=60, emb=emb)
    assert str(refused.value) == said and emb.texts_seen == 0
    assert snapshot(dsn) == before and definition(dsn) == function
    assert one(dsn, "SELECT count(*) FROM reembed_checkpoint") == 0
    assert [b["state"] for b in fetch(dsn, "SELECT state FROM reembed_bridge")] == ["mapping"]
    # what rollback and cleanup call: the same refusal; a superuser has every role's rights
    for conninfo, refuses in ((table_owner, True), (dsn, False)):
        with db.connect(conninfo, role="control", vectors=False, autocommit=True) as conn:
            info = inspect_target(conn, Target(dsn=conninfo))
            if refuses:
                with pytest.raises(ConfigError) as refused:
                    bridge.check_owners(conn, info)
                assert str(refused.value) == said
            else:
                bridge.check_owners(conn, info)
    # owned by the job's role but no CREATE on its schema: CREATE OR REPLACE would fail at the swap
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER FUNCTION reembed_query(vector) OWNER TO reembed_bridger")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM reembed_bridger")
    with pytest.raises(ConfigError, match='role "reembed_bridger" may not create functions in schema "public"'):
        run(settings(table_owner, strategy="shadow", gate_min_recall=0.0), embedder=emb)
    with db.connect(table_owner, role="control", vectors=False, autocommit=True) as conn:
        info = inspect_target(conn, Target(dsn=table_owner))
        with pytest.raises(ConfigError, match=r"the swap, rollback's swap back and a re-fit redefine the bridge "
                                              r'"public"."reembed_query"\(vector\) there'):
            bridge.check_owners(conn, info)
        bridge.check_owners(conn, info, create=False)  # cleanup and --drop need only the owner's rights
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("GRANT CREATE ON SCHEMA public TO reembed_bridger")
    report = run(settings(table_owner, strategy="shadow", gate_min_recall=0.0), embedder=emb)  # the way forward
    assert report.state == "done", report
    assert [b["state"] for b in fetch(dsn, "SELECT state FROM reembed_bridge")] == ["identity"]
    # after the swap, the function handed away again: rollback and cleanup refuse before any write
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER FUNCTION reembed_query(vector) OWNER TO reembed_bridge_other")
    before, function = snapshot(dsn), definition(dsn)
    for undo in (lambda: rollback(Settings(target=Target(dsn=table_owner)), RollbackOptions()),
                 lambda: cleanup(Settings(target=Target(dsn=table_owner)))):
        with pytest.raises(ConfigError, match='is owned by role "reembed_bridge_other"') as refused:
            undo()
        assert refused.value.exit_code == 2
        assert snapshot(dsn) == before and definition(dsn) == function


def test_a_bridge_fitted_for_a_content_expression_is_the_bridge_of_a_job_reading_the_same_text(
    dsn: str, static_model_dir: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`reembed bridge --content EXPR` records the model as a job with that --content records it (the
    text read is in the model's hash): the job keeps it and makes it the identity at its swap (the
    bridge's hash left the text out, and the job was refused as one for another model)."""
    old, new = static_model_dir(48), static_model_dir(32)
    make_table(dsn, rows=120, old_dim=48)
    base = ["--dsn", dsn, "--device", "cpu", "--log-level", "warning"]
    assert main(["run", *base, "--model", str(old), "--no-confirm", "--tokenizer-workers", "0"]) == 0
    text = ["--content", "content || ' (a note)'"]
    assert main(["bridge", *base, "--model", str(new), *text, "--sample", "120", "--bridge-min-recall", "0"]) == 0
    assert main(["run", *base, "--model", str(new), *text, "--strategy", "shadow", "--gate-min-recall", "0",
                 "--no-confirm", "--tokenizer-workers", "0"]) == 0, capsys.readouterr().err
    assert [b["state"] for b in fetch(dsn, "SELECT state FROM reembed_bridge")] == ["identity"]
    assert one(dsn, "SELECT target_hash FROM reembed_bridge") == one(dsn, "SELECT model_hash FROM embedding_model")


def test_the_library_exports_the_bridge() -> None:
    import reembed

    assert "fit_bridge" in reembed.__all__ and reembed.fit_bridge is bridge_command
    assert "BridgeOptions" in reembed.__all__ and replace(BridgeOptions(), sample=5).sample == 5
