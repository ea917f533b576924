"""Frozen settings: what to re-embed, with which model, how. Built from argv by the CLI,
or directly by library callers and tests."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import time
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, TypeVar

from reembed.errors import ConfigError

_DURATION = re.compile(r"^\s*(?:(\d+)h)?\s*(?:(\d+)m(?!s))?\s*(?:(\d+)s)?\s*(?:(\d+)ms)?\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
if TYPE_CHECKING:
    from _typeshed import DataclassInstance  # typeshed's own name for "any dataclass"

T = TypeVar("T", bound="DataclassInstance")
BRIDGE_MIN_RECALL = 0.2  # recall@10 of a bridge against the old model's own neighbours, at least
_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}


def parse_duration(text: str) -> float:
    """'6h', '90m', '1h30m', '45s', '200ms', or plain seconds -> seconds."""
    if text.strip().isdigit():
        return float(text)
    match = _DURATION.match(text)
    if not match or not any(match.groups()):
        raise ConfigError(f"cannot read duration {text!r}: write it like 6h, 90m, 1h30m, 45s or 200ms")
    hours, minutes, seconds, millis = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def parse_size(text: str) -> int:
    """'2GB', '512MB', or plain bytes -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"cannot read size {text!r}: write it like 512MB or 2GB")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "b").lower()])


