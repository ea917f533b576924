"""What a job will cost the server, said by `plan` before it starts: the WAL it writes, the disk
it needs on top of the table, and the dead rows it leaves behind. From the table itself (the
stored sizes of a sample of its rows, pg_class, pg_stats, the indexes' sizes) and the server's
WAL settings; nothing is written. `scripts/bench.py --sections cost` compares the WAL estimate with what a run wrote.

The model, for an UPDATE of every row with content:
- each sampled row as the job will write it: a heap update record (the new tuple, ~64 bytes of
  record around it), one insert into
  every index the job keeps (an UPDATE that changes a column no index reads may still be HOT,
  but a full page has no room for the new version: we count the insert), and, when the new
  vector no longer fits the tuple (pgvector's types are STORAGE external: over ~2 kB the vector
  goes to TOAST), its TOAST chunks;
- full-page images: the first change to a page after a checkpoint logs the whole page. The old
  heap pages are each changed once when the job walks the key in the table's physical order
  (pg_stats.correlation near 1); in another order (a uuid key) each page is changed again after
  every checkpoint of the job, whose count follows from the WAL itself (max_wal_size) and the
  job's duration (checkpoint_timeout). A kept index's pages are logged about twice (an image and
  a split: its entries double until VACUUM);
- finalize: a dimension change rewrites the table (the new heap, its TOAST and its indexes are
  all logged), and every ANN index built again is logged whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from reembed.dependents import ANN_METHODS
from reembed.queries import query
from reembed.target import TableInfo

PAGE = 8192
_PAGE_USABLE = PAGE - 24  # the page header
_TOAST_THRESHOLD = 2032  # a tuple larger than this has its largest external values moved out
_TOAST_CHUNK = 1996
_HEAP_RECORD = 64  # a heap update (or insert) record around its tuple: header, block references, xl_heap_*
_INDEX_RECORD = 64  # an index insert record around its index tuple
_POINTER = 18  # a TOAST pointer in the heap tuple
_TUPLE_OVERHEAD = 24 + 4  # tuple header + line pointer
_LOCK_RECORD = 16  # the share of a row's WAL for locking the old version when the new one moves page or is toasted
_SAMPLE_ROWS = 1000


@dataclass(frozen=True)
class _Row:
    """A sampled row as stored: its bytes without the vector, the vector's, and where the vector is."""

    rest: float
    vector: int
    vector_external: bool


def _sample(conn: psycopg.Connection[Any], info: TableInfo, columns: list[dict[str, Any]], rows: int) -> list[_Row]:
    """Up to _SAMPLE_ROWS rows' stored sizes (a value in TOAST counts as its pointer in the row)."""
    toast_known = bool(columns) and int(columns[0]["server_version"]) >= 170000  # pg_column_toast_chunk_id
    parts: list[sql.Composable] = []
    for i, c in enumerate(columns):
        ident = sql.Identifier(c["attname"])
        parts.append(sql.SQL("pg_column_size({}) AS {}").format(ident, sql.Identifier(f"s{i}")))
        in_toast = (sql.SQL("pg_column_toast_chunk_id({}) IS NOT NULL").format(ident)
                    if toast_known and int(c["attlen"]) == -1
                    else sql.SQL("coalesce(pg_column_size({}), 0) > {}").format(ident, sql.Literal(_TOAST_THRESHOLD)))
        parts.append(sql.SQL("{} AS {}").format(in_toast, sql.Identifier(f"x{i}")))
    if not parts:
        return []
    percent = min(100.0, 100.0 * 2 * _SAMPLE_ROWS / max(rows, 1))
    found = conn.execute(info.statement("cost_sample", sizes=sql.SQL(", ").join(parts)),
                         {"percent": percent, "n": _SAMPLE_ROWS}).fetchall()
    out = []
    for r in found:
        rest, vector, vector_external = float(_TUPLE_OVERHEAD), 0, False
        for i, c in enumerate(columns):
            stored = int(r[f"s{i}"] or 0)
            external = bool(r[f"x{i}"])
            if c["attname"] == info.column:
                vector, vector_external = stored, external
            else:
                rest += _POINTER if external else stored
        out.append(_Row(rest=rest, vector=vector, vector_external=vector_external))
    return out


def vector_bytes(column_type: str, dimension: int) -> int:
    return 8 + (2 if column_type == "halfvec" else 4) * dimension


