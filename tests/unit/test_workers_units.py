"""The workers' small rules: exit codes, the tokenizer share, the number of ranges."""

from __future__ import annotations

import signal

from reembed.errors import EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_TIME_BUDGET, most_severe
from reembed.fleet import combined_exit, tokenizers_per_worker
from reembed.ranges import MAX_RANGES, count_for


def test_the_exit_code_of_several_workers_is_the_most_severe() -> None:
    assert most_severe([EXIT_OK, EXIT_TIME_BUDGET, EXIT_OK]) == EXIT_TIME_BUDGET
    assert most_severe([EXIT_TIME_BUDGET, EXIT_SIGINT]) == EXIT_SIGINT
    assert most_severe([EXIT_SIGINT, EXIT_SIGTERM]) == EXIT_SIGTERM
    assert most_severe([EXIT_SIGTERM, EXIT_LOCKED, EXIT_OK]) == EXIT_LOCKED
    assert most_severe([EXIT_LOCKED, EXIT_FAILED]) == EXIT_FAILED
    assert most_severe([EXIT_OK, 9]) == EXIT_FAILED  # a code reembed never gives: a failure
    assert most_severe([]) == EXIT_OK


def test_a_worker_killed_by_a_signal_is_not_counted_its_ranges_were_taken_over() -> None:
    assert combined_exit(EXIT_OK, [-signal.SIGKILL, EXIT_OK]) == EXIT_OK
    assert combined_exit(EXIT_OK, [-signal.SIGKILL, EXIT_FAILED]) == EXIT_FAILED
    assert combined_exit(EXIT_TIME_BUDGET, [EXIT_OK]) == EXIT_TIME_BUDGET


def test_tokenizers_are_shared_out_by_the_measured_balance_within_the_cores_left() -> None:
    # a GPU host, 16 cores, 4 workers: tokenising takes 3x the device's time per row -> 3 each
    assert tokenizers_per_worker(cores=16, workers=4, tokenize_secs=3e-4, device_secs=1e-4) == 3
    # the device is the slower stage: one tokenizer keeps it fed, whatever the core count
    assert tokenizers_per_worker(cores=16, workers=4, tokenize_secs=1e-4, device_secs=5e-4) == 1
    # tokenising 10x slower: capped at the cores the 4 workers leave (12 / 4)
    assert tokenizers_per_worker(cores=16, workers=4, tokenize_secs=1e-3, device_secs=1e-4) == 3
    # two cores, two workers: no core left -> tokenise in each worker's own process
    assert tokenizers_per_worker(cores=2, workers=2, tokenize_secs=1e-3, device_secs=1e-4) == 0


def test_ranges_one_per_sixteen_batches_within_bounds() -> None:
    assert count_for(100, 256, None) == 1
    assert count_for(16 * 256 * 10, 256, None) == 10
    assert count_for(10**9, 256, None) == MAX_RANGES
    assert count_for(10, 256, 12) == 12


def test_the_workers_a_run_starts_always_join_its_job_whatever_its_join_flags() -> None:
    from reembed.fleet import child_command_line

    argv = ["run", "--model", "/m", "--no-join", "--workers", "3", "--join-wait=5s", "--device", "cuda:0"]
    child = child_command_line(argv, device="cuda:1", tokenizers=2, seconds_left=None)
    assert "--no-join" not in child and child.count("--join") == 1 and "--join-wait=5s" in child
    assert child[child.index("--workers"):child.index("--workers") + 3] == ["--workers", "1", "--join"]


def test_a_second_run_joins_only_when_asked_to() -> None:
    from reembed.cli import build_parser
    from reembed.errors import ConfigError
    from reembed.settings import Settings

    def joins(*flags: str) -> bool:
        args = build_parser().parse_args(["run", "--model", "/m", *flags])
        return Settings.from_args(args).options.join

    assert joins() is False  # a cron overlap: exit 3, naming the holder
    assert joins("--join") is True
    assert joins("--join-wait", "10m") is True
    assert joins("--workers", "2") is True
    assert joins("--devices", "cuda:0,cuda:1") is True
    assert joins("--workers", "2", "--no-join") is False
    try:
        joins("--no-join", "--join-wait", "1m")
    except ConfigError as exc:
        assert "exclude each other" in str(exc)
    else:
        raise AssertionError("--no-join with --join-wait was accepted")


def test_a_worker_stopped_before_it_installed_its_handler_counts_as_stopped() -> None:
    import subprocess
    import sys

    from reembed.fleet import Fleet
    from reembed.signals import StopSignal

    fleet = Fleet(StopSignal())
    fleet.procs = [subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]),
                   subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGINT)"])]
    try:
        assert fleet.wait() == [EXIT_SIGTERM, EXIT_SIGINT]
    finally:
        fleet.close()


def test_a_batch_waiting_for_its_turn_with_its_rows_locked_gives_up_and_is_retried() -> None:
    import threading
    import time

    from reembed.commits import Turns, TurnTimedOut
    from reembed.retry import is_transient

    turns = Turns()
    started = time.monotonic()
    try:
        turns.wait(1, timeout=0.2)  # batch 0 never commits: batch 1 lets go of its rows
    except TurnTimedOut as exc:
        assert is_transient(exc) and 0.2 <= time.monotonic() - started < 5
    else:
        raise AssertionError("the wait did not time out")
    later = threading.Timer(0.1, turns.done, args=(0,))
    later.start()
    turns.wait(1)  # the retry waits its turn with nothing held, as long as it takes
    later.join()
