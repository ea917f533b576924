"""Pure functions and formats: no database, no model load."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from reembed.errors import ConfigError
from reembed.finalize import build_memory, estimate_finalize_secs
from reembed.queries import names, query, schema_sql
from reembed.report import Report
from reembed.settings import ModelSpec, next_clock_time, parse_duration, parse_size
from reembed.target import regclass_text, split_name


@pytest.mark.parametrize(("text", "secs"), [("6h", 21600), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("120", 120)])
def test_durations_read_like_an_operator_writes_them(text: str, secs: float) -> None:
    assert parse_duration(text) == secs


def test_a_bad_duration_says_how_to_write_one() -> None:
    with pytest.raises(ConfigError, match="write it like 6h, 90m, 1h30m, 45s or 200ms"):
        parse_duration("tonight")


@pytest.mark.parametrize(("text", "size"), [("2GB", 2 * 1024**3), ("512MB", 512 * 1024**2), ("1024", 1024)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_until_is_the_next_such_local_time() -> None:
    now = dt.datetime(2026, 11, 27, 23, 0, tzinfo=dt.UTC)
    assert next_clock_time("06:00", now=now) == dt.datetime(2026, 11, 28, 6, 0, tzinfo=dt.UTC)
    assert next_clock_time("23:30", now=now) == dt.datetime(2026, 11, 27, 23, 30, tzinfo=dt.UTC)
    with pytest.raises(ConfigError):
        next_clock_time("24:00", now=now)


def test_table_names_split_and_quote_safely() -> None:
    assert split_name("knowledge_nodes") == ("knowledge_nodes",)
    assert split_name('app."Odd.Name"') == ("app", "Odd.Name")
    assert regclass_text(("app", 'we"ird')) == '"app"."we""ird"'
    with pytest.raises(ConfigError):
        split_name("a.b.c")


def test_build_memory_holds_the_graph_and_respects_the_cap() -> None:
    # 50,000 x 384-d with m = 16 overflowed a plain rows x (4d + 8) x 1.3 sizing on an H100 host
    assert build_memory(50_000, 384, 8 * 1024**3) > 50_000 * (4 * 384 + 8) * 1.3
    assert build_memory(10_000_000, 768, 2 * 1024**3) == 2 * 1024**3
    assert build_memory(10, 384, 2 * 1024**3) == 64 * 1024**2


def test_finalize_estimate_grows_with_rows_dims_and_a_rewrite() -> None:
    small = estimate_finalize_secs(1000, 384, typmod_change=False)
    assert estimate_finalize_secs(100_000, 384, typmod_change=False) > small
    assert estimate_finalize_secs(1000, 768, typmod_change=False) > small
    assert estimate_finalize_secs(1000, 384, typmod_change=True) > small


def test_every_named_query_loads_from_the_package() -> None:
    for name in ("advance_checkpoint", "active_job", "lock_holder", "upsert_registry", "claim_range"):
        assert name in names()
    assert "FOR UPDATE SKIP LOCKED" in query("claim_range").as_string(None)  # type: ignore[arg-type]
    assert "CREATE TABLE IF NOT EXISTS reembed_checkpoint" in schema_sql()


def test_json_report_has_the_keys_the_design_names() -> None:
    data = json.loads(Report(state="done", rows_updated=3, details={"embed_secs": 1.0}).to_json())
    for key in ("state", "rows_updated", "rows_skipped", "duration_secs", "index_rebuild_secs",
                "model_name", "dimension", "model_hash", "embed_secs"):
        assert key in data


def test_signature_hash_covers_files_and_vector_changing_options(tmp_path: Path) -> None:
    from reembed.embedder import fingerprint

    model = tmp_path / "m"
    model.mkdir()
    (model / "modules.json").write_text('[{"type": "sentence_transformers.models.Normalize"}]')
    (model / "model.safetensors").write_bytes(b"weights-1")
    (model / "README.md").write_text("docs")
    base = fingerprint(ModelSpec(model=str(model)))
    assert base == fingerprint(ModelSpec(model=str(model)))
    assert base[0] == str(model) and base[1].startswith("sha256:")
    assert fingerprint(ModelSpec(model=str(model), model_name="x/y"))[1] == base[1]
    assert fingerprint(ModelSpec(model=str(model), prefix="search_document: "))[1] != base[1]
    assert fingerprint(ModelSpec(model=str(model), max_seq_length=128))[1] != base[1]
    (model / "README.md").write_text("other docs")  # not a vector-changing file
    assert fingerprint(ModelSpec(model=str(model)))[1] == base[1]
    (model / "model.safetensors").write_bytes(b"weights-2")
    assert fingerprint(ModelSpec(model=str(model)))[1] != base[1]


def test_unknown_model_is_refused_without_download(tmp_path: Path) -> None:
    from reembed.embedder import fingerprint

    with pytest.raises(ConfigError, match="not a directory and not in the local model cache"):
        fingerprint(ModelSpec(model="org/definitely-not-cached-here"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no sentence-transformers model"):
        fingerprint(ModelSpec(model=str(empty)))


def test_progress_bar_on_a_terminal_shows_rows_and_total(capsys: pytest.CaptureFixture[str]) -> None:
    from reembed.progress import Progress

    progress = Progress(total=100, done=10, interval=30, bar=True)
    progress.advance(40)
    progress.close()
    err = capsys.readouterr().err
    assert "50/100" in err and "rows" in err


def test_progress_rate_and_eta_come_from_recent_samples() -> None:
    from reembed.progress import Progress

    progress = Progress(total=1000, done=0, interval=3600, bar=False)
    assert progress.rate is None and progress.eta_secs is None
    progress._samples.clear()
    progress._samples.extend([(0.0, 0), (10.0, 500)])
    progress.done = 500
    assert progress.rate == 50.0 and progress.eta_secs == 10.0


def test_a_stop_while_waiting_out_an_outage_ends_the_wait_with_the_stops_exit_code() -> None:
    import threading
    import time

    import psycopg

    from reembed import retry
    from reembed.errors import Interrupted
    from reembed.signals import StopSignal

    stop = StopSignal()

    def server_away() -> None:
        raise psycopg.OperationalError("connection refused")

    threading.Timer(0.3, stop.request, args=("SIGTERM",)).start()
    started = time.monotonic()
    with pytest.raises(Interrupted) as stopped:
        retry.call(server_away, what="commit_batch", max_outage=120, stop=stop)
    assert stopped.value.exit_code == 143 and time.monotonic() - started < 6


def test_transient_faults_are_waited_out_for_the_outage_bound_with_waits_never_near_zero() -> None:
    import time

    import psycopg

    from reembed import retry
    from reembed.errors import DatabaseError

    calls: list[float] = []

    def away() -> None:
        calls.append(time.monotonic())
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    started = time.monotonic()
    with pytest.raises(DatabaseError):
        retry.call(away, what="read_batch", max_outage=1.5, initial=0.1, maximum=0.4)
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert 1.4 < time.monotonic() - started < 3.0 and len(calls) >= 4
    assert min(gaps) >= 0.09  # capped exponential with a little jitter: never a near-zero wait


def test_until_is_the_clock_time_whenever_the_deadline_is_computed() -> None:
    """The run computes its deadline after the model loaded: --until must not close the window
    early by the time that took (it did, by the load time, before this test)."""
    import datetime as dt
    import time

    from reembed.settings import RunOptions

    now = dt.datetime.now().astimezone()
    options = RunOptions(until=now + dt.timedelta(seconds=60))
    started = time.monotonic() - 30.0  # the run began 30 s ago (lock, model load)
    deadline = options.deadline(started, now_wall=now)
    assert deadline is not None and abs(deadline - (time.monotonic() + 60.0)) < 1.0
    both = RunOptions(until=now + dt.timedelta(seconds=60), max_runtime=40.0).deadline(started, now_wall=now)
    assert both is not None and abs(both - (started + 40.0)) < 1e-6  # the earlier of the two
