"""`reembed eval`: is model B worth it on these rows, and what would it cost here? No writes.

A sample of the table's rows (a fixed seed; --sample rows with content, read once) is the
search's corpus for every model: the stored column's vectors for the current model, each
candidate's own encoding of the same texts (through the pipeline a run uses, timed: the encode
rate on this host's device). Of those rows, --queries are made into queries the way the quality
gate makes them (reembed.gate.make_query: one of a row's sentences, never the whole row), and
each model is measured as the gate measures (reembed.quality, in memory over the sample):
recall@10 and self-recall@10, each with its 95 % interval over the queries; overlap@10 with the
stored column's neighbours; between each candidate and the current column (or the best
candidate, when the current model is not at hand), a paired test on the same queries. Beside
them: the peak memory on the device (reembed.peak), the dimension and storage, and `plan`'s
time, WAL and disk for the whole table with that model (reembed.plan.plan_report, with the rate
measured here).

A model that cannot load, or whose dimension the column's indexes cannot take, is refused (exit
2), as `run` would refuse it, before any other model is measured.
"""

from __future__ import annotations

import gc
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import structlog

from reembed import checkpoint as ckpt
from reembed import db
from reembed.checkpoint import Job
from reembed.cost import size, vector_bytes
from reembed.embedder import SentenceTransformerEmbedder, fingerprint, pick_device, resolve_model_path
from reembed.encoding import Embedder
from reembed.errors import EXIT_OK, ConfigError
from reembed.gate import K, make_query
from reembed.peak import PeakMemory
from reembed.plan import encode_timed, estimate_rows, inventory, plan_report
from reembed.quality import found, mean_interval, nearest, overlap, paired, wilson
from reembed.settings import EvalOptions, ModelSpec, RunOptions, Settings
from reembed.signature import Signature
from reembed.target import TableInfo, inspect_target, read_registry
from reembed.terminal import PRE, duration, sections, table

log = structlog.get_logger()

WARM = 64  # texts encoded once, untimed, before the timed pass (first passes over new shapes are slower)
GATE_MIN_SELF_RECALL = RunOptions.gate_min_self_recall
GATE_MIN_RECALL = RunOptions.gate_min_recall
_METRIC = {"cosine": "cosine", "l2": "l2", "ip": "ip"}


@dataclass
class Sample:
    """The rows every model searches, read once."""

    keys: list[str]
    texts: list[str]
    stored: np.ndarray | None  # the column's vectors of these rows; None when it holds none here
    left_out: int  # rows with content but no usable stored vector: left out, so every model has the same rows
    queries: list[tuple[int, str]]  # (row, the query made from it)
    probes: list[int]  # the rows drawn for queries (self-recall and overlap are measured on them)


@dataclass
class Measured:
    """One model's figures on the sample."""

    label: str
    signature: Signature
    stored: bool = False  # the current column's own vectors
    hits: np.ndarray | None = None  # per query: found (None: no model to encode the queries)
    neighbours: np.ndarray | None = None
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Comparison:
    data: dict[str, Any] = field(default_factory=dict)
    exit_code: int = EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return self.data

    def text(self) -> str:
        return said(self.data)


def evaluate(settings: Settings, options: EvalOptions, *, embedders: list[Embedder] | None = None,
             current: Embedder | None = None) -> Comparison:
    """Library entry point of `reembed eval`. `embedders`: the candidates already loaded (instead
    of options.models; their load is then not measured); `current`: the registry's model, loaded."""
    if not options.models and not embedders:
        raise ConfigError("eval needs at least one candidate: give --model (a local model directory), repeatable")
    if options.sample < 2 * K:
        raise ConfigError(f"--sample must be at least {2 * K} rows, got {options.sample}")
    if options.queries < 1:
        raise ConfigError(f"--queries must be a positive number of rows, got {options.queries}")
    started = time.monotonic()
    with db.connect(settings.target.conninfo(), role="eval", autocommit=True) as conn, db.translated():
        info = inspect_target(conn, settings.target)
        registry = Signature.from_registry(read_registry(conn, info))
        job = ckpt.active_job(conn, info)
        rows_total = estimate_rows(conn, info)
        sample = read_sample(conn, info, options, rows_total, mixed=job is not None and job.strategy == "in_place")
        metric = _metric(info)
        base = _current(sample, registry, options, current, metric)
        measured: list[Measured] = []
        for spec, loaded in _candidates(options, embedders):
            measured.append(_candidate(conn, info, registry, job, settings, options, sample, metric, spec, loaded,
                                       base, started))
            gc.collect()
    data = _compare(info, rows_total, options, sample, metric, base, measured)
    data["duration_secs"] = round(time.monotonic() - started, 2)
    log.info("evaluated", models=[m.label for m in measured], sample=len(sample.texts), queries=len(sample.queries),
             recommended=data["recommended"]["model"], duration_secs=data["duration_secs"])
    return Comparison(data)


