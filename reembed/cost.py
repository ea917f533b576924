"""What a job will cost the server, said by `plan` before it starts: the WAL it writes, the disk
it needs on top of the table, and the dead rows it leaves behind. From the table's own
statistics (pg_class, pg_stats, the indexes' sizes) and the server's WAL settings; nothing is
written. `scripts/bench.py --sections cost` compares the WAL estimate with what a run wrote.

The model, for an UPDATE of every row with content:
- each row: a heap update record (the new tuple, ~64 bytes of record around it), one insert into
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
    analysed = all(c["avg_width"] is not None for c in columns)
    by_name = {c["attname"]: c for c in columns}
    vec = by_name.get(info.column)
    old_vector = (int(vec["avg_width"]) if analysed and vec is not None
                  else vector_bytes(info.column_type, info.typmod or dimension))
    if analysed:
        tuple_now = _TUPLE_OVERHEAD + sum(float(c["avg_width"]) * (1.0 - float(c["null_frac"] or 0.0))
                                          for c in columns)
        vec_share = old_vector * (1.0 - float(vec["null_frac"] or 0.0)) if vec is not None else 0.0
    else:
        cost.notes.append("the table was never analysed: the widths come from its size (ANALYZE it for a closer "
                          "estimate)")
        tuple_now = heap_bytes / rows
        vec_share = float(old_vector)
    rest = max(tuple_now - vec_share, _TUPLE_OVERHEAD)
    new_vector = vector_bytes(info.column_type, dimension)
    toasted = rest + new_vector > _TOAST_THRESHOLD
    new_tuple = rest + (_POINTER if toasted else new_vector)
    old_toasted = old_vector <= _POINTER + 4
    chunks = math.ceil(new_vector / _TOAST_CHUNK) if toasted else 0

    kept = [i for i in indexes if i["index_name"] not in rebuilt]
    kept_ann = [i for i in kept if i["method"] in ANN_METHODS and i["index_name"] in reindexed]
    kept_plain = [i for i in kept if i not in kept_ann]
    key = by_name.get(info.id_column)
    key_width = int(key["avg_width"]) if key is not None and key["avg_width"] is not None else 16
    element = new_vector + 2 * hnsw_m * 6 + 48  # an HNSW element: the vector, its layer-0 neighbours, headers

    per_row = _HEAP_RECORD + new_tuple + len(kept_plain) * (_INDEX_RECORD + key_width + 8)
    per_row += len(kept_ann) * 3 * element  # an insert into a kept graph also rewrites its neighbours' lists
    if toasted:
        per_row += new_vector + chunks * (_HEAP_RECORD + 32 + _INDEX_RECORD + 16)
    if old_toasted:
        per_row += chunks * 56  # the old chunks' deletes
    rows_wal = rows_to_update * per_row

    correlation = key["correlation"] if key is not None else None
    in_order = correlation is not None and abs(float(correlation)) >= 0.9
    rows_per_page = max(rows / heap_pages, 1.0)
    toast_pages = int(facts["toast_bytes"]) // PAGE if old_toasted else 0
    index_pages = sum(int(i["bytes"]) for i in kept_plain + kept_ann) // PAGE
    share = rows_to_update / rows
    fpw = 0.0
    passes = 1.0
    if facts["full_page_writes"]:
        for _ in range(3):  # the checkpoints follow from the WAL, which the images add to
            checkpoints = (rows_wal + fpw) / (float(facts["max_wal_bytes"]) / (1 + float(facts["completion_target"])))
            checkpoints += (job_secs or 0.0) / float(facts["checkpoint_timeout_secs"])
            passes = 1.0 if in_order else min(rows_per_page, 1.0 + checkpoints)
            fpw = PAGE * share * (heap_pages * passes + toast_pages * passes + 2 * index_pages)
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
    new_toast = rows * (new_vector + chunks * 40) if toasted else 0
    ann_built = 0
    for i in indexes:
        if i["index_name"] in rebuilt or i["index_name"] in reindexed:
            old_element = old_vector + 2 * hnsw_m * 6 + 48
            grow = element / old_element if i["method"] in ANN_METHODS and not old_toasted else 1.0
            ann_built += int(int(i["bytes"]) * grow) if int(i["bytes"]) > PAGE else rows * element
    rewrite = (new_heap + new_toast + sum(int(i["bytes"]) for i in kept_plain)) if type_change else 0
    cost.wal_finalize_bytes = rewrite + ann_built
    cost.wal_bytes = cost.wal_embed_bytes + cost.wal_finalize_bytes

    versions = int(rows_to_update * (new_tuple + 4) / _PAGE_USABLE * PAGE) + rows_to_update * (new_vector if toasted
                                                                                               else 0)
    wal_kept = min(cost.wal_bytes, int(float(facts["max_wal_bytes"])))
    dropped = sum(int(i["bytes"]) for i in indexes if i["index_name"] in rebuilt)
    during = versions + sum(int(i["bytes"]) for i in kept_plain) + wal_kept  # the kept indexes double
    rewrite_peak = versions + new_heap + new_toast if type_change else 0  # the old and new copies, at once
    cost.extra_disk_bytes = max(during, rewrite_peak) + max(ann_built - dropped, 0)
    old_versions = int(heap_bytes * share) + (int(facts["toast_bytes"] * share) if old_toasted else 0)
    cost.bloat_bytes = 0 if type_change else old_versions
    return cost
