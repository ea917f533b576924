"""The dry run: what `run` would do, with an encode-rate sample from the table. No writes."""

from __future__ import annotations

import textwrap
import time
from dataclasses import replace
from typing import Any

import numpy as np
import psycopg
import structlog

from reembed import bridge, dependents, fitting, partitions
from reembed import checkpoint as ckpt
from reembed.checkpoint import Job
from reembed.cost import estimate as estimate_cost
from reembed.cost import vector_bytes
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
from reembed.terminal import WIDTH, plan_text
from reembed.worker import WINDOW_SECS

log = structlog.get_logger()


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
    if probe:
        check_null_text(conn, info)
        check_shared_registry(conn, info, registry, opts)
    return found


def check_shared_registry(conn: psycopg.Connection[Any], info: TableInfo, registry: Signature | None,
                          opts: RunOptions) -> None:
    """Other vector columns of the registry's dimension (another table's, or another column of this
    one) probably follow the same registry row: the job would flip it for them too and leave them in
    a space it no longer names. Refused, by name, unless --allow-shared-registry says they follow
    another one (or may be left as they are)."""
    if registry is None:
        return
    rows = conn.execute(query("vector_columns_of_dimension"),
                        {"dim": registry.dimension, "table_oid": info.oid}).fetchall()
    jobs = {(info.oid, info.column), *opts.group_columns}  # a job over several tables: each is the job's own
    others = [f"{r['schema']}.{r['table_name']}.{r['column_name']}" for r in rows
              if not any(r["table_oid"] == oid and (r["column_name"] in (column, f"{column}_previous")
                                                    or r["column_name"].startswith(f"{column}_reembed"))
                         for oid, column in jobs)]
    if not others:
        return
    if opts.allow_shared_registry:
        log.warning("registry_shared", other_columns=others, registry=".".join(info.registry),
                    detail="these columns are left as they are while the registry will name the new model")
        return
    raise ConfigError(
        f"{', '.join(others)} also hold{'s' if len(others) == 1 else ''} {registry.dimension}-d vectors, probably of "
        f"the model {'.'.join(info.registry)} names ({registry.name}): the job would make the registry name the new "
        f"model for them too; re-embed them in their own jobs first with --registry pointing at a registry of their "
        "own, or pass --allow-shared-registry if they follow another registry or may be left as they are; nothing "
        "was written")


def check_null_text(conn: psycopg.Connection[Any], info: TableInfo) -> None:
    """A NOT NULL vector column takes no NULL: rows whose text is NULL (they would get none) are
    refused before any write, by their count, unless --null-content empty encodes them."""
    if not info.not_null or info.null_content != "null":
        return
    row = conn.execute(info.statement("null_text_rows")).fetchone()
    count = int(row["n"]) if row else 0
    if count:
        raise ConfigError(
            f"{count} rows of {info.qualified} have no text ({info.content_sql or info.content_column} is NULL) and "
            f"{info.column} is NOT NULL: they would have no vector; pass --null-content empty to encode them as the "
            "empty text, or give them text first; nothing was written")


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


