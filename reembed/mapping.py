"""The bridge's map from the new model's space into the old one, fitted on paired vectors of the
same rows (the new model's encoding, the vector the table holds), and measured on rows it never saw.

A map is affine, out = q @ weight + bias (then unit length when the old vectors are), so that the
database computes it with pgvector's own inner product, one output coordinate per row of a table
(reembed.bridge). The kinds fitted, each on the training rows and judged on validation rows cut
from them (the held-out rows stay out of every choice):

- ridge: least squares with a ridge penalty, its strength chosen on the validation rows;
- procrustes (equal dimensions only): an orthogonal map with a scale, on unit vectors;
- ridge+nce: the ridge map refined for retrieval (InfoNCE: each mapped vector must be nearer its
  own row's old vector than the other rows' old vectors in its batch), Adam in numpy, seeded.

Besides whole rows, the training pairs may hold fragments of them (one sentence of a row, encoded by
the new model) paired with the row's old vector: queries are short, rows are not, and a map fitted
on rows alone maps queries worse (measured: 92 % of the old model's own success@10 from 4,000 rows,
103 % with one fragment of each; the bench's `bridge` section).

The kind with the best validation recall is fitted again on every training row. `measure` takes
each held-out row as a query: its new vector, mapped, searched among the sample's old vectors, is
compared with the old model's own neighbours (its old vector's) and with the new model's (its new
vector's among the new vectors): recall@k of each, and how often the row itself is found.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from reembed.errors import ConfigError

K = 10
RIDGE_STRENGTHS = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # times the inputs' mean square, per coordinate
_NCE_TEMPERATURE = 0.03
_NCE_EPOCHS = 40
_NCE_BATCH = 1024
_NCE_RATE = 1e-3
MIN_PAIRS = 50  # fewer pairs than this fit nothing worth measuring
_UNIT = 1e-3  # old vectors whose norms are all within this of 1 are unit vectors


@dataclass(frozen=True)
class Pairs:
    """The same rows' vectors in both spaces (row i of each is one row of the table)."""

    new: np.ndarray  # (n, new dimension)
    old: np.ndarray  # (n, old dimension)

    def __len__(self) -> int:
        return len(self.new)

    def take(self, rows: np.ndarray) -> Pairs:
        return Pairs(self.new[rows], self.old[rows])


@dataclass(frozen=True)
class Map:
    kind: str
    weight: np.ndarray  # (new dimension, old dimension)
    bias: np.ndarray  # (old dimension,)
    normalize: bool  # the old model's vectors are unit length: the output is too

    def apply(self, new: np.ndarray) -> np.ndarray:
        out = np.asarray(new, dtype=np.float64) @ self.weight + self.bias
        return unit(out) if self.normalize else out

    @property
    def new_dimension(self) -> int:
        return int(self.weight.shape[0])

    @property
    def old_dimension(self) -> int:
        return int(self.weight.shape[1])


@dataclass(frozen=True)
class Fitted:
    """A map, how it was chosen, and what it gives on the held-out rows."""

    map: Map
    figures: dict[str, Any]
    held: np.ndarray  # the rows measured (never fitted on), numbers into the pairs


