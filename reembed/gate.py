"""The quality gate before a shadow job's swap: nothing is swapped in that search would regret.

On a sample of the table's own rows (TABLESAMPLE BERNOULLI, a fixed seed):
- the new vectors: every row with content has one (rows still captured, and failed rows
  accepted with --accept-failed, apart), finite, not zero, of the target dimension;
- index health: each sampled row, its own new vector as the query, is found in the top k
  through each new ANN index (a row of identical content counts: equal texts share a vector);
- retrieval quality: a query made from each row (one of its sentences, or a window of its
  words: never the whole row), encoded by the new model, finds its row in the top k through
  the new index (recall@k); with the old model given (--old-model), the same query encoded by
  it through the old column, so the gate can say "new is not worse than old by more than X";
  with a bridge (reembed.bridge), the new model's query through it on the old column: what search
  gave while the job ran, beside what it gave before and what it will give after.
A failure swaps nothing: the job stays resumable at the gate (exit 1, the figures on the job
row, in the report and in `status`); --skip-gate passes it, logged.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import psycopg
import structlog
from psycopg import sql
from psycopg.types.json import Jsonb

from reembed import bridge, db
from reembed import checkpoint as ckpt
from reembed.context import RunContext
from reembed.dependents import after_using, rename_refs
from reembed.encoding import Embedder
from reembed.errors import ReembedError
from reembed.queries import query
from reembed.target import TableInfo

log = structlog.get_logger()

K = 10
_OPERATORS = {"l2": "<->", "cosine": "<=>", "ip": "<#>", "l1": "<+>", "hamming": "<~>", "jaccard": "<%>"}
_OPCLASS = re.compile(r"^(.*)\s+(?:vector|halfvec|bit|sparsevec)_(\w+?)_ops$", re.S)
_QUERY = '"reembed gate query"'
_VECTOR = "CAST(%(q)s AS vector)"  # a query vector in a search's SQL
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


class GateFailed(ReembedError):
    """The new vectors or their index fall short: nothing was swapped (exit 1)."""


@dataclass(frozen=True)
class IndexUse:
    """How a query goes through an ANN index: its key expression, its distance operator, and
    the key expression with the column replaced by the query vector."""

    name: str
    key: str
    operator: str
    query_side: str

    @classmethod
    def of(cls, name: str, definition: str, column: str) -> IndexUse | None:
        """None for an index a query cannot be sent through plainly (not hnsw or ivfflat, a
        partial index, several key columns)."""
        try:
            body = after_using(definition, None).strip()
        except ReembedError:
            return None
        method, _, rest = body.partition(" ")
        inside, after = _parenthesised(rest.strip())
        if method not in ("hnsw", "ivfflat") or inside is None or " WHERE " in f" {after.upper()} " \
                or "," in _outside_parens(inside):
            return None
        match = _OPCLASS.match(inside.strip())
        key, kind = (match.group(1).strip(), match.group(2)) if match else (inside.strip(), "l2")
        operator = _OPERATORS.get(kind)
        if operator is None:
            return None
        side = rename_refs(key, column, _QUERY.strip('"')).replace(_QUERY, "CAST(%(q)s AS vector)")
        if side == key:
            return None  # the key does not read the column
        return cls(name, key, operator, side)


def _parenthesised(text: str) -> tuple[str | None, str]:
    """'(a (b) c) rest' -> ('a (b) c', ' rest'); (None, text) when it does not open a parenthesis."""
    if not text.startswith("("):
        return None, text
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return text[1:i], text[i + 1:]
    return None, text


def _outside_parens(text: str) -> str:
    out, depth = [], 0
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            out.append(ch)
    return "".join(out)


def make_query(content: str, rng: random.Random) -> str | None:
    """A query made from a row: one of its sentences (4 words or more), or, for a row of one
    sentence, a window of half its words; None for a row too short to cut (under 8 words)."""
    sentences = [s for s in _SENTENCE.split(content) if len(s.split()) >= 4]
    if len(sentences) >= 2:
        return " ".join(rng.choice(sentences).split()[:64])
    words = content.split()
    if len(words) < 8:
        return None
    size = max(4, len(words) // 2)
    start = rng.randrange(0, len(words) - size + 1)
    return " ".join(words[start: start + size][:64])


@dataclass
class _Row:
    key: str
    content: str
    vector: np.ndarray | None


def run(ctx: RunContext, conn: psycopg.Connection[Any], column: str, uses: Sequence[IndexUse | None],
        old_uses: Sequence[IndexUse | None] = ()) -> None:
    """The gate on `column` (the shadow), through the new indexes `uses`; `old_uses`: the live
    column's indexes, for the old model's recall. Records the figures; raises GateFailed."""
    opts, info, job = ctx.opts, ctx.info, ctx.active
    started = time.monotonic()
    if opts.skip_gate:
        figures: dict[str, Any] = {"passed": None, "skipped": True}
        conn.execute(query("record_gate"), {"gate": Jsonb(figures), "job_id": job.id})
        log.warning("gate_skipped", detail="--skip-gate: the new vectors are swapped in unchecked")
        return
    log.info("gate_started", sample=opts.gate_sample, queries=opts.gate_queries)
    db.register_vectors(conn)  # the gate's own connection reads and sends vectors
    rows = _sample(conn, info, column, opts.gate_sample, job)
    excused = _excused(conn, job)
    figures = {"passed": False, "skipped": False, "sample": len(rows), "k": K}
    figures.update(_vectors(rows, excused, ctx.signature.dimension))
    with_vectors = [r for r in rows if r.vector is not None and np.isfinite(r.vector).all()]
    rng = random.Random(job.id)
    probes = rng.sample(with_vectors, min(opts.gate_queries, len(with_vectors)))
    usable = [u for u in uses if u is not None]
    figures["self_recall"] = {u.name: _self_recall(conn, info, u, probes) for u in usable}
    queries = [(r, q) for r in probes if (q := make_query(r.content, rng)) is not None]
    figures["queries"] = len(queries)
    primary = usable[0] if usable else IndexUse("exact", sql.Identifier(column).as_string(), "<=>",
                                                "CAST(%(q)s AS vector)")
    figures["recall_new"] = _recall(conn, info, ctx.embedder, primary, queries)
    figures["through"] = primary.name
    old = ctx.old_embedder() if ctx.old_embedder is not None else None
    old_use = next((u for u in old_uses if u is not None), None) or IndexUse(
        "exact", sql.Identifier(info.column).as_string(), primary.operator, "CAST(%(q)s AS vector)")
    if old is not None:
        figures["recall_old"] = _recall(conn, info, old, old_use, queries)
        figures["old_through"] = old_use.name
    for b in bridge.current(conn, info.qualified, info.column):  # the new model's queries, bridged, on the old
        if b.state == "mapping" and b.target_hash == job.target_hash:
            through = old_use.query_side.replace(_VECTOR, bridge.wrap(_VECTOR, b))
            figures["recall_bridge"] = _recall(conn, info, ctx.embedder, replace(old_use, query_side=through), queries)
            figures["bridge"] = b.called
    failed = _judge(figures, ctx)
    figures["failures"] = failed
    figures["passed"] = not failed
    figures["secs"] = round(time.monotonic() - started, 3)
    figures["thresholds"] = {"min_recall": opts.gate_min_recall, "max_regression": opts.gate_max_regression,
                             "min_self_recall": opts.gate_min_self_recall}
    conn.execute(query("record_gate"), {"gate": Jsonb(figures), "job_id": job.id})
    log.info("gate_done", **{k: v for k, v in figures.items() if k != "thresholds"})
    if failed:
        raise GateFailed(f"the quality gate refused the swap: {'; '.join(failed)} ({said(figures)}); nothing was "
                         "swapped and search still serves the old vectors; re-run to try the gate again (after "
                         "fixing the model), pass --skip-gate to swap anyway, or --abandon-active with another model")


def said(figures: dict[str, Any]) -> str:
    """The gate's figures in one line (status, the error)."""
    if figures.get("skipped"):
        return "skipped (--skip-gate)"
    parts = [f"{figures.get('sample', 0)} vectors sampled"]
    bad = [f"{figures[k]} {k.replace('_', ' ')}" for k in ("missing", "not_finite", "zero", "wrong_dimension")
           if figures.get(k)]
    parts.append(", ".join(bad) if bad else "all present, finite, non-zero")
    for name, value in (figures.get("self_recall") or {}).items():
        parts.append(f"self-recall@{K} {value:.3f} through {name}")
    if figures.get("recall_new") is not None:
        parts.append(f"recall@{K} new {figures['recall_new']:.3f}"
                     + (f" vs old {figures['recall_old']:.3f}" if figures.get("recall_old") is not None else "")
                     + (f" vs bridged {figures['recall_bridge']:.3f}" if figures.get("recall_bridge") is not None
                        else "")
                     + f" on {figures.get('queries', 0)} queries from the rows")
    return "; ".join(parts)


