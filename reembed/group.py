"""One job over several tables under one registry: documents and chunks (messages and notes, ...)
embedded by the same model, named by one `embedding_model` row, re-embedded together so that the
registry never names a model some of them are not in.

Each table keeps its own job row in reembed_checkpoint and everything reembed.job does for one table
(its ranges and cursors, its capture, failed rows, inventory, index work, finalize steps); the rows
are linked as a group (`group_id`, and the group on each row: the signature the registry gets and
the tables, in the order they are embedded). What differs is the end: each table is embedded
in turn and finalized up to its cut-over (the catch-up; under shadow its indexes built and its
quality gate passed), and only when every table is there does ONE cut-over (in place) or ONE swap
(shadow) catch them all up under one bounded hold and flip the registry once
(reembed.cutover.for_group); then each table's remaining steps (capture dropped, indexes built).

The order of a run: the targets read; the group found (resumed), refused or new; every table's lock
taken (exit 3 if one is held; none kept then); a new group's inventories judged for every table
before any write (exit 2 names what is refused, the other tables under the registry included);
each table prepared in a transaction of its own (its row records the group), so that one table's
DDL locks are never held while another's are waited for; then the phases above. The quality gate
is judged per table, and a refusal on any refuses the swap (nothing swapped anywhere; every table
stays at its gate, resumable).

Resume: a run naming exactly the group's tables resumes it wherever it stopped (a table whose job
was not made yet, its prepare cut short, is prepared then). A run naming some of them, or one of
them alone (reembed.job.check_not_grouped), is refused with what to pass; `--abandon-active`
abandons the group when the run names every table of it (each table's old job is carried into its
new one, as reembed.job abandons one). One worker: `--workers`, `--join` and `--metrics-file` are
for a job over one table.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
import structlog

from reembed import carry, cutover, db, lease
from reembed import checkpoint as ckpt
from reembed.batches import prepare_session
from reembed.checkpoint import Group, Job, Member
from reembed.context import JobState, RunContext, writer_count
from reembed.cutover import CutOver, Held
from reembed.dependents import Inventory
from reembed.embedder import fingerprint
from reembed.encoding import Embedder
from reembed.errors import ConfigError, ReembedError
from reembed.failures import RowsFailed
from reembed.gate import GateFailed
from reembed.job import begin, check_previous, check_target, load, old_model, prepare, recheck, registry_matches
from reembed.job import plan as plan_one
from reembed.job import run as run_one
from reembed.plan import estimate_rows, inventory, plan_report
from reembed.report import Report
from reembed.settings import ModelSpec, Settings
from reembed.signals import StopSignal
from reembed.signature import Signature
from reembed.strategy import for_name
from reembed.target import TableInfo, inspect_target, read_registry
from reembed.terminal import group_plan_text
from reembed.throttle import Throttle
from reembed.throttle import check_options as throttle_options

log = structlog.get_logger()

CUT_OVER = "cut_over"  # the finalize step every table stops before, and the group does once for all

BANNER = """\
WARNING: reembed is about to re-embed {count} tables under one registry with {model} ({dim}-d), one after
WARNING: the other, then cut them all over at once (one {swap}: the registry names the new model for all):
{tables}
WARNING: The application may keep writing: its writes are captured and re-embedded.
WARNING: Press Ctrl-C within {secs:g} seconds to abort (--no-confirm skips this pause)."""


def run(settings: Settings, *, embedder: Embedder | None = None, stop: StopSignal | None = None) -> Report:
    """A job over every target of `settings` (library entry point of `reembed run`): one target is
    reembed.job's job; several are one job under one registry, cut over together."""
    if len(settings.all_targets) == 1:
        return run_one(replace(settings, target=settings.all_targets[0], targets=()), embedder=embedder, stop=stop)
    return _run(settings, embedder, stop or StopSignal())


def plan(settings: Settings, *, embedder: Embedder | None = None) -> Report:
    """The dry run over every target (`reembed plan`); nothing is written."""
    if len(settings.all_targets) == 1:
        return plan_one(replace(settings, target=settings.all_targets[0], targets=()), embedder=embedder)
    return run(replace(settings, options=replace(settings.options, dry_run=True)), embedder=embedder)


