"""The encoder's two stages: tokenize can run in another process and feeds forward the same input."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pytest


@pytest.mark.slow
@pytest.mark.model
def test_the_tokenize_stage_runs_in_another_process_and_gives_forward_the_same_input(minilm: Any) -> None:
    import torch

    texts = ["short", "a much longer text about databases and vectors " * 40, "médium length, with Accents", ""]
    here = minilm.tokenize(texts)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        there = pool.submit(minilm.tokenizer, texts).result(timeout=300)
    assert there.texts == here.texts and list(there.order) == list(here.order)
    assert len(there.chunks) == len(here.chunks)
    for a, b in zip(here.chunks, there.chunks, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
            assert same, key
    np.testing.assert_allclose(minilm.forward(there), minilm.model.encode(texts, convert_to_numpy=True), atol=1e-5)
