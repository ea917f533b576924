"""reembed: re-encode a PostgreSQL/pgvector table with a new sentence-transformers model,
as a resumable, checkpointed job."""

from __future__ import annotations

__version__ = "0.1.0"
