"""The Embedder protocol, its sentence-transformers implementation, and the model signature.

The signature is (name, dimension, hash). The hash covers the model's files and every
option that changes the vectors (prefix, truncation length, the model's own normalization),
so changed weights under the same name are a different target. Numeric precision is left
out on purpose: fp16 on a GPU host and fp32 on a CPU host give the same vectors to within
1e-3 cosine, and a job started on one must resume on the other.

Nothing here downloads: `--model` is a local directory or a name already in the local
Hugging Face cache. HF_HUB_OFFLINE is forced on before sentence-transformers is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from reembed.encoding import Feed, halved, is_oom
from reembed.errors import ConfigError, first_line
from reembed.feed import BatchFeed, TokenFeed, default_workers, spec_for
from reembed.settings import ModelSpec
from reembed.signature import Signature

log = structlog.get_logger()

_SKIP_FILES = {"README.md", ".gitattributes"}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class Tokenized:
    """Texts sorted longest first and cut into forward passes of the model's input, with the
    permutation back to input order."""

    order: np.ndarray  # sorted position i holds input text order[i]
    texts: list[str]  # sorted, prefixed
    chunks: list[Any]  # the model's input for texts[k * size : (k + 1) * size]
    size: int

    def __len__(self) -> int:
        return len(self.texts)


def resolve_model_path(model: str) -> Path:
    """A local directory, or a name already in the local Hugging Face cache. Never downloads."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "modules.json").exists() and not (path / "config.json").exists():
            raise ConfigError(
                f"--model {model}: the directory holds no sentence-transformers model "
                "(no modules.json or config.json); give the model's own directory"
            )
        return path.resolve()
    if path.exists():
        raise ConfigError(f"--model {model} is a file; give the model's directory")
    try:
        from huggingface_hub import snapshot_download

        cached = snapshot_download(repo_id=model, local_files_only=True)
    except Exception:  # noqa: BLE001 - every failure here means "not in the local cache"
        raise ConfigError(
            f"unknown model {model!r}: not a directory and not in the local model cache; "
            "give a local model directory (reembed never downloads weights)"
        ) from None
    return Path(cached)


