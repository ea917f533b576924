"""The encoder's feed: keeps the device busy (docs/ARCHITECTURE.md, "feed" and "The path of one batch").

    transactions ─► tokenizer processes (reembed.tokens) ─► a window of many transactions,
    its rows sorted by token length ─► device batches cut by a token budget (widths a
    multiple of 8) ─► the model's own module chain ─► vectors back in each transaction's order

On CUDA, each batch's inputs are built and copied (pinned memory, non-blocking, on a copy
stream of their own) while the device runs the batch before it, and the results come back
through pinned memory, read one batch later: the device never waits for the host.

`TokenFeed` runs a sentence-transformers model whose input it can build exactly: a
transformer with a fast tokenizer (right padding, text only) or a StaticEmbedding. Every
run checks the first rows it tokenises against the model's own `preprocess`; a model the
fast path cannot build exactly runs through `BatchFeed` (the embedder's own stages, one
transaction at a time), with one log line saying why. CUDA out of memory halves the budget.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import structlog

from reembed.encoding import BatchFeed, Embedder, Feed, Upcoming, halved, is_oom
from reembed.errors import first_line
from reembed.signals import StopSignal
from reembed.tokens import FLAT, PADDED, Pending, TokenizerPool, TokenizerSpec, Tokens

log = structlog.get_logger()

__all__ = ["BatchFeed", "Feed", "TokenFeed", "default_workers", "spec_for"]

CHECKED_ROWS = 256  # rows of the first window compared with the model's own preprocess
_WIDTH = 8  # padded widths are rounded up to a multiple of this: few shapes, warm kernels


class ModelEmbedder(Embedder, Protocol):
    """An embedder whose sentence-transformers model the feed drives itself."""

    model: Any  # its preprocess and its module chain

    def embed(self, features: dict[str, Any]) -> Any:
        """The model's module chain on device inputs: the sentence embeddings (float32), only."""
        ...


def default_workers() -> int:
    """Cores - 1 (the device's own thread keeps one), at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def spec_for(model: Any, prefix: str) -> TokenizerSpec | str:
    """The spec that tokenises exactly as `model` does, or why there is none."""
    first = model[0]
    kind = type(first).__name__
    if kind == "StaticEmbedding":
        return TokenizerSpec(json=first.tokenizer.to_str(), layout=FLAT, max_length=None, direction="right",
                             prefix=prefix, special_tokens=False, pad_id=0, keys=("input_ids", "offsets"))
    tokenizer = getattr(first, "tokenizer", None)
    if kind != "Transformer" or tokenizer is None:
        return f"its first module is {kind}, not a text Transformer or a StaticEmbedding"
    if not getattr(tokenizer, "is_fast", False):
        return "its tokenizer is not a fast (Rust) tokenizer"
    if getattr(first, "processing_kwargs", None):
        return f"it sets processing_kwargs {first.processing_kwargs!r}"
    if set(getattr(first, "modality_config", {"text": None})) != {"text"}:
        return "it is not a text-only model"
    if getattr(tokenizer, "padding_side", "right") != "right":
        return "its tokenizer pads on the left"
    keys = tuple(k for k in tokenizer.model_input_names if k in ("input_ids", "attention_mask", "token_type_ids"))
    if len(keys) != len(tokenizer.model_input_names) or "input_ids" not in keys:
        return f"it takes inputs {tokenizer.model_input_names} the fast path does not build"
    max_length = first.max_seq_length
    return TokenizerSpec(json=tokenizer.backend_tokenizer.to_str(), layout=PADDED,
                         max_length=int(max_length) if max_length and max_length < 1_000_000 else None,
                         direction=getattr(tokenizer, "truncation_side", "right"), prefix=prefix,
                         special_tokens=True, pad_id=int(tokenizer.pad_token_id or 0), keys=keys)


def differs(ref: dict[str, Any], spec: TokenizerSpec, tokens: Tokens) -> str | None:
    """Where `tokens` differ from `ref`, the model's own preprocess of the same texts, or None."""
    import torch

    extra = sorted(k for k, v in ref.items() if isinstance(v, torch.Tensor) and k not in spec.keys)
    if extra:
        return f"the model's input also has {extra}"
    offsets = tokens.offsets
    if spec.layout == FLAT:
        mine = torch.from_numpy(tokens.ids.astype(np.int64))
        if not torch.equal(ref["input_ids"], mine) or not torch.equal(ref["offsets"], torch.from_numpy(offsets)):
            return "its token ids differ from the model's own"
        return None
    mask = ref["attention_mask"].bool() if "attention_mask" in ref else ref["input_ids"] != spec.pad_id
    for row in range(len(tokens)):
        span = slice(int(offsets[row]), int(offsets[row] + tokens.lengths[row]))
        theirs = ref["input_ids"][row][mask[row]].tolist()
        if theirs != tokens.ids[span].tolist():
            return f"row {row} ({len(theirs)} tokens) is tokenised differently"
        if tokens.types is not None and ref["token_type_ids"][row][mask[row]].tolist() != tokens.types[span].tolist():
            return f"row {row}'s token type ids differ"
    return None


