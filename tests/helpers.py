"""Test helpers: the demo-shaped schema, a deterministic test embedder, the real CLI in a
subprocess, and polling (never fixed sleeps)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import psycopg
from psycopg.rows import dict_row

from reembed.signature import Signature

REGISTRY_DDL = """
CREATE TABLE embedding_model (
    id int PRIMARY KEY CHECK (id = 1),
    model_name text NOT NULL, dimension int NOT NULL, model_hash text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now()
)"""

WORDS = ["database", "index", "vector", "search", "model", "embedding", "query", "table", "row", "column", "cosine", "graph", "python", "compiler", "kernel", "network", "packet", "socket", "thread", "lock", "mutex", "cache", "memory", "disk", "river", "mountain", "forest", "ocean", "city", "music", "painting", "poem", "novel", "chess", "football", "weather"]


def hash_vector(text: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vec = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vec / np.linalg.norm(vec)


class HashEmbedder:
    """Deterministic test embedder for the job's mechanics (never the product's default).
    Texts containing `poison` raise, like a model that cannot take a row."""

    def __init__(self, dim: int = 32, *, name: str | None = None, poison: str | None = None) -> None:
        self.signature = Signature(name or f"test-hash-{dim}", dim, f"sha256:test-hash-{dim}")
        self.poison = poison
        self.calls = 0
        self.texts_seen = 0

    def tokenize(self, texts: Sequence[str]) -> list[str]:
        return list(texts)

    def forward(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts_seen += len(texts)
        if self.poison is not None:
            bad = [t for t in texts if self.poison in t]
            if bad:
                raise ValueError(f"cannot encode {bad[0][:30]!r}")
        return np.stack([hash_vector(t, self.signature.dimension) for t in texts])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.forward(self.tokenize(texts))


def stopping_after(emb: HashEmbedder, stop: Any, *, calls: int, reason: str = "SIGINT") -> HashEmbedder:
    """Make `emb` ask `stop` to stop (as a signal would) when its forward call number `calls` starts."""
    original = emb.forward

    def forward(texts: list[str]) -> np.ndarray:
        if emb.calls + 1 == calls:
            stop.request(reason)
        return original(texts)

    emb.forward = forward  # type: ignore[method-assign]
    return emb


class Gate:
    """Holds `emb`'s forward calls until open(); `reached` is set when the first one waits."""

    def __init__(self, emb: HashEmbedder) -> None:
        self.reached = threading.Event()
        self._opened = threading.Event()
        original = emb.forward

        def forward(texts: list[str]) -> np.ndarray:
            self.reached.set()
            self._opened.wait(30)
            return original(texts)

        emb.forward = forward  # type: ignore[method-assign]

    def open(self) -> None:
        self._opened.set()


class Background(threading.Thread):
    """fn() in a thread; afterwards `.result`, or `.error` if it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - examined by the test
            self.error = exc


def sentence(i: int) -> str:
    rng = np.random.default_rng(i)
    words = rng.choice(WORDS, size=int(rng.integers(4, 14)))
    return f"note {i}: " + " ".join(words)


def make_id(id_type: str, i: int) -> Any:
    if id_type == "uuid":
        return uuid.uuid5(uuid.NAMESPACE_OID, str(i))  # random order relative to i
    return i * 3 + 1 if id_type == "bigint" else f"k{i:05d}"


def make_table(
    dsn: str,
    *,
    rows: int = 200,
    id_type: str = "uuid",
    old_dim: int = 64,
    null_every: int = 0,
    with_index: bool = True,
    registry: bool = True,
    old_model: str = "old-model",
    content: Callable[[int], str | None] | None = None,
    table: str = "knowledge_nodes",
) -> list[Any]:
    """The design's schema, filled with `rows` rows embedded by an "old" 64-d model."""
    id_sql = {"uuid": "uuid", "bigint": "bigint", "text": "text"}[id_type]
    ids: list[Any] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table} (id {id_sql} PRIMARY KEY, content text, source text NOT NULL,"
            f" touched int NOT NULL DEFAULT 7, embedding vector({old_dim}))"
        )
        if with_index:
            conn.execute(
                f"CREATE INDEX idx_{table}_embedding_hnsw ON {table}"
                " USING hnsw (embedding vector_cosine_ops) WITH (m = 8, ef_construction = 32)"
            )
        if registry:
            conn.execute(REGISTRY_DDL)
            conn.execute(
                "INSERT INTO embedding_model (id, model_name, dimension, model_hash) VALUES (1, %s, %s, 'sha256:old')",
                (old_model, old_dim),
            )
        data = []
        for i in range(rows):
            row_id = make_id(id_type, i)
            text = content(i) if content else (None if null_every and i % null_every == 0 else sentence(i))
            vec = hash_vector(f"old:{text}", old_dim) if text is not None else None
            data.append((row_id, text, f"src-{i}", vec))
            ids.append(row_id)
        from pgvector.psycopg import register_vector

        register_vector(conn)
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} (id, content, source, embedding) VALUES (%s, %s, %s, %s)", data)
        conn.execute(f"ANALYZE {table}")
    return ids