def next_clock_time(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """'HH:MM' local time -> the next such moment (tomorrow if it has passed today)."""
    match = re.fullmatch(r"\s*([01]?\d|2[0-3]):([0-5]\d)\s*", text)
    if not match:
        raise ConfigError(f"cannot read --until {text!r}: write a local time as HH:MM, e.g. 06:30")
    now = now or dt.datetime.now().astimezone()
    at = now.replace(hour=int(match.group(1)), minute=int(match.group(2)), second=0, microsecond=0)
    if at <= now:
        at += dt.timedelta(days=1)
    return at


@dataclass(frozen=True)
class Target:
    """The table and columns to re-embed, and where the registry lives."""

    dsn: str | None = None
    table: str = "knowledge_nodes"
    column: str = "embedding"
    content_column: str = "content"
    content: str | None = None  # a SQL expression over the row for the text (instead of content_column)
    null_content: str = "null"  # a row whose text is NULL: "null" (its vector NULL) or "empty" (the empty text's)
    index: str | None = None  # None: the HNSW index found on the column
    registry: str = "embedding_model"

    def conninfo(self) -> str:
        """--dsn, else $REEMBED_DSN, else "" (libpq's own PG* variables)."""
        return self.dsn or os.environ.get("REEMBED_DSN", "")


@dataclass(frozen=True)
class ModelSpec:
    """The model and every option that changes the vectors it produces."""

    model: str
    model_name: str | None = None  # what the registry records; default: --model
    dimension: int | None = None  # cross-checked against the model before any write
    device: str = "auto"
    precision: str = "auto"
    prefix: str = ""
    max_seq_length: int | None = None  # None: the model's own
    content: str | None = None  # the target's content expression: the text the vectors are of (in the hash)
    null_content: str = "null"  # the target's: "empty" encodes a NULL text as "" (in the hash)

    @property
    def registry_name(self) -> str:
        return self.model_name or self.model

    def for_target(self, target: Target) -> ModelSpec:
        """This model reading `target`'s text: what it reads and how it takes a NULL are in its hash."""
        return replace(self, content=target.content, null_content=target.null_content)


@dataclass(frozen=True)
class RunOptions:
    """How the job runs."""

    batch_size: int = 256  # rows per checkpoint transaction
    encode_batch_size: int | None = None  # a cap on rows per forward pass (the token budget decides by default)
    max_batch_tokens: int | None = None  # padded tokens per forward pass; None: 65,536 on CUDA, 4,096 elsewhere
    tokenizer_workers: int | None = None  # tokenizer processes; None: cores - 1; 0: a thread of this process
    writers: int | None = None  # writer connections committing in order; None: 4 beside CUDA, 1 elsewhere
    window_rows: int | None = None  # rows sorted by length together; None: 4,096 on CUDA, 1,024 elsewhere
    drop_hnsw_first: bool = True  # the column's ANN indexes dropped before the writes, built again at the end
    allow_published: bool = False  # a type change on a table logical replication publishes (subscribers relaxed)
    allow_shared_registry: bool = False  # other vector columns of the registry's dimension may stay as they are
    # set by a job over several tables for each of its targets: the others' (table oid, column), which the
    # shared-registry check counts as the job's own
    group_columns: tuple[tuple[int, str], ...] = ()
    concurrent_index: bool = True  # the HNSW build never blocks the application's writes
    confirm_seconds: float = 5.0  # the warning banner's pause; 0 with --no-confirm
    dry_run: bool = False
    abandon_active: bool = False
    pipeline: bool = True
    max_runtime: float | None = None  # seconds
    until: dt.datetime | None = None
    max_retries: int | None = None  # None: transient faults are bounded by max_outage alone
    max_outage: float = 120.0  # seconds a transient fault (a restart, a failover) is waited out
    ddl_lock_timeout: str = "5s"  # every DDL statement waits at most this long for its lock
    max_writers_held: float = 1.0  # seconds the cut-over may hold writers off (its catch-up; a rewrite adds)
    cut_over_lock_timeout: str = "200ms"  # each cut-over lock request; under deadlock_timeout: the job yields
    index_memory: int = 2 * 1024**3  # cap on maintenance_work_mem for the HNSW build
    progress_interval: float = 30.0
    break_stale_lock: bool = False
    stale_after: float = 90.0  # a heartbeat older than this means the holder is gone (beats every 10 s)
    retry_failed: bool = False
    accept_failed: bool = False
    # throttling (reembed.throttle): None turns a check off
    max_replica_lag: float | None = 5.0  # seconds a replica may replay behind before the job holds
    critical_replica_lag: float | None = None  # seconds past which the job stops (exit 75)
    replica_dsns: tuple[str, ...] = ()  # replicas pg_stat_replication cannot show: a heartbeat row read there
    exclude_replicas: tuple[str, ...] = ()  # application_names or slot names the lag check leaves out
    max_wal_rate: float | None = None  # bytes of WAL per second
    max_archive_backlog: int | None = None  # WAL segments waiting for the archiver
    critical_archive_backlog: int | None = None
    autovacuum_pause: str = "wraparound"  # hold for an autovacuum on the table: wraparound | any | never
    max_lock_waits: int | None = None  # application sessions waiting on the job's locks
    max_load: int | None = None  # active application sessions
    critical_load: int | None = None
    throttle_query: str | None = None  # the operator's SQL: a first column true or > 0 holds the job
    throttle_flag_file: str | None = None  # holds while this file exists
    max_rate: float | None = None  # rows per second, at most
    # the strategy (reembed.strategy): in_place rewrites the column; shadow fills a column beside it
    strategy: str = "in_place"
    # --strategy shadow's quality gate (reembed.gate)
    skip_gate: bool = False
    gate_sample: int = 1000  # rows whose new vectors are checked
    gate_queries: int = 200  # of them, rows made into queries (self-recall and recall@10)
    gate_min_recall: float = 0.5  # recall@10 of queries made from the rows, through the new index
    gate_max_regression: float = 0.05  # with --old-model: how much worse than the old model's recall
    gate_min_self_recall: float = 0.9  # each row found from its own vector in the top 10 through each index
    old_model: ModelSpec | None = None  # the registry's current model, for the gate's comparison
    # --bridge (reembed.fitting, reembed.bridge): a map from the new model's space into the live
    # column's, fitted on the job's first committed rows, which the application wraps its vectors in
    bridge: bool = False
    bridge_sample: int = 10_000  # rows it is fitted on (a fifth of them held out and measured)
    bridge_min_recall: float = BRIDGE_MIN_RECALL  # recall@10 against the old model's neighbours, at least
    bridge_function: str | None = None  # None: reembed_query, in the table's schema
    # workers (reembed.worker, reembed.fleet): one job on several processes, GPUs, hosts
    workers: int = 1  # worker processes this run starts on this host (itself included)
    devices: tuple[str, ...] = ()  # one per worker, round robin (--devices cuda:0,cuda:1)
    ranges: int | None = None  # key ranges cut at prepare; None: one per 16 batches, at most 256
    join: bool = False  # an active job's workers hold the table's lock shared: join them (False: exit 3)
    join_wait: float = 0.0  # seconds to wait while another run holds the lock exclusively (prepare, finalize)
    metrics_file: str | None = None  # Prometheus text format, rewritten at every progress event and at exit
    command_line: tuple[str, ...] = ()  # the CLI's argv: what --workers N starts again for each worker

    def deadline(self, started_monotonic: float, now_wall: dt.datetime | None = None) -> float | None:
        """The run's deadline on the monotonic clock, or None."""
        limits = []
        if self.max_runtime is not None:
            limits.append(started_monotonic + self.max_runtime)
        if self.until is not None:  # the clock time, on the monotonic clock as it reads now
            now_monotonic, now_wall = time.monotonic(), now_wall or dt.datetime.now().astimezone()
            limits.append(now_monotonic + (self.until - now_wall).total_seconds())
        return min(limits) if limits else None


@dataclass(frozen=True)
class VerifyOptions:
    """What `reembed verify` checks."""

    sample: int = 1000  # rows drawn (row by row, a fixed seed)
    seed: int = 0
    every_row: bool = False  # every row instead of a sample
    min_cosine: float = 0.99  # a stored vector closer than this to a fresh encoding agrees

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> VerifyOptions:
        return _from_namespace(cls, args)


@dataclass(frozen=True)
class BridgeOptions:
    """What `reembed bridge` does: fit and install a bridge without a job (or preview it, or drop one)."""

    sample: int = 10_000  # rows drawn from the table and encoded by the new model
    min_recall: float = BRIDGE_MIN_RECALL
    function: str | None = None  # None: reembed_query in the table's schema (--drop: the table's only bridge)
    dry_run: bool = False  # fit and measure, install nothing
    drop: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BridgeOptions:
        _positive("--sample", args.sample)
        _fraction("--bridge-min-recall", args.bridge_min_recall)
        return cls(sample=args.sample, min_recall=args.bridge_min_recall, function=args.bridge_function,
                   dry_run=args.bridge_dry_run, drop=args.drop)


@dataclass(frozen=True)
class EvalOptions:
    """What `reembed eval` compares, on which rows."""

    models: tuple[ModelSpec, ...] = ()  # the candidates
    current: ModelSpec | None = None  # the registry's model (its hash is checked): the stored column's queries
    sample: int = 10_000  # rows read once and encoded by each model: the search's rows
    queries: int = 1000  # of them, rows made into queries (one of their sentences)
    seed: int = 0  # the same seed, the same rows and queries
    strategy: str = "in_place"  # the job whose cost `plan` states for each candidate

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalOptions:
        def spec(model: str, prefix: str, max_seq_length: int | None) -> ModelSpec:
            return ModelSpec(model=model, device=args.device, precision=args.precision, prefix=prefix,
                             max_seq_length=max_seq_length)

        current = spec(args.current_model, args.current_prefix or "", args.current_max_seq_length) \
            if args.current_model else None
        return cls(models=tuple(spec(m, args.prefix or "", args.max_seq_length) for m in args.models),
                   current=current, sample=args.sample, queries=args.queries, seed=args.seed,
                   strategy=args.strategy)


@dataclass(frozen=True)
class RollbackOptions:
    """What `reembed rollback` does with the rows written since the swap."""

    leave_stale_null: bool = False  # without the old model: those rows' previous vector set NULL
    batch_size: int = 256
    confirm: bool = True  # False: --no-confirm (nothing is asked today; kept for the cron form)
    cut_over_lock_timeout: str = "200ms"
    max_writers_held: float = 1.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RollbackOptions:
        return cls(leave_stale_null=args.leave_stale_null, batch_size=args.batch_size,
                   cut_over_lock_timeout=_millis(args.cut_over_lock_timeout),
                   max_writers_held=parse_duration(args.max_writers_held))


@dataclass(frozen=True)
class Settings:
    target: Target  # the table (a job over several: the first; its dsn and registry are the job's)
    model: ModelSpec | None = None
    options: RunOptions = field(default_factory=RunOptions)
    targets: tuple[Target, ...] = ()  # a job over several tables under one registry: every one, in order

    @property
    def all_targets(self) -> tuple[Target, ...]:
        return self.targets or (self.target,)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        found = targets_from_args(args)
        target, several = found[0], (found if len(found) > 1 else ())
        if not hasattr(args, "model"):
            return cls(target=target, targets=several)
        if args.model is None:  # rollback without the old model
            return cls(target=target, targets=several)
        # the text each target reads goes into its model's hash there (ModelSpec.for_target)
        model = _from_namespace(ModelSpec, args, prefix=args.prefix or "", content=None, null_content="null")
        if getattr(args, "devices", None):  # this process is the first worker: the first device
            model = replace(model, device=_devices(args.devices)[0])
        if not hasattr(args, "dry_run"):  # verify, rollback: a model and no job
            return cls(target=target, model=model, targets=several)
        _check_args(args)
        options = _from_namespace(
            RunOptions,
            args,
            confirm_seconds=0.0 if args.no_confirm else 5.0,
            max_runtime=parse_duration(args.max_runtime) if args.max_runtime else None,
            until=next_clock_time(args.until) if args.until else None,
            ddl_lock_timeout=_millis(args.ddl_lock_timeout),
            cut_over_lock_timeout=_millis(args.cut_over_lock_timeout),
            max_writers_held=parse_duration(args.max_writers_held),
            max_outage=parse_duration(args.max_outage),
            index_memory=parse_size(args.index_memory),
            max_replica_lag=_optional_duration(args.max_replica_lag),
            critical_replica_lag=_optional_duration(args.critical_replica_lag),
            replica_dsns=tuple(args.replica_dsns or ()),
            exclude_replicas=tuple(args.exclude_replicas or ()),
            max_wal_rate=float(parse_size(args.max_wal_rate.removesuffix("/s"))) if args.max_wal_rate else None,
            stale_after=parse_duration(args.stale_after),
            join_wait=parse_duration(args.join_wait),
            join=_joins(args),
            devices=_devices(args.devices),
            workers=args.workers or (len(_devices(args.devices)) or 1),
            old_model=ModelSpec(model=args.old_model, device=args.device, precision=args.precision,
                                prefix=args.old_prefix or "", max_seq_length=args.old_max_seq_length,
                                model_name=args.old_model_name) if args.old_model else None,
        )
        return cls(target=target, model=model, options=options, targets=several)


# --table and what goes with each table: given once (for every table) or once per --table, in order
PER_TARGET = ("column", "content_column", "content", "null_content", "index")
_FILE_KEYS = {"table": "table", "column": "column", "content-column": "content_column", "content": "content",
              "null-content": "null_content", "index": "index"}


def targets_from_args(args: argparse.Namespace) -> tuple[Target, ...]:
    """The job's targets: from --targets FILE, or from --table (repeatable) with the per-table options
    paired with it: each given once (for every table) or exactly once per --table, in the same order
    (`--content ''` at a place: that table reads its --content-column). Errors name the option."""
    dsn, registry = getattr(args, "dsn", None), getattr(args, "registry", Target.registry)
    path = getattr(args, "targets", None)
    given = {name: getattr(args, name, None) or [] for name in PER_TARGET}
    tables = getattr(args, "table", None) or []
    if path is not None:
        if tables or any(given.values()):
            flags = ["--table"] * bool(tables) + [f"--{n.replace('_', '-')}" for n, v in given.items() if v]
            raise ConfigError(f"--targets {path} names the tables: give {', '.join(dict.fromkeys(flags))} in the file "
                              "instead (one [[target]] per table), not on the command line as well")
        found = read_targets_file(path, dsn=dsn, registry=registry)
    else:
        tables = tables or [Target.table]
        for name, values in given.items():
            if len(values) not in (0, 1, len(tables)):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} is given {len(values)} times for {len(tables)} --table: give it once (for "
                                  f"every table) or once per --table, in the same order")

        def pick(name: str, i: int) -> Any:
            values = given[name]
            return values[0] if len(values) == 1 else values[i] if values else None

        found = tuple(_target(dsn=dsn, registry=registry, table=t, column=pick("column", i),
                              content_column=pick("content_column", i), content=pick("content", i),
                              null_content=pick("null_content", i), index=pick("index", i))
                      for i, t in enumerate(tables))
    _check_distinct(found)
    return found