@dataclass
class _Member:
    """One table of the job: its settings, what it is, its model's signature, its job."""

    settings: Settings
    info: TableInfo
    model_hash: str
    job: Job | None = None  # its job in the group (any state), or None: to prepare
    old: Job | None = None  # an active job of its table that a new job abandons
    found: Inventory | None = None
    rows_total: int = 0
    ctx: RunContext | None = None

    @property
    def label(self) -> str:
        return f"{ckpt.plain(self.info.qualified)}.{self.info.column}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.info.qualified, self.info.column)

    @property
    def context(self) -> RunContext:
        if self.ctx is None:
            raise ReembedError(f"{self.label}: no run context yet")
        return self.ctx

    def as_member(self) -> Member:
        i = self.info
        return Member(i.qualified, i.column, i.content_column, i.content_sql, i.null_content)


@dataclass
class _Found:
    """The group the targets are in, and the jobs to resume or to abandon."""

    group: Group | None = None  # the active group of exactly these tables (resumed)
    others: list[Group] = field(default_factory=list)  # active groups that name some of them and differ
    singles: list[Job] = field(default_factory=list)  # active jobs over one of these tables alone

    @property
    def active(self) -> bool:
        return self.group is not None or bool(self.others) or bool(self.singles)


def _run(settings: Settings, embedder: Embedder | None, stop: StopSignal) -> Report:
    if settings.model is None:
        raise ConfigError("run needs a model: give --model (a local model directory)")
    opts = settings.options
    _check_options(settings)
    started = time.monotonic()
    conninfo = settings.target.conninfo()
    conn = db.connect(conninfo, role="control", vectors=False, autocommit=True)
    try:
        with db.translated():
            members = _members(conn, settings, embedder)
            registry = Signature.from_registry(read_registry(conn, members[0].info))
            found = _find(conn, members)
        name, group_hash = _group_fingerprint(settings, members, embedder)
        if not found.active and registry is not None and registry_matches(registry, name, group_hash):
            return _noop(registry, settings.model.dimension, started, members)
        _check(found, members, name, settings)
        _check_spaces(members, registry, settings)
        with db.translated():
            for m in members:
                check_previous(conn, m.info, m.job if m.job is not None and m.job.state in ckpt.ACTIVE else None,
                               m.settings)
        old_loader = old_model(opts, next((m.job or m.old for m in members if m.job or m.old), None), registry)
        if opts.dry_run:
            loaded = embedder or load(_plain_spec(settings), opts, group_hash)
            return _plan(conn, members, registry, found, loaded, settings, started, group_hash)
        throttle_options(opts, conninfo)  # the operator's query and replicas answer, before any write
        with contextlib.ExitStack() as stack:
            locks = _take_locks(stack, conn, conninfo, members, settings)
            loaded = embedder or load(_plain_spec(settings), opts, group_hash)
            if settings.model.dimension is not None and settings.model.dimension != loaded.signature.dimension:
                raise ConfigError(f"model produces {loaded.signature.dimension} dimensions but --dimension is "
                                  f"{settings.model.dimension}")
            signature = Signature(name, loaded.signature.dimension, group_hash)
            _contexts(stack, members, locks, loaded, stop, started, old_loader)
            stop.install()
            stack.callback(stop.close)
            stack.callback(stop.restore)
            return _locked(conn, members, signature, settings, started)
    finally:
        conn.close()


def _check_options(settings: Settings) -> None:
    opts = settings.options
    refused = [flag for flag, on in (("--workers", opts.workers > 1), ("--devices", len(opts.devices) > 1),
                                     ("--join / --join-wait", opts.join and opts.workers <= 1),
                                     ("--metrics-file", opts.metrics_file is not None)) if on]
    if refused:
        raise ConfigError(f"{', '.join(refused)}: a job over several tables runs on one worker process; run it "
                          "without, or re-embed each table in a job of its own (each with its own registry); nothing "
                          "was written")
    if opts.bridge:
        raise ConfigError("--bridge fits a map on one table's rows: a job over several tables takes none; run it "
                          "without --bridge; nothing was written")
    registries = {t.registry for t in settings.all_targets}
    if len(registries) > 1:
        raise ConfigError(f"the targets name {len(registries)} registries ({', '.join(sorted(registries))}): a job "
                          "over several tables flips one registry row; give one --registry")


