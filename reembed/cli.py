"""argparse only: argv -> settings -> one library call -> exit code."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from reembed import __version__, htmlreport
from reembed.bridging import bridge_command
from reembed.errors import ConfigError, ReembedError, Stopped
from reembed.evaluate import evaluate
from reembed.group import plan, run
from reembed.logs import configure_logging
from reembed.rollback import cleanup, rollback
from reembed.settings import BRIDGE_MIN_RECALL, BridgeOptions, EvalOptions, RollbackOptions, Settings, VerifyOptions
from reembed.status import status as job_status
from reembed.verify import verify


def _add_target(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target (several tables under one registry: --table once per table, or --targets)")
    g.add_argument("--dsn", "--postgres-url", dest="dsn", default=None,
                   help="libpq connection string or URL (default: $REEMBED_DSN, else libpq's PG* variables)")
    g.add_argument("--table", action="append", default=None,
                   help="table to re-embed (schema.table allowed; default knowledge_nodes). Repeat it for a job over "
                        "several tables under one registry: each table is embedded in turn, then one cut-over (or "
                        "one swap) flips the registry for all; --column, --content-column, --content, --null-content "
                        "and --index are then given once (for every table) or once per --table, in the same order")
    g.add_argument("--targets", default=None, metavar="FILE",
                   help="the tables as a TOML file instead of --table: one [[target]] per table with table, and "
                        "optionally column, content-column or content, null-content, index")
    g.add_argument("--column", action="append", default=None, help="the vector column (embedding)")
    g.add_argument("--content-column", action="append", default=None, help="the text column to encode (content)")
    g.add_argument("--content", action="append", default=None, metavar="EXPR",
                   help="the text to encode as a SQL expression over the row, instead of --content-column, e.g. "
                        "\"title || E'\\n' || body\" or \"doc->>'text'\" (its columns unqualified; in the model's "
                        "hash: the registry records what was embedded); with several tables, '' for a table that "
                        "reads its --content-column")
    g.add_argument("--null-content", action="append", choices=("null", "empty"), default=None,
                   help="a row whose text is NULL: null leaves its vector NULL (refused for a NOT NULL column that "
                        "has such rows); empty encodes the empty text (in the model's hash) (null)")
    g.add_argument("--index", action="append", default=None,
                   help="the HNSW index to rebuild (default: the one on --column)")
    g.add_argument("--registry", default="embedding_model",
                   help="the one-row model registry table (one for the whole job)")


def _add_output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout at exit")
    g.add_argument("--log-format", choices=("auto", "console", "json"), default="auto",
                   help="stderr logs: console on a terminal, JSON lines otherwise (auto)")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def _add_encoding(g: argparse._ArgumentGroup, *, prefix: str, length: str) -> None:
    """Where the model runs and the options that change its vectors (run, plan and verify)."""
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (auto: CUDA when present)")
    g.add_argument("--precision", default="auto", help="auto | fp32 | fp16 | bf16 (auto: fp16 on CUDA, else fp32)")
    g.add_argument("--prefix", default="", help=prefix)
    g.add_argument("--max-seq-length", type=int, default=None, help=length)


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="local sentence-transformers model directory, or a name in the local model cache")
    g.add_argument("--model-name", default=None, help="the name the registry records (default: --model)")
    g.add_argument("--dimension", type=int, default=None, help="expected dimension; checked before any write")
    _add_encoding(g, prefix="prepended to every text, e.g. 'search_document: '",
                  length="truncate texts at this many tokens")

    j = p.add_argument_group("job")
    j.add_argument("--batch-size", type=int, default=256, help="rows per checkpoint transaction (256)")
    j.add_argument("--max-batch-tokens", type=int, default=None,
                   help="padded tokens per forward pass; rows are sorted by length and cut by this budget, "
                        "halved on CUDA out-of-memory (default 65536 on CUDA, 4096 on CPU)")
    j.add_argument("--tokenizer-workers", type=int, default=None,
                   help="tokenizer processes feeding the device (default: CPU cores - 1; 0: tokenise in this "
                        "process)")
    j.add_argument("--window-rows", type=int, default=None,
                   help="at most this many rows of several batches sorted by length together before encoding "
                        "(and about 2 s of the measured pace); a stop abandons the window being encoded "
                        "(default 4096 on CUDA, 1024 on CPU)")
    j.add_argument("--writers", type=int, default=None,
                   help="writer connections; batches are written in parallel and commit in key order "
                        "(default 4 beside a CUDA device, 1 on CPU)")
    j.add_argument("--encode-batch-size", type=int, default=None,
                   help="deprecated by --max-batch-tokens: now an upper bound on rows per forward pass")
    j.add_argument("--drop-hnsw-first", action=argparse.BooleanOptionalAction, default=True,
                   help="drop the column's HNSW and IVFFlat indexes before writing, build them again at the end "
                        "(default: yes; a dimension change drops every index whose key reads the column)")
    j.add_argument("--allow-published", action="store_true",
                   help="change the dimension of a table a publication replicates (relax each subscriber's "
                        "column to plain vector first)")
    j.add_argument("--allow-shared-registry", action="store_true",
                   help="go ahead although other vector columns of the registry's dimension exist (they follow "
                        "another registry, or may be left as they are while the registry names the new model)")
    j.add_argument("--concurrent-index", action=argparse.BooleanOptionalAction, default=True,
                   help="build the HNSW index CONCURRENTLY, so the application's writes never wait for it "
                        "(default: yes)")
    j.add_argument("--index-memory", default="2GB", help="cap on maintenance_work_mem for the HNSW build (2GB)")
    j.add_argument("--no-confirm", action="store_true", help="skip the 5-second warning pause")
    j.add_argument("--abandon-active", action="store_true",
                   help="abandon an active job with another target and start over with this model")
    j.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                   help="read, encode and write one after the other (for comparison)")
    j.add_argument("--max-runtime", default=None, help="stop resumably after this long (6h, 90m); exit 75")
    j.add_argument("--until", default=None, help="stop resumably at this local time (HH:MM); exit 75")
    j.add_argument("--max-outage", default="2m",
                   help="how long a lost database (a restart, a failover) is waited out before failing (2m)")
    j.add_argument("--max-retries", type=int, default=None,
                   help="also stop retrying a transient fault after this many tries (default: --max-outage alone)")
    j.add_argument("--ddl-lock-timeout", default="5s",
                   help="how long each DDL statement may wait for its lock before backing off (5s)")
    j.add_argument("--max-writers-held", default="1s",
                   help="the longest the cut-over holds the application's writers off for its last catch-up; "
                        "past it, the job catches up again without the lock (a dimension change's table "
                        "rewrite comes on top, see `reembed plan`) (1s)")
    j.add_argument("--cut-over-lock-timeout", default="200ms",
                   help="how long the cut-over waits for each of its locks before it gives up and retries; "
                        "keep it well under the server's deadlock_timeout (1s), so that when it waits on an "
                        "application transaction it is the cut-over that yields, never the application (200ms)")
    j.add_argument("--progress-interval", type=float, default=30.0, help="seconds between progress events (30)")
    j.add_argument("--break-stale-lock", action="store_true",
                   help="terminate a holder whose heartbeat is stale before taking over")
    j.add_argument("--retry-failed", action="store_true", help="encode the rows recorded as failed again")
    j.add_argument("--accept-failed", action="store_true",
                   help="finalize with the failed rows' embeddings left NULL")
    j.add_argument("--dry-run", action="store_true", help="plan only: write nothing")
    j.add_argument("--strategy", choices=("in_place", "shadow"), default="in_place",
                   help="in_place: rewrite the column (search must not be served until the end); shadow: fill a "
                        "column beside it, search keeps serving the old vectors until one short swap, which the "
                        "quality gate must pass; `reembed rollback` and `reembed cleanup` after (default: in_place; "
                        "`reembed plan` compares them)")
    w = p.add_argument_group("workers (one job on several processes, GPUs and hosts; PostgreSQL coordinates)")
    w.add_argument("--workers", type=int, default=None,
                   help="worker processes on this host, this one included; each claims key ranges of the job "
                        "(default: one per --devices entry, else 1). The same `reembed run` started on another "
                        "host joins the active job")
    w.add_argument("--devices", default=None, metavar="LIST",
                   help="one worker per device, e.g. cuda:0,cuda:1,cuda:2,cuda:3 (overrides --device)")
    w.add_argument("--ranges", type=int, default=None,
                   help="key ranges a new job's key space is cut into (default: one per 16 batches, at most 256); "
                        "a worker that runs dry splits the largest remaining range")
    joining = w.add_mutually_exclusive_group()
    joining.add_argument("--join", dest="join", action="store_true", default=None,
                         help="join the active job as one more worker when other runs' workers are on it (without "
                              "--join, --join-wait or --workers, a second run exits 3 naming the holder: a cron "
                              "overlap puts no more processes on a busy host)")
    joining.add_argument("--no-join", dest="join", action="store_false",
                         help="exit 3 whenever another run holds the table's lock (the default without --join-wait "
                              "or --workers)")
    w.add_argument("--join-wait", default="0s",
                   help="join as --join does, and while another run holds the lock exclusively (preparing or "
                        "finalizing the job) try again every second for this long before exit 3: for workers a "
                        "scheduler starts together (0s)")
    w.add_argument("--stale-after", default="90s",
                   help="a claim (or a lock holder) whose heartbeat is older than this is stale: its range is taken "
                        "over from its cursor (a dead worker's claim at once) (90s)")
    w.add_argument("--metrics-file", default=None, metavar="PATH",
                   help="write the job's progress, rate, ETA, failed rows, phase and exit state in the Prometheus "
                        "text format (node_exporter's textfile collector), atomically, at every progress event "
                        "and at exit")
    q = p.add_argument_group("quality gate (--strategy shadow; before the swap)")
    q.add_argument("--skip-gate", action="store_true", help="swap without the gate (logged)")
    q.add_argument("--gate-sample", type=int, default=1000, help="rows whose new vectors are checked (1000)")
    q.add_argument("--gate-queries", type=int, default=200,
                   help="sampled rows made into queries: one of a row's sentences must find the row (200)")
    q.add_argument("--gate-min-recall", type=float, default=0.5,
                   help="recall@10 of those queries through the new index, at least (0.5)")
    q.add_argument("--gate-max-regression", type=float, default=0.05,
                   help="with --old-model: the new recall@10 may be at most this much under the old model's (0.05)")
    q.add_argument("--gate-min-self-recall", type=float, default=0.9,
                   help="each sampled row found from its own vector in the top 10 through each new index (0.9)")
    q.add_argument("--old-model", default=None,
                   help="the model the column holds now (its hash must match the registry's): the gate compares "
                        "recall through the old column with it")
    q.add_argument("--old-model-name", default=None, help="the registry's name for the old model")
    q.add_argument("--old-prefix", default="", help="the --prefix the old model was run with")
    q.add_argument("--old-max-seq-length", type=int, default=None,
                   help="the --max-seq-length the old model was run with")

    br = p.add_argument_group("the bridge (--strategy shadow): the application moves to the new model on day one")
    br.add_argument("--bridge", action="store_true",
                    help="fit a map from the new model's space into the old one from the job's first committed rows "
                         "and install it as a SQL function (reembed_query) the application wraps every new-model "
                         "vector in; it is the identity from the swap on (runbook: \"The bridge\")")
    br.add_argument("--bridge-sample", type=int, default=10_000,
                    help="committed rows the bridge is fitted on, a fifth of them held out and measured (10000)")
    br.add_argument("--bridge-min-recall", type=float, default=BRIDGE_MIN_RECALL,
                    help="refuse a bridge whose recall@10 against the old model's own neighbours, on the held-out "
                         f"rows, is under this ({BRIDGE_MIN_RECALL:g})")
    br.add_argument("--bridge-function", default=None, metavar="NAME",
                    help="the bridge's function, NAME or schema.NAME (default reembed_query in the table's schema)")

    t = p.add_argument_group("throttling (checked every 0.5 s; the job holds while any is over its limit)")
    t.add_argument("--max-replica-lag", default="5s",
                   help="hold while a replica replays further behind than this; off turns it off (5s)")
    t.add_argument("--critical-replica-lag", default=None, help="stop (exit 75, resumable) past this replica lag")
    t.add_argument("--replica-dsn", dest="replica_dsns", action="append", default=None, metavar="DSN",
                   help="a replica pg_stat_replication does not show (cascaded, or hidden from this role): its lag "
                        "is read from a heartbeat row the job writes on the primary (repeatable)")
    t.add_argument("--exclude-replica", dest="exclude_replicas", action="append", default=None, metavar="NAME",
                   help="leave a replica (its application_name in pg_stat_replication) or a replication slot out "
                        "of the lag check: a delayed standby, a slot of a replica gone for good (repeatable)")
    t.add_argument("--max-wal-rate", default=None, help="hold while the primary writes more WAL than this, e.g. 64MB/s")
    t.add_argument("--max-archive-backlog", type=int, default=None,
                   help="hold while more WAL segments than this wait for the archiver")
    t.add_argument("--critical-archive-backlog", type=int, default=None,
                   help="stop (exit 75, resumable) past this archive backlog")
    t.add_argument("--autovacuum-pause", choices=("wraparound", "any", "never"), default="wraparound",
                   help="hold while an autovacuum works on the table: one to prevent wraparound (default), any, "
                        "or never")
    t.add_argument("--max-lock-waits", type=int, default=None,
                   help="hold while more application sessions than this wait on the job's locks")
    t.add_argument("--max-load", type=int, default=None,
                   help="hold while more application sessions than this are running a statement")
    t.add_argument("--critical-load", type=int, default=None, help="stop (exit 75, resumable) past this load")
    t.add_argument("--throttle-query", default=None, metavar="SQL",
                   help="hold while this query's first column is true or > 0 (it runs every 0.5 s)")
    t.add_argument("--throttle-flag-file", default=None, metavar="PATH", help="hold while this file exists")
    t.add_argument("--max-rate", type=float, default=None, metavar="ROWS",
                   help="commit at most this many rows per second")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reembed",
        description="Re-encode a pgvector table with a new sentence-transformers model, resumably.",
    )
    parser.add_argument("--version", action="version", version=f"reembed {__version__}")
    sub = parser.add_subparsers(dest="command_name", required=True)

    run = sub.add_parser("run", help="re-embed the table; resumes an active job", allow_abbrev=False)
    _add_model(run)
    _add_target(run)
    _add_output(run)
    run.set_defaults(command=_run)

    plan = sub.add_parser("plan", help="dry run: what `run` would do, with no writes")
    _add_model(plan)
    _add_target(plan)
    _add_output(plan)
    plan.add_argument("--report", default=None, metavar="PATH",
                      help="also write the plan as one self-contained HTML file (no network when viewed)")
    plan.set_defaults(command=_plan)

    status = sub.add_parser("status", help="progress, rate, ETA and holder of the table's job")
    _add_target(status)
    _add_output(status)
    status.add_argument("--watch", type=float, nargs="?", const=5.0, default=None, metavar="SECS",
                        help="refresh every SECS seconds (5) until interrupted")
    status.add_argument("--report", default=None, metavar="PATH",
                        help="also write the job as one self-contained HTML file: its rate over time, its phases, "
                             "throttle holds, the cut-over, the gate")
    status.set_defaults(command=_status)

    verify = sub.add_parser("verify", help="do the stored vectors hold the registry's model? (exit 1 when not)")
    g = verify.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="the registry's model: a local sentence-transformers directory (its hash is checked)")
    g.add_argument("--model-name", default=None,
                   help="the name the run recorded in the registry (checked against it, as `run` was given it)")
    _add_encoding(g, prefix="the --prefix the table was embedded with",
                  length="the --max-seq-length it was embedded with")
    v = verify.add_argument_group("verify")
    v.add_argument("--sample", type=int, default=1000, help="rows drawn from the whole table (1000)")
    v.add_argument("--seed", type=int, default=0, help="the sample's seed: the same seed, the same rows (0)")
    v.add_argument("--all", dest="every_row", action="store_true", help="check every row instead of a sample")
    v.add_argument("--min-cosine", type=float, default=0.99,
                   help="a stored vector agrees when its cosine to a fresh encoding is at least this (0.99)")
    _add_target(verify)
    _add_output(verify)
    verify.set_defaults(command=_verify)
    ev = sub.add_parser("eval", help="compare candidate models with the current column on the table's own rows, "
                                     "before a job (no writes)")
    g = ev.add_argument_group("models")
    g.add_argument("--model", dest="models", action="append", required=True, metavar="MODEL",
                   help="a candidate: a local sentence-transformers directory or a name in the local model cache "
                        "(repeat --model for several)")
    _add_encoding(g, prefix="prepended to every text by the candidates, e.g. 'search_document: '",
                  length="truncate the candidates' texts at this many tokens")
    g.add_argument("--current-model", default=None,
                   help="the registry's model (its hash is checked), to encode queries for the stored column "
                        "(default: the registry's name, when it is a local directory or cached model)")
    g.add_argument("--current-prefix", default="", help="the --prefix the table was embedded with")
    g.add_argument("--current-max-seq-length", type=int, default=None,
                   help="the --max-seq-length the table was embedded with")
    e = ev.add_argument_group("eval")
    e.add_argument("--sample", type=int, default=EvalOptions.sample,
                   help=f"rows read once and encoded by each model: the rows searched ({EvalOptions.sample:,})")
    e.add_argument("--queries", type=int, default=EvalOptions.queries,
                   help=f"of them, rows made into queries: one of a row's sentences must find the row "
                        f"({EvalOptions.queries:,})")
    e.add_argument("--seed", type=int, default=0, help="the same seed, the same rows and queries (0)")
    e.add_argument("--strategy", choices=("in_place", "shadow"), default="in_place",
                   help="the job whose whole-table cost is stated for each candidate (in_place)")
    e.add_argument("--report", default=None, metavar="PATH",
                   help="also write the comparison as one self-contained HTML file (no network when viewed)")
    _add_target(ev)
    _add_output(ev)
    ev.set_defaults(command=_eval)
    back = sub.add_parser("rollback", help="after a shadow job's swap: swap the previous column back in, its stale "
                                           "rows re-embedded (exit 2: nothing to roll back)")
    g = back.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="the model the previous column holds (its hash is checked): it re-embeds the rows written "
                        "since the swap")
    g.add_argument("--model-name", default=None, help="the registry's name for it")
    _add_encoding(g, prefix="the --prefix it was run with", length="the --max-seq-length it was run with")
    b = back.add_argument_group("rollback")
    b.add_argument("--leave-stale-null", action="store_true",
                   help="without --model: swap back with the rows written since the swap left NULL")
    b.add_argument("--batch-size", type=int, default=256, help="stale rows per transaction (256)")
    b.add_argument("--cut-over-lock-timeout", default="200ms",
                   help="how long the swap back waits for each lock before it yields and tries again (200ms)")
    b.add_argument("--max-writers-held", default="1s",
                   help="the longest the swap back holds the application's writers (and readers) off; the rest of "
                        "the stale rows is encoded ahead until it fits (1s)")
    _add_target(back)
    _add_output(back)
    back.set_defaults(command=_rollback)
    bridge = sub.add_parser("bridge", help="fit a map from a new model's space into the column's and install it as "
                                           "a SQL function, without a job: the application moves to the new model "
                                           "first, the re-embed comes later")
    g = bridge.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="the new model: a local sentence-transformers directory (what the application will encode "
                        "with, and a later `reembed run` re-embeds with)")
    g.add_argument("--model-name", default=None, help="the name the registry will record for it (default: --model)")
    g.add_argument("--dimension", type=int, default=None, help="its expected dimension; checked before anything")
    _add_encoding(g, prefix="prepended to every text, as the job will", length="truncate texts at this many tokens")
    b = bridge.add_argument_group("bridge")
    b.add_argument("--sample", type=int, default=10_000,
                   help="rows drawn from the table and encoded: the bridge is fitted on four fifths, measured on the "
                        "rest (10000)")
    b.add_argument("--bridge-min-recall", type=float, default=BRIDGE_MIN_RECALL,
                   help="refuse (exit 2, nothing written) a bridge whose recall@10 against the old model's own "
                        f"neighbours on the held-out rows is under this ({BRIDGE_MIN_RECALL:g})")
    b.add_argument("--bridge-function", default=None, metavar="NAME",
                   help="its function, NAME or schema.NAME (default reembed_query in the table's schema)")
    b.add_argument("--dry-run", dest="bridge_dry_run", action="store_true",
                   help="fit and measure it, install nothing")
    b.add_argument("--drop", action="store_true",
                   help="drop the table's bridge (its function): once no application calls it")
    _add_target(bridge)
    _add_output(bridge)
    bridge.set_defaults(command=_bridge)
    clean = sub.add_parser("cleanup", help="after a shadow job's swap: drop the previous column, its indexes and the "
                                           "record of rows written since (exit 2: nothing to clean up)")
    _add_target(clean)
    _add_output(clean)
    clean.set_defaults(command=_cleanup)
    return parser


def _run(settings: Settings, args: argparse.Namespace) -> int:
    settings = replace(settings, options=replace(settings.options, command_line=tuple(args.argv)))
    report = run(settings)
    _emit(report.as_dict(), report.summary(), args, quiet=report.state == "noop")
    return report.exit_code


def _plan(settings: Settings, args: argparse.Namespace) -> int:
    report = plan(settings)
    if args.report:
        htmlreport.write(args.report, htmlreport.plan_page(report.as_dict()))
    _emit(report.as_dict(), report.summary(), args, quiet=False)
    return report.exit_code


def _eval(settings: Settings, args: argparse.Namespace) -> int:
    result = evaluate(settings, EvalOptions.from_args(args))
    if args.report:
        htmlreport.write(args.report, htmlreport.eval_page(result.as_dict()))
    _emit(result.as_dict(), result.text(), args, quiet=False)
    return result.exit_code


def _status(settings: Settings, args: argparse.Namespace) -> int:
    if args.report and len(settings.all_targets) > 1:
        raise ConfigError("--report pages one table's job: give one --table (status without --report shows each "
                          "table of a job over several)")
    if args.report:
        result = job_status(settings)
        htmlreport.write(args.report, htmlreport.job_page(result.data))
    try:
        while True:
            result = job_status(settings)
            if args.json:
                print(json.dumps(result.as_dict(), default=str, sort_keys=True), flush=True)
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")
                print(result.text(), flush=True)
            if not args.watch:
                return result.exit_code
            time.sleep(args.watch)
    except KeyboardInterrupt:
        if args.watch:
            return 0  # Ctrl-C is the way out of --watch
        raise


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    verdict = verify(settings, VerifyOptions.from_args(args))
    if args.json:
        print(json.dumps(verdict.as_dict(), default=str, sort_keys=True), flush=True)
    else:
        print(verdict.text(), flush=True)
    return verdict.exit_code


def _rollback(settings: Settings, args: argparse.Namespace) -> int:
    report = rollback(settings, RollbackOptions.from_args(args))
    _emit(report.as_dict(), report.message, args, quiet=False)
    return report.exit_code


def _bridge(settings: Settings, args: argparse.Namespace) -> int:
    report = bridge_command(settings, BridgeOptions.from_args(args))
    _emit(report.as_dict(), report.message, args, quiet=False)
    return report.exit_code


def _cleanup(settings: Settings, args: argparse.Namespace) -> int:
    report = cleanup(settings)
    _emit(report.as_dict(), report.message, args, quiet=False)
    return report.exit_code


def _emit(data: dict[str, Any], summary: str, args: argparse.Namespace, *, quiet: bool) -> None:
    """The result on stdout: JSON with --json, else one line (none for a no-op: cron stays quiet)."""
    if args.json:
        print(json.dumps(data, default=str, sort_keys=True), flush=True)
    elif not quiet or args.log_level == "debug":
        print(summary, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv
    except SystemExit as exc:  # argparse: 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    configure_logging(args.log_format, args.log_level)
    command: Callable[[Settings, argparse.Namespace], int] = args.command
    try:
        settings = Settings.from_args(args)
        return command(settings, args)
    except ReembedError as exc:
        notes = "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))
        print(f"reembed: {exc}{notes}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Stopped as exc:
        print("reembed: stopped at once by a second signal; the batch in flight rolled back", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("reembed: interrupted", file=sys.stderr)
        return 130

