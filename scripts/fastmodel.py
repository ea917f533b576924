"""A fast, real sentence-transformers model for demos and benchmarks: a seeded random
StaticEmbedding over a shipped tokenizer (no download). It measures the database-bound
regime a GPU host lives in (~10,000+ rows/s on 2 CPU cores); it is never a default."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def save_static_model(path: Path, *, tokenizer_dir: Path, dim: int, seed: int = 0, normalize: bool = False,
                      constant: bool = False) -> Path:
    """A seeded random StaticEmbedding over the tokenizer in `tokenizer_dir` (`normalize`: with a
    Normalize module after it, as static models often ship), saved as a model directory.
    `constant`: every token's vector the same, so every text gets one vector (a broken model)."""
    import torch
    from tokenizers import Tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers import SentenceTransformer

        try:
            from sentence_transformers.sentence_transformer.modules import (
                Normalize,
                StaticEmbedding,
            )
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.models import Normalize, StaticEmbedding

    torch.manual_seed(seed)
    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    modules: list[Any] = [StaticEmbedding(tokenizer, embedding_dim=dim)]
    if constant:
        with torch.no_grad():
            modules[0].embedding.weight.fill_(0.1)
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu")
    model.save(str(path))
    return path


_SKELETON_FILES = (
    "modules.json", "sentence_bert_config.json", "config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "1_Pooling/config.json",
)


def copy_skeleton(model_dir: Path, dest: Path) -> Path:
    """A model directory's configuration and tokenizer, without its weights (a few hundred kB)."""
    for name in _SKELETON_FILES:
        source = Path(model_dir) / name
        if source.exists():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return dest


def save_random_bert(
    path: Path, *, skeleton: Path, hidden: int, layers: int, heads: int, intermediate: int, seed: int = 0
) -> Path:
    """A randomly initialised BERT of the given shape, with MiniLM's tokenizer, mean pooling and
    normalisation: the real architecture's cost without shipping its weights (for GPU benches)."""
    import json

    import torch
    from transformers import BertConfig, BertModel

    copy_skeleton(skeleton, path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate)
    torch.manual_seed(seed)
    BertModel(BertConfig(**config)).save_pretrained(str(path), safe_serialization=True)
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = hidden
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return path


def save_variant(path: Path, *, base: Path, pooling: str = "mean", dense: int | None = None,
                 normalize: bool = True, seed: int = 0) -> Path:
    """The base model's transformer (its weights and tokenizer) with another module chain: CLS or
    mean pooling, an optional seeded Dense layer, optional normalisation. Saved as a model directory."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(seed)
    transformer = models.Transformer(str(base))
    modules = [transformer, models.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if dense is not None:
        modules.append(models.Dense(transformer.get_embedding_dimension(), dense))
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(path))
    return path


def simulated_forward(per_token: float, dim: int, busy: list[tuple[float, float]] | None = None) -> Any:
    """A SIMULATED DEVICE for CPU-only development, never a measurement of a GPU: a forward that
    costs `per_token` seconds per padded token, sleeping (the GIL released, as a kernel launch
    leaves it), and returns deterministic unit vectors. `busy` collects its (start, end) times."""
    import time

    import torch

    def forward(features: dict[str, Any], **_: Any) -> dict[str, Any]:
        started = time.monotonic()
        time.sleep(per_token * features["input_ids"].numel())
        if busy is not None:
            busy.append((started, time.monotonic()))
        base = features["input_ids"].float().mean(dim=1, keepdim=True) + torch.arange(1, dim + 1, dtype=torch.float32)
        return {**features, "sentence_embedding": torch.nn.functional.normalize(base, dim=1)}

    return forward
