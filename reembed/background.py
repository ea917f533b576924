"""A daemon thread that runs a loop until asked to stop (the lock keeper, the index-build watcher)."""

from __future__ import annotations

import threading


class Background:
    """Subclasses write `_loop`, waiting between rounds with `self._stopped.wait(seconds)`."""

    def __init__(self, name: str, *, join_timeout: float) -> None:
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._join_timeout = join_timeout

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self._join_timeout)

    def _loop(self) -> None:
        raise NotImplementedError
