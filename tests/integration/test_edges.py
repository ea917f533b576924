"""The edges of a job (issue 15): at the cut-over the job is always the one that yields. An
application whose edits read the row before the registry, or write before they read it, keeps
every transaction through a dimension change and a same-dimension job. Real PostgreSQL; the
test embedder (the job's mechanics)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import structlog

from reembed.job import run
from support.database import fetch, make_table, one
from support.fakes import HashEmbedder, SlowHashEmbedder, hash_vector, job_settings, sentence
from support.processes import cli_env, cli_run_args, events, run_cli, wait_for


def _literal(vec: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in vec) + "]"


class _Editor(threading.Thread):
    """An application editing rows, ~100 transactions a second, embedding each edit with the model the
    registry names (read FOR SHARE in the same transaction, as the runbook asks), in one of two
    orders: the row read before the registry (`read-first`), or the content written before it
    (`write-first`). Every failed transaction is kept."""

    def __init__(self, dsn: str, keys: list[Any], order: str, number: int, vtype: str = "vector") -> None:
        super().__init__(daemon=True, name=f"editor-{order}-{number}")
        self.dsn, self.keys, self.order, self.number, self.vtype = dsn, keys, order, number, vtype
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []

    def run(self) -> None:
        rng = np.random.default_rng(self.number)
        with psycopg.connect(self.dsn) as conn:
            while not self.stop.is_set():
                key = self.keys[int(rng.integers(len(self.keys)))]
                text = f"edited by editor {self.number} ({self.order}), edit {self.done}"
                try:
                    with conn.transaction():
                        self._edit(conn, key, text)
                    self.done += 1
                except psycopg.Error as exc:
                    self.failures.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                self.stop.wait(0.01)  # the application's own pace between two edits

    def _edit(self, conn: psycopg.Connection[Any], key: Any, text: str) -> None:
        registry = "SELECT dimension FROM embedding_model WHERE id = 1 FOR SHARE"
        if self.order == "read-first":
            conn.execute("SELECT content FROM knowledge_nodes WHERE id = %s", (key,)).fetchone()
            (dim,) = conn.execute(registry).fetchone()  # type: ignore[misc]
            conn.execute(f"UPDATE knowledge_nodes SET content = %s, embedding = %s::{self.vtype} WHERE id = %s",
                         (text, _literal(hash_vector(text, dim)), key))
        else:
            conn.execute("UPDATE knowledge_nodes SET content = %s WHERE id = %s", (text, key))
            (dim,) = conn.execute(registry).fetchone()  # type: ignore[misc]
            conn.execute(f"UPDATE knowledge_nodes SET embedding = %s::{self.vtype} WHERE id = %s",
                         (_literal(hash_vector(text, dim)), key))


@contextlib.contextmanager
def _editing(dsn: str, keys: list[Any], vtype: str) -> Iterator[list[_Editor]]:
    """Eight editors, both orders, editing until the block ends; their failures asserted none."""
    editors = [_Editor(dsn, keys, order, n, vtype) for n, order in enumerate(["read-first", "write-first"] * 4)]
    for e in editors:
        e.start()
    try:
        yield editors
    finally:
        for e in editors:
            e.stop.set()
        for e in editors:
            e.join(30)
    failures = [f for e in editors for f in e.failures]
    assert failures == [], failures[:5]


SHAPES = {  # the table's shape: its DDL after make_table, the column's type
    "plain": ((), "vector"),
    "second-index": (("CREATE INDEX knowledge_ivf ON knowledge_nodes USING ivfflat (embedding vector_l2_ops)"
                      " WITH (lists = 4)",), "vector"),
    "halfvec": (("DROP INDEX idx_knowledge_nodes_embedding_hnsw",
                 "ALTER TABLE knowledge_nodes ALTER COLUMN embedding TYPE halfvec(64)",
                 "CREATE INDEX knowledge_half ON knowledge_nodes USING hnsw (embedding halfvec_cosine_ops)"),
                "halfvec"),
    "view": (("CREATE VIEW knowledge_view AS SELECT id, content, embedding FROM knowledge_nodes",), "vector"),
}


@pytest.mark.parametrize(("shape", "new_dim"), [("plain", 256), ("plain", 64), ("second-index", 256),
                                                ("halfvec", 256), ("view", 64)],
                         ids=["dimension-change", "same-dimension", "second-index", "halfvec", "view"])
def test_no_application_transaction_fails_because_of_the_cut_over(dsn: str, shape: str, new_dim: int) -> None:
    """Eight editors (~600 edits/s in all), reading the row before the registry or writing before
    it, through three jobs, three cut-overs, in a row; on the table shapes people have (a second
    ANN index, a halfvec column, a view over the column for a same-dimension job)."""
    ddl, vtype = SHAPES[shape]
    keys = make_table(dsn, rows=300, id_type="bigint", with_index=shape != "plain")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in ddl:
            conn.execute(statement)
    before = {r["name"]: r["definition"] for r in fetch(
        dsn, "SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS definition FROM pg_index i"
             " JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'knowledge_nodes'::regclass")}
    with _editing(dsn, keys, vtype) as editors:
        for k in range(3):  # the last one with the model the assertions check
            dim = new_dim if k != 1 else (new_dim * 2 if new_dim != 64 else 64)
            report = run(job_settings(dsn, batch_size=16), embedder=HashEmbedder(dim, name=f"model-{k}"))
            assert report.state == "done"
    assert report.state == "done"
    assert all(e.done > 0 for e in editors), [e.done for e in editors]
    assert one(dsn, "SELECT writers_held_secs FROM reembed_checkpoint") is not None
    rows = fetch(dsn, "SELECT content, embedding::text AS e FROM knowledge_nodes")
    atol = 2e-3 if vtype == "halfvec" else 1e-5
    stale = [r["content"] for r in rows
             if not np.allclose(np.array(json.loads(r["e"])), hash_vector(r["content"], new_dim), atol=atol)]
    assert stale == [], stale[:5]  # every row current: the job's vectors and the application's agree
    after = fetch(dsn, "SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS definition, i.indisvalid AS ok"
                       " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                       " WHERE i.indrelid = 'knowledge_nodes'::regclass")
    assert {r["name"]: r["definition"] for r in after} == before and all(r["ok"] for r in after)
    assert one(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                    "'knowledge_nodes'::regclass AND attname = 'embedding'") == f"{vtype}({new_dim})"
    if shape == "view":
        assert one(dsn, "SELECT count(*) FROM knowledge_view WHERE embedding IS NOT NULL") == len(keys)


@pytest.mark.model
def test_a_short_window_with_the_real_model_commits_rows_and_a_rerun_finishes(
    dsn: str, minilm_path: Path, workdir: Path
) -> None:
    """--max-runtime some seconds past the model load: the first window is one transaction and
    the next ones about two seconds of encoding, so rows commit before the time is up (the old
    1,024-row first window, ~20 s of MiniLM on these paragraphs on two cores, committed none)."""
    rows = 1100
    make_table(dsn, rows=rows, old_dim=384, with_index=False,
               content=lambda i: " ".join(sentence(7 * i + j) for j in range(6)))
    # the window: what loading the model and a first look take on this machine now (a plan measures
    # it, its sample included: on a loaded machine, seconds more), and 8 s of encoding on top; the
    # rate held (--max-rate) so that a faster machine cannot finish the table inside the window
    planned = run_cli(["plan", "--dsn", dsn, "--model", str(minilm_path), "--json", "--log-level", "warning"],
                      cwd=workdir)
    assert planned.returncode == 0, planned.stderr[-3000:]
    window = int(json.loads(planned.stdout)["duration_secs"]) + 8
    rate = max(5, min(25, int(0.6 * rows / window)))
    first = run_cli(cli_run_args(dsn, minilm_path, "--max-runtime", f"{window}s", "--max-rate", str(rate), batch=64),
                    cwd=workdir)
    assert first.returncode == 75, first.stderr[-3000:]
    done = one(dsn, "SELECT rows_done FROM reembed_checkpoint_range")
    assert 0 < done < rows
    again = run_cli(cli_run_args(dsn, minilm_path, batch=64), cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads(again.stdout)
    assert report["state"] == "done" and done + report["rows_updated"] == rows
    assert one(dsn, "SELECT state FROM reembed_checkpoint") == "done"


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* \[(debug|info|warning|error)")


def test_on_a_terminal_every_log_line_is_whole_while_the_bar_advances(dsn: str, model48: Path, workdir: Path) -> None:
    """The CLI under a pseudo-terminal: the progress bar and the log lines share it, and no log line
    is glued to the bar ("...| 16/480 [00:00<?, ?rows/s]2026-... [info] ...")."""
    make_table(dsn, rows=480, old_dim=48, with_index=False)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal 160 columns wide
    proc = subprocess.Popen(
        [sys.executable, "-m", "reembed", "run", "--dsn", dsn, "--model", str(model48), "--no-confirm",
         "--batch-size", "16", "--window-rows", "16", "--log-level", "debug"],
        cwd=workdir, env=cli_env(), stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    screen = _ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))
    drawn = [part.strip() for line in screen.split("\n") for part in line.split("\r") if part.strip()]
    logged = [p for p in drawn if re.search(r"\[(debug|info|warning|error)\s*\]", p)]
    assert len(logged) > 10
    glued = [p for p in logged if not _LOG_LINE.match(p)]
    assert glued == [], glued[:3]
    bars = {m.group(1) for p in drawn if (m := re.search(r"\| *(\d+)/480 \[", p))}
    assert len(bars) > 3, bars  # the bar advanced, drawn again between the lines, drawn again between the lines


class _Outpacing(threading.Thread):
    """An application editing random rows ~200 times a second (faster than SlowHashEmbedder
    encodes) until `until()` is true or it is stopped (60 s at most)."""

    def __init__(self, dsn: str, keys: list[Any], until: Any = lambda: False) -> None:
        super().__init__(daemon=True)
        self.dsn, self.keys, self.until = dsn, keys, until
        self.stop = threading.Event()
        self.edits = 0

    def run(self) -> None:
        rng = np.random.default_rng(3)
        deadline = time.monotonic() + 60
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set() and not self.until() and time.monotonic() < deadline:
                self.edits += 1
                conn.execute("UPDATE knowledge_nodes SET content = %s WHERE id = %s",
                             (f"edit {self.edits}", self.keys[int(rng.integers(len(self.keys)))]))
                self.stop.wait(0.005)


def test_a_sigkill_while_the_cut_over_catches_up_again_then_a_rerun_finishes_right(dsn: str, workdir: Path) -> None:
    """The cut-over's own catch-up loop (the application outpacing the encoder, no lock held):
    killed there, the job loses nothing; a re-run, once the application slows, cuts over right."""
    keys = make_table(dsn, rows=100, id_type="bigint", with_index=False)
    app = _Outpacing(dsn, keys)
    app.start()
    log = workdir / "job.log"
    script = Path(__file__).resolve().parent.parent / "support" / "slow_job.py"
    try:
        with log.open("wb") as out:
            # a device of 20 rows/s: the application outpaces it even on a loaded machine
            proc = subprocess.Popen([sys.executable, str(script), dsn, "20"], env=cli_env(), stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: len(events(log, "cut_over_catching_up")) >= 3 or proc.poll() is not None,
                     timeout=120, what="the cut-over catching up again")
            assert proc.poll() is None, log.read_text()[-3000:]
            proc.kill()
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        app.stop.set()
        app.join(10)
    assert app.edits > 0
    assert one(dsn, "SELECT state FROM reembed_checkpoint") == "finalizing"
    assert "cut_over" not in (one(dsn, "SELECT finalize_steps FROM reembed_checkpoint") or [])
    assert one(dsn, "SELECT model_name FROM embedding_model") == "old-model"  # nothing of the cut-over committed
    report = run(job_settings(dsn, batch_size=16), embedder=HashEmbedder(64))
    assert report.state == "done"
    assert one(dsn, "SELECT model_name FROM embedding_model") == HashEmbedder(64).signature.name
    assert one(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'reembed_capture_%%'") == 0
    rows = fetch(dsn, "SELECT content, embedding::text AS e FROM knowledge_nodes")
    stale = [r["content"] for r in rows
             if not np.allclose(np.array(json.loads(r["e"])), hash_vector(r["content"], 64), atol=1e-5)]
    assert stale == []


def test_an_application_writing_faster_than_the_job_encodes_never_holds_writers_past_the_bound(dsn: str) -> None:
    keys = make_table(dsn, rows=100, id_type="bigint", with_index=False)
    bound = 0.5
    with structlog.testing.capture_logs() as logs:
        def not_converging() -> bool:
            return any(e["event"] == "catch_up_not_converging" for e in list(logs))

        app = _Outpacing(dsn, keys, until=not_converging)  # until the job says it cannot keep up
        app.start()
        try:
            # a device of 20 rows/s: the application (a thread here, ~200 edits/s on an idle machine)
            # outpaces it even on a loaded one
            report = run(job_settings(dsn, batch_size=16, max_writers_held=bound),
                         embedder=SlowHashEmbedder(64, rows_per_sec=20))
        finally:
            app.stop.set()
            app.join(10)
    assert report.state == "done"
    (warning,) = [e for e in logs if e["event"] == "catch_up_not_converging"][:1]
    assert warning["application_changes_per_sec"] > 0 and warning["encode_rows_per_sec"] > 0
    held = one(dsn, "SELECT writers_held_secs FROM reembed_checkpoint")
    assert held is not None and held < bound, held
    rows = fetch(dsn, "SELECT content, embedding::text AS e FROM knowledge_nodes")
    stale = [r["content"] for r in rows
             if not np.allclose(np.array(json.loads(r["e"])), hash_vector(r["content"], 64), atol=1e-5)]
    assert stale == []


@pytest.mark.parametrize(("shape", "new_dim", "then"), [("plain", 256, "cleanup"), ("view", 256, "cleanup"),
                                                        ("halfvec", 256, "cleanup"), ("second-index", 64, "cleanup"),
                                                        ("view", 256, "rollback")],
                         ids=["dimension-change", "view", "halfvec", "second-index-same-dimension", "view-rollback"])
def test_no_application_transaction_fails_because_of_the_shadow_swap_the_cleanup_or_the_rollback(
    dsn: str, shape: str, new_dim: int, then: str
) -> None:
    """The same eight editors through a shadow job (its swap needs ACCESS EXCLUSIVE for the renames,
    with the registry row held: an editor holding the table and waiting for the registry is the
    case the swap must never deadlock with) and then `reembed cleanup` (DROP COLUMN) or `reembed
    rollback --leave-stale-null` (the swap back)."""
    from reembed.rollback import cleanup, rollback
    from reembed.settings import RollbackOptions, Settings, Target

    ddl, vtype = SHAPES[shape]
    keys = make_table(dsn, rows=300, id_type="bigint", with_index=shape != "plain")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in ddl:
            conn.execute(statement)
    with _editing(dsn, keys, vtype) as editors:
        wait_for(lambda: all(e.done > 5 for e in editors), timeout=60, what="the editors editing")
        report = run(job_settings(dsn, batch_size=16, strategy="shadow", gate_min_recall=0.0),
                     embedder=HashEmbedder(new_dim, name="model-new"))
        assert report.state == "done", report
        during = [e.done for e in editors]
        wait_for(lambda: all(e.done > d + 5 for e, d in zip(editors, during, strict=True)), timeout=60,
                 what="the editors editing after the swap")
        if then == "cleanup":
            assert cleanup(Settings(target=Target(dsn=dsn))).state == "cleaned"
        else:
            assert rollback(Settings(target=Target(dsn=dsn)), RollbackOptions(leave_stale_null=True)).state \
                == "rolled_back"
        after = [e.done for e in editors]
        wait_for(lambda: all(e.done > d + 5 for e, d in zip(editors, after, strict=True)), timeout=60,
                 what="the editors editing after the cleanup")
    print(f"\n[shadow {shape}] editors {sum(e.done for e in editors)} edits, writers held "
          f"{report.details['writers_held_secs']:.3f} s, readers held {report.details['readers_held_secs']:.4f} s")
    rows = fetch(dsn, "SELECT content, embedding::text AS e FROM knowledge_nodes")
    atol = 2e-3 if vtype == "halfvec" else 1e-5
    dim = new_dim if then == "cleanup" else 64

    def current(r: dict[str, Any]) -> bool:
        if r["e"] is None:  # rolled back with --leave-stale-null: written after the swap
            return then == "rollback"
        got = np.array(json.loads(r["e"]))
        # after a rollback, a row no one edited keeps the vector the table was made with ("old:")
        return any(np.allclose(got, hash_vector(t, dim), atol=atol)
                   for t in ([r["content"]] + ([f"old:{r['content']}"] if then == "rollback" else [])))

    stale = [r["content"] for r in rows if not current(r)]
    assert stale == [], stale[:5]
    assert one(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                    "'knowledge_nodes'::regclass AND attname = 'embedding'") == f"{vtype}({dim})"
    if shape == "view":
        assert one(dsn, "SELECT count(*) FROM knowledge_view WHERE vector_dims(embedding) = %s", (dim,)) == \
            one(dsn, "SELECT count(*) FROM knowledge_nodes WHERE embedding IS NOT NULL")
