"""The bridge fitted from the table: its pairs, the fit and its measurement, the gate on it, and when
a job fits it.

Pairs are rows whose old vector is in the live column, beside their new model's vector:
- `reembed bridge` (and `plan --bridge`, which installs nothing) draws rows from the whole table and
  encodes them with the new model;
- `run --strategy shadow --bridge` encodes no row again: the rows the job has committed hold their
  new vector in the shadow column (it encodes one short fragment of each training row, and the
  held-out rows' queries, with the job's model: a few thousand sentences). Once `--bridge-sample`
  rows are committed (or, for a smaller table, once all are) the bridge is fitted from a sample of
  them, spread over the job's ranges, and installed. Every worker process watches for that moment;
  the first to take the table's bridge lock (reembed.bridge.claim) fits and installs it, the others
  find it installed. A resumed job keeps the bridge it has (the application has been calling it);
  one that has none fits it.
A fit whose recall@10 against the old model's neighbours is under --bridge-min-recall is refused:
nothing is installed (`reembed bridge`: exit 2; a run records the refusal for `status`, stops its
workers and fails, exit 1, with the job as it was: re-run without --bridge, or with a lower bound).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import structlog

from reembed import bridge, db, gate, mapping, shadow
from reembed import checkpoint as ckpt
from reembed.background import Background
from reembed.context import RunContext
from reembed.encoding import Embedder
from reembed.errors import ConfigError, InternalError, ReembedError
from reembed.queries import query
from reembed.settings import RunOptions
from reembed.signature import Signature
from reembed.target import TableInfo

log = structlog.get_logger()

_WATCH_SECS = 2.0  # how often a worker looks whether enough rows are committed for the fit
HELD_OUT = 0.2  # of the sample, measured and never fitted on


class BridgeRefused(ReembedError):
    """The fitted bridge falls short of --bridge-min-recall: nothing was installed."""


class BridgeFailed(ReembedError):
    """The job's bridge could not be fitted or installed (after the job's first write: exit 1)."""


@dataclass(frozen=True)
class Sample:
    pairs: mapping.Pairs
    contents: list[str]


def _vector(value: Any) -> np.ndarray:
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


def _sample_of(rows: list[dict[str, Any]], new: np.ndarray | None = None) -> Sample:
    if not rows:
        return Sample(mapping.Pairs(np.empty((0, 0)), np.empty((0, 0))), [])
    vectors = np.stack([_vector(r["new"]) for r in rows]) if new is None else new
    return Sample(mapping.Pairs(vectors, np.stack([_vector(r["old"]) for r in rows])), [r["content"] for r in rows])


def sample_table(conn: psycopg.Connection[Any], info: TableInfo, embedder: Embedder, *, n: int,
                 rows_total: int, seed: int = 7) -> Sample:
    """About `n` rows drawn from the whole table (their pages), encoded by `embedder`."""
    db.register_vectors(conn)
    percent = min(100.0, 100.0 * 3 * n / max(rows_total, 1))
    rows = conn.execute(info.statement("bridge_sample"), {"percent": percent, "seed": seed, "n": n}).fetchall()
    if not rows:
        return _sample_of([])
    return _sample_of(rows, np.asarray(embedder.encode([r["content"] for r in rows]), dtype=np.float32))


def sample_job(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job, *, n: int) -> Sample:
    """About `n` of the rows the job has committed, shared out between its ranges by what each has
    done: their new vectors (the shadow column) beside their old ones."""
    column = shadow.Names.of(job).shadow
    done = [r for r in ckpt.ranges(conn, job) if r.last_id is not None and r.rows_done > 0]
    total = max(sum(r.rows_done for r in done), 1)
    rows: list[dict[str, Any]] = []
    for r in done:
        share = max(1, round(n * r.rows_done / total))
        rows += conn.execute(info.statement("bridge_pairs", new=column),
                             {"after": r.lower_id, "upper": r.last_id, "n": share}).fetchall()
    return _sample_of(rows)


def measure_queries(fitted: mapping.Fitted, sample: Sample, embedder: Embedder, *, seed: int = 7) -> dict[str, Any]:
    """Queries made from the held-out rows (one of a row's sentences, as the gate makes them), encoded
    by the new model: how often each finds its row in the top 10 through the bridge among the old
    vectors (bridged), and among the new vectors (what search gives after the re-embed)."""
    rng = random.Random(seed)
    made = [(int(i), q) for i in fitted.held if (q := gate.make_query(sample.contents[i], rng)) is not None]
    if not made:
        return {}
    vectors = np.asarray(embedder.encode([q for _, q in made]), dtype=np.float64)
    rows = [i for i, _ in made]
    k = min(mapping.K, len(sample.pairs))
    unit = mapping.unit
    bridged = mapping.top(unit(fitted.map.apply(vectors)), unit(sample.pairs.old.astype(np.float64)), k)
    after = mapping.top(unit(vectors), unit(sample.pairs.new.astype(np.float64)), k)
    return {"queries": len(made),
            "queries_found_bridged": round(float(np.mean([r in b for r, b in zip(rows, bridged, strict=True)])), 4),
            "queries_found_new": round(float(np.mean([r in a for r, a in zip(rows, after, strict=True)])), 4)}


def fragments_of(sample: Sample, embedder: Embedder, *, seed: int = 11) -> mapping.Fragments:
    """For the map's training rows: one query-like fragment of each (a sentence, as the gate makes
    its queries), encoded by the new model."""

    def made(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = random.Random(seed)
        found = [(int(i), q) for i in rows if (q := gate.make_query(sample.contents[i], rng)) is not None]
        if not found:
            return np.empty(0, dtype=np.int64), np.empty((0, sample.pairs.new.shape[1]), dtype=np.float32)
        vectors = np.asarray(embedder.encode([q for _, q in found]), dtype=np.float32)
        return np.array([i for i, _ in found], dtype=np.int64), vectors

    return made


def fit(sample: Sample, *, min_recall: float, embedder: Embedder | None = None) -> mapping.Fitted:
    """The map and its figures; `refused` among them (a reason) when it falls short. With the new
    model (`embedder`): fragments of the training rows among the pairs, and queries made from the
    held-out rows measured."""
    fitted = mapping.fit(sample.pairs, held_out=HELD_OUT,
                         fragments=fragments_of(sample, embedder) if embedder is not None else None)
    figures = dict(fitted.figures, min_recall=min_recall)
    if embedder is not None:
        figures.update(measure_queries(fitted, sample, embedder))
    if figures["recall_vs_old"] < min_recall:
        figures["refused"] = (f"recall@{mapping.K} against the old model's neighbours {figures['recall_vs_old']:.3f} "
                              f"< --bridge-min-recall {min_recall:g}")
    return mapping.Fitted(fitted.map, figures, fitted.held)


def said(figures: dict[str, Any]) -> str:
    """A fit's figures in one line."""
    fragments = f" and {figures['fragments']:,} fragments of them" if figures.get("fragments") else ""
    out = (f"{figures['kind']} map {figures['new_dimension']} -> {figures['old_dimension']} dimensions from "
           f"{figures['train']:,} rows{fragments} in {figures['fit_secs']:.1f} s; on {figures['held_out']:,} "
           "held-out rows "
           f"recall@{figures['k']} vs the old model's neighbours {figures['recall_vs_old']:.3f}, vs the new "
           f"model's {figures['recall_vs_new']:.3f} (the two models agree on {figures['old_vs_new']:.3f}), rows "
           f"found {figures['self_recall']:.3f}")
    if "queries" in figures:
        out += (f"; {figures['queries']} queries made from them find their row {figures['queries_found_bridged']:.3f} "
                f"bridged, {figures['queries_found_new']:.3f} with the new model's vectors")
    return out