def _judge(f: dict[str, Any], ctx: RunContext) -> list[str]:
    opts, out = ctx.opts, []
    for key, what in (("missing", "rows with content hold no new vector"), ("not_finite", "vectors not finite"),
                      ("zero", "zero vectors"), ("wrong_dimension", "vectors of another dimension")):
        if f.get(key):
            out.append(f"{f[key]} {what}")
    for name, value in f["self_recall"].items():
        if value is not None and value < opts.gate_min_self_recall:
            out.append(f"index {name} finds a row from its own vector in the top {K} for {value:.3f} of rows "
                       f"(--gate-min-self-recall {opts.gate_min_self_recall:g})")
    recall = f.get("recall_new")
    if recall is not None and recall < opts.gate_min_recall:
        out.append(f"recall@{K} of the new vectors {recall:.3f} < --gate-min-recall {opts.gate_min_recall:g}")
    old = f.get("recall_old")
    if recall is not None and old is not None and recall < old - opts.gate_max_regression:
        out.append(f"recall@{K} of the new vectors {recall:.3f} is worse than the old model's {old:.3f} by more "
                   f"than --gate-max-regression {opts.gate_max_regression:g}")
    return out


def _sample(conn: psycopg.Connection[Any], info: TableInfo, column: str, n: int, job: ckpt.Job) -> list[_Row]:
    total = job.rows_total or 0
    percent = min(100.0, 100.0 * 1.3 * n / max(total, 1))
    rows = conn.execute(info.statement("gate_sample", column=column),
                        {"percent": percent, "seed": job.id, "n": n}).fetchall()
    return [_Row(r["id_text"], r["content"], None if r["e"] is None else np.asarray(r["e"].to_numpy()
                                                                                    if hasattr(r["e"], "to_numpy")
                                                                                    else r["e"], dtype=np.float32))
            for r in rows]


