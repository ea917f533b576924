"""Fakes for the job's mechanics: a deterministic test embedder (never the product's default),
ways to stop or hold it at a chosen call, the words its texts are made of, and the settings of an
in-process run with it."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from reembed.encoding import Embedder
from reembed.settings import ModelSpec, RunOptions, Settings, Target
from reembed.signature import Signature

WORDS = [
    "database", "index", "vector", "search", "model", "embedding", "query", "table", "row", "column",
    "cosine", "graph", "python", "compiler", "kernel", "network", "packet", "socket", "thread", "lock",
    "mutex", "cache", "memory", "disk", "river", "mountain", "forest", "ocean", "city", "music", "painting",
    "poem", "novel", "chess", "football", "weather",
]


def hash_vector(text: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vec = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vec / np.linalg.norm(vec)


def sentence(i: int) -> str:
    rng = np.random.default_rng(i)
    words = rng.choice(WORDS, size=int(rng.integers(4, 14)))
    return f"note {i}: " + " ".join(words)


class HashEmbedder(Embedder):
    """Deterministic test embedder for the job's mechanics (never the product's default).
    Texts containing `poison` raise, like a model that cannot take a row. Its feed is the
    protocol's own (BatchFeed: its stages, one transaction at a time)."""

    def __init__(self, dim: int = 32, *, name: str | None = None, poison: str | None = None) -> None:
        self.signature = Signature(name or f"test-hash-{dim}", dim, f"sha256:test-hash-{dim}")
        self.poison = poison
        self.calls = 0
        self.texts_seen = 0

    def tokenize(self, texts: Sequence[str]) -> list[str]:
        return list(texts)

    def forward(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts_seen += len(texts)
        if self.poison is not None:
            bad = [t for t in texts if self.poison in t]
            if bad:
                raise ValueError(f"cannot encode {bad[0][:30]!r}")
        return np.stack([hash_vector(t, self.signature.dimension) for t in texts])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.forward(self.tokenize(texts))


class SlowHashEmbedder(HashEmbedder):
    """The test embedder at `rows_per_sec` (a slow device): slower than an application can write."""

    def __init__(self, dim: int = 32, *, rows_per_sec: float = 100.0, **kw: Any) -> None:
        super().__init__(dim, **kw)
        self.secs_per_row = 1.0 / rows_per_sec

    def forward(self, texts: list[str]) -> np.ndarray:
        time.sleep(self.secs_per_row * len(texts))  # a device's time, not a wait for anything
        return super().forward(texts)


def stopping_after(emb: HashEmbedder, stop: Any, *, calls: int, reason: str = "SIGINT") -> HashEmbedder:
    """Make `emb` ask `stop` to stop (as a signal would) when its forward call number `calls` starts."""
    original = emb.forward

    def forward(texts: list[str]) -> np.ndarray:
        if emb.calls + 1 == calls:
            stop.request(reason)
        return original(texts)

    emb.forward = forward  # type: ignore[method-assign]
    return emb


class Gate:
    """Holds `emb`'s forward calls until open(); `reached` is set when the first one waits."""

    def __init__(self, emb: HashEmbedder) -> None:
        self.reached = threading.Event()
        self._opened = threading.Event()
        original = emb.forward

        def forward(texts: list[str]) -> np.ndarray:
            self.reached.set()
            self._opened.wait(30)
            return original(texts)

        emb.forward = forward  # type: ignore[method-assign]

    def open(self) -> None:
        self._opened.set()


def job_settings(dsn: str, **opts: Any) -> Any:
    """Settings for an in-process run with a test embedder (no banner pause)."""
    opts.setdefault("confirm_seconds", 0)
    return Settings(target=Target(dsn=dsn), model=ModelSpec(model="unused"), options=RunOptions(**opts))
