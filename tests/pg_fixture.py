"""A throwaway PostgreSQL server for the platform's tests: ``initdb`` + ``pg_ctl`` in a temp dir, torn down after.

The server runs as an unprivileged user (``postgres`` when the tests run as root: PostgreSQL refuses root),
listens on 127.0.0.1 and a free port, keeps its socket inside its temp dir, and trades durability for speed
(``fsync=off``). Each test (or module) gets a fresh database on it.

Where no PostgreSQL is installed the tests that need it skip, saying why; with ``CI=true`` in the environment
that skip is a failure instead, so CI cannot pass without running them. ``EMBEDTUNE_PG_BIN`` names the folder
of ``initdb``/``pg_ctl`` when they are neither on PATH nor in ``/usr/lib/postgresql/<version>/bin``.

Fixtures: ``postgres_server`` (session), ``postgres_url`` (a fresh database), ``db_url`` (parametrised:
a SQLite file, then a PostgreSQL database: a test using it runs on both).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

UNPRIVILEGED_USER = "postgres"
_names = itertools.count()


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL on this machine (a reason to skip, except in CI)."""


def find_pg_bin() -> Path | None:
    candidates = [os.environ.get("EMBEDTUNE_PG_BIN")]
    if on_path := shutil.which("pg_ctl"):
        candidates.append(str(Path(on_path).parent))
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version(p.parent.name), reverse=True)
    candidates += [str(p) for p in versions]
    for folder in filter(None, candidates):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name)) or (0,)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayPostgres:
    """One PostgreSQL cluster in a temp dir; :meth:`stop` ends it and deletes every file."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="embedtune-pg-"))
        self.port = free_port()
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(UNPRIVILEGED_USER)
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                raise PostgresUnavailable(f"running as root and there is no '{UNPRIVILEGED_USER}' user to run "
                                          "PostgreSQL as (it refuses root)") from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.run_as = ["runuser", "-u", UNPRIVILEGED_USER, "--"]

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        done = subprocess.run([*self.run_as, *cmd], cwd=self.root, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stdout}{done.stderr}{tail}")

    def start(self) -> ThrowawayPostgres:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--no-sync", "--no-instructions")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 "
                   "-c shared_buffers=32MB")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")
        return self

    @property
    def base_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def create_database(self, hint: str = "test") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"{re.sub(r'[^a-z0-9]+', '_', hint.lower())[:40]}_{next(_names)}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return f"{self.base_url}/{name}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop",
                          timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def start_throwaway_postgres() -> ThrowawayPostgres:
    """Start a cluster, or raise :class:`PostgresUnavailable` saying why there is none to start."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise PostgresUnavailable("no PostgreSQL server (initdb, pg_ctl) found on PATH, in /usr/lib/postgresql/*/bin "
                                  "or in $EMBEDTUNE_PG_BIN (Debian/Ubuntu: apt-get install postgresql)")
    server = ThrowawayPostgres(bin_dir)
    try:
        return server.start()
    except BaseException:
        server.stop()
        raise


def unavailable(reason: str) -> None:
    """Skip with the reason; in CI (``CI=true``) fail instead: CI must run the PostgreSQL tests."""
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true but the PostgreSQL tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server():
    try:
        server = start_throwaway_postgres()
    except PostgresUnavailable as exc:
        unavailable(str(exc))
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A fresh, empty PostgreSQL database for this test."""
    return postgres_server.create_database(request.node.name)


DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=DATABASES)
def db_url(request, tmp_path) -> str:
    """An empty platform database: a SQLite file, then (second run of the test) a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'platform.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="module", params=DATABASES)
def module_databases(request, tmp_path_factory) -> Callable[[str], str]:
    """Makes empty databases of one kind for a module: SQLite files, then (second run) PostgreSQL databases;
    for modules whose services each need a database of their own."""
    server = request.getfixturevalue("postgres_server") if request.param == "postgres" else None

    def new(hint: str) -> str:
        if server is None:
            return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'platform.db'}"
        return server.create_database(hint)

    return new


@pytest.fixture(scope="module")
def module_db_url(module_databases, request) -> str:
    """As ``db_url``, one per test module (for module-scoped services)."""
    return module_databases(request.module.__name__)