def _members(conn: psycopg.Connection[Any], settings: Settings, embedder: Embedder | None) -> list[_Member]:
    """Every target inspected (a ConfigError names the first that is wrong), each with its model's hash
    (the text it reads is in it) and its settings (the others' columns are the job's own to the
    shared-registry check)."""
    infos = [inspect_target(conn, t) for t in settings.all_targets]
    seen: dict[tuple[str, str], str] = {}
    for t, info in zip(settings.all_targets, infos, strict=True):
        key = (info.qualified, info.column)
        if key in seen:
            raise ConfigError(f"{t.table} and {seen[key]} are the same table ({info.qualified}); name its column "
                              f"{info.column} once")
        seen[key] = t.table
    columns = tuple((i.oid, i.column) for i in infos)
    out = []
    for t, info in zip(settings.all_targets, infos, strict=True):
        own = replace(settings, target=t, targets=(), options=replace(settings.options, group_columns=columns))
        model_hash = embedder.signature.hash if embedder is not None else fingerprint(
            settings.model.for_target(t) if settings.model else ModelSpec(model=""))[1]
        out.append(_Member(own, info, model_hash))
    return out


def _plain_spec(settings: Settings) -> ModelSpec:
    if settings.model is None:
        raise ConfigError("run needs a model: give --model (a local model directory)")
    return replace(settings.model, content=None, null_content="null")


def _group_fingerprint(settings: Settings, members: list[_Member], embedder: Embedder | None) -> tuple[str, str]:
    """What the registry will record: the model's name, and the hash its tables share (the same text
    options: that hash, as a job over one table records it), else the model's own (its files and
    options, the text left out: each table's job keeps the hash of the text it reads)."""
    if embedder is not None:
        return embedder.signature.name, embedder.signature.hash
    hashes = {m.model_hash for m in members}
    name, plain = fingerprint(_plain_spec(settings))
    return name, hashes.pop() if len(hashes) == 1 else plain


def _signed(embedder: Embedder, name: str, model_hash: str) -> Embedder:
    """The loaded model under a table's own signature (its hash covers the text that table reads)."""
    if embedder.signature.hash == model_hash:
        return embedder
    signed = copy.copy(embedder)
    signed.signature = Signature(name, embedder.signature.dimension, model_hash)
    return signed


def _find(conn: psycopg.Connection[Any], members: list[_Member]) -> _Found:
    """The active group (or jobs over one table) the targets' tables are in; each member's job in the
    group that names exactly these tables, or its table's active job (to abandon)."""
    out = _Found()
    groups: dict[int, Group] = {}
    for m in members:
        active = ckpt.active_job(conn, m.info)
        named = active if active is not None and active.group_id is not None else \
            ckpt.active_group(conn, m.info.qualified, m.info.column)
        if named is not None and named.group is not None:
            groups[named.group.id] = named.group
        elif active is not None:
            out.singles.append(active)
        m.old = active
    keys = {m.key for m in members}
    for g in groups.values():
        if set(g.keys) == keys and out.group is None:
            out.group = g
        else:
            out.others.append(g)
    if out.group is not None:
        by_key = {(j.table_name, j.column_name): j for j in ckpt.group_jobs(conn, out.group.id)}
        order = {k: i for i, k in enumerate(out.group.keys)}
        members.sort(key=lambda m: order[m.key])  # the group's order: the order they are embedded in
        for m in members:
            m.job = by_key.get(m.key)
            if m.job is not None and m.old is not None and m.old.id == m.job.id:
                m.old = None
    return out


