if __name__ == "__main__":  # a spawned tokenizer process imports this module too (as __mp_main__):
    import signal
    import sys

    def _stopped_before_start(signum: int, frame: object) -> None:
        # A SIGTERM before the run installs its own handlers (loading the library takes seconds):
        # nothing is written yet, so it is a stop like any other, with its exit code, not a kill.
        # (SIGINT keeps Python's own: a KeyboardInterrupt, which each command handles.)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, _stopped_before_start)
    from reembed.cli import main  # only the command itself loads the CLI, and with it the library

    raise SystemExit(main())
