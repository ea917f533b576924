"""An application that keeps writing to knowledge_nodes while reembed runs, as the runbook says:
each writing transaction reads the registry row FOR SHARE and embeds with the model it names.

    python app_workload.py DSN STOP_FILE OUT_JSON --new-model DIR --new-name NAME [--rate 30] [--seed 1]

Until STOP_FILE exists: inserts (some with a NULL embedding), content edits, deletes, at about
--rate writes per second, each followed by a read of a few rows. The old model is the tests'
deterministic hash model (`old:` + text); the new one is a real sentence-transformers model.
Writes the counts, the errors, and the longest time a write waited (the statements and the
commit, not the embedding) and a read took, to OUT_JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

WORDS = ("database index vector search model embedding query table row column cosine graph python compiler "
         "kernel network packet socket thread lock mutex cache memory disk river mountain forest ocean").split()


def old_vector(text: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(f"old:{text}".encode()).digest()[:8], "little")
    vec = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vec / np.linalg.norm(vec)


def key_of(rng: np.random.Generator, id_type: str) -> Any:
    """A key that may or may not exist (the reader looks up rows the way an application would)."""
    return uuid.UUID(int=int(rng.integers(1 << 62))) if id_type == "uuid" else int(rng.integers(-100, 2000))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dsn")
    p.add_argument("stop_file", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--new-model", required=True)
    p.add_argument("--new-name", required=True)
    p.add_argument("--rate", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--id-type", default="uuid")
    args = p.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    new_model = SentenceTransformer(args.new_model, device="cpu")  # loaded up front: ready at the cut-over
    rng = np.random.default_rng(args.seed)
    stats: dict[str, Any] = {"inserts": 0, "edits": 0, "deletes": 0, "null_inserts": 0, "errors": [],
                             "max_write_secs": 0.0, "writes_with_new_model": 0, "reads": 0, "read_errors": [],
                             "max_read_secs": 0.0}
    conn = psycopg.connect(args.dsn)
    register_vector(conn)
    next_id = 10_000_000
    (args.out.parent / (args.out.name + ".ready")).write_text("ready")
    while not args.stop_file.exists():
        started = time.monotonic()
        text = f"app {rng.integers(1 << 30)}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))
        op = rng.choice(["insert", "edit", "delete", "null_insert"], p=[0.4, 0.4, 0.1, 0.1])
        try:
            with conn.transaction():
                name, dim = conn.execute("SELECT model_name, dimension FROM embedding_model"
                                         " WHERE id = 1 FOR SHARE").fetchone()
                new = name == args.new_name
                if new and op == "null_insert":  # NULL embeddings are for reembed to fill: during a job only
                    op = "insert"
                vec = new_model.encode([text], convert_to_numpy=True)[0] if new else old_vector(text, dim)
                t0 = time.monotonic()
                if op in ("insert", "null_insert"):
                    key: Any = uuid.uuid4() if args.id_type == "uuid" else next_id
                    next_id += 1
                    conn.execute("INSERT INTO knowledge_nodes (id, content, source, embedding)"
                                 " VALUES (%s, %s, 'app', %s)",
                                 (key, text, None if op == "null_insert" else vec))
                else:
                    # SKIP LOCKED: a row some other transaction holds is left alone, as a queue-like
                    # application would (the tests hold rows to pause reembed)
                    row = conn.execute("SELECT id FROM knowledge_nodes TABLESAMPLE SYSTEM (5) LIMIT 1"
                                       " FOR UPDATE SKIP LOCKED").fetchone() \
                        or conn.execute("SELECT id FROM knowledge_nodes LIMIT 1 FOR UPDATE SKIP LOCKED").fetchone()
                    if row is not None and op == "edit":
                        conn.execute("UPDATE knowledge_nodes SET content = %s, embedding = %s WHERE id = %s",
                                     (text, vec, row[0]))
                    elif row is not None:
                        conn.execute("DELETE FROM knowledge_nodes WHERE id = %s", (row[0],))
            waited = time.monotonic() - t0  # statements + commit (the embedding is the app's own time)
            stats["max_write_secs"] = max(stats["max_write_secs"], waited)
            stats[{"insert": "inserts", "edit": "edits", "delete": "deletes", "null_insert": "null_inserts"}[op]] += 1
            stats["writes_with_new_model"] += int(new)
        except Exception as exc:  # noqa: BLE001 - every failed write is a failed promise: counted, shown
            stats["errors"].append(f"{type(exc).__name__}: {exc}"[:300])
            if conn.broken:
                conn = psycopg.connect(args.dsn)
                register_vector(conn)
        read_started = time.monotonic()  # and a reader: it must never wait for reembed (but a rewrite)
        try:
            conn.execute("SELECT count(*), max(content) FROM knowledge_nodes WHERE id = ANY(%s)",
                         ([key_of(rng, args.id_type)],)).fetchone()
            conn.commit()
            stats["reads"] += 1
            stats["max_read_secs"] = max(stats["max_read_secs"], time.monotonic() - read_started)
        except Exception as exc:  # noqa: BLE001 - counted and shown
            stats["read_errors"].append(f"{type(exc).__name__}: {exc}"[:300])
            conn.rollback()
        _publish(args.out, stats)
        pause = 1.0 / args.rate - (time.monotonic() - started)
        if pause > 0:
            time.sleep(pause)
    conn.close()
    _publish(args.out, stats)
    return 0


def _publish(out: Path, stats: dict[str, Any]) -> None:
    """Whole or not at all: a reader never sees a half-written file (write, then rename)."""
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(stats))
    partial.replace(out)


if __name__ == "__main__":
    sys.exit(main())