def source_of(conn: psycopg.Connection[Any], info: TableInfo) -> Signature:
    """The model the live column holds (the registry's), what a bridge maps into."""
    row = conn.execute(query("read_registry", registry=info.registry)).fetchone()
    found = Signature.from_registry(row)
    if found is None:
        raise ConfigError(f"the registry of {info.qualified} names no model: a bridge maps into the space of the model "
                          "the column holds, and the registry must name it; nothing was written")
    return found


# ------------------------------------------------------------------ a job and its bridge


def check_job(conn: psycopg.Connection[Any], info: TableInfo, job: ckpt.Job | None, *, name: str, model_hash: str,
              registry: Signature | None, opts: RunOptions) -> None:
    """Before any write: --bridge only with the shadow strategy, a model in the column to map into and
    a function name free; no job while a bridge of the table takes another model's vectors; a bridge
    the swap cannot make right refused."""
    resumed = job is not None and job.matches_fingerprint(name, model_hash)
    strategy = job.strategy if resumed and job is not None else opts.strategy
    if opts.bridge and strategy != "shadow":
        raise ConfigError("--bridge needs --strategy shadow: in place, the column holds both models' vectors until "
                          "the end, so no map into it can be right (and search must not be served from it); "
                          + (f"job {job.id} runs in place; " if resumed and job is not None else "")
                          + "nothing was written")
    if opts.bridge and (job.source if resumed and job is not None else registry) is None:
        raise ConfigError(f"--bridge maps into the space of the model {info.qualified}.{info.column} holds, and the "
                          "registry names none; nothing was written")
    if opts.bridge:
        function = bridge.function_of(info, opts.bridge_function)
        bridge.check_function(conn, info, function, Signature(name, 0, model_hash))
    for b in bridge.current(conn, info.qualified, info.column):
        if b.target_hash != model_hash and b.state == "mapping":
            raise ConfigError(f"the bridge {b.called} maps {b.target_model_name}'s vectors into {info.qualified}."
                              f"{info.column}: the application encodes with that model; re-embed with it, or "
                              "`reembed bridge --drop` the bridge once no application calls it; nothing was written")
        if b.target_hash != model_hash:
            raise ConfigError(f"the application wraps {b.target_model_name}'s vectors in {b.called} (the identity "
                              f"now): after this job's swap they would meet {name}'s; install a bridge for {name} "
                              "under another name (`reembed bridge --model ... --bridge-function ...`), move the "
                              f"application to it, `reembed bridge --drop --bridge-function {b.function_name}`, then "
                              "run the job; nothing was written")
        if strategy != "shadow":
            raise ConfigError(f"the bridge {b.called} maps into {info.qualified}.{info.column}: in place, the column "
                              "holds both models' vectors until the end and the bridge would never become the "
                              "identity; use --strategy shadow; nothing was written")
    bridge.check_owners(conn, info)  # the swap redefines them, rollback and cleanup too


