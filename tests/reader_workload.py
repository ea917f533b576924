"""A search application that keeps querying knowledge_nodes while reembed runs (the runbook's
reader protocol): each query's transaction reads the registry row FOR SHARE, embeds the query
with the model the registry names, and searches the column by its original name (and, with
--view, a view over it). Its statements are prepared after a few runs, as psycopg does.

    python reader_workload.py DSN STOP_FILE OUT_JSON --new-model DIR --new-name NAME [--rate 20] [--view V]

The query is the content of a row read in the same transaction, so its nearest neighbour is that
row at distance ~0 when the column holds the registry's model's vectors: an answer holding the
row at a larger distance is an answer from another vector space (`mismatched`); one without the
row at all is `missed` (another space, or the index's approximation). Writes the
counts, the errors and each search's (wall time, model, secs) to OUT_JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_workload import _publish, old_vector  # the application's old model and its output file, shared

SAME = 1e-3  # cosine distance of a text to its own vector, from the same model


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dsn")
    p.add_argument("stop_file", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--new-model", required=True)
    p.add_argument("--new-name", required=True)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--view", default=None)
    args = p.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    new_model = SentenceTransformer(args.new_model, device="cpu")
    stats: dict[str, Any] = {"queries": 0, "self_found": 0, "mismatched": [], "errors": [], "by_model": {},
                             "view_queries": 0, "searches": [], "missed": []}
    conn = psycopg.connect(args.dsn)
    register_vector(conn)
    (args.out.parent / (args.out.name + ".ready")).write_text("ready")
    published = 0.0
    while not args.stop_file.exists():
        started = time.monotonic()
        try:
            with conn.transaction():
                name, dim = conn.execute("SELECT model_name, dimension FROM embedding_model"
                                         " WHERE id = 1 FOR SHARE").fetchone()
                # a row drawn uniformly (BERNOULLI samples rows, not pages: a rewritten row's new
                # version, at the end of the heap, is as likely as any)
                row = conn.execute("SELECT id, content FROM knowledge_nodes TABLESAMPLE BERNOULLI (5)"
                                   " WHERE content IS NOT NULL AND embedding IS NOT NULL ORDER BY random() LIMIT 1"
                                   ).fetchone()
                if row is None:
                    continue
                key, text = row
                new = name == args.new_name
                vec = np.asarray(new_model.encode([text])[0] if new else old_vector(text, dim), dtype=np.float32)
                t0 = time.monotonic()
                found = conn.execute("SELECT id, content = %s AS same, embedding <=> %s AS d FROM knowledge_nodes"
                                     " ORDER BY embedding <=> %s LIMIT 5", (text, vec, vec)).fetchall()
                secs = time.monotonic() - t0
                if args.view:
                    conn.execute(f"SELECT id FROM {args.view} ORDER BY embedding <=> %s LIMIT 3", (vec,)).fetchall()
                    stats["view_queries"] += 1
            stats["queries"] += 1
            stats["by_model"][name] = stats["by_model"].get(name, 0) + 1
            stats["searches"].append([time.time(), name, round(secs, 6)])
            same = [(k, d) for k, s, d in found if s]
            if any(d < SAME for _, d in same):
                stats["self_found"] += 1
            else:
                stats["missed"].append(time.time())
                if same:  # the row itself, at a distance its text's own vector would not be
                    stats["mismatched"].append({"at": time.time(), "model": name, "key": str(key),
                                                "distance": min(d for _, d in same)})
        except Exception as exc:  # noqa: BLE001 - every failed query is a failed promise: counted, shown
            stats["errors"].append(f"{type(exc).__name__}: {exc}"[:300])
            if conn.broken:
                conn = psycopg.connect(args.dsn)
                register_vector(conn)
        if time.monotonic() - published > 0.5:
            _publish(args.out, stats)
            published = time.monotonic()
        pause = 1.0 / args.rate - (time.monotonic() - started)
        if pause > 0:
            time.sleep(pause)
    conn.close()
    _publish(args.out, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
