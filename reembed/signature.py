"""The model signature: (name, dimension, hash). What a job re-embeds to, and what the
registry records. The hash covers the model's files and every option that changes the
vectors (reembed.embedder.fingerprint)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Signature:
    name: str
    dimension: int
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {"model_name": self.name, "dimension": self.dimension, "model_hash": self.hash}

    @classmethod
    def from_registry(cls, row: dict[str, Any] | None) -> Signature | None:
        """From a registry-shaped mapping (model_name, dimension, model_hash), or None."""
        if row is None or row.get("model_name") is None:
            return None
        return cls(row["model_name"], int(row["dimension"]), row["model_hash"])