@contextlib.contextmanager
def while_embedding(ctx: RunContext) -> Iterator[None]:
    """With --bridge: a watcher thread while this process embeds; its refusal stops the run."""
    if not ctx.opts.bridge:
        yield
        return
    watcher = _Watcher(ctx)
    watcher.start()
    try:
        yield
    finally:
        watcher.stop()
    if watcher.error is not None:
        raise watcher.error


def ensure(ctx: RunContext) -> None:
    """Before finalize, with --bridge: the bridge installed if no worker has yet (a table smaller
    than the sample, a run stopped before it); a refusal fails the run before anything is swapped."""
    if not ctx.opts.bridge or "cut_over" in ctx.active.steps:
        return
    held = ctx.connections.hold("bridge")
    try:
        while not _settle(_installing(ctx, held)):  # busy: another worker's watcher is installing it now
            if ctx.stop.wait(1.0):
                return
    finally:
        held.release()


def _installing(ctx: RunContext, held: Any) -> tuple[str, Any]:
    """One try at the job's bridge; an error past the job's first write is not a usage error (exit 1).
    The sample is read in one short transaction, fitted with none open (minutes at 10,000 pairs: an
    open one would be ended by the session's idle-in-transaction timeout, and would hold vacuum back),
    and installed in another short one; this session's lock on the table's bridge keeps the other
    workers from fitting it too meanwhile."""
    try:
        looked = ctx.lease.write(_sample, ctx, on=held, what="bridge_sample")
        if looked[0] != "sample":
            return looked
        fitted = fit(looked[1], min_recall=ctx.opts.bridge_min_recall, embedder=ctx.embedder)
        return ctx.lease.write(_install, ctx, fitted, on=held, what="install_bridge")
    except ConfigError as exc:
        raise BridgeFailed(f"the bridge could not be installed: {exc}") from exc
    finally:
        bridge.unlock_fit(held.conn, ctx.info)


def _sample(conn: psycopg.Connection[Any], ctx: RunContext) -> tuple[str, Any]:
    """('busy', None) while another session fits or installs; ('kept', bridge) if one is there; else
    ('sample', pairs). This session takes the table's bridge lock (the caller lets it go)."""
    info, job, opts = ctx.info, ctx.active, ctx.opts
    if not bridge.lock_fit(conn, info):
        return ("busy", None)
    if (kept := _kept(conn, ctx)) is not None:
        return ("kept", kept)
    if job.source is None:
        raise ConfigError(f"job {job.id} recorded no model before it (the registry was empty): a bridge maps into "
                          "that model's space; run without --bridge")
    return ("sample", sample_job(conn, info, job, n=opts.bridge_sample))


