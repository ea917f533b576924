"""The dry run: what `run` would do, with an encode-rate sample from the table. No writes."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import psycopg

from reembed import bridge, dependents, fitting
from reembed import checkpoint as ckpt
from reembed.checkpoint import Job
from reembed.cost import estimate as estimate_cost
from reembed.cost import size, vector_bytes
from reembed.dependents import Inventory
from reembed.encoding import Embedder, feed_for
from reembed.errors import ConfigError
from reembed.finalize import REWRITE_BYTES_PER_SEC, REWRITE_ROWS_PER_SEC, estimate_finalize_secs
from reembed.queries import query
from reembed.report import Report
from reembed.settings import RunOptions, Settings
from reembed.signals import StopSignal
from reembed.signature import Signature
from reembed.target import TableInfo
from reembed.worker import WINDOW_SECS


def estimate_rows(conn: psycopg.Connection[Any], info: TableInfo) -> int:
    """pg_class.reltuples when the table is large and analysed; an exact count otherwise."""
    row = conn.execute(query("row_estimate"), {"table_oid": info.oid}).fetchone()
    estimate = row["estimate"] if row else None
    if estimate is not None and estimate >= 1_000_000:
        return int(estimate)
    counted = conn.execute(info.statement("count_rows")).fetchone()
    return int(counted["n"]) if counted else 0


def inventory(conn: psycopg.Connection[Any], info: TableInfo, registry: Signature | None, old: Job | None,
              dimension: int, opts: RunOptions, *, probe: bool = True) -> Inventory:
    """Everything on the column and what a new job does with each (reembed.dependents), or a
    ConfigError naming what it refuses; `old`: the job a new one abandons (its dropped indexes
    are this one's to build)."""
    if old is not None and old.strategy == "in_place" and opts.strategy == "shadow":
        raise ConfigError(f"job {old.id} re-embeds {info.qualified}.{info.column} in place: the column already mixes "
                          "two models, which a shadow column cannot undo; abandon it with --strategy in_place; "
                          "nothing was written")
    if old is not None:
        source = old.source_typmod or old.source_dimension
    else:
        source = registry.dimension if registry is not None else None
    carried = [d for d in dependents.recorded(old) if d.action == dependents.REBUILD]
    found = dependents.take(conn, info, dimension=dimension, source_dimension=source,
                            drop_first=opts.drop_hnsw_first, allow_published=opts.allow_published,
                            probe=probe, carried=carried, strategy=opts.strategy)
    found.check(info)
    return found


def rewrite_secs(conn: psycopg.Connection[Any], info: TableInfo, rows: int) -> float:
    """How long tightening the column's typmod (a table rewrite) is expected to hold the table."""
    row = conn.execute(query("table_size"), {"table_oid": info.oid}).fetchone()
    size = int(row["bytes"]) if row and row["bytes"] is not None else 0
    return max(rows / REWRITE_ROWS_PER_SEC, size / REWRITE_BYTES_PER_SEC)  # the slower of the two


def compare(conn: psycopg.Connection[Any], info: TableInfo, registry: Signature | None, old: Job | None,
            dimension: int, opts: RunOptions, *, rows: int, encode_secs: float | None, cost: Any, type_change: bool,
            shadowed: set[str]) -> dict[str, Any]:
    """Both strategies side by side: the extra disk each needs, how long search and the
    application's writes would be unavailable, whether the inventory refuses it; and the one
    recommended (shadow when search is served from the column and nothing refuses it)."""
    indexes = conn.execute(query("cost_indexes"), {"table_oid": info.oid}).fetchall()
    ann = [i for i in indexes if i["method"] in dependents.ANN_METHODS and i["index_name"] in shadowed]
    old_dim = info.typmod or (registry.dimension if registry else None) or dimension
    index_bytes = sum(int(i["bytes"]) for i in ann) * dimension / max(old_dim, 1)
    column_bytes = rows * vector_bytes(info.column_type, dimension)
    finalize = estimate_finalize_secs(rows, dimension, typmod_change=False)
    rewrite = rewrite_secs(conn, info, rows) if type_change else 0.0
    out: dict[str, Any] = {}
    for name in ("in_place", "shadow"):
        refused = None
        try:
            inventory(conn, info, registry, old, dimension, replace(opts, strategy=name), probe=False)
        except ConfigError as exc:
            refused = str(exc)
        if name == "in_place":
            out[name] = {"extra_disk_bytes": int(cost.extra_disk_bytes),
                         "search_unavailable_secs": round((encode_secs or 0.0) + finalize + rewrite, 1),
                         "writers_held_secs": round(opts.max_writers_held + rewrite, 3),
                         "readers_held_secs": round(rewrite, 3), "refused": refused,
                         "prepared_statements_broken": list(_BROKEN_IN_PLACE if type_change else ())}
        else:
            out[name] = {"extra_disk_bytes": int(cost.extra_disk_bytes + column_bytes + index_bytes),
                         "kept_until_cleanup_bytes": int(column_bytes + index_bytes),
                         "search_unavailable_secs": 0.0, "writers_held_secs": round(opts.max_writers_held, 3),
                         "readers_held_secs": round(opts.max_writers_held, 3),  # the swap holds both, at most
                         "refused": refused,
                         "prepared_statements_broken": list(_BROKEN_SHADOW + (_BROKEN_RETYPED if type_change
                                                                              else ()))}
    served = bool(ann) or registry is not None
    if out["shadow"]["refused"] is None and served:
        out["recommended"], why = "shadow", "search is served from the column: shadow keeps it serving"
    elif out["in_place"]["refused"] is None:
        why = "the shadow strategy is refused here" if out["shadow"]["refused"] else "no search index to keep serving"
        out["recommended"] = "in_place"
    else:
        out["recommended"], why = None, "both strategies are refused"
    out["why"] = why
    return out


# What a driver's prepared statements (psycopg prepares after 5 executions; JDBC, pgx alike) do across
# each strategy: PostgreSQL refuses, at every execution until it is prepared again, one whose result's
# columns changed ("cached plan must not change result type"; DEALLOCATE ALL recovers: see the
# runbook). Shown by tests/integration/test_prepared.py.
_BROKEN_SHADOW = ("SELECT * (the shadow column is added at prepare; the swap renames columns)",)
_BROKEN_RETYPED = ("those that return the column (its dimension changes)",)
_BROKEN_IN_PLACE = ("those that return the column, or SELECT * (its type changes at prepare and at the cut-over)",)


def said_strategies(s: dict[str, Any]) -> str:
    parts = []
    for name in ("in_place", "shadow"):
        d = s[name]
        if d["refused"]:
            parts.append(f"{name}: refused")
            continue
        down = d["search_unavailable_secs"]
        unavailable = f"for about {down:g} s" if down else "never"
        broken = d.get("prepared_statements_broken") or []
        parts.append(f"{name}: extra disk up to {size(d['extra_disk_bytes'])}, search unavailable {unavailable}, "
                     f"writers held at most {d['writers_held_secs']:g} s"
                     + (f", prepared statements that fail until prepared again: {' and '.join(broken)}"
                        if broken else ""))
    return "strategies: " + "; ".join(parts) + f"; recommended: {s['recommended'] or 'none'} ({s['why']})"


def sample_texts(conn: psycopg.Connection[Any], info: TableInfo, n: int, rows_total: int) -> list[str]:
    """About `n` texts of the table, pages drawn from all of it."""
    percent = min(100.0, 120.0 * n / max(rows_total, 1))
    rows = conn.execute(info.statement("sample_content"), {"n": n, "percent": percent}).fetchall()
    return [r["content"] for r in rows]


def sample_rate(conn: psycopg.Connection[Any], info: TableInfo, embedder: Embedder, opts: RunOptions,
                rows_total: int) -> float | None:
    """Rows/s of the table's own rows through the pipeline a run uses, timed the way the run
    encodes them: its feed (tokenizer processes, token-budget batches), one untimed pass over the
    whole sample first (first passes over new shapes are slower: the run is past them soon), then
    the sample cut into windows as the run cuts them (about WINDOW_SECS of the pace the first pass
    measured, at most the feed's window). The stages overlap in a run, so the slower sets the
    pace: tokenizer processes beside the device; a tokenizer thread of this process shares its GIL."""
    texts = sample_texts(conn, info, max(2 * opts.batch_size, 512), rows_total)
    if not texts:
        return None
    feed = feed_for(embedder, opts)
    never = StopSignal()
    size = opts.batch_size
    try:
        warm = time.perf_counter()
        feed.encode([feed.submit(texts[i: i + size]) for i in range(0, len(texts), size)], never)
        pace = len(texts) / max(time.perf_counter() - warm, 1e-6)
        started = time.perf_counter()
        pending = [feed.submit(texts[i: i + size]) for i in range(0, len(texts), size)]
        for p in pending:
            p.result()
        tokenized = time.perf_counter()
        limit = max(1, min(feed.window_rows, int(pace * WINDOW_SECS)))  # as worker.window_limit
        per_window = -(-limit // size)  # the run closes a window with the transaction that reaches it
        for start in range(0, len(pending), per_window):
            feed.encode(pending[start: start + per_window], never)
        encoded = time.perf_counter()
    finally:
        feed.close()
    tokenize_secs, forward_secs = tokenized - started, encoded - tokenized
    secs = max(tokenize_secs, forward_secs) if feed.overlapped else tokenize_secs + forward_secs
    return len(texts) / max(secs, 1e-6)


PREVIEW_SAMPLE = 2_000  # rows `plan --bridge` encodes for a preview of the bridge


def _bridge_preview(conn: psycopg.Connection[Any], info: TableInfo, registry: Signature | None, embedder: Embedder,
                    opts: RunOptions, rows: int, bridges: list[bridge.Bridge]) -> dict[str, Any] | None:
    """With --bridge, when the job would fit one: a bridge fitted on a sample the new model encodes
    here and measured as the job's will be (installed nowhere)."""
    sig = embedder.signature
    if not opts.bridge or registry is None or registry.hash == sig.hash or any(b.target_hash == sig.hash
                                                                                for b in bridges):
        return None
    try:
        sample = fitting.sample_table(conn, info, embedder, n=min(opts.bridge_sample, PREVIEW_SAMPLE),
                                      rows_total=rows)
        return fitting.fit(sample, min_recall=opts.bridge_min_recall, embedder=embedder).figures
    except ConfigError as exc:  # too few rows to fit: said, not a refusal of the plan
        return {"error": str(exc)}


def plan_report(
    conn: psycopg.Connection[Any],
    info: TableInfo,
    registry: Signature | None,
    job: Job | None,
    embedder: Embedder,
    settings: Settings,
    started: float,
) -> Report:
    opts, sig = settings.options, embedder.signature
    rows = estimate_rows(conn, info)
    resume = job is not None and job.matches(sig)
    done = ckpt.progress(conn, job)["rows_done"] if resume and job is not None else 0
    to_update = max(rows - done, 0)
    on_column = (dependents.recorded(job) if resume and job is not None
                 else list(inventory(conn, info, registry, job, sig.dimension, opts).dependents))
    rate = sample_rate(conn, info, embedder, opts, rows)
    batches = -(-to_update // opts.batch_size)
    estimate = round(to_update / rate, 1) if rate else None
    alter = (job.source_typmod if resume and job is not None else info.typmod) != sig.dimension
    found = on_column
    cost = estimate_cost(conn, info, rows_total=rows, rows_to_update=to_update, dimension=sig.dimension,
                         type_change=bool(alter), job_secs=estimate,
                         rebuilt={d.name for d in found if d.is_index and d.action == dependents.REBUILD},
                         reindexed={d.name for d in found if d.is_index and d.action == dependents.REINDEX},
                         hnsw_m=info.index.m if info.index else 16)
    strategies = compare(conn, info, registry, job if not resume else None, sig.dimension, opts, rows=rows,
                         encode_secs=estimate, cost=cost, type_change=bool(alter),
                         shadowed={d.name for d in found if d.is_index})
    bridges = bridge.current(conn, info.qualified, info.column)
    preview = _bridge_preview(conn, info, registry, embedder, opts, rows, bridges)
    details = {
        "strategy": opts.strategy,
        "bridges": [{"function": b.called, "state": b.state, "figures": b.figures} for b in bridges],
        "bridge_preview": preview,
        "strategies": strategies,
        "table": info.qualified,
        "rows_to_update": to_update,
        "embedder_batches": batches,
        "estimated_walltime_secs": estimate,
        "encode_rows_per_sec_sample": round(rate, 1) if rate else None,
        "current_signature": registry.as_dict() if registry else None,
        "target_signature": sig.as_dict(),
        "would_alter_typmod": bool(alter),
        "index": info.index.name if info.index else (job.index_name if job else None),
        "dependents": [d.as_json() for d in on_column],
        "resumes_job": job.id if resume and job else None,
        "cut_over_rewrite_secs": round(rewrite_secs(conn, info, rows), 1) if alter else 0.0,
        "cost": cost.as_dict(),
    }
    message = (
        f"plan: {to_update} rows of {info.qualified} to re-embed in {batches} batches with {sig.name} "
        f"({sig.dimension}-d), about {estimate if estimate is not None else '?'} s of encoding; "
        f"typmod change: {'yes' if alter else 'no'}; current model: {registry.name if registry else 'none'}"
        + (f"; resumes job {job.id}" if resume and job else "")
        + "; on the column: " + dependents.summary(on_column)
        + f"; cost: {cost.said()}"
        + (f"; at the cut-over the table is rewritten (vector({sig.dimension})): writers and readers wait "
           f"about {details['cut_over_rewrite_secs']} s" if alter and opts.strategy == "in_place" else "")
        + "; " + said_strategies(strategies)
        + "".join(f"; bridge {bridge.said(b)}" for b in bridges)
        + (f"; bridge preview ({preview['pairs']:,} rows encoded here, nothing installed; the job fits it on "
           f"--bridge-sample rows): {fitting.said(preview)}" + (f"; REFUSED: {preview['refused']}"
                                                                if preview.get("refused") else "")
           if preview and "kind" in preview else f"; bridge preview: {preview['error']}" if preview else "")
    )
    return Report(state="planned", model_name=sig.name, dimension=sig.dimension, model_hash=sig.hash,
                  duration_secs=time.monotonic() - started, message=message, details=details)