def files_digest(path: Path) -> str:
    """sha256 over every file of the model (relative path + bytes), in a stable order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if file.name in _SKIP_FILES or rel.startswith(".git/") or rel.startswith(".cache/"):
            continue
        digest.update(rel.encode() + b"\0")
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def fingerprint(spec: ModelSpec) -> tuple[str, str]:
    """(registry name, hash) without loading the model: enough for the nightly no-op check."""
    path = resolve_model_path(spec.model)
    return spec.registry_name, _hash(path, spec)


def _hash(path: Path, spec: ModelSpec) -> str:
    options: dict[str, object] = {"prefix": spec.prefix, "max_seq_length": spec.max_seq_length,
                                   "normalize": _normalizes(path)}
    # what text the vectors are of, when it is not a plain column's (so a plain column's hash is as before)
    if spec.content is not None:
        options["content"] = spec.content
    if spec.null_content != "null":
        options["null_content"] = spec.null_content
    digest = hashlib.sha256(files_digest(path).encode())
    digest.update(json.dumps(options, sort_keys=True).encode())
    return "sha256:" + digest.hexdigest()


def _normalizes(path: Path) -> bool:
    modules = path / "modules.json"
    if not modules.exists():
        return False
    return any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))


def pick_device(requested: str) -> str:
    if not _DEVICE.match(requested):
        raise ConfigError(f"--device {requested!r}: use auto, cpu, cuda, cuda:N or mps")
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: no CUDA device is visible here; use --device cpu or auto")
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
    if requested == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("--device mps: MPS is not available here; use --device cpu or auto")
    return requested


def pick_precision(requested: str, device: str) -> str:
    if requested not in _PRECISIONS:
        raise ConfigError(f"--precision {requested!r}: use one of {', '.join(_PRECISIONS)}")
    if requested == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    return requested


_LOADED: dict[tuple[str, int | None], Any] = {}  # a tokenizer process's own copy of the model


class ModelTokenizer:
    """The tokenize stage, picklable: the model's own `preprocess` (its max length, casing and
    special tokens), with the prefix, longest first, in passes of `size`. In the process that
    loaded the model it uses that model; sent to another process (a process pool's worker) it
    loads the model from `path` there, once."""

    def __init__(self, path: str, *, prefix: str, size: int, max_seq_length: int | None, model: Any = None) -> None:
        self.path = path
        self.prefix = prefix
        self.size = size
        self.max_seq_length = max_seq_length
        self._model = model
        self._lock = threading.Lock()  # a fast tokenizer is not to be shared by threads

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_model", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _model=None, _lock=threading.Lock())

    def __call__(self, texts: Sequence[str]) -> Tokenized:
        prefixed = [self.prefix + t for t in texts] if self.prefix else list(texts)
        order = np.argsort([-len(t) for t in prefixed], kind="stable")
        ordered = [prefixed[i] for i in order]
        chunks = [self.preprocess(ordered[i: i + self.size]) for i in range(0, len(ordered), self.size)]
        return Tokenized(order=order, texts=ordered, chunks=chunks, size=self.size)

    def preprocess(self, texts: list[str]) -> Any:
        with self._lock:
            return self._the_model().preprocess(texts)

    def _the_model(self) -> Any:
        if self._model is None:
            key = (self.path, self.max_seq_length)
            if key not in _LOADED:
                os.environ["HF_HUB_OFFLINE"] = "1"
                _LOADED[key] = _load(Path(self.path), "cpu")
                if self.max_seq_length is not None:
                    _LOADED[key].max_seq_length = self.max_seq_length
            self._model = _LOADED[key]
        return self._model


class SentenceTransformerEmbedder:
    """A sentence-transformers model on CPU, CUDA or MPS."""

    def __init__(self, spec: ModelSpec, *, encode_batch_size: int | None = None, model_hash: str | None = None) -> None:
        """`model_hash`: the fingerprint's hash, when the caller has it (hashing reads every file)."""
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        path = resolve_model_path(spec.model)
        self.model_path = path
        self.device = pick_device(spec.device)
        self.precision = pick_precision(spec.precision, self.device)
        started = time.monotonic()
        self.model = _load(path, self.device)
        if spec.max_seq_length is not None:
            self.model.max_seq_length = spec.max_seq_length
        dimension = _dimension(self.model)  # (its probe, if any, runs at fp32: one precision throughout)
        if self.precision != "fp32":  # the first module only: pooling and normalisation stay float32 (embed)
            import torch

            self.model[0].to({"fp16": torch.float16, "bf16": torch.bfloat16}[self.precision])
        if spec.dimension is not None and spec.dimension != dimension:
            raise ConfigError(
                f"model {spec.model} produces {dimension} dimensions but --dimension is {spec.dimension}; "
                "fix --dimension or pick the model you meant"
            )
        self.prefix = spec.prefix
        self.signature = Signature(spec.registry_name, dimension, model_hash or _hash(path, spec))
        default_batch = 256 if self.device.startswith("cuda") else 64
        self.max_rows = encode_batch_size  # the operator's cap on rows per forward pass, if any
        self.encode_batch_size = encode_batch_size or default_batch
        self.model.eval()
        self.tokenizer = ModelTokenizer(str(path), prefix=spec.prefix, size=self.encode_batch_size,
                                        max_seq_length=spec.max_seq_length, model=self.model)
        log.info(
            "model_loaded",
            model=spec.model,
            device=self.device,
            precision=self.precision,
            dimension=dimension,
            encode_batch_size=self.encode_batch_size,
            load_secs=round(time.monotonic() - started, 2),
        )

    def feed(self, *, workers: int | None = None, max_batch_tokens: int | None = None,
             window_rows: int | None = None) -> Feed:
        """The fast feed (tokenizer processes, token-budget batches) when this model's input can be
        built exactly; else its own stages, one batch at a time, with one log line saying why."""
        spec = spec_for(self.model, self.prefix)
        if isinstance(spec, str):
            log.warning("fast_feed_fallback", reason=f"the model: {spec}",
                        detail="this model is encoded with SentenceTransformer's own stages, one batch at a time")
            return BatchFeed(self)
        cuda = self.device.startswith("cuda")
        return TokenFeed(self, spec, workers=default_workers() if workers is None else workers,
                         max_batch_tokens=max_batch_tokens or (65536 if cuda else 4096), max_rows=self.max_rows,
                         window_rows=window_rows or (4096 if cuda else 1024))

    def tokenize(self, texts: Sequence[str]) -> Tokenized:
        """Longest first, so each forward pass pads to similar lengths; cut into passes."""
        self.tokenizer.size = self.encode_batch_size
        return self.tokenizer(texts)

    def forward(self, features: Tokenized) -> np.ndarray:
        import torch

        out = np.empty((len(features), self.signature.dimension), dtype=np.float32)
        size, total = features.size, len(features)
        pending = [(k * size, min(size, total - k * size), chunk) for k, chunk in enumerate(features.chunks)]
        with torch.inference_mode():
            while pending:
                start, rows, chunk = pending.pop(0)
                if rows > self.encode_batch_size:  # tokenized before the batch size was halved
                    pending[:0] = self._recut(features.texts, start, rows)
                    continue
                out_of_memory: str | None = None
                try:
                    vectors = self._forward_pass(chunk)
                except Exception as exc:
                    if not is_oom(exc) or rows <= 1:
                        raise  # a single row that does not fit: no batch size helps
                    out_of_memory = first_line(exc)
                if out_of_memory is not None:  # out of the except: the failed pass's tensors are freed
                    self._halve(out_of_memory)
                    pending[:0] = self._recut(features.texts, start, rows)
                    continue
                out[features.order[start: start + rows]] = vectors
        return out

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.forward(self.tokenize(texts))

    def _forward_pass(self, chunk: Any) -> np.ndarray:
        import torch

        on_device = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in chunk.items()}
        vectors: np.ndarray = self.embed(on_device).cpu().numpy()
        return vectors

    def embed(self, features: dict[str, Any]) -> Any:
        """The model's own module chain on device inputs; only the sentence embeddings (float32)
        are kept. At fp32 that is the model's forward; at fp16/bf16 only the first module (the
        transformer, or a StaticEmbedding) runs at that precision and its outputs are cast to
        float32 before pooling, dense layers and normalisation: `F.normalize`'s eps is 0 in fp16
        (a zero vector becomes NaN) and fp16 sums overflow to Inf."""
        import torch

        if self.precision == "fp32":
            return self.model(features)["sentence_embedding"].float()
        modules = iter(self.model.named_children())
        _, first = next(modules)
        out = first(features)
        out = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in out.items()}
        for _, module in modules:
            out = module(out)
        return out["sentence_embedding"]

    def _recut(self, texts: list[str], start: int, rows: int) -> list[tuple[int, int, Any]]:
        """The rows of a pass that did not fit, as passes of the (halved) encode batch size."""
        size, end = self.encode_batch_size, start + rows
        return [(i, min(size, end - i), self.tokenizer.preprocess(texts[i: min(i + size, end)]))
                for i in range(start, end, size)]

    def _halve(self, error: str) -> None:
        """Out of GPU memory: halve the forward pass and keep the size that works for the rest of the run."""
        self.encode_batch_size = halved(self.encode_batch_size, error, device=self.device, event="encode_batch_halved",
                                        field="encode_batch_size")


def _load(path: Path, device: str) -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
        # ("Loading weights" bars are noise in an operator's log)
        try:
            return SentenceTransformer(str(path), device=device, local_files_only=True)
        except TypeError:  # older sentence-transformers without local_files_only
            return SentenceTransformer(str(path), device=device)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load model from {path}: {exc}".splitlines()[0]) from exc


def _dimension(model: Any) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = getter()
    if dim is None:
        dim = int(model.encode(["dimension probe"], convert_to_numpy=True).shape[1])
    return int(dim)
