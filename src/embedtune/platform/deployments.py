"""Deployments: one ``python -m embedtune serve`` process per deployment, on a free local port.

Status: pending (process started) -> ready (``/v1/health/ready`` answered 200) -> deleted (stopped on
request); failed when the process exits or never gets ready. A serving process outlives a restart of the
platform service (own session); the restarted service checks it again and keeps it if it still answers.

Each deployment has its own random API key (``deployments/<id>/serve.key``, 0600): the gateway and
evaluation jobs send it, so another local user of the host cannot use the loopback server directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from embedtune.platform import db
from embedtune.platform.deployment_keys import auth_headers, key_path
from embedtune.platform.executors import worker_env
from embedtune.platform.processes import HOST, pid_alive
from embedtune.platform.settings import PlatformSettings
from embedtune.serve.keys import ensure_key_file

log = logging.getLogger("embedtune.platform")


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 20) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class DeploymentManager:
    def __init__(self, settings: PlatformSettings, sessions: sessionmaker[Session]):
        self.settings, self.sessions = settings, sessions
        self.procs: dict[str, subprocess.Popen] = {}

    def log_path(self, dep_id: str) -> Path:
        return self.settings.data_dir / "deployments" / dep_id / "serve.log"

    def start(self, dep: db.Deployment) -> None:
        host = self.settings.deployment_host
        port = free_port(host)
        path = self.log_path(dep.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        # NAME=PATH makes the server answer to the platform's model name (what gateway callers send).
        key_file = key_path(self.settings.data_dir, dep.id)
        ensure_key_file(key_file)
        cmd = [sys.executable, "-m", "embedtune", "serve", "--model", f"{dep.model}={dep.model_path}", "--host", host,
               "--port", str(port), "--api-key-file", str(key_file)]
        with path.open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=worker_env(self.settings), start_new_session=True)
        self.procs[dep.id] = proc
        dep.pid, dep.port, dep.host, dep.url = proc.pid, port, HOST, f"http://{host}:{port}"

    def stop(self, dep: db.Deployment) -> None:
        proc = self.procs.pop(dep.id, None)
        pid = proc.pid if proc else (dep.pid if dep.host == HOST else None)
        if pid and pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                if proc is not None and proc.poll() is not None:
                    break
                time.sleep(0.1)
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def _exited(self, dep: db.Deployment) -> str | None:
        proc = self.procs.get(dep.id)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return None
            self.procs.pop(dep.id, None)
            return f"serving process exited with code {code}"
        if dep.host == HOST and not pid_alive(dep.pid):
            return "serving process is no longer running"
        return None

    def check(self, startup: bool = False) -> None:
        with self.sessions() as s:
            deps = s.scalars(select(db.Deployment).where(db.Deployment.status.in_(db.LIVE_DEPLOYMENT))).all()
        for dep in deps:
            values = self._check_one(dep)
            if values:
                # Written only if the deployment is still what we looked at: a DELETE in between wins.
                with self.sessions() as s:
                    db.update_deployment(s, dep.id, (dep.status,), **values)

    def _check_one(self, dep: db.Deployment) -> dict[str, Any] | None:
        """The deployment's new status (and details), or None when nothing changed."""
        if (why := self._exited(dep)) is not None:
            return {"status": "failed", "error": f"{why}; log tail:\n{tail(self.log_path(dep.id))}"}
        if dep.status == "ready":
            return None  # a live ready process is not polled every tick; the gateway reports its errors
        try:
            ready = httpx.get(f"{dep.url}/v1/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            ready = False
        if ready:
            log.info("deployment %s ready at %s", dep.name, dep.url)
            return {"status": "ready", "served_model": self._served_model(dep)}
        waited = (db.utcnow() - dep.created_at).total_seconds()
        if waited > self.settings.deployment_ready_timeout:
            self.stop(dep)
            return {"status": "failed",
                    "error": f"not ready after {waited:.0f} s; log tail:\n{tail(self.log_path(dep.id))}"}
        return None

    def _served_model(self, dep: db.Deployment) -> str | None:
        with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError):
            return httpx.get(f"{dep.url}/v1/models", timeout=5,
                             headers=auth_headers(self.settings.data_dir, dep.id)).json()["data"][0]["id"]
        return None