def read_sample(conn: psycopg.Connection[Any], info: TableInfo, options: EvalOptions, rows_total: int, *,
                mixed: bool = False) -> Sample:
    """The sample's rows (content, stored vector), once; the queries made from them with the seed.
    `mixed`: an in-place job is rewriting the column (its vectors mix two models: not compared)."""
    percent = min(100.0, 100.0 * 1.3 * options.sample / max(rows_total, 1))
    rows = conn.execute(info.statement("eval_sample"),
                        {"percent": percent, "seed": options.seed, "n": options.sample}).fetchall()
    if len(rows) < 2 * K:
        raise ConfigError(f"{info.qualified} has {len(rows)} rows with content in the sample: too few to search "
                          f"(at least {2 * K}); nothing to evaluate")
    vectors = [None if r["e"] is None else np.asarray(r["e"].to_numpy() if hasattr(r["e"], "to_numpy") else r["e"],
                                                      dtype=np.float32) for r in rows]
    usable = [v is not None and np.isfinite(v).all() for v in vectors]
    stored = None
    left_out = 0
    if any(usable) and not mixed and len({v.shape for v in vectors if v is not None}) == 1:
        left_out = len(rows) - int(sum(usable))
        rows = [r for r, ok in zip(rows, usable, strict=True) if ok]
        stored = np.stack([v for v, ok in zip(vectors, usable, strict=True) if ok and v is not None])
    rng = random.Random(options.seed)  # as the gate: the rows drawn, then a sentence of each
    probes = rng.sample(range(len(rows)), min(options.queries, len(rows)))
    queries = [(i, q) for i in probes if (q := make_query(rows[i]["content"], rng)) is not None]
    return Sample([r["id_text"] for r in rows], [r["content"] for r in rows], stored, left_out, queries, probes)


def _metric(info: TableInfo) -> str:
    """The distance the column's index searches by (cosine without one)."""
    opclass = info.index.opclass if info.index else ""
    kind = opclass.split("_")[1] if opclass.count("_") >= 2 else "cosine"
    return _METRIC.get(kind, "cosine")


def _label(spec: ModelSpec) -> str:
    return spec.model_name or _short(spec.model)


def _short(name: str) -> str:
    """A model directory by its last part; a model's name as it is."""
    path = Path(name)
    return path.name if path.name and os.sep in name else name


def _candidates(options: EvalOptions, embedders: list[Embedder] | None) -> list[tuple[ModelSpec, Embedder | None]]:
    if embedders:
        return [(ModelSpec(model=e.signature.name, device=e.device), e) for e in embedders]
    return [(spec, None) for spec in options.models]


def _load(spec: ModelSpec) -> Embedder:
    name, model_hash = fingerprint(spec)
    return SentenceTransformerEmbedder(spec, model_hash=model_hash)