def _kept(conn: psycopg.Connection[Any], ctx: RunContext) -> bridge.Bridge | None:
    """The table's installed bridge into the job's model, or None."""
    return next((b for b in bridge.current(conn, ctx.info.qualified, ctx.info.column)
                 if b.target_hash == ctx.active.target_hash), None)


def _install(conn: psycopg.Connection[Any], ctx: RunContext, fitted: mapping.Fitted) -> tuple[str, Any]:
    """One short transaction: ('installed', bridge) or ('refused', figures), recorded; ('kept', bridge)
    if one was installed meanwhile (this session's lock was lost with its connection)."""
    info, job, opts = ctx.info, ctx.active, ctx.opts
    if not bridge.claim(conn, info):
        return ("busy", None)
    if (kept := _kept(conn, ctx)) is not None:
        return ("kept", kept)
    source = job.source
    if source is None:
        raise InternalError(f"job {job.id} lost its source model between the bridge's sample and its install")
    function = bridge.function_of(info, opts.bridge_function)
    if "refused" in fitted.figures:
        bridge.record_refused(conn, info, fitted, source=source, target=job.target, function=function, job_id=job.id)
        return ("refused", fitted.figures)
    return ("installed", bridge.install(conn, info, fitted, source=source, target=job.target, function=function,
                                        job_id=job.id))


def _settle(outcome: tuple[str, Any]) -> bool:
    """True once the job has its bridge; a refusal raised."""
    what, value = outcome
    if what == "refused":
        raise BridgeRefused(f"the bridge was refused: {value['refused']} ({said(value)}); nothing was installed and "
                            "the job is as it was: re-run without --bridge (the application stays on the registry's "
                            "protocol), or with a lower --bridge-min-recall")
    if what == "installed":
        log.info("bridge_ready", detail=f"wrap every new-model vector in {value.called}: " + said(value.figures))
    if what == "kept":
        log.info("bridge_kept", function=value.called, detail="the job's bridge is installed already; kept as it is")
    return what in ("installed", "kept")


class _Watcher(Background):
    """Waits until the job has committed enough rows for the fit, then fits and installs (or finds
    the bridge installed by another worker, or refused by one: that refusal is this run's too)."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__("reembed-bridge", join_timeout=120.0)
        self.ctx = ctx
        self.error: ReembedError | None = None
        self._since: dt.datetime | None = None

    def _loop(self) -> None:
        ctx = self.ctx
        while not self._stopped.is_set() and not ctx.stop.requested:
            try:
                if self._round():
                    return
            except Exception as exc:  # noqa: BLE001 - whatever stops the bridge fails the run, said
                self.error = exc if isinstance(exc, ReembedError) else BridgeFailed(
                    f"the bridge could not be installed: {type(exc).__name__}: {exc}")
                self.error.__cause__ = exc if self.error is not exc else None
                log.error("bridge_failed", error=str(self.error).splitlines()[0])
                ctx.stop.request("bridge")
                return
            self._stopped.wait(_WATCH_SECS)

    def _round(self) -> bool:
        ctx, job = self.ctx, self.ctx.active
        held = ctx.connections.hold("bridge")
        try:
            if self._since is None:
                self._since = ctx.lease.read(_server_now, on=held, what="server_now")
            refused = ctx.lease.read(bridge.refused_since, job, self._since, on=held, what="read_bridge")
            if refused is not None:
                return _settle(("refused", refused.figures))
            progress = ctx.lease.read(ckpt.progress, job, on=held, what="job_progress")
            done = int(progress["rows_done"]) + int(progress["rows_skipped"])
            if done < min(ctx.opts.bridge_sample, job.rows_total or ctx.opts.bridge_sample):
                return False
            return _settle(_installing(ctx, held))
        finally:
            held.release()


def _server_now(conn: psycopg.Connection[Any]) -> dt.datetime:
    row = conn.execute(query("server_now")).fetchone()
    return row["now"] if row else dt.datetime.now(dt.UTC)
