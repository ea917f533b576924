"""A search application on the bridge protocol (the runbook's "The bridge"): it encodes with the new
model only, from its start, and wraps every vector in the bridge's SQL function; it never reads the
registry and is never told of a swap or a rollback.

    python bridge_workload.py DSN STOP_FILE OUT_JSON --new-model DIR [--rate 10] [--function reembed_query]

Each round: a row drawn uniformly, a query made from it (one of its sentences, as reembed's gate
makes them), encoded and searched with `ORDER BY embedding <=> (SELECT f($1)) LIMIT 10`: found when
the row is among the ten. Every third round it writes too, as an application does: an insert whose
vector is `f($1)` of its text's encoding, or an edit of one of its own rows' content and vector.
Writes the counts, the errors and each search's (wall time, found) to OUT_JSON.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_workload import _publish  # the application's output file, shared


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dsn")
    p.add_argument("stop_file", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--new-model", required=True)
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--function", default="reembed_query")
    args = p.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    from reembed.gate import make_query

    model = SentenceTransformer(args.new_model, device="cpu")  # loaded once, at start-up: never switched
    fn = args.function
    rng = random.Random(5)
    stats: dict[str, Any] = {"queries": 0, "found": 0, "errors": [], "searches": [], "inserts": 0, "edits": 0,
                             "write_errors": [], "written": []}
    conn = psycopg.connect(args.dsn, autocommit=True)
    register_vector(conn)
    (args.out.parent / (args.out.name + ".ready")).write_text("ready")
    published, rounds = 0.0, 0
    while not args.stop_file.exists():
        started = time.monotonic()
        rounds += 1
        try:
            row = conn.execute("SELECT id, content FROM knowledge_nodes TABLESAMPLE BERNOULLI (10)"
                               " WHERE content IS NOT NULL AND source <> 'app' ORDER BY random() LIMIT 1").fetchone()
            text = make_query(row[1], rng) if row is not None else None
            if row is not None and text is not None:
                vec = np.asarray(model.encode([text])[0], dtype=np.float32)
                found = conn.execute(f"SELECT id FROM knowledge_nodes ORDER BY embedding <=> (SELECT {fn}(%s))"
                                     " LIMIT 10", (vec,)).fetchall()
                hit = any(k == row[0] for (k,) in found)
                stats["queries"] += 1
                stats["found"] += int(hit)
                stats["searches"].append([time.time(), int(hit)])
        except Exception as exc:  # noqa: BLE001 - every failed query is a failed promise: counted, shown
            stats["errors"].append(f"{time.time():.3f} {type(exc).__name__}: {exc}"[:300])
            if conn.broken:
                conn = psycopg.connect(args.dsn, autocommit=True)
                register_vector(conn)
        if rounds % 3 == 0:
            _write(conn, model, fn, rng, stats)
        if time.monotonic() - published > 0.5:
            _publish(args.out, stats)
            published = time.monotonic()
        pause = 1.0 / args.rate - (time.monotonic() - started)
        if pause > 0:
            time.sleep(pause)
    conn.close()
    _publish(args.out, stats)
    return 0


def _write(conn: psycopg.Connection[Any], model: Any, fn: str, rng: random.Random, stats: dict[str, Any]) -> None:
    text = f"written by the application {rng.randrange(1 << 30)}: a connection pool hands out database connections"
    vec = np.asarray(model.encode([text])[0], dtype=np.float32)
    try:
        if stats["written"] and rng.random() < 0.4:
            key = rng.choice(stats["written"])
            conn.execute(f"UPDATE knowledge_nodes SET content = %s, embedding = {fn}(%s) WHERE id = %s",
                         (text, vec, key))
            stats["edits"] += 1
        else:
            key = conn.execute(f"INSERT INTO knowledge_nodes (id, content, source, embedding)"
                               f" VALUES (nextval('app_keys'), %s, 'app', {fn}(%s)) RETURNING id", (text, vec)
                               ).fetchone()[0]
            stats["written"].append(key)
            stats["inserts"] += 1
    except Exception as exc:  # noqa: BLE001 - counted and shown
        stats["write_errors"].append(f"{time.time():.3f} {type(exc).__name__}: {exc}"[:300])


if __name__ == "__main__":
    sys.exit(main())