def _check(found: _Found, members: list[_Member], name: str, settings: Settings) -> None:
    """Refuse (exit 2, before any write) a run that does not name exactly the active group's tables,
    a table another job is on, or another model or text than the group's, unless told to abandon."""
    abandon = settings.options.abandon_active
    keys = {m.key for m in members}
    for other in found.others:
        missing = [m for m in other.members if m.key not in keys]
        if not abandon or missing:
            raise ConfigError(other.refusal(", ".join(m.label for m in members if m.key in set(other.keys)))
                              + (f" ({', '.join(m.label for m in missing)} would be left mid-job)"
                                 if abandon and missing else ""))
    for job in found.singles:
        if not abandon:
            raise ConfigError(f"job {job.id} is re-embedding {job.table_name}.{job.column_name} alone, with "
                              f"{job.target.name}: finish it first (reembed run with its --table), or pass "
                              "--abandon-active to drop it and start this job over every table; nothing was written")
    g = found.group
    if g is None:
        return
    if g.signature.name != name and not abandon:
        raise ConfigError(f"job group {g.id} ({g.said()}) is re-embedding with {g.signature.name} "
                          f"({g.signature.dimension}-d), not {name}; re-run with that model to resume it, or pass "
                          "--abandon-active to drop it and start over with this one; nothing was written")
    for m in members:
        if m.job is not None and m.job.state in ckpt.ACTIVE:
            check_target(m.job, name, m.model_hash, m.info, m.settings)
    if abandon and not _resumable(found, members, name):  # abandoned: each table's active job is its new job's old
        found.others.append(g)
        found.group = None
        for m in members:
            m.old, m.job = (m.job if m.job is not None and m.job.state in ckpt.ACTIVE else m.old), None


def _check_spaces(members: list[_Member], registry: Signature | None, settings: Settings) -> None:
    """The tables a job starts on are in one vector space, the one the registry names: a column of
    another dimension is not under this registry row, and one flip cannot be right for both."""
    dims = {m.label: m.info.typmod for m in members if m.job is None and m.info.typmod is not None}
    want = registry.dimension if registry is not None else next(iter(dims.values()), None)
    odd = [f"{label} ({dim}-d)" for label, dim in dims.items() if dim != want]
    if not odd:
        return
    names = (f"the space {settings.target.registry} names ({registry.name}, {want}-d)" if registry is not None
             else f"the {want}-d of {next(label for label, dim in dims.items() if dim == want)}")
    raise ConfigError(f"{', '.join(odd)} {'is' if len(odd) == 1 else 'are'} not in {names}: the tables of one job "
                      "share one registry row and one vector space; re-embed a table of another dimension in a job "
                      "of its own, with a --registry of its own; nothing was written")


def _resumable(found: _Found, members: list[_Member], name: str) -> bool:
    g = found.group
    return g is not None and g.signature.name == name and all(
        m.job is None or m.job.state not in ckpt.ACTIVE
        or (m.job.matches_fingerprint(name, m.model_hash)
            and (m.job.content_expr, m.job.null_content) == (m.info.content_sql, m.info.null_content))
        for m in members)


def _noop(registry: Signature, dimension: int | None, started: float, members: list[_Member]) -> Report:
    if dimension is not None and dimension != registry.dimension:
        raise ConfigError(f"model {registry.name} produces {registry.dimension} dimensions but --dimension is "
                          f"{dimension}")
    tables = ", ".join(m.label for m in members)
    log.debug("nothing_to_do", tables=tables, model_name=registry.name)
    return Report(state="noop", duration_secs=time.monotonic() - started, model_name=registry.name,
                  dimension=registry.dimension, model_hash=registry.hash,
                  message=f"nothing to do: {tables} are already embedded with {registry.name}")


def _take_locks(stack: contextlib.ExitStack, conn: psycopg.Connection[Any], conninfo: str, members: list[_Member],
                settings: Settings) -> dict[int, lease.TableLock]:
    """Every table's lock, exclusively, in the order of the tables' oids (one held by another run: exit
    3, and those taken are let go); two columns of one table share its lock."""
    opts = settings.options
    firsts: dict[int, _Member] = {}
    for m in members:
        firsts.setdefault(m.info.oid, m)
    held: dict[int, lease.TableLock] = {}
    for oid in sorted(firsts):
        m = firsts[oid]
        held[oid] = lease.take(conn, conninfo, oid, table=m.info.qualified, column=m.info.column,
                               break_stale_lock=opts.break_stale_lock, stale_after=opts.stale_after)
        stack.callback(held[oid].release)
    return held