def _target(*, dsn: str | None, registry: str, table: str, column: str | None, content_column: str | None,
            content: str | None, null_content: str | None, index: str | None) -> Target:
    return Target(dsn=dsn, registry=registry, table=table, column=column or Target.column,
                  content_column=content_column or Target.content_column, content=content or None,
                  null_content=null_content or Target.null_content, index=index or None)


def read_targets_file(path: str, *, dsn: str | None = None, registry: str = Target.registry) -> tuple[Target, ...]:
    """--targets FILE: TOML, one [[target]] table per table: `table` (required), `column`,
    `content-column` or `content` (a SQL expression), `null-content` ("null" or "empty"), `index`.
    Every problem is one ConfigError naming the file (and the entry)."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--targets {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"--targets {path}: cannot read it ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--targets {path} is not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"target"})
    if extra:
        raise ConfigError(f"--targets {path}: unknown key {', '.join(extra)}: the file holds [[target]] entries only "
                          "(--dsn and --registry are the job's, on the command line)")
    entries = data.get("target")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"--targets {path} names no table: write one [[target]] entry per table, each with "
                          "table = \"schema.table\"")
    out = []
    for n, entry in enumerate(entries, start=1):
        where = f"--targets {path}, [[target]] number {n}"
        unknown = sorted(set(entry) - set(_FILE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {', '.join(unknown)}; the keys are {', '.join(_FILE_KEYS)}")
        bad = [k for k, v in entry.items() if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ConfigError(f"{where}: {', '.join(bad)} must be a non-empty string")
        if "table" not in entry:
            raise ConfigError(f"{where} has no table: give table = \"schema.table\"")
        if "content" in entry and "content-column" in entry:
            raise ConfigError(f"{where} gives both content and content-column: the text is one or the other")
        if entry.get("null-content", "null") not in ("null", "empty"):
            raise ConfigError(f"{where}: null-content must be \"null\" or \"empty\", not {entry['null-content']!r}")
        values = {_FILE_KEYS[k]: v for k, v in entry.items()}
        out.append(_target(dsn=dsn, registry=registry, table=values.pop("table"), column=values.get("column"),
                           content_column=values.get("content_column"), content=values.get("content"),
                           null_content=values.get("null_content"), index=values.get("index")))
    return tuple(out)


def _check_distinct(targets: tuple[Target, ...]) -> None:
    seen: set[tuple[str, str]] = set()
    for t in targets:
        key = (t.table, t.column)
        if key in seen:
            raise ConfigError(f"{t.table}.{t.column} is named twice: each table's column is one target of the job")
        seen.add(key)


def _from_namespace(cls: type[T], args: argparse.Namespace, **overrides: object) -> T:
    """A settings dataclass from the argparse results that share its field names, plus overrides."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def _joins(args: argparse.Namespace) -> bool:
    """--join, or --join-wait, or --workers N (its processes are one job's workers): join an active
    job's workers; --no-join, or none of these: exit 3 while another run holds the lock."""
    if args.join is not None:
        if not args.join and parse_duration(args.join_wait) > 0:
            raise ConfigError("--no-join and --join-wait exclude each other: --join-wait joins")
        return bool(args.join)
    return parse_duration(args.join_wait) > 0 or (args.workers or len(_devices(args.devices)) or 1) > 1


