"""The encoder's feed: tokenizer processes and token-budget batches give exactly the vectors of
SentenceTransformer.encode, in each transaction's order; a model the fast path cannot build
falls back to the model's own stages with one log line; a dead tokenizer process fails the
run cleanly; a Ctrl-C leaves no process behind."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import structlog
from corpus import docstrings
from fastmodel import save_variant, simulated_forward
from helpers import (
    assert_checkpoint_agrees_with_data,
    cli_run_args,
    events,
    job_rows_done,
    last_report,
    make_table,
    one,
    run_cli,
    spawn,
    wait_exit,
    wait_for,
)

from reembed.signals import StopSignal

pytestmark = [pytest.mark.slow, pytest.mark.model]

ODD = ["", " ", "Ünïcödé ÀCCENTS and CamelCase", "日本語のテキストと絵文字 🎉", "x" * 5000,
       "word " * 600, "tab\tand\nnewlines\r\n"]


def _texts(n: int) -> list[str]:
    return ODD + docstrings(limit=n - len(ODD), seed=3)


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path, static_model_dir: Any) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("variants")
    return {
        "minilm": minilm_path,
        "cls-pooling": save_variant(base / "cls", base=minilm_path, pooling="cls", normalize=False),
        "dense": save_variant(base / "dense", base=minilm_path, pooling="mean", dense=96),
        "static": static_model_dir(64),
    }


def _embedder(path: Path, prefix: str = "", **kw: Any) -> Any:
    from reembed.embedder import SentenceTransformerEmbedder
    from reembed.settings import ModelSpec

    return SentenceTransformerEmbedder(ModelSpec(model=str(path), device="cpu", prefix=prefix), **kw)


def _through_feed(feed: Any, texts: list[str], per_batch: int) -> np.ndarray:
    pending = [feed.submit(texts[i: i + per_batch]) for i in range(0, len(texts), per_batch)]
    out = feed.encode(pending, StopSignal())
    assert out is not None and [len(v) for v in out] == [len(texts[i: i + per_batch]) for i in range(0, len(texts), per_batch)]
    return np.concatenate(out)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine; two zero vectors (a static model's empty text) count as equal."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-12)
    return np.where((na == 0) & (nb == 0), 1.0, cos)


@pytest.mark.parametrize(("kind", "prefix"), [("minilm", ""), ("cls-pooling", ""), ("dense", ""),
                                              ("minilm", "search_document: "), ("static", "")])
def test_the_feed_gives_encodes_vectors_in_each_transactions_order(
    variants: dict[str, Path], kind: str, prefix: str
) -> None:
    from reembed.feed import TokenFeed

    emb = _embedder(variants[kind], prefix)
    texts = _texts(300)
    # A small budget and window: many device batches, each mixing rows of several transactions.
    feed = emb.feed(workers=2, max_batch_tokens=2048, window_rows=300)
    assert isinstance(feed, TokenFeed)
    try:
        got = _through_feed(feed, texts, per_batch=37)
        assert feed.checked and feed.inexact is None
    finally:
        feed.close()
    want = emb.model.encode([prefix + t for t in texts], convert_to_numpy=True)
    assert got.shape == want.shape == (len(texts), emb.signature.dimension)
    cos = _cosines(got, want)
    assert cos.min() >= 0.9999, (kind, int(cos.argmin()), texts[int(cos.argmin())][:80])


def test_widths_are_multiples_of_8_and_batches_keep_to_the_token_budget(minilm_path: Path) -> None:
    emb = _embedder(minilm_path)
    shapes: list[tuple[int, int]] = []
    forward = emb.model.forward

    def recording(features: Any, **kw: Any) -> Any:
        shapes.append(tuple(features["input_ids"].shape))
        return forward(features, **kw)

    emb.model.forward = recording
    feed = emb.feed(workers=0, max_batch_tokens=1024, window_rows=200)
    try:
        _through_feed(feed, _texts(200), per_batch=50)
    finally:
        feed.close()
    assert len(shapes) > 5
    for rows, width in shapes:
        assert width % 8 == 0 or width == 256  # the model's max length is its own cap
        assert rows * width <= 1024 or rows == 1
    widths = [w for _, w in shapes]
    assert widths == sorted(widths, reverse=True)  # one window, longest first


def test_a_model_the_fast_path_cannot_build_falls_back_with_one_line_saying_why(
    tmp_path: Path, minilm_path: Path
) -> None:
    from reembed.feed import BatchFeed

    truncating = save_variant(tmp_path / "kw", base=minilm_path)
    config = json.loads((truncating / "sentence_bert_config.json").read_text())
    config["processing_kwargs"] = {"text": {"max_length": 16}}
    (truncating / "sentence_bert_config.json").write_text(json.dumps(config))
    emb = _embedder(truncating)
    with structlog.testing.capture_logs() as logs:
        feed = emb.feed(workers=1)
    assert isinstance(feed, BatchFeed)
    lines = [e for e in logs if e["event"] == "fast_feed_fallback"]
    assert len(lines) == 1 and "processing_kwargs" in lines[0]["reason"]
    texts = _texts(40)
    got = _through_feed(feed, texts, per_batch=16)
    feed.close()
    want = emb.model.encode(texts, convert_to_numpy=True)  # the model's own truncation at 16 tokens
    assert _cosines(got, want).min() >= 0.9999


def test_tokens_that_differ_from_the_models_own_are_caught_and_the_run_falls_back(minilm_path: Path) -> None:
    from dataclasses import replace

    from reembed.feed import TokenFeed

    emb = _embedder(minilm_path)
    feed = emb.feed(workers=0)
    assert isinstance(feed, TokenFeed)
    feed.close()
    wrong = TokenFeed(emb, replace(feed.spec, max_length=32), workers=0, max_batch_tokens=4096,
                      max_rows=None, window_rows=64)
    texts = _texts(80)
    with structlog.testing.capture_logs() as logs:
        got = _through_feed(wrong, texts, per_batch=40)
    wrong.close()
    lines = [e for e in logs if e["event"] == "fast_feed_fallback"]
    assert len(lines) == 1 and "tokenised differently" in lines[0]["reason"]
    assert _cosines(got, emb.model.encode(texts, convert_to_numpy=True)).min() >= 0.9999


def test_where_no_process_can_be_started_tokenisation_runs_in_this_process_said_once(
    minilm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    from multiprocessing.context import SpawnProcess

    from reembed.feed import TokenFeed

    def refused(*_: Any, **__: Any) -> Any:  # what spawning raises on a host out of processes
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(SpawnProcess, "_Popen", staticmethod(refused))
    emb = _embedder(minilm_path)
    with structlog.testing.capture_logs() as logs:
        feed = emb.feed(workers=2)
    assert isinstance(feed, TokenFeed) and feed.pool.workers == 0
    assert [e["event"] for e in logs].count("tokenizer_processes_unavailable") == 1
    texts = _texts(60)
    try:
        got = _through_feed(feed, texts, per_batch=25)
    finally:
        feed.close()
    assert _cosines(got, emb.model.encode(texts, convert_to_numpy=True)).min() >= 0.9999


# ------------------------------------------------------------------ processes

ROWS, BATCH = 960, 32


def _tokenizer_workers(pid: int) -> list[psutil.Process]:
    kids = psutil.Process(pid).children(recursive=True)
    return [k for k in kids if "spawn_main" in " ".join(k.cmdline()) and "resource_tracker" not in " ".join(k.cmdline())]


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

    from helpers import job_settings

    from reembed.job import run

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
    emb.model.forward = simulated_forward(2e-5, 384, busy)
    report = run(job_settings(dsn, batch_size=32, window_rows=64, tokenizer_workers=2, max_batch_tokens=2048),
                 embedder=emb)
    assert report.state == "done" and report.rows_updated == 320
    assert len(busy) > 5
    during = [t for t in tokenised if any(a < t < b for a, b in busy)]
    assert during, "every tokenisation ended before the device started or while it was idle"