@dataclass
class Cost:
    wal_bytes: int = 0  # the whole job
    wal_embed_bytes: int = 0  # the batches and catch-ups
    wal_finalize_bytes: int = 0  # the rewrite, the index builds
    extra_disk_bytes: int = 0  # at the peak, on top of the table as it is now (WAL kept included)
    bloat_bytes: int = 0  # dead row versions left behind for VACUUM
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"wal_bytes": self.wal_bytes, "wal_embed_bytes": self.wal_embed_bytes,
                "wal_finalize_bytes": self.wal_finalize_bytes, "extra_disk_bytes": self.extra_disk_bytes,
                "bloat_bytes": self.bloat_bytes, "notes": self.notes}

    def said(self) -> str:
        return (f"WAL about {size(self.wal_bytes)} ({size(self.wal_embed_bytes)} for the rows, "
                f"{size(self.wal_finalize_bytes)} at finalize); extra disk up to {size(self.extra_disk_bytes)}; "
                + (f"{size(self.bloat_bytes)} of dead row versions left for VACUUM" if self.bloat_bytes
                   else "no dead row versions left behind (the rewrite compacts the table)"))


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _distinct(column: dict[str, Any] | None, rows: int) -> float:
    """ANALYZE's count of distinct values (a negative n_distinct is a share of the rows); all rows if unknown."""
    if column is None or column["n_distinct"] is None:
        return float(rows)
    n = float(column["n_distinct"])
    return max(1.0, -n * rows if n < 0 else min(n, float(rows)))


