"""A fast, real sentence-transformers model for demos and benchmarks: a seeded random
StaticEmbedding over a shipped tokenizer (no download). It measures the database-bound
regime a GPU host lives in (~10,000+ rows/s on 2 CPU cores); it is never a default."""

from __future__ import annotations

import warnings
from pathlib import Path


def save_static_model(path: Path, *, tokenizer_dir: Path, dim: int, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers import SentenceTransformer

        try:
            from sentence_transformers.sentence_transformer.modules import StaticEmbedding
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.models import StaticEmbedding

    torch.manual_seed(seed)
    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    model = SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=dim)], device="cpu")
    model.save(str(path))
    return path