def partitioned(conn: psycopg.Connection[Any], info: TableInfo, found: list[dependents.Dependent],
                opts: RunOptions, *, type_change: bool) -> dict[str, Any]:
    """A partitioned table's part of the plan: its partitions, the index builds one partition at a
    time, and what the table is while the job runs."""
    parts = partitions.tree(conn, info)
    if not parts:
        return {}
    rows = {p.label: p.rows for p in parts}
    builds: list[dict[str, Any]] = []
    for d in found:
        if d.is_index and d.partitioned and d.action in (dependents.REBUILD, dependents.REINDEX, dependents.SHADOW):
            children = [c for c in d.child_indexes if c.leaf]
            builds.append({"index": d.name, "action": d.action,
                           "steps": len(children) + (1 if d.action == dependents.REINDEX else 2),
                           "partition_indexes": [{"partition": ".".join(c.table), "index": c.name,
                                                  "rows": rows.get(".".join(c.table))} for c in children]})
    how = "CONCURRENTLY" if opts.concurrent_index else "each in a transaction of its own"
    said_builds = "; ".join(
        f"{b['index']}: {'REINDEXed' if b['action'] == dependents.REINDEX else 'built'} on each of "
        f"{len(b['partition_indexes'])} partitions ({how}" + (")" if b["action"] == dependents.REINDEX else
                                                              ", attached below the parent index ON ONLY the table)")
        for b in builds)
    dropped = [b["index"] for b in builds if b["action"] == dependents.REBUILD]
    if opts.strategy == "shadow":
        mid = ("a shadow column on every partition (catalog only); the live column and its indexes keep serving; at "
               "finalize each partition's twin index is built and attached below a twin parent index, invalid until "
               "the last one is, and the swap renames every partition's index")
    elif dropped or type_change:
        mid = ((f"{'index' if len(dropped) == 1 else 'indexes'} {', '.join(dropped)} dropped on every partition"
                if dropped else "")
               + (" and " if dropped and type_change else "")
               + (f"every partition's {info.column} without its dimension" if type_change else "")
               + ": search over the table, or any one partition, is unavailable until the last partition's index "
                 "is built again")
    else:
        mid = "the indexes stay (each partition's is REINDEXed at the end, one at a time)"
    mid += ("; a partition attached meanwhile is taken in (its rows re-embedded by the catch-up, its index built "
            "with the others); one detached leaves the job as it is then")
    leaves = [p for p in parts if p.leaf]
    return {"partitions": [{"name": p.label, "bound": p.bound, "partitioned": not p.leaf, "level": p.level,
                               "rows": p.rows, "bytes": p.bytes} for p in parts],
               "partition_index_builds": builds, "mid_job": mid,
               "partitions_said": f"{len(leaves)} partitions ({partitions.said(leaves)})",
               "partition_builds_said": said_builds}


def sample_texts(conn: psycopg.Connection[Any], info: TableInfo, n: int, rows_total: int) -> list[str]:
    """About `n` texts of the table, pages drawn from all of it."""
    percent = min(100.0, 120.0 * n / max(rows_total, 1))
    rows = conn.execute(info.statement("sample_content"), {"n": n, "percent": percent}).fetchall()
    return [r["content"] for r in rows]


def sample_rate(conn: psycopg.Connection[Any], info: TableInfo, embedder: Embedder, opts: RunOptions,
                rows_total: int) -> float | None:
    """Rows/s of the table's own rows through the pipeline a run uses (`encode_timed`)."""
    texts = sample_texts(conn, info, max(2 * opts.batch_size, 512), rows_total)
    if not texts:
        return None
    return encode_timed(embedder, texts, opts)[1]