def split(pairs: Pairs, *, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers for training and for the measurement (`held_out` of them, at least one)."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    cut = max(1, int(round(len(pairs) * held_out)))
    return np.sort(order[cut:]), np.sort(order[:cut])


Fragments = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def fit(pairs: Pairs, *, held_out: float = 0.2, seed: int = 0, refine: bool = True,
        fragments: Fragments | None = None) -> Fitted:
    """Fit on part of `pairs`, measure on the rest (reembed.mapping's docstring). `fragments`: given
    the training rows, (rows, new vectors) of query-like fragments of them (a sentence of each row,
    encoded by the new model), each paired with its row's old vector as more training pairs: what a
    search sends is a short query, not a whole row (the held-out rows get none). With fragments, the
    kinds are judged by how often a validation row's fragment finds that row; else by the row's own."""
    if len(pairs) < MIN_PAIRS:
        raise ConfigError(f"only {len(pairs)} rows hold both an old vector and content: a bridge needs at least "
                          f"{MIN_PAIRS} to be fitted and measured")
    started = time.monotonic()
    train, held = split(pairs, held_out=held_out, seed=seed)
    normalize = bool(np.all(np.abs(np.linalg.norm(pairs.old, axis=1) - 1.0) < _UNIT))
    extra_rows, extra_new = fragments(train) if fragments is not None else (np.empty(0, dtype=np.int64), None)

    def rows_and_fragments(rows: np.ndarray, *, with_fragments: bool = True) -> Pairs:
        if not with_fragments or extra_new is None or not len(extra_rows):
            return pairs.take(rows)
        keep = np.isin(extra_rows, rows)
        return Pairs(np.concatenate([pairs.new[rows], extra_new[keep]]),
                     np.concatenate([pairs.old[rows], pairs.old[extra_rows[keep]]]))

    fitting, validation = split(pairs.take(train), held_out=0.2, seed=seed + 1)
    judge = _Judge(pairs, train[validation], extra_rows, extra_new)
    strength = choose_strength(rows_and_fragments(train[fitting]), pairs.take(train[validation]))
    kinds: dict[str, tuple[bool, Callable[[Pairs], Map]]] = {
        "ridge": (True, lambda p: ridge(p, strength, normalize=normalize))}
    if pairs.new.shape[1] == pairs.old.shape[1]:
        kinds["procrustes"] = (True, lambda p: procrustes(p, normalize=normalize))
    if refine:
        kinds["ridge+nce"] = (True, lambda p: nce(p, ridge(p, strength, normalize=normalize), seed=seed))
        if extra_new is not None and len(extra_rows):
            kinds["ridge+nce/rows"] = (False, lambda p: nce(p, ridge(p, strength, normalize=normalize), seed=seed))
    scores = {name: judge.score(build(rows_and_fragments(train[fitting], with_fragments=uses)))
              for name, (uses, build) in kinds.items()}
    kind = max(scores, key=lambda k: scores[k])
    uses, build = kinds[kind]
    chosen = build(rows_and_fragments(train, with_fragments=uses))
    chosen = Map(kind, chosen.weight, chosen.bias, chosen.normalize)
    fit_secs = time.monotonic() - started
    figures: dict[str, Any] = {
        "kind": kind, "pairs": len(pairs), "train": len(train), "held_out": len(held), "k": K,
        "fragments": int(len(extra_rows)) if uses else 0,
        "ridge_strength": strength, "normalize": normalize,
        "new_dimension": int(pairs.new.shape[1]), "old_dimension": int(pairs.old.shape[1]),
        "validation": {"judged_by": judge.by, **{k: round(v, 4) for k, v in scores.items()}},
        "fit_secs": round(fit_secs, 3),
    }
    figures.update(measure(chosen, pairs, held))
    return Fitted(chosen, figures, held)


class _Judge:
    """Scores a candidate map on the validation rows: how often a row's fragment (a query) finds the
    row among the validation rows' old vectors, when there are fragments; else the row's own vector."""

    def __init__(self, pairs: Pairs, rows: np.ndarray, extra_rows: np.ndarray, extra_new: np.ndarray | None) -> None:
        self.pairs = pairs.take(rows)
        keep = np.isin(extra_rows, rows) if extra_new is not None else np.zeros(0, dtype=bool)
        self.queries = extra_new[keep] if extra_new is not None and keep.any() else None
        where = {int(r): i for i, r in enumerate(rows)}
        self.answers = np.array([where[int(r)] for r in extra_rows[keep]]) if self.queries is not None else None
        self.by = "fragments found their row" if self.queries is not None else "rows found themselves"

    def score(self, candidate: Map) -> float:
        if self.queries is None or self.answers is None:
            return self_recall(candidate, self.pairs)
        k = min(K, len(self.pairs))
        found = top(unit(candidate.apply(self.queries)), unit(self.pairs.old.astype(np.float64)), k)
        return float(np.mean([a in f for a, f in zip(self.answers, found, strict=True)]))


def choose_strength(train: Pairs, validation: Pairs) -> float:
    """The ridge penalty (times the inputs' mean square) whose map is nearest the validation rows'
    old vectors by cosine."""
    scores = {s: _mean_cosine(ridge(train, s, normalize=False).apply(validation.new), validation.old)
              for s in RIDGE_STRENGTHS}
    return max(scores, key=lambda s: scores[s])


def ridge(pairs: Pairs, strength: float, *, normalize: bool) -> Map:
    x, y = pairs.new.astype(np.float64), pairs.old.astype(np.float64)
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    penalty = strength * np.trace(gram) / gram.shape[0]
    weight = np.linalg.solve(gram + penalty * np.eye(gram.shape[0]), xc.T @ yc)
    return Map("ridge", weight, my - mx @ weight, normalize)


def procrustes(pairs: Pairs, *, normalize: bool) -> Map:
    """The orthogonal map (with one scale) of the centred unit vectors: equal dimensions only."""
    x, y = unit(pairs.new.astype(np.float64)), unit(pairs.old.astype(np.float64))
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    u, s, vt = np.linalg.svd(xc.T @ yc)
    rotation = u @ vt
    scale = float(s.sum() / max(np.sum(xc * xc), 1e-12))
    # the map takes raw new vectors: their unit scaling folded in is exact only for unit inputs,
    # which the new model's are when it normalises; a query's length does not change its cosine
    weight = rotation * scale
    return Map("procrustes", weight, my - mx @ weight, normalize)


def nce(pairs: Pairs, start: Map, *, seed: int, epochs: int = _NCE_EPOCHS) -> Map:
    """`start` refined for retrieval: InfoNCE over batches of rows (Adam, numpy, seeded)."""
    rng = np.random.default_rng(seed)
    x = pairs.new.astype(np.float64)
    targets = unit(pairs.old.astype(np.float64))
    weight, bias = start.weight.copy(), start.bias.copy()
    adam = _Adam([weight, bias])
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for begin in range(0, len(x), _NCE_BATCH):
            rows = order[begin: begin + _NCE_BATCH]
            if len(rows) < 2:
                continue
            dw, db = _nce_gradient(x[rows], targets[rows], weight, bias)
            adam.step([dw, db])
    return Map("ridge+nce", weight, bias, start.normalize)


def _nce_gradient(x: np.ndarray, targets: np.ndarray, weight: np.ndarray,
                  bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The gradient of InfoNCE (row i's mapped vector against every row's target, its own the
    right answer) with respect to the weight and the bias."""
    z = x @ weight + bias
    norms = np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    u = z / norms
    logits = u @ targets.T / _NCE_TEMPERATURE
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(x)), np.arange(len(x))] -= 1.0
    du = (p / len(x)) @ targets / _NCE_TEMPERATURE
    dz = (du - u * np.sum(u * du, axis=1, keepdims=True)) / norms
    return x.T @ dz, dz.sum(axis=0)


class _Adam:
    def __init__(self, params: list[np.ndarray], rate: float = _NCE_RATE) -> None:
        self.params, self.rate, self.t = params, rate, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            p -= self.rate * (m / (1 - 0.9 ** self.t)) / (np.sqrt(v / (1 - 0.999 ** self.t)) + 1e-8)


def measure(chosen: Map, pairs: Pairs, held: np.ndarray, *, k: int = K) -> dict[str, Any]:
    """Each held-out row a query, searched among every sampled row by cosine: recall@k of the
    mapped new vector's neighbours among the old vectors against the old vector's own (what search
    gave before) and against the new vector's among the new vectors (what it will give after);
    how often the row itself is found; and how much the old and new models agree at all."""
    k = min(k, len(pairs))
    old_space, new_space = unit(pairs.old.astype(np.float64)), unit(pairs.new.astype(np.float64))
    bridged = top(unit(chosen.apply(pairs.new[held])), old_space, k)
    before = top(old_space[held], old_space, k)
    after = top(new_space[held], new_space, k)
    return {
        "recall_vs_old": round(_overlap(bridged, before, k), 4),
        "recall_vs_new": round(_overlap(bridged, after, k), 4),
        "self_recall": round(float(np.mean([r in b for r, b in zip(held, bridged, strict=True)])), 4),
        "old_vs_new": round(_overlap(before, after, k), 4),
    }


def self_recall(chosen: Map, pairs: Pairs, *, k: int = K) -> float:
    """How often a row's mapped new vector finds its own old vector in the top k among `pairs`."""
    k = min(k, len(pairs))
    found = top(unit(chosen.apply(pairs.new)), unit(pairs.old.astype(np.float64)), k)
    return float(np.mean([i in row for i, row in enumerate(found)]))


def top(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """The k nearest rows of `corpus` to each query (unit vectors: by inner product), unordered."""
    out = []
    for begin in range(0, len(queries), 1024):
        scores = queries[begin: begin + 1024] @ corpus.T
        out.append(np.argpartition(-scores, k - 1, axis=1)[:, :k])
    return np.concatenate(out) if out else np.empty((0, k), dtype=np.int64)


def _overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)])) if len(a) else 0.0


def unit(x: np.ndarray) -> np.ndarray:
    """Each row at length 1 (a zero row stays zero)."""
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12))


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(unit(a) * unit(np.asarray(b, dtype=np.float64)), axis=-1)))
