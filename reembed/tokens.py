"""Tokenisation in worker processes (text-embeddings-inference's shape: a pool of tokenizer
workers, one thread each, feeding one device).

Each worker process holds the model's own fast tokenizer, sent to it serialised
(`TokenizerSpec.json`: the model's backend tokenizer as the model configured it: its
normaliser, lower-casing, special tokens), with the model's truncation length and side. It
returns compact numpy arrays (`Tokens`), never Python lists of tensors. This module imports
neither torch nor sentence-transformers: a spawned worker starts in a fraction of a second.

Workers ignore SIGINT and SIGTERM (the parent stops them: a Ctrl-C in a terminal reaches the
whole process group) and are killed by the kernel if the parent dies (PR_SET_PDEATHSIG on
Linux), so no run leaves a tokenizer process behind.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from reembed.errors import InternalError, ReembedError

PADDED = "padded"  # a transformer: input_ids, attention_mask (and token_type_ids), one row each
FLAT = "flat"  # a StaticEmbedding: every row's ids one after the other, and the offsets


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything a worker process needs to tokenise exactly as the model does. Picklable."""

    json: str  # the model's backend tokenizer, serialised
    layout: str  # PADDED or FLAT
    max_length: int | None  # truncation length (None: the tokenizer's own setting is kept)
    direction: str  # truncation side
    prefix: str
    special_tokens: bool
    pad_id: int
    keys: tuple[str, ...]  # the features the model takes


@dataclass
class Tokens:
    """Rows' token ids, compact: `ids[offsets[i] : offsets[i] + lengths[i]]` is row i."""

    ids: np.ndarray  # int32
    lengths: np.ndarray  # int32
    types: np.ndarray | None = None  # int8 token type ids, aligned with ids, when the model takes them

    def __len__(self) -> int:
        return len(self.lengths)

    @functools.cached_property
    def offsets(self) -> np.ndarray:  # once per window, not once per device batch
        offsets = np.zeros(len(self.lengths), dtype=np.int64)
        np.cumsum(self.lengths[:-1], out=offsets[1:])
        return offsets

    @staticmethod
    def join(parts: Sequence[Tokens]) -> Tokens:
        if not parts:
            return Tokens(np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int32))
        if len(parts) == 1:
            return parts[0]
        types = None if parts[0].types is None else np.concatenate([_types(p) for p in parts])
        return Tokens(np.concatenate([p.ids for p in parts]), np.concatenate([p.lengths for p in parts]), types)


def _types(part: Tokens) -> np.ndarray:
    if part.types is None:
        raise InternalError("token type ids in some parts of a window and not in others")
    return part.types


def load(spec: TokenizerSpec) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(spec.json)
    tok.no_padding()
    if spec.max_length is not None:
        tok.enable_truncation(spec.max_length, stride=0, strategy="longest_first", direction=spec.direction)
    return tok


def tokenize(tok: Any, spec: TokenizerSpec, texts: Sequence[str]) -> Tokens:
    if spec.prefix:
        texts = [spec.prefix + t for t in texts]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # the same ids, without character offsets
    encodings = encode(list(texts), add_special_tokens=spec.special_tokens)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int32, count=len(encodings))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=total)
    types = None
    if "token_type_ids" in spec.keys:
        types = np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encodings), dtype=np.int8, count=total)
    return Tokens(ids, lengths, types)


# ------------------------------------------------------------------ in a worker process

_WORKER: tuple[Any, TokenizerSpec] | None = None


def _start_worker(spec: TokenizerSpec) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:  # die with the parent, whatever kills it
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the pool is the parallelism
    _WORKER = (load(spec), spec)


def _in_worker(texts: Sequence[str]) -> Tokens:
    if _WORKER is None:
        raise InternalError("a tokenizer process was asked to tokenise before its initializer ran")
    return tokenize(_WORKER[0], _WORKER[1], texts)


def _ready() -> int:
    return os.getpid()


_DIED = ("a tokenizer worker process died (killed or out of memory); nothing of the batches in flight "
         "was written: re-run to resume")


class TokenizerDied(ReembedError):
    """A tokenizer worker process died (killed, out of memory). Nothing of the batch was written."""


class TokenizerPool:
    """`workers` spawned processes, or (0) one thread of this process. `submit` cuts the texts
    into slices so every worker gets a share; `Pending.result` joins them back in order."""

    def __init__(self, spec: TokenizerSpec, workers: int) -> None:
        self.spec = spec
        self.workers = workers
        self._executor: Executor
        if workers == 0:
            local = load(spec)
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="reembed-tokenize")
            self._call: Any = lambda texts: tokenize(local, spec, texts)
            self._processes: list[multiprocessing.process.BaseProcess] = []
        else:
            # Spawned (never forked: the parent holds torch's threads and database sockets), all of
            # them now, from this thread: PR_SET_PDEATHSIG follows the thread that started a process.
            self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker, initargs=(spec,))
            self._call = _in_worker
            # Each submit below spawns a process (none is idle yet: a spawned one takes a second
            # to start), so the pool's processes are the children new since `before`.
            before = {p.pid for p in multiprocessing.active_children()}
            started = [self._executor.submit(_ready) for _ in range(workers)]
            self._processes = [p for p in multiprocessing.active_children() if p.pid not in before]
            try:
                for ready in started:
                    ready.result()
            except BaseException:
                self.close(now=True)
                raise

    def submit(self, texts: Sequence[str]) -> Pending:
        share = max(32, -(-len(texts) // max(self.workers, 1)))
        try:
            futures = [self._executor.submit(self._call, texts[i: i + share]) for i in range(0, len(texts), share)]
        except BrokenProcessPool as exc:
            raise TokenizerDied(_DIED) from exc
        return Pending(futures, texts)

    def close(self, *, now: bool = False) -> None:
        """Stop the workers: at once (`now`: a failed or interrupted run) or once idle."""
        if now:  # killed, not terminated: they ignore SIGTERM (and SIGINT) by design
            for proc in self._processes:
                proc.kill()
        self._executor.shutdown(wait=True, cancel_futures=True)


class Pending:
    """One transaction's texts on their way through the tokenizer workers."""

    def __init__(self, futures: list[Future[Tokens]], texts: Sequence[str]) -> None:
        self.futures = futures
        self.texts = texts
        self.rows = len(texts)

    def ready(self) -> bool:
        """Tokenised already (never waits)."""
        return all(f.done() for f in self.futures)

    def result(self) -> Tokens:
        try:
            return Tokens.join([f.result() for f in self.futures])
        except BrokenProcessPool as exc:
            raise TokenizerDied(_DIED) from exc