def snapshot(dsn: str, table: str = "knowledge_nodes") -> dict[str, Any]:
    """Everything a test compares before/after: rows (all columns), catalog facts, tool tables."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        rows = conn.execute(f"SELECT to_jsonb(t)::text AS r FROM {table} t ORDER BY 1").fetchall()
        col = conn.execute(
            "SELECT format_type(atttypid, atttypmod) AS t FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attname = 'embedding'",
            (table,),
        ).fetchone()
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s ORDER BY indexname", (table,)
        ).fetchall()
        reg = None
        if conn.execute("SELECT to_regclass('embedding_model') IS NOT NULL AS p").fetchone()["p"]:
            reg = conn.execute("SELECT model_name, dimension, model_hash, updated_at FROM embedding_model").fetchall()
        tool = conn.execute("SELECT to_regclass('reembed_checkpoint') IS NOT NULL AS p").fetchone()["p"]
        return {"rows": rows, "column": col["t"] if col else None, "indexes": indexes, "registry": reg, "tool_tables": tool}


def fetch(dsn: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def one(dsn: str, sql: str, params: Any = None) -> Any:
    rows = fetch(dsn, sql, params)
    return next(iter(rows[0].values())) if rows else None


def wait_for(predicate: Callable[[], Any], *, timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll until predicate() is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(args: Sequence[str], *, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """The real CLI in a subprocess; stderr+stdout to `log`."""
    with log.open("wb") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "reembed", *args], cwd=cwd, env=cli_env(), stdout=fh, stderr=subprocess.STDOUT
        )


def run_cli(args: Sequence[str], *, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reembed", *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def assert_checkpoint_agrees_with_data(dsn: str, new_dim: int) -> str:
    """Rows up to last_id carry new vectors, the others old ones: nothing lost, nothing extra."""
    last_id = one(dsn, "SELECT last_id FROM reembed_checkpoint_range")
    done = one(dsn, "SELECT rows_done FROM reembed_checkpoint_range")
    rows = fetch(dsn, "SELECT id::text AS id, vector_dims(embedding) AS d FROM knowledge_nodes"
                      " WHERE content IS NOT NULL ORDER BY id")
    new = [r["d"] == new_dim for r in rows]
    assert new == [last_id is not None and r["id"] <= last_id for r in rows]
    assert sum(new) == done
    return str(last_id)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 180) -> int:
    """The process's exit code; killed (and the test failed) if it does not end in time."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def job_rows_done(dsn: str) -> int:
    try:
        value = one(dsn, "SELECT coalesce(sum(rows_done + rows_skipped), 0) FROM reembed_checkpoint_range")
    except psycopg.errors.UndefinedTable:
        return 0
    return int(value or 0)


def keys(dsn: str, table: str = "knowledge_nodes") -> list[Any]:
    """The table's ids in key order (the order the job walks them)."""
    return [r["id"] for r in fetch(dsn, f"SELECT id FROM {table} ORDER BY id")]


def ddl_waiting(dsn: str) -> int:
    """How many of the job's DDL statements (ALTER TABLE, or DROP TRIGGER before a type change)
    wait on a lock right now."""
    return int(one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND (query ILIKE 'ALTER TABLE%%' OR query ILIKE 'DROP TRIGGER%%')"))


def writer_waiting(dsn: str) -> int:
    """Is the job's writer waiting on a lock (an application's row lock) right now?"""
    return int(one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'reembed writer%%'"
                        " AND wait_event_type = 'Lock'"))


class Application:
    """An application's open transaction, holding what a live system holds, until end()."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn)

    def hold_row(self, key: Any, table: str = "knowledge_nodes") -> None:
        self.conn.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE", (key,))

    def hold_registry(self) -> None:
        """What every writer of the runbook's protocol holds for a moment: the registry row FOR SHARE."""
        self.conn.execute("SELECT 1 FROM embedding_model WHERE id = 1 FOR SHARE")

    def hold_table(self, table: str = "knowledge_nodes") -> None:
        self.conn.execute(f"LOCK TABLE {table} IN ACCESS SHARE MODE")

    def end(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


def job_settings(dsn: str, **opts: Any) -> Any:
    """Settings for an in-process run with a test embedder (no banner pause)."""
    from reembed.settings import ModelSpec, RunOptions, Settings, Target

    opts.setdefault("confirm_seconds", 0)
    return Settings(target=Target(dsn=dsn), model=ModelSpec(model="unused"), options=RunOptions(**opts))


def cli_run_args(dsn: str, model: Path, *extra: str, batch: int = 16, window: int | None = None) -> list[str]:
    """`reembed run` for the real CLI: JSON logs and the JSON report, no banner pause. `window`:
    rows sorted and encoded together (a test that acts between two commits wants one batch)."""
    return ["run", "--dsn", dsn, "--model", str(model), "--no-confirm", "--batch-size", str(batch),
            "--log-format", "json", "--json", *(["--window-rows", str(window)] if window else []), *extra]


def events(log: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of one event, in order, from a CLI run's log file."""
    return [json.loads(line) for line in log.read_text().splitlines()
            if line.startswith("{") and f'"event": "{name}"' in line]


def last_report(log: Path) -> dict[str, Any]:
    """The run's `--json` report (the last JSON line that is not a log event)."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{") and '"state"' in line and '"event"' not in line:
            return json.loads(line)
    raise AssertionError(f"no report in {log.read_text()[-2000:]}")
