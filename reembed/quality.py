"""Retrieval quality on a sample, with its uncertainty: the arithmetic of `reembed eval`.

The measures are the quality gate's (reembed.gate), computed in memory over a sample of the
table's rows instead of through an index over the whole table:
- recall@k: a query made from a row (one of its sentences) finds that row in the top k of the
  sample (a row of identical content counts: equal texts share a vector);
- self-recall@k: a row's own vector finds the row in the top k (a degenerate model, one that
  gives many texts the same vector, fails it);
- overlap@k: of a row's k nearest other rows in one space, the share that are also among its k
  nearest in another (the stored column's): how much of today's neighbourhood a model keeps.

Uncertainty is over the queries, which are a sample: a Wilson score interval for a recall (a
proportion), a normal interval for a mean overlap, and, between two models on the same queries, a
paired comparison (McNemar's exact test on the queries one finds and the other misses, and an
interval for the difference), so that 0.01 on 200 queries is said to be no significant difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval
ALPHA = 0.05
_CHUNK = 1024  # queries scored against the whole sample at a time
METRICS = ("cosine", "l2", "ip")


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_dict(self) -> dict[str, float]:
        return {"value": round(self.value, 4), "low": round(self.low, 4), "high": round(self.high, 4)}


def wilson(hits: int, n: int, *, z: float = Z95) -> Interval:
    """The Wilson score interval of a proportion `hits / n` (good at 0, 1 and small n)."""
    if n <= 0:
        return Interval(math.nan, 0.0, 1.0)
    p = hits / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: np.ndarray, *, z: float = Z95) -> Interval:
    """A mean and its normal-approximation interval."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    mean = float(np.mean(values))
    half = z * float(np.std(values, ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return Interval(mean, mean - half, mean + half)


@dataclass(frozen=True)
class Paired:
    """Model B against model A on the same queries: B's recall minus A's, its interval, McNemar's
    exact two-sided p-value, and the verdict it supports."""

    difference: float
    low: float
    high: float
    p_value: float
    only_a: int  # queries A finds and B misses
    only_b: int

    @property
    def verdict(self) -> str:
        if self.p_value >= ALPHA:
            return "no significant difference"
        return "better" if self.difference > 0 else "worse"

    def as_dict(self) -> dict[str, object]:
        return {"difference": round(self.difference, 4), "low": round(self.low, 4), "high": round(self.high, 4),
                "p_value": round(self.p_value, 4), "only_reference": self.only_a, "only_this": self.only_b,
                "verdict": self.verdict}


def paired(a: np.ndarray, b: np.ndarray, *, z: float = Z95) -> Paired:
    """`a`, `b`: per query, did model A (B) find its row."""
    if a.shape != b.shape:
        raise ValueError("paired outcomes must be on the same queries")
    n = len(a)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if n == 0:
        return Paired(0.0, 0.0, 0.0, 1.0, 0, 0)
    difference = (only_b - only_a) / n
    variance = max(0.0, (only_a + only_b) - (only_b - only_a) ** 2 / n) / (n * n)
    half = z * math.sqrt(variance)
    return Paired(difference, difference - half, difference + half, mcnemar(only_a, only_b), only_a, only_b)


def mcnemar(only_a: int, only_b: int) -> float:
    """McNemar's exact test: the two-sided binomial p-value of the discordant pairs (1.0 when none)."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m
    return min(1.0, 2.0 * tail)


def normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(vectors / np.where(norms == 0, 1.0, norms), dtype=np.float32)


def nearest(corpus: np.ndarray, queries: np.ndarray, *, k: int, metric: str = "cosine",
            exclude: Sequence[int] | None = None) -> np.ndarray:
    """For each query, the indices of its `k` nearest rows of `corpus` (nearest first), by the
    index's own distance (cosine, l2, or inner product); `exclude[i]`: a corpus row left out for
    query i (the row itself, for neighbours of a row)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    corpus = np.asarray(corpus, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    k = min(k, len(corpus) - (1 if exclude is not None else 0))
    if metric == "cosine":
        corpus, queries = normalized(corpus), normalized(queries)
    squared = np.einsum("ij,ij->i", corpus, corpus) if metric == "l2" else None
    out = np.empty((len(queries), max(k, 0)), dtype=np.int64)
    for start in range(0, len(queries), _CHUNK):
        block = queries[start: start + _CHUNK]
        score = block @ corpus.T  # larger is nearer
        if squared is not None:
            score = 2 * score - squared[None, :]  # -(|q - c|^2) up to the query's own norm
        if exclude is not None:
            score[np.arange(len(block)), np.asarray(exclude[start: start + len(block)])] = -np.inf
        top = np.argpartition(-score, k - 1, axis=1)[:, :k] if 0 < k < score.shape[1] else \
            np.tile(np.arange(score.shape[1]), (len(block), 1))[:, :k]
        order = np.argsort(-np.take_along_axis(score, top, axis=1), axis=1, kind="stable")
        out[start: start + len(block)] = np.take_along_axis(top, order, axis=1)
    return out


def found(top: np.ndarray, targets: Sequence[int], contents: Sequence[str]) -> np.ndarray:
    """Per query: is its target row, or a row of the same content, among `top`'s rows?"""
    return np.array([any(j == t or contents[j] == contents[t] for j in row) for row, t in
                     zip(top.tolist(), targets, strict=True)], dtype=bool)


def overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the share of its neighbours in `a` that are also its neighbours in `b`."""
    k = a.shape[1]
    if k == 0:
        return np.zeros(len(a))
    return np.array([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist(), strict=True)])
