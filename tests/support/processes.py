"""Processes and threads: the real CLI in a subprocess, its JSON log and report, a function in a
background thread, and polling (never fixed sleeps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class Background(threading.Thread):
    """fn() in a thread; afterwards `.result`, or `.error` if it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - examined by the test
            self.error = exc


def wait_for(predicate: Callable[[], Any], *, timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll until predicate() is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(args: Sequence[str], *, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """The real CLI in a subprocess; stderr+stdout to `log`."""
    with log.open("wb") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "reembed", *args], cwd=cwd, env=cli_env(), stdout=fh, stderr=subprocess.STDOUT
        )


def run_cli(args: Sequence[str], *, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reembed", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 180) -> int:
    """The process's exit code; killed (and the test failed) if it does not end in time."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def cli_run_args(dsn: str, model: Path, *extra: str, batch: int = 16, window: int | None = None) -> list[str]:
    """`reembed run` for the real CLI: JSON logs and the JSON report, no banner pause. `window`:
    rows sorted and encoded together (a test that acts between two commits wants one batch)."""
    return [
        "run",
        "--dsn",
        dsn,
        "--model",
        str(model),
        "--no-confirm",
        "--batch-size",
        str(batch),
        "--log-format",
        "json",
        "--json",
        *(["--window-rows", str(window)] if window else []),
        *extra,
    ]


ROWS, BATCH = 480, 16  # the tests that act between two commits: a table of 30 batches


def cli_args(dsn: str, model: Path, *extra: str) -> list[str]:
    """`reembed run` for the tests that act between two commits: one batch a window."""
    return cli_run_args(dsn, model, *extra, batch=BATCH, window=BATCH)


def events(log: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of one event, in order, from a CLI run's log file."""
    return [
        json.loads(line)
        for line in log.read_text().splitlines()
        if line.startswith("{") and f'"event": "{name}"' in line
    ]


def last_report(log: Path) -> dict[str, Any]:
    """The run's `--json` report (the last JSON line that is not a log event)."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{") and '"state"' in line and '"event"' not in line:
            return json.loads(line)
    raise AssertionError(f"no report in {log.read_text()[-2000:]}")
