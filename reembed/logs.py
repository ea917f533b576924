"""structlog, configured once: human-readable on a terminal, JSON lines otherwise. stderr only."""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _Stderr:
    """Whatever sys.stderr is at the time of writing (tests and embedders swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    use_console = sys.stderr.isatty() if fmt == "auto" else fmt == "console"
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(
            file=_Stderr(),  # type: ignore[arg-type]  # _Stderr writes and flushes like a TextIO, without being one
        ),
        cache_logger_on_first_use=False,
    )
    # psycopg_pool logs each failed reconnect attempt (a WARNING); reembed logs an outage once
    # (reembed.retry), so the pool's own lines are kept to errors.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    for noisy in ("sentence_transformers", "transformers", "huggingface_hub", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