def _contexts(stack: contextlib.ExitStack, members: list[_Member], locks: dict[int, lease.TableLock],
              loaded: Embedder, stop: StopSignal, started: float, old_loader: Any) -> None:
    """Each table's run context: its connections (their staging table is the table's), its throttle,
    its table's lease (kept by a keeper thread on the connections of the table's first target), the
    shared model (under the table's own signature) and stop signal."""
    keepers: dict[int, lease.Lease] = {}
    for m in members:
        opts, conninfo = m.settings.options, m.settings.target.conninfo()
        writers = writer_count(opts, loaded.device)
        connections = db.Connections(conninfo, size=6 + writers, configure=prepare_session(m.info),
                                     reconnect_timeout=opts.max_outage)
        stack.callback(connections.close)
        keeper = keepers.get(m.info.oid)
        if keeper is None:
            keeper = keepers[m.info.oid] = lease.Lease(locks[m.info.oid], connections, table_oid=m.info.oid,
                                                       table=m.info.qualified, stop=stop,
                                                       max_outage=opts.max_outage, max_retries=opts.max_retries)
            keeper.start()
            stack.callback(keeper.release)  # before its connections close
        throttle = Throttle(opts, stop=stop, conninfo=conninfo, table_oid=m.info.oid, lease=keeper,
                            held=connections.hold("throttle"))
        stack.callback(throttle.close)
        control = connections.hold("control")
        stack.callback(control.release)
        m.ctx = RunContext(settings=m.settings, info=m.info, embedder=_signed(loaded, loaded.signature.name,
                                                                              m.model_hash),
                           stop=stop, lease=keeper, connections=connections, control=control,
                           state=JobState(for_name(opts.strategy)), started=started, deadline=opts.deadline(started),
                           writers=writers, throttle=throttle, old_embedder=old_loader)


def _locked(conn: psycopg.Connection[Any], members: list[_Member], signature: Signature, settings: Settings,
            started: float) -> Report:
    """Under every table's lock: the group found again, prepared where needed, then its phases."""
    with db.translated():
        registry = Signature.from_registry(read_registry(conn, members[0].info))
        found = _find(conn, members)
    if not found.active and registry is not None and registry_matches(registry, signature.name, signature.hash):
        return _noop(registry, None, started, members)
    _check(found, members, signature.name, settings)
    todo = [m for m in members if m.job is None]
    if todo:
        aborted = _prepare(conn, members, todo, found.group, registry, signature, settings)
        if aborted is not None:
            return aborted
    with db.translated():
        ckpt.ensure_schema(conn)  # a job of an older version gains the newer columns and tables
    resumed: dict[int, str | None] = {}
    for m in members:
        if m in todo or m.job is None:
            continue
        ctx = m.context
        job = ctx.state.advance(ckpt.reload(conn, m.job), strategy=for_name(m.job.strategy))
        if job.state in ckpt.ACTIVE:
            recheck(ctx, conn, job)
            resumed[job.id] = ckpt.progress(conn, job)["last_id"]
            log.info("job_resumed", job_id=job.id, table=m.info.qualified, state=job.state, group_id=job.group_id,
                     last_id=resumed[job.id], finalize_steps=job.steps)
    for m in members:  # every table's job is beaten, whichever is being worked on
        m.context.lease.on_beat(functools.partial(_beat, m.context.active.id))
    return _phases(members, signature, resumed, started)


def _beat(job_id: int, conn: psycopg.Connection[Any], pid: int) -> None:
    ckpt.heartbeat(conn, job_id, db.holder_name())


def _prepare(conn: psycopg.Connection[Any], members: list[_Member], todo: list[_Member], group: Group | None,
             registry: Signature | None, signature: Signature, settings: Settings) -> Report | None:
    """The tables without a job: every one's inventory judged before any write (exit 2), one banner,
    then each prepared in a transaction of its own, recording the group (a new group's id is its first
    job's). A Report when the operator aborted at the banner."""
    opts = settings.options
    with db.translated():
        for m in todo:
            carry.finish_not_null(conn, m.info)  # a NOT NULL a killed rollback left to put back first
            m.found = inventory(conn, m.info, registry, m.old, signature.dimension, m.settings.options)
            m.rows_total = estimate_rows(conn, m.info)
    if _confirm(members, todo, signature, settings):
        return Report(state="stopped", exit_code=members[0].context.stop.exit_code,
                      message="aborted before any write")
    with db.translated():
        ckpt.ensure_schema(conn)  # the first write of a new job: after the banner
    record: Group = group or Group(0, signature, tuple(m.as_member() for m in members))
    for m in todo:
        if m.found is None:
            raise ReembedError(f"{m.label}: no inventory")
        ctx = m.context
        job = ctx.state.advance(prepare(ctx, conn, registry, m.old, rows_total=m.rows_total, found=m.found,
                                        group=record))
        record = job.group or record
        m.job = job
    log.info("group_started", group_id=record.id, tables=record.said(), model_name=signature.name,
             strategy=opts.strategy)
    return None


