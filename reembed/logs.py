"""structlog, configured once: human-readable on a terminal, JSON lines otherwise. stderr only."""

from __future__ import annotations

import logging
import sys
import threading

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


_bars = 0  # progress bars drawn on stderr right now (reembed.progress says so)


def bar_drawn(shown: bool) -> None:
    """A progress bar appears on stderr (True) or goes (False): while one is drawn, every log line
    goes through tqdm, which lifts the bar, writes the whole line and draws the bar again."""
    global _bars
    with _LOCK:
        _bars = max(0, _bars + (1 if shown else -1))
        if not _bars:
            _STDERR.flush_pending()


_LOCK = threading.RLock()


class _Stderr:
    """Whatever sys.stderr is at the time of writing (tests and embedders swap it); while a
    progress bar is drawn, whole lines through tqdm.write (never glued to the bar)."""

    def __init__(self) -> None:
        self._pending = ""

    def write(self, text: str) -> int:
        with _LOCK:
            if not _bars and not self._pending:
                return sys.stderr.write(text)
            from tqdm import tqdm

            self._pending += text
            while "\n" in self._pending:
                line, self._pending = self._pending.split("\n", 1)
                tqdm.write(line, file=sys.stderr)
            return len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def flush_pending(self) -> None:
        if self._pending:
            sys.stderr.write(self._pending)
            self._pending = ""


_STDERR = _Stderr()


# Machine detail: how the pipeline was sized, each range and split, each index-build tick. A log
# shipper wants them (JSON lines keep every event at its level); a person at a terminal wants the
# milestones, so on the console these show only at --log-level debug.
DETAIL = frozenset({
    "model_loaded", "fast_feed", "tokenizers_sized", "worker_started", "range_complete", "range_split",
    "split_requested", "index_build_progress", "catch_up_pass_started", "recreated_on_new_column",
    "shadow_indexes_valid", "lock_not_granted", "server_notice", "rows_changed_under_the_job",
    "finalize_step_done",
})


def _milestones_only(logger: object, method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """On the console at info: machine detail dropped (reembed.logs.DETAIL); warnings always pass."""
    if method in ("debug", "info") and event.get("event") in DETAIL:
        raise structlog.DropEvent
    return event


def _without_empty(logger: object, method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """On the console: fields with nothing to say (None, empty) left out of the line."""
    return {k: v for k, v in event.items() if v is not None and v != [] and v != {} and v != ""}


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    use_console = sys.stderr.isatty() if fmt == "auto" else fmt == "console"
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            *([_milestones_only] if use_console and LEVELS[level] > logging.DEBUG else []),
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *([_without_empty] if use_console else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(
            file=_STDERR,  # type: ignore[arg-type]  # _Stderr writes and flushes like a TextIO, without being one
        ),
        cache_logger_on_first_use=False,
    )
    # psycopg_pool logs each failed reconnect attempt (a WARNING); reembed logs an outage once
    # (reembed.retry), so the pool's own lines are kept to errors.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    for noisy in ("sentence_transformers", "transformers", "huggingface_hub", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
