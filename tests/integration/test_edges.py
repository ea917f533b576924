"""The edges of a job (issue 15): at the cut-over the job is always the one that yields. An
application whose edits read the row before the registry, or write before they read it, keeps
every transaction through a dimension change and a same-dimension job. Real PostgreSQL; the
test embedder (the job's mechanics)."""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import structlog

from reembed.job import run
from support.database import fetch, make_table, one
from support.fakes import HashEmbedder, hash_vector, job_settings, sentence
from support.processes import cli_env, cli_run_args, run_cli


def _literal(vec: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in vec) + "]"


class _Editor(threading.Thread):
    """An application editing rows, ~100 transactions a second, embedding each edit with the model the
    registry names (read FOR SHARE in the same transaction, as the runbook asks), in one of two
    orders: the row read before the registry (`read-first`), or the content written before it
    (`write-first`). Every failed transaction is kept."""

    def __init__(self, dsn: str, keys: list[Any], order: str, number: int) -> None:
        super().__init__(daemon=True, name=f"editor-{order}-{number}")
        self.dsn, self.keys, self.order, self.number = dsn, keys, order, number
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
            conn.execute("UPDATE knowledge_nodes SET content = %s, embedding = %s::vector WHERE id = %s",
                         (text, _literal(hash_vector(text, dim)), key))
        else:
            conn.execute("UPDATE knowledge_nodes SET content = %s WHERE id = %s", (text, key))
            (dim,) = conn.execute(registry).fetchone()  # type: ignore[misc]
            conn.execute("UPDATE knowledge_nodes SET embedding = %s::vector WHERE id = %s",
                         (_literal(hash_vector(text, dim)), key))


@pytest.mark.parametrize("new_dim", [256, 64], ids=["dimension-change", "same-dimension"])
def test_no_application_transaction_fails_because_of_the_cut_over(dsn: str, new_dim: int) -> None:
    """Eight editors (~600 edits/s in all) through three jobs, three cut-overs, in a row."""
    keys = make_table(dsn, rows=300, id_type="bigint", with_index=False)
    editors = [_Editor(dsn, keys, order, n) for n, order in enumerate(["read-first", "write-first"] * 4)]
    for e in editors:
        e.start()
    try:
        for k in range(3):  # the last one with the model the assertions check
            dim = new_dim if k != 1 else (new_dim * 2 if new_dim != 64 else 64)
            report = run(job_settings(dsn, batch_size=16), embedder=HashEmbedder(dim, name=f"model-{k}"))
            assert report.state == "done"
    finally:
        for e in editors:
            e.stop.set()
        for e in editors:
            e.join(30)
    failures = [f for e in editors for f in e.failures]
    assert failures == [], failures[:5]
    assert report.state == "done"
    assert all(e.done > 0 for e in editors), [e.done for e in editors]
    assert one(dsn, "SELECT writers_held_secs FROM reembed_checkpoint") is not None
    rows = fetch(dsn, "SELECT content, embedding::text AS e FROM knowledge_nodes")
    stale = [r["content"] for r in rows
             if not np.allclose(np.array(json.loads(r["e"])), hash_vector(r["content"], new_dim), atol=1e-5)]
    assert stale == [], stale[:5]  # every row current: the job's vectors and the application's agree


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
    first = run_cli(cli_run_args(dsn, minilm_path, "--max-runtime", "12s", batch=64), cwd=workdir)
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


class _Slow(HashEmbedder):
    """~100 rows/s: slower than the application writes below."""

    def forward(self, texts: list[str]) -> np.ndarray:
        time.sleep(0.01 * len(texts))
        return super().forward(texts)


def test_an_application_writing_faster_than_the_job_encodes_never_holds_writers_past_the_bound(dsn: str) -> None:
    keys = make_table(dsn, rows=100, id_type="bigint", with_index=False)
    bound = 0.5
    with structlog.testing.capture_logs() as logs:
        def not_converging() -> bool:
            return any(e["event"] == "catch_up_not_converging" for e in list(logs))

        stop_app = threading.Event()

        def application() -> None:  # ~200 edits/s until the job says it cannot keep up (60 s at most)
            rng = np.random.default_rng(3)
            deadline = time.monotonic() + 60
            with psycopg.connect(dsn, autocommit=True) as conn:
                n = 0
                while not stop_app.is_set() and not not_converging() and time.monotonic() < deadline:
                    n += 1
                    conn.execute("UPDATE knowledge_nodes SET content = %s WHERE id = %s",
                                 (f"edit {n}", keys[int(rng.integers(len(keys)))]))
                    stop_app.wait(0.005)

        app = threading.Thread(target=application, daemon=True)
        app.start()
        try:
            report = run(job_settings(dsn, batch_size=16, max_writers_held=bound), embedder=_Slow(64))
        finally:
            stop_app.set()
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