def _excused(conn: psycopg.Connection[Any], job: ckpt.Job) -> set[str]:
    """Rows that may lack a vector now: captured and not caught up yet (the swap's last catch-up
    encodes them), or failed and accepted."""
    rows = conn.execute(query("gate_excused"), {"job_id": job.id}).fetchall()
    return {r["row_id"] for r in rows}


def _vectors(rows: list[_Row], excused: set[str], dimension: int) -> dict[str, int]:
    out = {"missing": 0, "not_finite": 0, "zero": 0, "wrong_dimension": 0}
    for r in rows:
        if r.vector is None:
            out["missing"] += r.key not in excused
        elif r.vector.shape != (dimension,):
            out["wrong_dimension"] += 1
        elif not np.isfinite(r.vector).all():
            out["not_finite"] += 1
        elif not np.any(r.vector):
            out["zero"] += 1
    return out


@contextlib.contextmanager
def _through(conn: psycopg.Connection[Any], info: TableInfo, use: IndexUse) -> Iterator[Callable[[np.ndarray],
                                                                                             list[Any]]]:
    """A search through `use`, for one pass of the gate's queries: one transaction, its settings
    (through the index, as the application's search goes) set once."""
    statement = info.statement("gate_search", key=sql.SQL(use.key), op=sql.SQL(use.operator),
                               q=sql.SQL(use.query_side), k=sql.Literal(K))
    with conn.transaction():
        if use.name != "exact":
            conn.execute(query("gate_search_settings"))
        yield lambda vector: conn.execute(statement, {"q": vector}).fetchall()


def _hit(found: list[Any], row: _Row) -> bool:
    return any(f["id_text"] == row.key or f["content"] == row.content for f in found)


def _self_recall(conn: psycopg.Connection[Any], info: TableInfo, use: IndexUse, probes: list[_Row]) -> float | None:
    if not probes:
        return None
    with _through(conn, info, use) as search:
        hits = sum(_hit(search(r.vector), r) for r in probes if r.vector is not None)
    return round(hits / len(probes), 4)


def _recall(conn: psycopg.Connection[Any], info: TableInfo, embedder: Embedder, use: IndexUse,
            queries: list[tuple[_Row, str]]) -> float | None:
    if not queries:
        return None
    vectors = embedder.encode([q for _, q in queries])
    with _through(conn, info, use) as search:
        hits = sum(_hit(search(np.asarray(v, dtype=np.float32)), r)
                   for (r, _), v in zip(queries, vectors, strict=True))
    return round(hits / len(queries), 4)
