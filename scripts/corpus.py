"""Varied real text for tests and benchmarks: the docstrings of installed packages, read from
their source files with `ast` (nothing is imported), 20 to 2,000 characters each, in a seeded
order. Real prose and code mixed, lengths from a line to several paragraphs: the text that
showed the tokenizer to be the bottleneck where uniform short strings hid it."""

from __future__ import annotations

import ast
import importlib.util
import random
from pathlib import Path

# Packages every reembed environment has (its own dependencies and torch's).
TUNING = ("psycopg", "sentence_transformers", "structlog", "jinja2")  # what the code was developed against
HELD_OUT = ("huggingface_hub", "networkx", "fsspec", "filelock", "tqdm")  # only the throughput checks read these


def docstrings(packages: tuple[str, ...] = TUNING, *, limit: int | None = None, seed: int = 0,
               low: int = 20, high: int = 2000) -> list[str]:
    found: list[str] = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            for path in sorted(Path(root).rglob("*.py")):
                found += _from_file(path, low, high)
    unique = sorted(set(found))
    random.Random(seed).shuffle(unique)
    return unique[:limit] if limit is not None else unique


def _from_file(path: Path, low: int, high: int) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc and low <= len(doc) <= high:
            out.append(doc)
    return out