def encode_timed(embedder: Embedder, texts: list[str], opts: RunOptions, *,
                 warm: int | None = None) -> tuple[np.ndarray, float]:
    """`texts`' vectors (in their order) and rows/s through the pipeline a run uses, timed the way
    the run encodes them: its feed (tokenizer processes, token-budget batches), one untimed pass
    first over the first `warm` texts (all of them by default: first passes over new shapes are
    slower, the run is past them soon), then the texts cut into windows as the run cuts them
    (about WINDOW_SECS of the pace the first pass measured, at most the feed's window). The stages
    overlap in a run, so the slower sets the pace: tokenizer processes beside the device; a
    tokenizer thread of this process shares its GIL."""
    feed = feed_for(embedder, opts)
    never = StopSignal()
    size = opts.batch_size
    first = texts if warm is None else texts[:max(1, warm)]
    encoded: list[np.ndarray] = []
    try:
        started = time.perf_counter()
        feed.encode([feed.submit(first[i: i + size]) for i in range(0, len(first), size)], never)
        pace = len(first) / max(time.perf_counter() - started, 1e-6)
        started = time.perf_counter()
        pending = [feed.submit(texts[i: i + size]) for i in range(0, len(texts), size)]
        for p in pending:
            p.result()
        tokenized = time.perf_counter()
        limit = max(1, min(feed.window_rows, int(pace * WINDOW_SECS)))  # as worker.window_limit
        per_window = -(-limit // size)  # the run closes a window with the transaction that reaches it
        for start in range(0, len(pending), per_window):
            encoded += feed.encode(pending[start: start + per_window], never) or []
        finished = time.perf_counter()
    finally:
        feed.close()
    tokenize_secs, forward_secs = tokenized - started, finished - tokenized
    secs = max(tokenize_secs, forward_secs) if feed.overlapped else tokenize_secs + forward_secs
    vectors = np.concatenate(encoded) if encoded else np.empty((0, embedder.signature.dimension), np.float32)
    return vectors, len(texts) / max(secs, 1e-6)


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


def _bridge_text(bridges: list[bridge.Bridge], preview: dict[str, Any] | None) -> str:
    """The plan's section on the bridge: the table's, and the preview of the job's (--bridge)."""
    lines = [f"bridge {bridge.said(b)}" for b in bridges]
    if preview and "kind" in preview:
        lines.append(f"--bridge, previewed on {preview['pairs']:,} rows encoded here (the job fits it on "
                     f"--bridge-sample rows; nothing installed): {fitting.said(preview)}"
                     + (f"; REFUSED: {preview['refused']}" if preview.get("refused") else ""))
    elif preview:
        lines.append(f"--bridge, previewed: {preview['error']}")
    if not lines:
        return ""
    wrapped = [textwrap.fill(line, WIDTH, initial_indent="  ", subsequent_indent="    ") for line in lines]
    return "\n\nThe bridge\n" + "\n".join(wrapped)


def plan_report(
    conn: psycopg.Connection[Any],
    info: TableInfo,
    registry: Signature | None,
    job: Job | None,
    embedder: Embedder,
    settings: Settings,
    started: float,
    *,
    rate: float | None = None,
) -> Report:
    """`rate`: rows/s measured already on the table's rows (reembed eval); else sampled here."""
    opts, sig = settings.options, embedder.signature
    rows = estimate_rows(conn, info)
    resume = job is not None and job.matches(sig)
    done = ckpt.progress(conn, job)["rows_done"] if resume and job is not None else 0
    to_update = max(rows - done, 0)
    on_column = (dependents.recorded(job) if resume and job is not None
                 else list(inventory(conn, info, registry, job, sig.dimension, opts).dependents))
    rate = rate if rate is not None else sample_rate(conn, info, embedder, opts, rows)
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
        "column": info.column,
        "column_type": info.column_type,
        "column_typmod": job.source_typmod if resume and job is not None else info.typmod,
        "rows_to_update": to_update,
        "embedder_batches": batches,
        "estimated_walltime_secs": estimate,
        "encode_rows_per_sec_sample": round(rate, 1) if rate else None,
        "current_signature": registry.as_dict() if registry else None,
        "target_signature": sig.as_dict(),
        "would_alter_typmod": bool(alter),
        "index": info.index.name if info.index else (job.index_name if job else None),
        "dependents": [d.as_json() for d in on_column],
        "dependents_said": [dependents.summary([d]) for d in on_column],
        "resumes_job": job.id if resume and job else None,
        "cut_over_rewrite_secs": round(rewrite_secs(conn, info, rows), 1) if alter else 0.0,
        "cost": cost.as_dict(),
        "text": {"content": info.content_sql or info.content_column, "reads": list(info.content_reads),
                 "null_content": info.null_content},
        "not_null": info.not_null,
        "key": list(info.pk.columns),
    }
    details.update(partitioned(conn, info, on_column, opts, type_change=bool(alter)))
    message = plan_text(details) + _bridge_text(bridges, preview)
    return Report(state="planned", model_name=sig.name, dimension=sig.dimension, model_hash=sig.hash,
                  duration_secs=time.monotonic() - started, message=message, details=details)