class TokenFeed:
    """A sentence-transformers model fed by tokenizer processes and token-budget batches."""

    def __init__(self, embedder: ModelEmbedder, spec: TokenizerSpec, *, workers: int,
                 max_batch_tokens: int, max_rows: int | None, window_rows: int) -> None:
        self.embedder = embedder
        self.spec = spec
        self.max_batch_tokens = max_batch_tokens
        self.max_rows = max_rows
        self.window_rows = window_rows
        self.checked = False
        self.inexact: str | None = None
        self.pool = _pool(spec, workers)
        self.extras: dict[str, Any] = {}
        self.device = _Device(embedder.device)
        self._ahead: _Ahead | None = None  # the next window, its first batch staged (see _run)
        self.staged_ahead = 0  # windows whose first batch was staged before the last one's results were read

    def submit(self, texts: Sequence[str]) -> Pending:
        return self.pool.submit(texts) if self.inexact is None else Pending([], texts)

    def encode(self, pending: Sequence[Pending], stop: StopSignal, *, upcoming: Upcoming | None = None,
               ) -> list[np.ndarray] | None:
        if not self.checked and self.inexact is None:
            self._check(pending)
        if self.inexact is not None:
            return [self.embedder.encode(p.texts) for p in pending]
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.key == _key(pending):  # its first batch staged already
            vectors = self._run(ahead.tokens, stop, ahead=ahead, upcoming=upcoming)
        else:
            vectors = self._run(Tokens.join([p.result() for p in pending]), stop, upcoming=upcoming)
        if vectors is None:
            return None
        bounds = np.cumsum([0] + [p.rows for p in pending])
        return [vectors[bounds[i]: bounds[i + 1]] for i in range(len(pending))]

    @property
    def overlapped(self) -> bool:
        return self.pool.workers > 0

    def close(self, *, now: bool = False) -> None:
        self._ahead = None
        self.pool.close(now=now)

    # ------------------------------------------------------------------ exactness

    def _check(self, pending: Sequence[Pending]) -> None:
        texts: list[str] = []
        parts: list[Tokens] = []
        for p in pending:
            if len(texts) >= CHECKED_ROWS:
                break
            texts += p.texts
            parts.append(p.result())
        if not texts:
            return
        ref = self.embedder.model.preprocess([self.spec.prefix + t for t in texts])
        reason = differs(ref, self.spec, Tokens.join(parts))
        if reason is not None:
            self.inexact = reason
            log.warning("fast_feed_fallback", reason=reason,
                        detail="this model is encoded with SentenceTransformer's own stages, one batch at a time")
        else:
            self.extras = {k: v for k, v in ref.items() if not hasattr(v, "shape")}  # e.g. modality: text
            self.checked = True
            log.info("fast_feed", layout=self.spec.layout, tokenizer_workers=self.pool.workers,
                     max_batch_tokens=self.max_batch_tokens, window_rows=self.window_rows,
                     checked_rows=len(texts))

    # ------------------------------------------------------------------ the device

    def cut(self, lengths: np.ndarray, start: int) -> tuple[int, int]:
        """The next device batch of the length-sorted rows from `start`: (end, padded width)."""
        longest = int(lengths[start])
        limit = len(lengths) if self.max_rows is None else min(len(lengths), start + self.max_rows)
        if self.spec.layout == FLAT:
            spent = np.cumsum(lengths[start: min(limit, start + self.max_batch_tokens)])
            return start + max(1, int(np.searchsorted(spent, self.max_batch_tokens, side="right"))), longest
        width = -(-max(longest, 1) // _WIDTH) * _WIDTH
        if self.spec.max_length is not None and width > self.spec.max_length:
            width = self.spec.max_length
        return min(limit, start + max(1, self.max_batch_tokens // width)), width

    def features(self, tokens: Tokens, rows: np.ndarray, width: int) -> dict[str, np.ndarray]:
        lengths = tokens.lengths[rows]
        starts = tokens.offsets[rows]
        total = int(lengths.sum())
        within = np.zeros(len(rows), dtype=np.int64)
        np.cumsum(lengths[:-1], out=within[1:])
        source = np.repeat(starts - within, lengths) + np.arange(total)
        if self.spec.layout == FLAT:
            return {"input_ids": tokens.ids[source], "offsets": within}
        mask = np.arange(width)[None, :] < lengths[:, None]
        ids = np.full((len(rows), width), self.spec.pad_id, dtype=np.int32)
        ids[mask] = tokens.ids[source]
        features = {"input_ids": ids, "attention_mask": mask.astype(np.int32)}
        if tokens.types is not None:
            types = np.zeros((len(rows), width), dtype=np.int32)
            types[mask] = tokens.types[source]
            features["token_type_ids"] = types
        return {k: v for k, v in features.items() if k in self.spec.keys}

    def _run(self, tokens: Tokens, stop: StopSignal, *, ahead: _Ahead | None = None,
             upcoming: Upcoming | None = None) -> np.ndarray | None:
        """Every row's vector, in `tokens`' order. The next batch is staged while the device runs
        this one; each batch's results are read after the next one was launched; and before the
        last results are read, the next window's first batch is staged if that window is queued
        and tokenised (so the device does not drain at a window's end). Only a batch's sentence
        embeddings outlive its forward (never its token embeddings)."""
        import torch

        out = np.empty((len(tokens), self.embedder.signature.dimension), dtype=np.float32)
        order, lengths = ahead.order if ahead is not None else _sorted(tokens)

        def stage(start: int) -> tuple[np.ndarray, int, Any]:
            return self._stage(tokens, order, lengths, start)

        landing: deque[tuple[np.ndarray, Any]] = deque()
        start, staged = 0, ahead.first if ahead is not None else None
        with torch.inference_mode(), self.device.scope():
            while start < len(order):
                out_of_memory: str | None = None
                try:  # take -> forward -> fetch -> stage the next: any of them may run out of memory
                    if staged is None:
                        staged = stage(start)
                    rows, end, inputs = staged
                    embeddings = self.embedder.embed({**self.device.take(inputs), **self.extras})
                    landing.append((rows, self.device.fetch(embeddings)))
                    del embeddings
                    start, staged = end, None
                    if start < len(order):
                        staged = stage(start)  # built and copied while the device runs the batch before
                    elif upcoming is not None:
                        self._ahead = self._stage_ahead(upcoming)  # while the device runs this window's last
                except Exception as exc:
                    if not is_oom(exc) or self.cut(lengths, start)[0] - start <= 1:
                        raise  # a single row that does not fit: no budget helps
                    out_of_memory = first_line(exc)
                if out_of_memory is not None:  # out of the except: the failed pass's tensors are freed
                    staged = self._ahead = None
                    self._halve(out_of_memory)
                    continue
                while len(landing) > 1:
                    done, host = landing.popleft()
                    out[done] = self.device.read(host)
                if stop.requested:
                    return None
            for done, host in landing:
                out[done] = self.device.read(host)
        return out

    def _stage(self, tokens: Tokens, order: np.ndarray, lengths: np.ndarray, start: int) -> tuple[np.ndarray, int, Any]:
        end, width = self.cut(lengths, start)
        return order[start:end], end, self.device.stage(self.features(tokens, order[start:end], width))

    def _stage_ahead(self, upcoming: Upcoming) -> _Ahead | None:
        """The next window with its first batch staged, if it is queued and tokenised (never waits)."""
        following = upcoming()
        if not following or not all(p.ready() for p in following):
            return None
        tokens = Tokens.join([p.result() for p in following])
        if not len(tokens):
            return None
        order, lengths = _sorted(tokens)
        self.staged_ahead += 1
        return _Ahead(_key(following), tokens, (order, lengths), self._stage(tokens, order, lengths, 0))

    def _halve(self, error: str) -> None:
        self.max_batch_tokens = halved(self.max_batch_tokens, error, device=self.device.device,
                                       event="token_budget_halved", field="max_batch_tokens")
        if self.max_rows is not None:
            self.max_rows = max(1, self.max_rows // 2)


@dataclass(frozen=True)
class _Ahead:
    """The next window, tokenised and sorted, its first batch staged on the device."""

    key: tuple[int, ...]  # its transactions (their Pending objects), to know it when it comes
    tokens: Tokens
    order: tuple[np.ndarray, np.ndarray]  # rows by length, longest first, and their lengths
    first: tuple[np.ndarray, int, Any]


def _key(pending: Sequence[Pending]) -> tuple[int, ...]:
    return tuple(id(p) for p in pending)


def _sorted(tokens: Tokens) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-tokens.lengths, kind="stable")
    return order, tokens.lengths[order]


def _pool(spec: TokenizerSpec, workers: int) -> TokenizerPool:
    """The tokenizer processes; where processes cannot be started (a sandbox without /dev/shm, a
    process limit), tokenisation in this process, said once."""
    try:
        return TokenizerPool(spec, workers)
    except (OSError, BrokenProcessPool) as exc:
        if workers == 0:
            raise
        log.warning("tokenizer_processes_unavailable",
                    error=first_line(exc),
                    detail="tokenising in this process instead; the device may wait for it")
        return TokenizerPool(spec, 0)


class _Device:
    """Host <-> device copies. On CUDA: pinned buffers, non-blocking copies on a stream of their
    own, events to know when a copy landed, every stream and event named by its device (the
    current device is never relied on: on cuda:1 it is still cuda:0). Elsewhere: plain tensors,
    moved to the device (mps) or left where they are (cpu)."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = device
        self.cuda = device.startswith("cuda")
        self.copies = (
            torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            if self.cuda else None
        )

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """The device stage runs with its device current (allocations, the caching allocator)."""
        if not self.cuda:
            return contextlib.nullcontext()
        import torch

        return torch.cuda.device(self.device)

    def stage(self, arrays: dict[str, np.ndarray]) -> Any:
        import torch

        if not self.cuda:
            return {k: torch.from_numpy(v).to(self.device).long() for k, v in arrays.items()}
        with torch.cuda.stream(self.copies):
            moved = {}
            for key, array in arrays.items():
                pinned = torch.empty(array.shape, dtype=torch.from_numpy(array).dtype, pin_memory=True)
                np.copyto(pinned.numpy(), array)  # one copy, straight into pinned memory
                moved[key] = pinned.to(self.device, non_blocking=True)
            ready = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            ready.record(self.copies)
        return moved, ready

    def take(self, staged: Any) -> dict[str, Any]:
        """The staged inputs, usable by the compute stream (which waits for their copy, not the host)."""
        if not self.cuda:
            inputs: dict[str, Any] = staged
            return inputs
        import torch

        moved, ready = staged
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        for t in moved.values():
            t.record_stream(current)
        return {k: t.long() for k, t in moved.items()}

    def fetch(self, embeddings: Any) -> Any:
        """Start copying the results to the host; `read` waits for them."""
        if not self.cuda:
            return embeddings.float().cpu()
        import torch

        host = torch.empty(embeddings.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(embeddings.float(), non_blocking=True)
        landed = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        landed.record(torch.cuda.current_stream(self.device))
        return host, landed

    def read(self, fetched: Any) -> np.ndarray:
        if self.cuda:
            host, landed = fetched
            landed.synchronize()  # blocking: the core is free for the tokenizers meanwhile
        else:
            host = fetched
        vectors: np.ndarray = host.numpy()
        return vectors