def _current(sample: Sample, registry: Signature | None, options: EvalOptions, current: Embedder | None,
             metric: str) -> Measured | None:
    """The stored column on the sample; its queries encoded by the registry's model when it is at
    hand (--current-model, or the registry's name found locally with the registry's hash)."""
    if sample.stored is None:
        return None
    sig = registry or Signature("(no registry row)", int(sample.stored.shape[1]), "")
    out = Measured("current", sig, stored=True)
    note = None
    if current is None and registry is not None:
        current, note = _current_model(options, registry)
    if current is not None and registry is not None and current.signature.hash != registry.hash:
        raise ConfigError(f"--current-model {current.signature.name} is not the registry's model {registry.name} "
                          f"(hash {current.signature.hash[:19]}… against {registry.hash[:19]}…); give the model, "
                          "with the --current-prefix and --current-max-seq-length it was run with")
    out.neighbours = nearest(sample.stored, sample.stored[sample.probes], k=K, metric=metric, exclude=sample.probes)
    out.figures = _storage(sig.dimension, "vector")
    if current is not None:
        vectors = current.encode([q for _, q in sample.queries])
        out.hits = found(nearest(sample.stored, vectors, k=K, metric=metric), [i for i, _ in sample.queries],
                         sample.texts)
    else:
        out.figures["note"] = note or "the registry's model is not at hand: give --current-model to measure recall"
    self_hits = found(nearest(sample.stored, sample.stored[sample.probes], k=K, metric=metric), sample.probes,
                      sample.texts)
    out.figures["self_recall"] = wilson(int(self_hits.sum()), len(self_hits)).as_dict()
    return out


def _current_model(options: EvalOptions, registry: Signature) -> tuple[Embedder | None, str | None]:
    if options.current is not None:
        return _load(replace(options.current, model_name=registry.name)), None
    try:
        resolve_model_path(registry.name)
    except ConfigError:
        return None, (f"the registry's model {registry.name} is not a local directory or cached model: give "
                      "--current-model to measure the current column's recall")
    spec = ModelSpec(model=registry.name, device="cpu")
    if fingerprint(spec)[1] != registry.hash:
        return None, (f"{registry.name} here is not the registry's model (another hash): give --current-model "
                      "with the options it was run with")
    return _load(spec), None


def _refusal(conn: psycopg.Connection[Any], info: TableInfo, registry: Signature | None, job: Job | None,
             dimension: int, wanted: str) -> str:
    """The strategy a job with this dimension could run (the one asked for first), or a
    ConfigError naming why neither could (a dimension the column's indexes cannot take)."""
    refused: list[ConfigError] = []
    for strategy in dict.fromkeys((wanted, "shadow", "in_place")):
        try:
            inventory(conn, info, registry, job, dimension, RunOptions(strategy=strategy), probe=False)
            return strategy
        except ConfigError as exc:
            refused.append(exc)
    raise refused[0]


def _candidate(conn: psycopg.Connection[Any], info: TableInfo, registry: Signature | None, job: Job | None,
               settings: Settings, options: EvalOptions, sample: Sample, metric: str, spec: ModelSpec,
               loaded: Embedder | None, base: Measured | None, started: float) -> Measured:
    device = loaded.device if loaded is not None else pick_device(spec.device)
    opts = RunOptions(strategy=options.strategy)
    with PeakMemory(device) as peak:
        load_started = time.monotonic()
        embedder = loaded or _load(spec)
        load_secs = time.monotonic() - load_started
        sig = embedder.signature
        try:
            strategy = _refusal(conn, info, registry, job, sig.dimension, options.strategy)
        except ConfigError as exc:
            raise ConfigError(f"--model {spec.model} ({sig.dimension}-d) cannot replace the column's model: {exc}") \
                from None
        corpus, rate = encode_timed(embedder, sample.texts, opts, warm=WARM)
        queries = embedder.encode([q for _, q in sample.queries])
    bad = ~np.isfinite(corpus).all(axis=1)
    zero = ~np.any(corpus, axis=1)
    corpus = np.where(bad[:, None], 0.0, corpus).astype(np.float32)
    out = Measured(_label(spec) if loaded is None else _short(sig.name), sig)
    out.hits = found(nearest(corpus, np.nan_to_num(queries), k=K, metric=metric), [i for i, _ in sample.queries],
                     sample.texts)
    self_hits = found(nearest(corpus, corpus[sample.probes], k=K, metric=metric), sample.probes, sample.texts)
    out.neighbours = nearest(corpus, corpus[sample.probes], k=K, metric=metric, exclude=sample.probes)
    planned = plan_report(conn, info, registry, job, embedder,
                          Settings(target=settings.target, model=spec, options=replace(opts, strategy=strategy)),
                          started, rate=rate)
    out.figures = {
        "model": spec.model, "device": device, "self_recall": wilson(int(self_hits.sum()), len(self_hits)).as_dict(),
        "not_finite": int(bad.sum()), "zero": int((zero & ~bad).sum()), "rows_per_sec": round(rate, 1),
        "peak_memory": peak.result.as_dict(), "load_secs": round(load_secs, 2) if loaded is None else None,
        **_storage(sig.dimension, info.column_type),
        "plan": {k: planned.details[k] for k in ("strategy", "rows_to_update", "estimated_walltime_secs",
                                                  "would_alter_typmod", "cost", "strategies")},
    }
    del embedder
    return out