def _confirm(members: list[_Member], todo: list[_Member], signature: Signature, settings: Settings) -> bool:
    seconds = settings.options.confirm_seconds
    if seconds <= 0:
        return False
    shadow = settings.options.strategy == "shadow"
    lines = []
    for m in members:
        if m not in todo:
            lines.append(f"WARNING:   {m.label}: resumed")
            continue
        dropped = [d.name for d in (m.found.rebuilt if m.found else [])]
        said = ("a shadow column beside it; search keeps serving the old vectors" if shadow else
                "the column mixes two spaces until the cut-over: do not serve search from it"
                + (f"; {', '.join(dropped)} dropped until the end" if dropped else ""))
        lines.append(f"WARNING:   {m.label} ({m.rows_total:,} rows): {said}")
    print(BANNER.format(count=len(members), model=signature.name, dim=signature.dimension,
                        swap="swap" if shadow else "cut-over", tables="\n".join(lines), secs=seconds),
          file=sys.stderr, flush=True)
    return members[0].context.stop.wait(seconds)


# ------------------------------------------------------------------ the phases


def _phases(members: list[_Member], signature: Signature, resumed: dict[int, str | None], started: float) -> Report:
    """Each table up to the cut-over, in turn; a refused gate or failed rows on one refuses the cut-over
    (the others are still taken to theirs); each caught up again; the one cut-over; each to done."""
    reports: dict[int, Report] = {}
    refused: list[tuple[_Member, ReembedError]] = []
    for m in members:
        ctx = m.context
        if ctx.active.state == "done":
            continue
        try:
            r = begin(ctx, resumed.get(ctx.active.id), until=CUT_OVER)
        except (GateFailed, RowsFailed) as exc:
            refused.append((m, exc))
            continue
        reports[ctx.active.id] = r
        if r.state not in ("ready", "done"):
            return _report(members, signature, reports, started, stopped=r)
    if refused:
        said = "; ".join(f"{m.label}: {exc}" for m, exc in refused)
        error = type(refused[0][1])(f"{len(refused)} of the {len(members)} tables cannot be cut over, so none is "
                                    f"(every table stays as it is, resumable): {said}")
        raise error
    pending = [m for m in members if CUT_OVER not in m.context.active.steps]
    held: Held | None = None
    if pending:
        for m in members:  # what the application wrote while the later tables were embedded
            r = begin(m.context, None, until=CUT_OVER)
            if r.state != "ready":
                return _report(members, signature, reports, started, stopped=r)
        held = _cut_over(members, signature)
    for m in members:
        ctx = m.context
        ctx.state.advance(ctx.lease.read(ckpt.reload, ctx.active, on=ctx.control, what="reload_job"))
        if ctx.active.state == "done":
            continue
        r = begin(ctx, None)
        rows = reports.get(ctx.active.id)
        if rows is not None:
            r.rows_updated, r.rows_skipped, r.rows_failed = rows.rows_updated, rows.rows_skipped, rows.rows_failed
        reports[ctx.active.id] = r
        if r.state != "done":
            return _report(members, signature, reports, started, stopped=r)
    return _report(members, signature, reports, started, held=held)


