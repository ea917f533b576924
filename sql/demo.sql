-- The demo's tables: the schema reembed is built for (DESIGN.md, "The problem"), with the
-- "old" model's 64-d vectors. scripts/demo fills knowledge_nodes from the Python standard
-- library's docstrings.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS knowledge_nodes (
    id         uuid PRIMARY KEY,
    content    text,
    source     text NOT NULL,          -- a column reembed must never touch
    embedding  vector(64)
);

CREATE INDEX IF NOT EXISTS idx_knowledge_nodes_embedding_hnsw ON knowledge_nodes
    USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64);

CREATE TABLE IF NOT EXISTS embedding_model (
    id int PRIMARY KEY CHECK (id = 1),
    model_name text NOT NULL,
    dimension int NOT NULL,
    model_hash text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
