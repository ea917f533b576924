"""What the tests share with the demo and the benchmarks, from scripts/: the model makers
(fastmodel: a seeded random StaticEmbedding over the shipped tokenizer, model variants, a
simulated device) and the held-out text corpus (corpus: docstrings of installed packages).
Loaded from their files: scripts/ is not a package and is not put on the path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {SCRIPTS / name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # what its dataclasses and pickles look it up by
    spec.loader.exec_module(module)
    return module


fastmodel = _load("fastmodel")
corpus = _load("corpus")
