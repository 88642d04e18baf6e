"""`embedtune platform` as a real process for the PostgreSQL and replica tests: start, client, kill, clean up.

The one place these tests start the service: when it gains options (auth keys, ...) adapt ``start`` and
``client`` here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, select

from embedtune.platform import db
from embedtune.platform.client import PlatformClient
from pg_fixture import free_port

SRC = Path(__file__).resolve().parents[1] / "src"


def wait_for(predicate: Callable[[], Any], timeout: float = 60, poll: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} not reached within {timeout} s")


def pid_alive(pid: int | None) -> bool:
    from embedtune.platform.processes import pid_alive as alive

    return alive(pid)


class PlatformProcess:
    """One `python -m embedtune platform` process (a replica when several share ``db_url`` and ``data_dir``)."""

    def __init__(self, data_dir: Path, db_url: str, *args: str, heartbeat: float = 0.5, stale_after: float = 5):
        self.data_dir, self.db_url, self.args = data_dir, db_url, args
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"service-{self.port}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120) -> PlatformProcess:
        env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "embedtune", "platform", "--db", self.db_url, "--data-dir", str(self.data_dir),
               "--port", str(self.port), "--heartbeat", str(self.heartbeat), "--stale-after", str(self.stale_after),
               *self.args]
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(self._ready, timeout, what=f"platform on port {self.port} ready")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"platform exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/v1/health/ready", timeout=2).status_code == 200
        return False

    @property
    def admin_key(self) -> str:
        """The admin key the first replica to start wrote (auth is on, as in production)."""
        return (self.data_dir / "admin.key").read_text().strip()

    def client(self, workspace: str = "default", api_key: str | None = None) -> PlatformClient:
        return PlatformClient(self.url, workspace=workspace, timeout=60, api_key=api_key or self.admin_key)

    def kill(self) -> None:
        """kill -9: the replica dies at once; its worker processes (own sessions) are not touched."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class Service(PlatformProcess):
    """One service as a team runs it: its database (a SQLite file in ``data_dir`` unless ``db_url`` names
    one), path registration allowed under pytest's base temp folder (where the tests' model folders such as
    tiny_bert_dir live; it is off by default). ``stop()`` ends it and every process it recorded;
    ``stop_service_only()`` leaves its workers running, as a crash would."""

    def __init__(self, data_dir: Path, *args: str, db_url: str | None = None):
        super().__init__(data_dir, db_url or f"sqlite:///{data_dir / 'platform.db'}", "--allow-path-registration",
                         "--path-root", str(data_dir.parents[1]), *args)

    def stop_service_only(self) -> None:
        super().stop()

    def stop(self) -> None:
        stop_all([self], self.db_url)


class Jobs:
    """The job rows as the database has them (what the API does not show: the claiming replica)."""

    def __init__(self, db_url: str):
        self.engine = create_engine(db_url)

    def get(self, job_id: str) -> db.Job:
        with db.session_factory(self.engine)() as s:
            return s.get(db.Job, job_id)

    def all(self) -> list[db.Job]:
        with db.session_factory(self.engine)() as s:
            return list(s.scalars(select(db.Job)).all())

    def recorded_pids(self) -> list[int]:
        with self.engine.connect() as conn:
            pids = conn.execute(select(db.Job.worker_pid).where(db.Job.worker_pid.is_not(None))).scalars().all()
            pids += conn.execute(select(db.Deployment.pid).where(db.Deployment.pid.is_not(None))).scalars().all()
        return [p for p in pids if pid_alive(p)]

    def close(self) -> None:
        self.engine.dispose()


def claimed_by_pid(job: db.Job) -> int | None:
    """The service replica that claimed the job (its id is host/pid/nonce)."""
    return int(job.claimed_by.split("/")[1]) if job.claimed_by else None


def stop_all(services: list[PlatformProcess], db_url: str) -> None:
    """End the services, then every worker or deployment process the database recorded (by process group)."""
    for svc in services:
        PlatformProcess.stop(svc)  # the service alone (Service.stop comes back here)
    jobs = Jobs(db_url)
    try:
        for pid in jobs.recorded_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)  # a worker a test paused must wake to die
                os.killpg(pid, signal.SIGKILL)
    finally:
        jobs.close()


def write_corpus(folder: Path, n_docs: int = 12) -> Path:
    from conftest import make_documents

    folder.mkdir(parents=True, exist_ok=True)
    for doc in make_documents(n_per_topic=max(1, n_docs // 6)):
        (folder / f"{doc['_id']}.txt").write_text(f"{doc['title']}\n\n{doc['text']}\n")
    return folder


def job_log(svc: PlatformProcess, job_id: str) -> str:
    path = svc.data_dir / "jobs" / job_id / "job.log"
    return path.read_text(errors="replace") if path.is_file() else ""
