"""The exceptions users can see, each with its exit code (the README's table of exit codes), and the one
they should never see (InternalError: a bug, shown with its traceback)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_TIME_BUDGET = 75
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def first_line(exc: BaseException) -> str:
    """An exception's message, its first line (its type's name when it has none): for log lines."""
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


class ReembedError(Exception):
    """A failure the operator can act on. The checkpoint is intact; a re-run resumes."""

    exit_code = EXIT_FAILED


class ConfigError(ReembedError):
    """Usage or configuration error, found before anything was written."""

    exit_code = EXIT_USAGE


class LockHeld(ReembedError):
    """Another run holds the table's advisory lock."""

    exit_code = EXIT_LOCKED

    def __init__(self, message: str, *, holder: int | None = None) -> None:
        super().__init__(message)
        self.holder = holder  # the holder's backend pid, when known


class CheckpointConflict(ReembedError):
    """The checkpoint moved under us: someone else advanced it. Stop, don't guess."""

    def __init__(self, job_id: int, expected: str | None) -> None:
        super().__init__(
            f"checkpoint of job {job_id} is no longer at {expected!r}: another writer moved it; "
            "stop the other run, then re-run to resume"
        )


class ClaimLost(ReembedError):
    """Another worker took over our claim on a range (ours looked stale: a long pause, a lost
    connection). Nothing of the transaction that found it out was committed; the worker lets the
    range go and claims another."""

    def __init__(self, rng: object) -> None:
        super().__init__(f"range {getattr(rng, 'range_no', '?')} was taken over by another worker")
        self.range = rng


def most_severe(codes: list[int]) -> int:
    """The exit code of several workers: a failure over a refusal over a lost lock over a signal
    over a time window over success."""
    order = (EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_SIGTERM, EXIT_SIGINT, EXIT_TIME_BUDGET, EXIT_OK)
    known = [c for c in codes if c in order]
    unknown = [c for c in codes if c not in order]  # killed by a signal (negative), or any other failure
    if unknown:
        return EXIT_FAILED
    return min(known, key=order.index) if known else EXIT_OK


class DatabaseError(ReembedError):
    """A database error, translated in reembed.db; `retryable` marks transient ones."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class Interrupted(ReembedError):
    """A stop (signal, time window) while waiting out a transient fault: nothing more was committed."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DeviceFailed(ReembedError):
    """The device or its driver failed (CUDA errors are sticky): the run stops, nothing of the
    window in flight is written, no row is blamed."""


class InternalError(RuntimeError):
    """A broken invariant of reembed itself: a bug. Not a ReembedError, so the CLI shows its traceback."""


class Stopped(BaseException):
    """Raised to unwind at once on a second SIGINT/SIGTERM. Open transactions roll back."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
