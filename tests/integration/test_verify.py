"""`reembed verify`: the stored vectors checked against a fresh encoding by the registry's model,
through the real CLI (exit codes, --json), on a real PostgreSQL with a real sentence-transformers
model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgvector.psycopg import register_vector

from reembed.cli import main
from reembed.job import run
from reembed.signals import StopSignal
from support.database import job_rows_done, make_table, one, snapshot
from support.fakes import HashEmbedder, hash_vector, job_settings
from support.processes import wait_for


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _verify_json(capsys: pytest.CaptureFixture[str], dsn: str, model: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = _cli(capsys, "verify", "--dsn", dsn, "--model", str(model), "--device", "cpu", "--json",
                        "--log-level", "warning", *extra)
    return code, json.loads(out)


def _embed(capsys: pytest.CaptureFixture[str], dsn: str, model: Path) -> None:
    code, _, err = _cli(capsys, "run", "--dsn", dsn, "--model", str(model), "--device", "cpu", "--no-confirm",
                        "--tokenizer-workers", "0", "--log-level", "warning")
    assert code == 0, err


@pytest.fixture
def embedded(dsn: str, static_model_dir: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> tuple[str, Path]:
    """The design's table (120 rows, every 10th without content) re-embedded by reembed with a real model."""
    model = static_model_dir(48)
    make_table(dsn, rows=120, old_dim=64, null_every=10)
    _embed(capsys, dsn, model)
    return dsn, model


