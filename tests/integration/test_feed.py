"""The encoder's feed in a run: a dead tokenizer process fails the run cleanly; a Ctrl-C leaves
no process behind; with a simulated device the next rows are tokenised while it runs. (The
feed's exactness, without a database: tests/unit/test_feed_exact.py.)"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from support.database import assert_checkpoint_agrees_with_data, job_rows_done, make_table, one
from support.models import embedder as _embedder
from support.models import texts as _texts
from support.processes import cli_run_args, events, last_report, run_cli, spawn, wait_exit, wait_for
from support.scripts import fastmodel

pytestmark = [pytest.mark.slow, pytest.mark.model]


# ------------------------------------------------------------------ processes

ROWS, BATCH = 960, 32


def _tokenizer_workers(pid: int) -> list[psutil.Process]:
    kids = psutil.Process(pid).children(recursive=True)
    return [k for k in kids
            if "spawn_main" in " ".join(k.cmdline()) and "resource_tracker" not in " ".join(k.cmdline())]


def test_a_killed_tokenizer_process_fails_the_run_cleanly_and_a_rerun_resumes(
    dsn: str, minilm_path: Path, workdir: Path
) -> None:
    make_table(dsn, rows=ROWS, content=lambda i: f"row {i}: " + "a sentence about vectors and databases. " * (i % 9))
    log = workdir / "killed.log"
    args = cli_run_args(dsn, minilm_path, "--tokenizer-workers", "2", batch=BATCH, window=2 * BATCH)
    proc = spawn(args, cwd=workdir, log=log)
    wait_for(lambda: job_rows_done(dsn) >= BATCH, timeout=180, what="a committed batch")
    workers = _tokenizer_workers(proc.pid)
    assert len(workers) == 2
    workers[0].kill()
    assert wait_exit(proc, timeout=120) == 1, log.read_text()[-3000:]
    assert log.read_text().strip().splitlines()[-1].startswith("reembed: a tokenizer worker process died")
    done = one(dsn, "SELECT rows_done FROM reembed_checkpoint_range")
    assert 0 < done < ROWS
    assert_checkpoint_agrees_with_data(dsn, 384)
    rerun = run_cli(cli_run_args(dsn, minilm_path, batch=BATCH), cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["rows_updated"] == ROWS - done


def test_sigint_with_tokenizer_processes_running_leaves_no_process_behind(
    dsn: str, minilm_path: Path, workdir: Path
) -> None:
    make_table(dsn, rows=ROWS)
    log = workdir / "sigint.log"
    proc = spawn(cli_run_args(dsn, minilm_path, "--tokenizer-workers", "2", batch=BATCH), cwd=workdir, log=log)
    wait_for(lambda: len(_tokenizer_workers(proc.pid)) == 2 and events(log, "embedding_started"),
             timeout=180, what="the tokenizer processes at work")
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    assert wait_exit(proc, timeout=60) == 130, log.read_text()[-3000:]
    assert last_report(log)["state"] == "stopped"

    def gone(p: psutil.Process) -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: all(gone(c) for c in children), timeout=30, what="every child process to end")
    assert_checkpoint_agrees_with_data(dsn, 384)


def test_with_a_simulated_device_the_next_rows_are_tokenised_while_the_device_runs(
    dsn: str, minilm_path: Path
) -> None:
    """SIMULATED DEVICE (CPU development only): a forward that sleeps a fixed time per padded
    token, releasing the GIL like a GPU kernel launch. The pipeline must tokenise the rows that
    come next (in processes) while the device is busy, not after."""
    import threading
    import time

    from reembed.job import run
    from support.fakes import job_settings

    texts = _texts(320)
    make_table(dsn, rows=320, old_dim=384, content=lambda i: texts[i])
    emb = _embedder(minilm_path)
    busy: list[tuple[float, float]] = []
    tokenised: list[float] = []
    lock = threading.Lock()

    make = emb.feed

    def recording_feed(**kw: Any) -> Any:
        feed = make(**kw)
        submit = feed.submit

        def watched(texts: Any) -> Any:
            pending = submit(texts)
            for f in pending.futures:
                f.add_done_callback(lambda _f: (lock.acquire(), tokenised.append(time.monotonic()), lock.release()))
            return pending

        feed.submit = watched
        return feed

    emb.feed = recording_feed
    emb.model.forward = fastmodel.simulated_forward(2e-5, 384, busy)
    report = run(job_settings(dsn, batch_size=32, window_rows=64, tokenizer_workers=2, max_batch_tokens=2048),
                 embedder=emb)
    assert report.state == "done" and report.rows_updated == 320
    assert len(busy) > 5
    during = [t for t in tokenised if any(a < t < b for a, b in busy)]
    assert during, "every tokenisation ended before the device started or while it was idle"