def _storage(dimension: int, column_type: str) -> dict[str, Any]:
    return {"dimension": dimension, "bytes_per_vector": vector_bytes(column_type, dimension)}


def _compare(info: TableInfo, rows_total: int, options: EvalOptions, sample: Sample, metric: str,
             base: Measured | None, measured: list[Measured]) -> dict[str, Any]:
    reference = base if base is not None and base.hits is not None else \
        max(measured, key=lambda m: float(m.hits.mean()) if m.hits is not None and len(m.hits) else 0.0)
    models = []
    for m in ([base] if base is not None else []) + measured:
        f = dict(m.figures, label=m.label, current=m.stored, signature=m.signature.as_dict())
        f["table_vector_bytes"] = rows_total * f["bytes_per_vector"]
        if m.hits is not None:
            f["recall"] = wilson(int(m.hits.sum()), len(m.hits)).as_dict()
            if m is not reference and reference.hits is not None:
                f["versus"] = dict(paired(reference.hits, m.hits).as_dict(), reference=reference.label)
        else:
            f["recall"] = None
        if base is not None and m.neighbours is not None and base.neighbours is not None:
            f["overlap"] = mean_interval(overlap(m.neighbours, base.neighbours)).as_dict()
        models.append(f)
    return {
        "table": info.qualified, "column": info.column, "rows_total": rows_total, "k": K, "metric": metric,
        "sample": {"rows": len(sample.texts), "asked": options.sample, "seed": options.seed,
                   "queries": len(sample.queries), "left_out": sample.left_out},
        "reference": reference.label, "models": models,
        "recommended": recommend(models, reference.label),
    }


def recommend(models: list[dict[str, Any]], reference: str) -> dict[str, Any]:
    """The candidate to take, and why: significantly better recall than the current column; else,
    among those no worse than the reference, the cheapest to store and run."""
    candidates = [m for m in models if not m["current"]]
    healthy = [m for m in candidates if m["self_recall"]["value"] >= GATE_MIN_SELF_RECALL
               and (m["recall"] is None or m["recall"]["value"] >= GATE_MIN_RECALL)]
    current = next((m for m in models if m["current"] and m["recall"] is not None), None)

    def cheapest(pool: list[dict[str, Any]]) -> dict[str, Any]:
        return min(pool, key=lambda m: (m["bytes_per_vector"], -(m.get("rows_per_sec") or 0.0)))

    if current is not None:
        better = [m for m in healthy if m.get("versus", {}).get("verdict") == "better"]
        if better:
            best = max(better, key=lambda m: m["recall"]["value"])
            v = best["versus"]
            return {"model": best["label"], "why": f"recall@{K} {v['difference']:+.3f} [{v['low']:+.3f}, "
                    f"{v['high']:+.3f}] over the current column on these rows (p = {v['p_value']:.3g})"}
        tied = [m for m in healthy if m.get("versus", {}).get("verdict") == "no significant difference"]
        if tied:
            pick = cheapest(tied)
            return {"model": None, "why": f"no candidate is significantly better than the current column on these "
                    f"rows; {pick['label']} is as good within the uncertainty ({_cost_said(pick)})"}
        return {"model": None, "why": "keep the current model: every candidate is worse on these rows"}
    if not healthy:
        return {"model": None, "why": f"every candidate falls short of the quality gate's defaults (self-recall@{K} "
                f">= {GATE_MIN_SELF_RECALL:g}, recall@{K} >= {GATE_MIN_RECALL:g})"}
    pool = [m for m in healthy if m["label"] == reference
            or m.get("versus", {}).get("verdict") == "no significant difference"]
    pick = cheapest(pool or healthy)
    peers = [str(m["label"]) for m in pool if m is not pick]
    return {"model": pick["label"], "why": (f"the best recall@{K} on these rows" if not peers else
            f"as good as {', '.join(peers)} within the uncertainty, and the cheapest ({_cost_said(pick)})")
            + "; the current column's recall was not measured (give --current-model)"}