def test_verify_a_table_reembedded_by_reembed_agrees_and_exits_0(
    embedded: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, model = embedded
    before = snapshot(dsn)
    code, data = _verify_json(capsys, dsn, model, "--all")
    assert code == 0, data
    assert data["rows_checked"] == 120
    assert data["counts"]["agree"] == 108 and data["counts"]["null_content"] == 12
    assert sum(data["counts"][k] for k in ("disagree", "null_vector", "wrong_dimension", "not_finite", "zero",
                                           "vector_without_content")) == 0
    assert data["cosine"]["min"] > 0.9999
    assert data["left_behind"] == [] and data["active_job"] is None
    code, out, _ = _cli(capsys, "verify", "--dsn", dsn, "--model", str(model), "--device", "cpu", "--sample", "50",
                        "--log-level", "warning")
    assert code == 0
    assert "(sample, seed 0)" in out and out.rstrip().endswith("OK: every stored vector checked is the registry's "
                                                                "model's")
    assert snapshot(dsn) == before  # verify writes nothing


def test_the_same_seed_draws_the_same_rows(embedded: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    dsn, model = embedded
    with psycopg.connect(dsn, autocommit=True) as conn:  # every sampled row made wrong: the sample is named
        conn.execute("UPDATE knowledge_nodes SET embedding = NULL WHERE content IS NOT NULL")
    first = _verify_json(capsys, dsn, model, "--sample", "30", "--seed", "5")[1]["wrong"]["null_vector"]
    again = _verify_json(capsys, dsn, model, "--sample", "30", "--seed", "5")[1]["wrong"]["null_vector"]
    other = _verify_json(capsys, dsn, model, "--sample", "30", "--seed", "6")[1]["wrong"]["null_vector"]
    assert 10 <= len(first) <= 30 and first == again and first != other


def test_rows_an_application_wrote_with_the_old_model_after_the_cut_over_are_named_and_exit_1(
    embedded: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, model = embedded
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        keys = [r[0] for r in conn.execute("SELECT id::text FROM knowledge_nodes WHERE content IS NOT NULL "
                                           "ORDER BY id LIMIT 3 OFFSET 40").fetchall()]
        for i, key in enumerate(keys):  # an application still on the old model: new text, old model's vector
            text = f"an edit made by an application that missed the change {i}"
            conn.execute("UPDATE knowledge_nodes SET content = %s, embedding = %s WHERE id = %s::uuid",
                         (text, hash_vector(f"old:{text}", 48), key))
        conn.execute("UPDATE knowledge_nodes SET embedding = NULL WHERE id = "
                     "(SELECT id FROM knowledge_nodes WHERE content IS NOT NULL ORDER BY id DESC LIMIT 1)")
    code, data = _verify_json(capsys, dsn, model, "--all")
    assert code == 1
    assert sorted(data["wrong"]["disagree"]) == sorted(keys)
    assert data["counts"]["disagree"] == 3 and data["counts"]["null_vector"] == 1
    assert data["counts"]["agree"] == 104
    code, out, _ = _cli(capsys, "verify", "--dsn", dsn, "--model", str(model), "--device", "cpu", "--all",
                        "--log-level", "warning")
    assert code == 1
    assert all(key in out for key in keys) and "NOT OK" in out


def test_verify_on_a_half_done_job_says_so_and_exits_1(
    embedded: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, model = embedded
    stop = StopSignal()
    emb = HashEmbedder(48)
    encode = emb.forward

    def forward(texts: list[str]) -> Any:  # the third batch asks to stop once a batch is committed
        if emb.calls + 1 == 3:             # (a stop drops what was encoded but not yet written)
            wait_for(lambda: job_rows_done(dsn) > 0, timeout=60, what="a batch committed")
            stop.request("SIGINT")
        return encode(texts)

    emb.forward = forward  # type: ignore[method-assign]
    report = run(job_settings(dsn, batch_size=16, window_rows=16), embedder=emb, stop=stop)
    assert report.state == "stopped"
    done = one(dsn, "SELECT rows_done FROM reembed_checkpoint_range r JOIN reembed_checkpoint USING (job_id) "
                    "WHERE state = 'embedding'")
    assert done > 0
    code, data = _verify_json(capsys, dsn, model, "--all")
    assert code == 1
    assert data["active_job"]["state"] == "embedding" and data["active_job"]["target"] == "test-hash-48"
    assert data["counts"]["disagree"] == done  # the rows the job rewrote: another model's vectors
    assert data["counts"]["agree"] == 108 - done
    code, out, _ = _cli(capsys, "verify", "--dsn", dsn, "--model", str(model), "--device", "cpu", "--all",
                        "--log-level", "warning")
    assert code == 1 and "is embedding with test-hash-48" in out


def test_a_capture_left_behind_is_reported(embedded: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    dsn, model = embedded
    job_id = one(dsn, "SELECT max(job_id) FROM reembed_checkpoint")
    with psycopg.connect(dsn, autocommit=True) as conn:  # what a job killed mid-cleanup by hand would leave
        conn.execute("INSERT INTO reembed_changes (job_id, row_id) VALUES (%s, 'x'), (%s, 'y')", (job_id, job_id))
        conn.execute("CREATE FUNCTION stray() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'")
        conn.execute(f"CREATE TRIGGER reembed_capture_{job_id}_ins AFTER INSERT ON knowledge_nodes "
                     "FOR EACH ROW EXECUTE FUNCTION stray()")
    code, data = _verify_json(capsys, dsn, model, "--sample", "20")
    assert code == 1
    assert data["counts"]["disagree"] == 0
    said = " | ".join(data["left_behind"])
    assert f"reembed_capture_{job_id}_ins" in said and f"2 captured keys of job {job_id}" in said


def test_verify_refuses_a_model_that_is_not_the_registrys(
    embedded: tuple[str, Path], static_model_dir: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, _ = embedded
    code, out, err = _cli(capsys, "verify", "--dsn", dsn, "--model", str(static_model_dir(32)), "--device", "cpu")
    assert code == 2 and out == ""
    assert err.startswith("reembed: --model ") and "is not the registry's model" in err and err.count("\n") == 1


def test_verify_a_halfvec_column(dsn: str, static_model_dir: Callable[..., Path],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    model = static_model_dir(48)
    make_table(dsn, rows=60, old_dim=48, with_index=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE knowledge_nodes ALTER COLUMN embedding TYPE halfvec(48)")
    _embed(capsys, dsn, model)
    code, data = _verify_json(capsys, dsn, model, "--all")
    assert code == 0 and data["column_type"] == "halfvec" and data["counts"]["agree"] == 60
    assert data["cosine"]["min"] > 0.999  # halfvec keeps ~3 significant digits
    with psycopg.connect(dsn, autocommit=True) as conn:  # one row's vector replaced by another row's
        conn.execute("UPDATE knowledge_nodes SET embedding = (SELECT embedding FROM knowledge_nodes ORDER BY id "
                     "LIMIT 1) WHERE id = (SELECT id FROM knowledge_nodes ORDER BY id DESC LIMIT 1)")
    code, data = _verify_json(capsys, dsn, model, "--all")
    assert code == 1 and data["counts"]["disagree"] == 1


def test_verify_takes_the_model_name_the_run_was_given_and_checks_it_against_the_registry(
    dsn: str, static_model_dir: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model = static_model_dir(48)
    make_table(dsn, rows=40, old_dim=64)
    code, _, err = _cli(capsys, "run", "--dsn", dsn, "--model", str(model), "--model-name", "acme/static-48",
                        "--device", "cpu", "--no-confirm", "--tokenizer-workers", "0", "--log-level", "warning")
    assert code == 0, err
    code, data = _verify_json(capsys, dsn, model, "--model-name", "acme/static-48")  # the run's own command line
    assert code == 0 and data["counts"]["agree"] == 40, data
    code, out, err = _cli(capsys, "verify", "--dsn", dsn, "--model", str(model), "--model-name", "acme/other",
                          "--device", "cpu")
    assert code == 2 and out == ""
    assert err.startswith("reembed: --model-name acme/other is not the registry's model name acme/static-48")
    assert len(err.strip().splitlines()) == 1