def estimate(conn: psycopg.Connection[Any], info: TableInfo, *, rows_total: int, rows_to_update: int,
             dimension: int, type_change: bool, rebuilt: set[str], reindexed: set[str], job_secs: float | None,
             hnsw_m: int = 16) -> Cost:
    """The cost of re-embedding `rows_to_update` of `rows_total` rows to `dimension`; `rebuilt`:
    the indexes dropped at prepare and built again; `reindexed`: kept through the writes."""
    facts = conn.execute(query("cost_facts"), {"table_oid": info.oid}).fetchone()
    if facts is None:
        return Cost(notes=["the table is gone"])
    columns = conn.execute(query("cost_columns"), {"schema": info.ident[0], "table": info.ident[1],
                                                  "table_oid": info.oid}).fetchall()
    indexes = conn.execute(query("cost_indexes"), {"table_oid": info.oid}).fetchall()
    cost = Cost()
    rows = max(rows_total, 1)
    heap_bytes, heap_pages = int(facts["heap_bytes"]), max(int(facts["heap_pages"]), 1)
    by_name = {c["attname"]: c for c in columns}
    new_vector = vector_bytes(info.column_type, dimension)
    chunks = math.ceil(new_vector / _TOAST_CHUNK)
    sample = _sample(conn, info, columns, rows)
    if not sample:  # an empty table: nothing to say per row
        sample = [_Row(rest=_TUPLE_OVERHEAD, vector=0, vector_external=False)]
    kept = [i for i in indexes if i["index_name"] not in rebuilt]
    kept_ann = [i for i in kept if i["method"] in ANN_METHODS and i["index_name"] in reindexed]
    kept_plain = [i for i in kept if i not in kept_ann]
    key, vec = by_name.get(info.id_column), by_name.get(info.column)
    key_width = int(key["avg_width"]) if key is not None and key["avg_width"] is not None else 16
    element = new_vector + 2 * hnsw_m * 6 + 48  # an HNSW element: the vector, its layer-0 neighbours, headers

    per_row = 0.0
    new_tuples = 0.0
    toasted_rows = 0
    for r in sample:  # each sampled row as the job will write it: its vector inline, or moved to TOAST
        toasted = r.rest + new_vector > _TOAST_THRESHOLD
        tuple_bytes = r.rest + (_POINTER if toasted else new_vector)
        wal = _HEAP_RECORD + _LOCK_RECORD + tuple_bytes
        if toasted:
            toasted_rows += 1
            wal += new_vector + chunks * (_HEAP_RECORD + 32 + _INDEX_RECORD + 16)
        if r.vector_external:
            wal += math.ceil(r.vector / _TOAST_CHUNK) * 56  # the old chunks' deletes
        per_row += wal
        new_tuples += tuple_bytes
    per_row /= len(sample)
    new_tuple = new_tuples / len(sample)
    toasted_share = toasted_rows / len(sample)
    old_external = sum(1 for r in sample if r.vector_external) / len(sample)
    tuple_now = sum(r.rest + (_POINTER if r.vector_external else r.vector) for r in sample) / len(sample)
    per_row += len(kept_plain) * (_INDEX_RECORD + key_width + 8)
    per_row += len(kept_ann) * 3 * element  # an insert into a kept graph also rewrites its neighbours' lists
    rows_wal = rows_to_update * per_row
    old_vector = sum(r.vector for r in sample) / len(sample)
    old_toasted = old_external > 0.5

    correlation = key["correlation"] if key is not None else None
    in_order = correlation is not None and abs(float(correlation)) >= 0.9
    rows_per_page = max(rows / heap_pages, 1.0)
    toast_pages = int(int(facts["toast_bytes"]) * old_external) // PAGE  # the old vectors' chunks, deleted
    index_pages = sum(int(i["bytes"]) for i in kept_plain + kept_ann) // PAGE
    share = rows_to_update / rows
    # a page's image leaves out its free space (the hole): about the bytes its rows take
    heap_page_image = min(float(PAGE), 24 + rows_per_page * (tuple_now + 4))
    fpw = 0.0
    passes = 1.0
    if facts["full_page_writes"]:
        for _ in range(3):  # the checkpoints follow from the WAL, which the images add to
            checkpoints = (rows_wal + fpw) / (float(facts["max_wal_bytes"]) / (1 + float(facts["completion_target"])))
            checkpoints += (job_secs or 0.0) / float(facts["checkpoint_timeout_secs"])
            passes = 1.0 if in_order else min(rows_per_page, 1.0 + checkpoints)
            fpw = share * (heap_page_image * heap_pages * passes + PAGE * (toast_pages * passes + 2 * index_pages))
        if facts["wal_compression"]:
            fpw *= 0.5
    if not in_order and correlation is not None:
        cost.notes.append(f"the key is not in the table's physical order (correlation {float(correlation):.2f}): "
                          f"each page is logged whole about {passes:.1f} times")
    if kept_ann:
        cost.notes.append("an ANN index kept through the writes makes each row's WAL several times larger; "
                          "--drop-hnsw-first (the default) avoids it")
    cost.wal_embed_bytes = int(rows_wal + fpw)

    new_heap = math.ceil(rows * (new_tuple + 4) / _PAGE_USABLE) * PAGE
    new_toast = int(rows * toasted_share * (new_vector + chunks * 40))
    # An HNSW or IVFFlat index keeps one element per distinct vector (equal vectors share one):
    # as many as there are distinct contents, after the job; as many as distinct old vectors now.
    new_elements = _distinct(by_name.get(info.content_column), rows)
    old_elements = _distinct(vec, rows)
    ann_built = 0
    for i in indexes:
        if i["index_name"] in rebuilt or i["index_name"] in reindexed:
            if i["method"] not in ANN_METHODS:
                ann_built += int(i["bytes"])
                continue
            old_element = old_vector + 2 * hnsw_m * 6 + 48
            per_element = int(i["bytes"]) / old_elements if int(i["bytes"]) > PAGE and not old_toasted \
                else old_element * 1.1
            ann_built += int(new_elements * per_element * element / old_element)
    rewrite = (new_heap + new_toast + sum(int(i["bytes"]) for i in kept_plain)) if type_change else 0
    cost.wal_finalize_bytes = rewrite + ann_built
    cost.wal_bytes = cost.wal_embed_bytes + cost.wal_finalize_bytes

    versions = int(rows_to_update * ((new_tuple + 4) / _PAGE_USABLE * PAGE + toasted_share * new_vector))
    wal_kept = min(cost.wal_bytes, int(float(facts["max_wal_bytes"])))
    dropped = sum(int(i["bytes"]) for i in indexes if i["index_name"] in rebuilt)
    during = versions + sum(int(i["bytes"]) for i in kept_plain) + wal_kept  # the kept indexes double
    rewrite_peak = versions + new_heap + new_toast if type_change else 0  # the old and new copies, at once
    cost.extra_disk_bytes = max(during, rewrite_peak) + max(ann_built - dropped, 0)
    old_versions = int(heap_bytes * share) + int(int(facts["toast_bytes"]) * old_external * share)
    cost.bloat_bytes = 0 if type_change else old_versions
    return cost