def _cut_over(members: list[_Member], signature: Signature) -> Held:
    """Every table caught up and swapped in one transaction, the registry flipped once (reembed.cutover)."""
    ctxs = [m.context for m in members]
    holds = [ctx.strategy.hold(ctx) for ctx in ctxs]
    registry = ctxs[0].info.registry

    def swap(conn: psycopg.Connection[Any]) -> None:
        for ctx, hold in zip(ctxs, holds, strict=True):
            ctx.strategy.swap(ctx, conn, rewrite=hold.rewrite)
        cutover.flip_registry(conn, registry, signature)

    def record(conn: psycopg.Connection[Any], secs: float) -> None:
        for ctx in ctxs:
            ctx.strategy.swapped(ctx, conn, secs)

    held = cutover.for_group(CutOver(), ctxs, holds, swap=swap, record=record)
    log.info("group_cut_over", tables=", ".join(m.label for m in members), writers_held_secs=round(held.secs, 4),
             rows_caught_up=held.rows, tries=held.tries, model_name=signature.name)
    return held


def _report(members: list[_Member], signature: Signature, reports: dict[int, Report], started: float, *,
            stopped: Report | None = None, held: Held | None = None) -> Report:
    """The group's report: the tables' own, summed, and each in `tables`."""
    first = members[0].context.active
    out = Report(state="done" if stopped is None else stopped.state,
                 exit_code=0 if stopped is None else stopped.exit_code, job_id=first.group_id,
                 duration_secs=time.monotonic() - started, model_name=signature.name,
                 dimension=signature.dimension, model_hash=signature.hash,
                 message=stopped.message if stopped is not None else "")
    tables = []
    for m in members:
        job = m.context.active
        r = reports.get(job.id) or Report(state=job.state)
        out.rows_updated += r.rows_updated
        out.rows_skipped += r.rows_skipped
        out.rows_failed += r.rows_failed
        out.index_rebuild_secs += r.index_rebuild_secs
        tables.append({"table": m.info.qualified, "column": m.info.column, "job_id": job.id, "state": r.state,
                       "rows_updated": r.rows_updated, "rows_skipped": r.rows_skipped, "rows_failed": r.rows_failed,
                       "index_rebuild_secs": round(r.index_rebuild_secs, 3)})
    out.details["group_id"] = first.group_id
    out.details["tables"] = tables
    out.details["strategy"] = members[0].context.strategy.name
    writers = first.writers_held_secs if held is None else held.secs
    if writers is not None:
        out.details["writers_held_secs"] = round(writers, 4)
    if stopped is None:
        log.info("group_done", group_id=first.group_id, rows_updated=out.rows_updated,
                 duration_secs=round(out.duration_secs, 2))
    return out


# ------------------------------------------------------------------ plan


def _plan(conn: psycopg.Connection[Any], members: list[_Member], registry: Signature | None, found: _Found,
          embedder: Embedder, settings: Settings, started: float, group_hash: str) -> Report:
    """Each table's plan (reembed.plan), and the one cut-over or swap of them all."""
    signature = Signature(embedder.signature.name, embedder.signature.dimension, group_hash)
    reports = []
    for m in members:
        job = m.job if m.job is not None and m.job.state in ckpt.ACTIVE else m.old
        reports.append(plan_report(conn, m.info, registry, job,
                                   _signed(embedder, signature.name, m.model_hash), m.settings, started))
    opts = settings.options
    shadow = opts.strategy == "shadow"
    rewrites = [float(r.details.get("cut_over_rewrite_secs") or 0.0) for r in reports]
    secs: list[float | None] = [r.details.get("estimated_walltime_secs") for r in reports]
    group = {
        "tables": [m.label for m in members],
        "resumes_group": found.group.id if found.group is not None else None,
        "strategy": opts.strategy,
        "one": "swap" if shadow else "cut-over",
        "registry_from": registry.as_dict() if registry else None,
        "registry_to": signature.as_dict(),
        "writers_held_secs": round(opts.max_writers_held + (0.0 if shadow else sum(rewrites)), 3),
        "readers_held_secs": round(opts.max_writers_held if shadow else sum(rewrites), 3),
        "estimated_walltime_secs": round(sum(s for s in secs if s is not None), 1) if None not in secs else None,
        "rows_to_update": sum(int(r.details["rows_to_update"]) for r in reports),
    }
    details: dict[str, Any] = {"group": group, "tables": [r.details for r in reports], "strategy": opts.strategy}
    return Report(state="planned", model_name=signature.name, dimension=signature.dimension,
                  model_hash=signature.hash, duration_secs=time.monotonic() - started,
                  message=group_plan_text(details, [r.message for r in reports]), details=details)

