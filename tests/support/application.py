"""The application process of the live-table tests (tests/app_workload.py): it reads the registry
row FOR SHARE in each writing transaction, embeds with the model it names, writes and reads
until stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from support.processes import cli_env, wait_for

APP = Path(__file__).resolve().parent.parent / "app_workload.py"
READER = Path(__file__).resolve().parent.parent / "reader_workload.py"


class App:
    """The application process (tests/app_workload.py), writing until stopped."""

    def __init__(self, dsn: str, workdir: Path, *, new_model: Path, new_name: str, rate: float = 30.0,
                 id_type: str = "uuid") -> None:
        self.stop_file, self.out = workdir / "app.stop", workdir / "app.json"
        with (workdir / "app.log").open("wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, str(APP), dsn, str(self.stop_file), str(self.out), "--new-model", str(new_model),
                 "--new-name", new_name, "--rate", str(rate), "--id-type", id_type],
                env=cli_env(), stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: (workdir / "app.json.ready").exists() or self.proc.poll() is not None, timeout=120,
                 what="the application to start")
        assert self.proc.poll() is None, (workdir / "app.log").read_text()[-2000:]

    def writes(self) -> int:
        stats = self.stats()
        return sum(stats.get(k, 0) for k in ("inserts", "edits", "deletes", "null_inserts"))

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.out.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def stop(self) -> dict[str, Any]:
        self.stop_file.write_text("stop")
        self.proc.wait(timeout=60)
        return self.stats()


class Reader:
    """The search application (tests/reader_workload.py), querying until stopped."""

    def __init__(self, dsn: str, workdir: Path, *, new_model: Path, new_name: str, rate: float = 20.0,
                 view: str | None = None) -> None:
        self.stop_file, self.out = workdir / "reader.stop", workdir / "reader.json"
        self.log = workdir / "reader.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(READER), dsn, str(self.stop_file), str(self.out), "--new-model", str(new_model),
                 "--new-name", new_name, "--rate", str(rate), *(["--view", view] if view else [])],
                env=cli_env(), stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: (workdir / "reader.json.ready").exists() or self.proc.poll() is not None, timeout=120,
                 what="the reader to start")
        assert self.proc.poll() is None, self.log.read_text()[-2000:]

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.out.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def queries(self, model: str | None = None) -> int:
        stats = self.stats()
        return int(stats.get("queries", 0) if model is None else stats.get("by_model", {}).get(model, 0))

    def stop(self) -> dict[str, Any]:
        self.stop_file.write_text("stop")
        self.proc.wait(timeout=60)
        return self.stats()


BRIDGE_APP = Path(__file__).resolve().parent.parent / "bridge_workload.py"


class BridgeApp:
    """The search application on the bridge protocol (tests/bridge_workload.py): the new model only,
    every vector wrapped in the bridge's function, searching and writing until stopped."""

    def __init__(self, dsn: str, workdir: Path, *, new_model: Path, rate: float = 10.0,
                 function: str = "reembed_query") -> None:
        self.stop_file, self.out = workdir / "bridge_app.stop", workdir / "bridge_app.json"
        self.log = workdir / "bridge_app.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(BRIDGE_APP), dsn, str(self.stop_file), str(self.out), "--new-model",
                 str(new_model), "--rate", str(rate), "--function", function],
                env=cli_env(), stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: (workdir / "bridge_app.json.ready").exists() or self.proc.poll() is not None, timeout=120,
                 what="the bridge application to start")
        assert self.proc.poll() is None, self.log.read_text()[-2000:]

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.out.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def queries(self) -> int:
        return int(self.stats().get("queries", 0))

    def searches_since(self, moment: float) -> int:
        """How many searches the application has published that ended after `moment` (time.time())."""
        return sum(1 for t, _ in self.stats().get("searches", []) if t > moment)

    def stop(self) -> dict[str, Any]:
        self.stop_file.write_text("stop")
        self.proc.wait(timeout=60)
        return self.stats()
