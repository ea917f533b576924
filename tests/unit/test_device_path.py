"""The device path, on this CPU: finite vectors at fp16, device faults told from row faults, out of
memory recovered wherever it strikes, no batch's token embeddings kept past its forward, and every
stream and event named by its device (an AST check of reembed/feed.py)."""

from __future__ import annotations

import ast
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import torch

from reembed import encoding
from reembed.embedder import SentenceTransformerEmbedder
from reembed.errors import DeviceFailed
from reembed.failures import encode_isolating
from reembed.settings import ModelSpec
from reembed.signals import StopSignal
from support.fakes import HashEmbedder
from support.models import reference
from support.models import texts as _texts
from support.scripts import fastmodel

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def static_normalized(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A StaticEmbedding followed by Normalize: the shape of the model that made NaN at fp16."""
    path = tmp_path_factory.mktemp("static-normalized")
    return fastmodel.save_static_model(path, tokenizer_dir=minilm_path, dim=64, normalize=True)


def _feed_all(feed: Any, texts: list[str], per: int = 25) -> np.ndarray:
    out = feed.encode([feed.submit(texts[i: i + per]) for i in range(0, len(texts), per)], StopSignal())
    assert out is not None
    return np.concatenate(out)


def test_fp16_vectors_are_finite_and_unit_length_with_the_empty_text(static_normalized: Path) -> None:
    texts = ["", *_texts(120), ""]
    from sentence_transformers import SentenceTransformer

    as_it_was = SentenceTransformer(str(static_normalized), device="cpu").half()  # the whole chain at fp16
    assert not np.isfinite(as_it_was.encode(texts)).all()  # the defect: the empty text's zero vector, NaN
    emb = SentenceTransformerEmbedder(ModelSpec(model=str(static_normalized), device="cpu", precision="fp16"))
    want = SentenceTransformerEmbedder(ModelSpec(model=str(static_normalized), device="cpu")).encode(texts)
    feed = emb.feed(workers=0)
    try:
        for got in (_feed_all(feed, texts), emb.encode(texts)):  # the fast feed, and the model's own stages
            assert np.isfinite(got).all()
            norms = np.linalg.norm(got, axis=1)
            empty = np.linalg.norm(want, axis=1) == 0  # "", " ": no token, a zero vector at fp32 too
            assert empty.sum() >= 3 and np.allclose(norms[~empty], 1.0, atol=1e-3) and np.all(norms[empty] == 0.0)
            np.testing.assert_allclose(got, want, atol=2e-3)  # fp16's rounding, no more
    finally:
        feed.close()


@pytest.mark.parametrize(("error", "fault"), [
    (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA error: device-side assert triggered"), True),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`"), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (ValueError("cannot encode this row"), False),
    (RuntimeError("expected scalar type Float but found Half"), False),
], ids=["illegal-access", "device-assert", "cublas", "oom", "row", "dtype"])
def test_device_faults_are_told_from_row_faults(error: BaseException, fault: bool) -> None:
    assert encoding.is_device_fault(error) is fault


def test_a_device_fault_while_narrowing_fails_the_run_and_blames_no_row() -> None:
    emb = HashEmbedder(8)

    def broken(texts: Any) -> np.ndarray:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    emb.forward = broken  # type: ignore[method-assign]
    texts: list[str | None] = ["a", "b", "c", "d"]
    out: list[np.ndarray | None] = [None] * 4
    failed: dict[int, str] = {}
    with pytest.raises(DeviceFailed, match="the device failed .*illegal memory access") as raised:
        encode_isolating(emb, texts, [0, 1, 2, 3], out, failed)
    assert raised.value.exit_code == 1 and failed == {} and out == [None] * 4


def test_a_non_finite_vector_fails_its_row_and_no_other() -> None:
    emb = HashEmbedder(8)
    real = emb.forward

    def some_nan(texts: Any) -> np.ndarray:
        vectors = real(texts)
        vectors[[i for i, t in enumerate(texts) if "bad" in t]] = np.nan
        return vectors

    emb.forward = some_nan  # type: ignore[method-assign]
    texts: list[str | None] = ["ok 1", "bad", "ok 2"]
    out: list[np.ndarray | None] = [None] * 3
    failed: dict[int, str] = {}
    encode_isolating(emb, texts, [0, 1, 2], out, failed)
    assert failed == {1: encoding.NON_FINITE} and out[1] is None
    assert out[0] is not None and out[2] is not None and np.isfinite(out[0]).all()


def test_out_of_memory_in_fetch_halves_the_budget_once_and_every_row_comes_back_in_order(minilm_path: Path) -> None:
    emb = SentenceTransformerEmbedder(ModelSpec(model=str(minilm_path), device="cpu"))
    texts = _texts(150)
    feed = emb.feed(workers=0, max_batch_tokens=2048, window_rows=1024)
    fetch, calls = feed.device.fetch, []

    def fetch_once_out_of_memory(embeddings: Any) -> Any:
        calls.append(len(embeddings))
        if len(calls) == 2:  # the second batch's results do not fit on the way back
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")
        return fetch(embeddings)

    feed.device.fetch = fetch_once_out_of_memory  # type: ignore[method-assign]
    try:
        with structlog.testing.capture_logs() as logs:
            got = _feed_all(feed, texts)
    finally:
        feed.close()
    assert [e["max_batch_tokens"] for e in logs if e["event"] == "token_budget_halved"] == [1024]
    np.testing.assert_allclose(got, reference(minilm_path).encode(texts), rtol=1e-4, atol=1e-5)


def test_the_next_windows_first_batch_is_staged_before_the_last_results_are_read(minilm_path: Path) -> None:
    """The pipeline does not drain at a window's end: the next window's first batch is staged
    (on CUDA: built and copied while the device runs) before this window's last results are read,
    and it is that staged batch the next window starts with (staged once, not twice)."""
    emb = SentenceTransformerEmbedder(ModelSpec(model=str(minilm_path), device="cpu"))
    texts = _texts(180)
    feed = emb.feed(workers=0, max_batch_tokens=1024, window_rows=60)
    windows = [[feed.submit(texts[w + i: w + i + 20]) for i in range(0, 60, 20)] for w in range(0, 180, 60)]
    for window in windows:
        for p in window:
            p.result()  # tokenised: the next window counts as ready
    events: list[str] = []
    stage, read, embed = feed.device.stage, feed.device.read, emb.embed

    def staging(arrays: Any) -> Any:
        events.append("stage")
        return stage(arrays)

    def reading(fetched: Any) -> Any:
        events.append("read")
        return read(fetched)

    def embedding(features: Any) -> Any:
        events.append("embed")
        return embed(features)

    feed.device.stage, feed.device.read = staging, reading  # type: ignore[method-assign]
    emb.embed = embedding  # type: ignore[method-assign]
    got, per_window = [], []
    try:
        for k, window in enumerate(windows):
            following = windows[k + 1] if k + 1 < len(windows) else None
            events.clear()
            out = feed.encode(window, StopSignal(), upcoming=lambda following=following: following)
            assert out is not None
            got.append(np.concatenate(out))
            per_window.append(list(events))
    finally:
        feed.close()
    assert feed.staged_ahead == 2
    for k, seen in enumerate(per_window):
        after_last_forward = seen[len(seen) - seen[::-1].index("embed"):]
        if k + 1 < len(windows):  # the next window's first staged, then this window's last results read
            assert after_last_forward[0] == "stage" and set(after_last_forward[1:]) == {"read"}, seen
        else:
            assert set(after_last_forward) == {"read"}, seen
        # every batch staged once: this window's first was staged by the one before
        assert seen.count("stage") == seen.count("embed") - (1 if k else 0) + (1 if k + 1 < len(windows) else 0)
    np.testing.assert_allclose(np.concatenate(got), reference(minilm_path).encode(texts), rtol=1e-4, atol=1e-5)


def test_a_batch_keeps_no_token_embeddings_past_its_forward(minilm_path: Path) -> None:
    emb = SentenceTransformerEmbedder(ModelSpec(model=str(minilm_path), device="cpu"))
    first = emb.model[0]
    forward, kept, alive_at_start = first.forward, [], []

    def watched(features: Any, **kw: Any) -> Any:
        alive_at_start.append([ref() is not None for ref in kept])
        out = forward(features, **kw)
        kept.append(weakref.ref(out["token_embeddings"]))
        return out

    first.forward = watched
    feed = emb.feed(workers=0, max_batch_tokens=1024, window_rows=1024)
    try:
        _feed_all(feed, _texts(120))
    finally:
        feed.close()
    assert len(kept) > 3  # several device batches in one window
    assert all(not any(alive) for alive in alive_at_start), alive_at_start


def test_every_stream_and_event_of_the_feed_names_its_device() -> None:
    """No `.record()` or `current_stream()` without its stream or device: on cuda:N (N >= 1) the
    current device is still cuda:0, and an event recorded there says nothing of cuda:N's copies.
    (Chosen over a fake device: the rule is syntactic, and this check holds for every line.)"""
    import reembed.feed

    tree = ast.parse(Path(reembed.feed.__file__).read_text())
    unnamed = [node.lineno for node in ast.walk(tree)
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr in ("record", "current_stream", "Stream")
               and not node.args and not node.keywords]
    assert unnamed == [], f"reembed/feed.py lines {unnamed} rely on the current device"
    streams = [node for node in ast.walk(tree)
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Stream"]
    assert streams and all(any(k.arg == "device" for k in node.keywords) for node in streams)
