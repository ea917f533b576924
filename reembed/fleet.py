"""`reembed run --workers N`: the other N - 1 worker processes of this host.

Each is the same `reembed run` (the operator's command line, less what only the first process
does: --workers, --devices, --json, --metrics-file), with its own --device, its share of the
host's tokenizer processes and what is left of the time window; like any other `reembed run`
it joins the active job as a worker (reembed.job). State lives in PostgreSQL only: a worker
that dies is a claim that goes stale, taken over by the others; none of them is special.

The first process (this one) forwards SIGINT and SIGTERM to them (they run in sessions of
their own, so that a terminal's Ctrl-C reaches each once), waits for them before it tries to
finalize, and exits with the most severe of their exit codes and its own.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import structlog

from reembed.errors import most_severe
from reembed.signals import StopSignal

log = structlog.get_logger()

# Options the first process keeps to itself: (flag, takes a value)
_OWN = {"--workers": True, "--devices": True, "--device": True, "--json": False, "--metrics-file": True,
        "--tokenizer-workers": True, "--max-runtime": True, "--until": True, "--no-confirm": False,
        "--join": False, "--no-join": False}


def child_command_line(argv: Sequence[str], *, device: str | None, tokenizers: int | None,
                       seconds_left: float | None) -> list[str]:
    """`reembed run` as the operator gave it, for one more worker of this host."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag, has_value, _ = arg.partition("=")
        if flag in _OWN:
            skip = _OWN[flag] and not has_value
            continue
        kept.append(arg)
    extra = ["--no-confirm", "--workers", "1", "--join"]  # the children are this job's workers: they join
    if device is not None:
        extra += ["--device", device]
    if tokenizers is not None:
        extra += ["--tokenizer-workers", str(tokenizers)]
    if seconds_left is not None:
        extra += ["--max-runtime", f"{max(1, int(seconds_left))}s"]
    return [sys.executable, "-m", "reembed", *kept, *extra]


class Fleet:
    """The worker processes this run started."""

    def __init__(self, stop: StopSignal) -> None:
        self.stop = stop
        self.procs: list[subprocess.Popen[bytes]] = []
        self._unregister = stop.on_request(self._forward)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, commands: Sequence[list[str]]) -> None:
        for command in commands:
            # stdout to our stderr: our stdout carries the one --json object
            proc = subprocess.Popen(command, stdout=sys.stderr.fileno(), start_new_session=True)
            self.procs.append(proc)
            log.info("worker_started", pid=proc.pid, command=" ".join(command[3:]))

    def _forward(self) -> None:
        """A stop asked of us by a signal goes to every worker (a time window: they have their own)."""
        signum = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}.get(self.stop.reason or "")
        if signum is not None:
            self.signal(signum)

    def signal(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    def wait(self) -> list[int]:
        """Every worker's exit code, once all have ended (a second stop signal reaches them too). A
        worker that SIGINT or SIGTERM reached before it could install a handler was stopped before it
        started (nothing written): its code is the stop's, 130 or 143."""
        codes = []
        for proc in self.procs:
            code = proc.wait()
            if code in (-signal.SIGINT, -signal.SIGTERM):
                log.info("worker_stopped_before_start", pid=proc.pid, signal=signal.Signals(-code).name)
                code = 128 - code
            if code < 0:
                log.warning("worker_killed", pid=proc.pid, signal=signal.Signals(-code).name,
                            detail="its claim went stale and was taken over from its cursor")
            elif code:
                log.warning("worker_exited", pid=proc.pid, exit_code=code)
            codes.append(code)
        return codes

    def end(self, *, grace: float = 30.0) -> list[int]:
        """Stop whatever still runs (SIGTERM: they commit what they encoded), then their codes."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        return self.wait()

    def close(self) -> None:
        self._unregister()


def tokenizers_per_worker(*, cores: int, workers: int, tokenize_secs: float, device_secs: float) -> int:
    """Tokenizer processes for each of a host's `workers`, from the measured time per row of
    tokenising (one process) and of the device's forward pass: as many as keep the device busy
    (tokenise time / device time, rounded up), within the cores the workers leave (each worker's
    own process drives its device on one). 0: tokenise in the worker's own process — where no
    core is left, a process of its own would only take turns with the device on the same core."""
    spare = max(0, cores - workers) // max(1, workers)
    if device_secs <= 0:
        return spare
    needed = -(-tokenize_secs // device_secs)  # ceil
    return int(min(spare, max(1, needed)))


def combined_exit(own: int, codes: Sequence[int]) -> int:
    """The most severe exit code of this process and its workers. A worker killed by a signal has
    no exit code of its own (SIGKILL, the OOM killer): its claim went stale and the others took its
    ranges over from their cursors, so it is logged (worker_killed), not counted."""
    return most_severe([own, *(c for c in codes if c >= 0)])