def _devices(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    devices = tuple(d.strip() for d in text.split(",") if d.strip())
    if not devices:
        raise ConfigError(f"--devices {text!r} names no device: give them like cuda:0,cuda:1")
    return devices


def _check_args(args: argparse.Namespace) -> None:
    _positive("--batch-size", args.batch_size)
    for flag in ("workers", "ranges"):
        if getattr(args, flag) is not None:
            _positive("--" + flag, getattr(args, flag))
    for flag in ("encode_batch_size", "max_batch_tokens", "window_rows", "writers"):
        if getattr(args, flag) is not None:
            _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.tokenizer_workers is not None and args.tokenizer_workers < 0:
        raise ConfigError("--tokenizer-workers must be 0 (tokenise in this process) or more, "
                          f"got {args.tokenizer_workers}")
    if args.dimension is not None:
        _positive("--dimension", args.dimension)
    if args.max_retries is not None and args.max_retries < 0:
        raise ConfigError("--max-retries must be 0 or more")
    for flag in ("max_archive_backlog", "critical_archive_backlog", "max_lock_waits", "max_load", "critical_load"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}")
    if args.max_rate is not None and args.max_rate <= 0:
        raise ConfigError(f"--max-rate must be a positive number of rows per second, got {args.max_rate:g}")
    if args.old_model and args.strategy != "shadow":
        raise ConfigError("--old-model is for the quality gate of --strategy shadow")
    _positive("--gate-sample", args.gate_sample)
    _positive("--gate-queries", args.gate_queries)
    for flag in ("gate_min_recall", "gate_max_regression", "gate_min_self_recall"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be between 0 and 1, got {getattr(args, flag):g}")
    if args.bridge and args.strategy != "shadow":
        raise ConfigError("--bridge needs --strategy shadow: in place, the column holds both models' vectors until "
                          "the end, so no map into it can be right; nothing was written")
    _positive("--bridge-sample", args.bridge_sample)
    _fraction("--bridge-min-recall", args.bridge_min_recall)
    if args.retry_failed and args.accept_failed:
        raise ConfigError("--retry-failed and --accept-failed exclude each other: pick one")


def _optional_duration(text: str | None) -> float | None:
    """A limit in time, or None for "off" (and for 0)."""
    if text is None or text.strip().lower() in ("off", "none", "0"):
        return None
    return parse_duration(text)


def _millis(duration: str) -> str:
    """A duration as PostgreSQL's lock_timeout takes it."""
    return f"{int(parse_duration(duration) * 1000)}ms"


def _fraction(flag: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{flag} must be between 0 and 1, got {value:g}")


def _positive(flag: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{flag} must be a positive integer, got {value}")
