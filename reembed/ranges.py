"""The job's key space in ranges, for workers: where prepare cuts it, and where a range is cut
again when a worker runs dry.

Prepare takes the keys at evenly spaced fractions of a sample of the key
(`percentile_disc` over `TABLESAMPLE BERNOULLI`; a composite key's sample, in key order, picked
here): any orderable key works — bigint, uuid, text (in the column's collation, the order the
readers page in), or several columns of them (compared as rows). Range i is
(key[i-1], key[i]]; the first has no lower bound and the last no upper bound, so rows inserted
past either end are in a range too.

A split is made by the range's holder, never by the worker that asked for it: only the holder
knows how far it has read, so only it can cut past every row it may be writing (its reader goes
on up to the cut; the new range starts there). The cut is the median key of what is left,
counted on the key's index up to a cap (a huge range is cut at the cap's half: still a split).
"""

from __future__ import annotations

from typing import Any

import psycopg

from reembed.target import TableInfo

SAMPLE_ROWS = 100_000  # keys sampled for the boundaries
MAX_RANGES = 256
COUNT_CAP = 2_000_000  # rows counted before a split (an index-only scan)


def count_for(rows_total: int, batch_size: int, requested: int | None) -> int:
    """How many ranges prepare cuts: --ranges, else one per 16 batches, between 1 and 256."""
    if requested is not None:
        return max(1, requested)
    return max(1, min(MAX_RANGES, rows_total // max(1, 16 * batch_size)))


def boundaries(conn: psycopg.Connection[Any], info: TableInfo, *, rows_total: int, ranges: int) -> list[str]:
    """The inclusive upper keys of ranges 0 .. n-2 (the last range is unbounded), strictly
    increasing; fewer than ranges - 1 when the sample has fewer distinct keys."""
    if ranges <= 1:
        return []
    percent = 100.0 if rows_total <= SAMPLE_ROWS else max(0.01, 100.0 * SAMPLE_ROWS / rows_total)
    fractions = [i / ranges for i in range(1, ranges)]
    if info.pk.composite:  # rows of values have no percentile_disc: the sample in key order, picked here
        sample = [r["k"] for r in conn.execute(info.statement("key_sample"), {"percent": percent}).fetchall()]
        found = [sample[min(len(sample) - 1, max(0, int(f * len(sample)) - 1))] for f in fractions] if sample else []
    else:
        row = conn.execute(info.statement("key_quantiles"), {"fractions": fractions, "percent": percent}).fetchone()
        found = row["keys"] if row and row["keys"] else []
    keys: list[str] = []
    for key in found:
        if key is not None and (not keys or key != keys[-1]):  # percentile_disc is monotone: equal keys repeat
            keys.append(key)
    return keys


def split_point(conn: psycopg.Connection[Any], info: TableInfo, *, after: str | None, upper: str | None,
                min_rows: int) -> tuple[str | None, int]:
    """(the key to cut at, rows left past `after`): the median of what is left up to `upper`;
    None when fewer than 2 x min_rows are left (not worth a second worker's start)."""
    params: dict[str, Any] = {"after": after, "upper": upper, "cap": COUNT_CAP}
    row = conn.execute(info.statement("keys_left"), params).fetchone()
    left = int(row["n"]) if row else 0
    if left < 2 * min_rows:
        return None, left
    at = conn.execute(info.statement("key_at"), {**params, "offset": left // 2 - 1}).fetchone()
    return (at["id_text"] if at else None), left
