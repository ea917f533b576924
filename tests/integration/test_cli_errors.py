"""Bad input: a one-line error that says what to do next, exit 2, and nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from reembed.cli import main
from support.database import make_table, snapshot


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, out: str, err: str, message: str) -> None:
    assert code == 2
    assert out == ""
    assert err == f"reembed: {message}\n"


def test_unknown_model_exits_2_with_one_line_and_writes_nothing(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_table(dsn, rows=5)
    before = snapshot(dsn)
    result = run_main(capsys, "run", "--dsn", dsn, "--model", "no-such/model-anywhere", "--no-confirm")
    assert_refused(*result, "unknown model 'no-such/model-anywhere': not a directory and not in the local "
                   "model cache; give a local model directory (reembed never downloads weights)")
    assert snapshot(dsn) == before


def test_dimension_mismatch_exits_2_before_any_write(
    dsn: str, capsys: pytest.CaptureFixture[str], static_model_dir: Callable[..., Path]
) -> None:
    make_table(dsn, rows=5)
    model = static_model_dir(48)
    before = snapshot(dsn)
    result = run_main(capsys, "run", "--dsn", dsn, "--model", str(model), "--dimension", "768", "--no-confirm")
    assert_refused(*result, f"model {model} produces 48 dimensions but --dimension is 768; "
                   "fix --dimension or pick the model you meant")
    assert snapshot(dsn) == before


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda d: make_table(d, rows=3), ["--table", "nope"],
         "table nope does not exist; check --table and --dsn"),
        (lambda d: make_table(d, rows=3), ["--column", "vec"],
         "column vec does not exist in knowledge_nodes; check --column"),
        (lambda d: make_table(d, rows=3), ["--column", "source"],
         "column source of knowledge_nodes is text, not a pgvector vector or halfvec; check --column"),
        (lambda d: make_table(d, rows=3, registry=False), [],
         "registry table embedding_model does not exist; create it (see README, 'The tables') "
         "or name it with --registry"),
        (lambda d: _keyless(d), [],
         "table knowledge_nodes has no primary key; reembed walks the table in primary-key order and "
         "needs one (of one column or several); add one"),
        (lambda d: make_table(d, rows=3), ["--index", "idx_other"],
         "index idx_other is not an HNSW index on \"public\".\"knowledge_nodes\".embedding; check --index"),
    ],
    ids=["missing-table", "missing-column", "not-a-vector", "missing-registry", "no-key", "missing-index"],
)
def test_bad_target_exits_2_with_one_line_and_writes_nothing(
    dsn: str,
    capsys: pytest.CaptureFixture[str],
    static_model_dir: Callable[..., Path],
    setup: Callable[[str], Any],
    args: list[str],
    message: str,
) -> None:
    setup(dsn)
    before = snapshot(dsn)
    result = run_main(capsys, "run", "--dsn", dsn, "--model", str(static_model_dir(48)), "--no-confirm", *args)
    assert_refused(*result, message)
    assert snapshot(dsn) == before


def _keyless(dsn: str) -> None:
    """The design's table and registry, the table without a primary key (a composite one is walked)."""
    make_table(dsn, rows=3)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE knowledge_nodes DROP CONSTRAINT knowledge_nodes_pkey")


def test_missing_pgvector_extension_exits_2_and_writes_nothing(
    bare_dsn: str, capsys: pytest.CaptureFixture[str], static_model_dir: Callable[..., Path]
) -> None:
    with psycopg.connect(bare_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE knowledge_nodes (id int PRIMARY KEY, content text)")
        before = conn.execute("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace").fetchone()
    result = run_main(capsys, "run", "--dsn", bare_dsn, "--model", str(static_model_dir(48)), "--no-confirm")
    assert_refused(*result, "the pgvector extension is not installed in this database; run CREATE EXTENSION "
                   "vector (or point --dsn at the right database)")
    with psycopg.connect(bare_dsn, autocommit=True) as conn:
        after = conn.execute("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace").fetchone()
    assert before == after


def test_dsn_that_does_not_connect_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], static_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    dsn = f"host={tmp_path} port=1 dbname=nothing user=nobody connect_timeout=2"
    code, out, err = run_main(capsys, "run", "--dsn", dsn, "--model", str(static_model_dir(48)), "--no-confirm")
    assert code == 2 and out == ""
    assert err.startswith("reembed: cannot connect to PostgreSQL (")
    assert err.endswith("); check --dsn, $REEMBED_DSN or the PG* variables\n")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["--max-runtime", "soon"], "cannot read duration 'soon': write it like 6h, 90m, 1h30m, 45s or 200ms"),
        (["--until", "25:00"], "cannot read --until '25:00': write a local time as HH:MM, e.g. 06:30"),
        (["--retry-failed", "--accept-failed"], "--retry-failed and --accept-failed exclude each other: pick one"),
        (["--device", "tpu"], "--device 'tpu': use auto, cpu, cuda, cuda:N or mps"),
    ],
    ids=["batch-size", "max-runtime", "until", "failed-flags", "device"],
)
def test_bad_option_exits_2_with_one_line_and_writes_nothing(
    dsn: str,
    capsys: pytest.CaptureFixture[str],
    static_model_dir: Callable[..., Path],
    args: list[str],
    message: str,
) -> None:
    make_table(dsn, rows=3)
    before = snapshot(dsn)
    result = run_main(capsys, "run", "--dsn", dsn, "--model", str(static_model_dir(48)), "--no-confirm", *args)
    assert_refused(*result, message)
    assert snapshot(dsn) == before


def test_missing_model_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "run")
    assert code == 2 and out == ""
    assert err.splitlines()[-1] == "reembed run: error: the following arguments are required: --model"