def _cost_said(m: dict[str, Any]) -> str:
    return (f"{m['dimension']}-d, {m['bytes_per_vector']:,} bytes a vector, "
            f"{m.get('rows_per_sec') or 0:,.0f} rows/s here")


def _interval(i: dict[str, float] | None) -> str:
    return "-" if i is None else f"{i['value']:.3f} [{i['low']:.3f}, {i['high']:.3f}]"


def _versus(m: dict[str, Any]) -> str:
    v = m.get("versus")
    if v is None:
        return "(reference)" if not m["current"] or m["recall"] is not None else "-"
    return f"{v['difference']:+.3f} ±{(v['high'] - v['low']) / 2:.3f}: {v['verdict']}"


def _plus_minus(i: dict[str, float] | None) -> str:
    return "-" if i is None else f"{i['value']:.3f} ±{(i['high'] - i['low']) / 2:.3f}"


def _memory(m: dict[str, Any]) -> str:
    peak = m.get("peak_memory")
    if not peak:
        return "-"
    return f"{size(peak['bytes'])} ({'GPU' if peak['kind'] == 'cuda_allocated' else 'RSS'})"


def said(d: dict[str, Any]) -> str:
    """The comparison in sections: quality, cost on this host and for the whole table, the choice."""
    s = d["sample"]
    title = (f"eval: {d['table']}.{d['column']} ({d['rows_total']:,} rows): {s['rows']:,} rows sampled (seed "
             f"{s['seed']}), {s['queries']:,} queries made from them")
    names = [("current: " + _short(m["signature"]["model_name"])) if m["current"] else m["label"] for m in d["models"]]
    quality = table(
        ["model", "dim", f"recall@{d['k']} [95% CI]", f"vs {d['reference']} (paired)", f"self-recall@{d['k']}",
         f"overlap@{d['k']} (stored)"],
        [[n, str(m["dimension"]), _interval(m["recall"]), _versus(m), f"{m['self_recall']['value']:.3f}",
          _plus_minus(m.get("overlap"))] for n, m in zip(names, d["models"], strict=True)],
        right=[False, True])
    cost = table(
        ["model", "rows/s here", "peak memory", "bytes/vector", "column", "re-embed time", "WAL", "extra disk"],
        [[n, f"{m['rows_per_sec']:,.0f}", _memory(m), f"{m['bytes_per_vector']:,}", size(m["table_vector_bytes"]),
          duration(m["plan"]["estimated_walltime_secs"]), size(m["plan"]["cost"]["wal_bytes"]),
          size(m["plan"]["cost"]["extra_disk_bytes"])]
         for n, m in zip(names, d["models"], strict=True) if not m["current"]],
        right=[False, True, True, True, True, True, True, True])
    notes = [("", f"recall@{d['k']}: a query made from a row (one of its sentences) finds the row among the "
                  f"{s['rows']:,} sampled rows ({d['metric']} distance, exact search); on the whole table more rows "
                  "compete, so every model's figure is lower there: compare models, not absolute figures")]
    if s["left_out"]:
        notes.append(("", f"{s['left_out']:,} sampled rows without a stored vector were left out"))
    notes += [("", f"{m['label']}: {m['note']}") for m in d["models"] if m.get("note")]
    notes += [("", f"{m['label']}: {m['not_finite']} vectors not finite, {m['zero']} zero")
              for m in d["models"] if m.get("not_finite") or m.get("zero")]
    rec = d["recommended"]
    choice = [("", (f"Recommended: {rec['model']}: " if rec["model"] else "Recommended: no change: ") + rec["why"])]
    return sections(title, [("Quality on your rows (95 % intervals over the queries)", [(PRE, x) for x in quality]),
                            (f"Cost on this host and for the whole table ({d['rows_total']:,} rows)",
                             [(PRE, x) for x in cost]),
                            ("Notes", notes), ("What is recommended", choice)])
