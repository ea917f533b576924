"""The encoder's feed, without a database: tokenizer processes and token-budget batches give
exactly the vectors of SentenceTransformer.encode, in each transaction's order; a model the
fast path cannot build falls back to the model's own stages with one log line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from reembed.signals import StopSignal
from support.models import embedder as _embedder
from support.models import texts as _texts
from support.scripts import fastmodel

pytestmark = [pytest.mark.slow, pytest.mark.model]


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path, static_model_dir: Any) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("variants")
    return {
        "minilm": minilm_path,
        "cls-pooling": fastmodel.save_variant(base / "cls", base=minilm_path, pooling="cls", normalize=False),
        "dense": fastmodel.save_variant(base / "dense", base=minilm_path, pooling="mean", dense=96),
        "static": static_model_dir(64),
    }


def _through_feed(feed: Any, texts: list[str], per_batch: int) -> np.ndarray:
    pending = [feed.submit(texts[i: i + per_batch]) for i in range(0, len(texts), per_batch)]
    out = feed.encode(pending, StopSignal())
    assert out is not None
    assert [len(v) for v in out] == [len(texts[i: i + per_batch]) for i in range(0, len(texts), per_batch)]
    return np.concatenate(out)


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """The same vectors, element by element (float noise of another batching only): a scale or a
    sign that is off fails, as it would not by angle (a static model's vectors are not normalised)."""
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


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
    _assert_same(got, want)


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

    truncating = fastmodel.save_variant(tmp_path / "kw", base=minilm_path)
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
    _assert_same(got, want)


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
    _assert_same(got, emb.model.encode(texts, convert_to_numpy=True))


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
    _assert_same(got, emb.model.encode(texts, convert_to_numpy=True))
