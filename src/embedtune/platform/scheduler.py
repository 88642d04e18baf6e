"""The service's background loop: start pending jobs, notice dead workers, watch deployments.

It never runs a job itself. Each tick:
1. workers the executor saw end: a job still running is failed with how its worker ended (a cancelling
   job becomes cancelled);
2. jobs running without a worker this service launched (adopted after a restart, or launched by
   another replica): if their pid is gone (same host) or their heartbeat is stale, the job is an orphan
   and is failed with the reason, or re-queued when ``on_orphan=requeue``;
3. pending jobs are claimed (compare-and-set pending -> running) and launched, up to ``max_workers``;
4. deployments are health-checked.
The first tick runs before the service accepts requests, so no job is ever left "running" for a dead worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from embedtune.platform import db
from embedtune.platform.executors import Executor
from embedtune.platform.settings import PlatformSettings

log = logging.getLogger("embedtune.platform")
HOST = socket.gethostname()


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by a parent that is gone) is dead for our purposes.
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def job_log_path(settings: PlatformSettings, job_id: str) -> Path:
    return settings.data_dir / "jobs" / job_id / "job.log"


class Scheduler:
    def __init__(self, settings: PlatformSettings, sessions: sessionmaker[Session], executor: Executor,
                 deployments=None):  # noqa: ANN001
        self.settings, self.sessions, self.executor = settings, sessions, executor
        self.deployments = deployments
        self.stop = threading.Event()
        self.lock = threading.Lock()  # one tick at a time (the loop and an API-triggered nudge)
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="platform-scheduler")

    def start(self) -> None:
        self.tick(startup=True)
        self.thread.start()

    def shutdown(self) -> None:
        self.stop.set()
        self.wake.set()
        self.thread.join(timeout=10)
        self.executor.shutdown()

    def nudge(self) -> None:
        self.wake.set()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.wake.wait(self.settings.poll_seconds)
            self.wake.clear()
            if self.stop.is_set():
                break
            try:
                self.tick()
            except Exception:  # noqa: BLE001 (a failed tick is logged and retried next time)
                log.exception("scheduler tick failed")

    def tick(self, startup: bool = False) -> None:
        with self.lock:
            if startup:
                self._release_created()
            for job_id, how in self.executor.finished():
                self._worker_ended(job_id, how)
            self._check_untracked(startup)
            self._start_pending()
            if self.deployments is not None:
                self.deployments.check(startup)

    # ------------------------------------------------------------------------------------------ jobs

    def _worker_ended(self, job_id: str, how: str) -> None:
        with self.sessions() as s:
            if db.transition(s, job_id, "cancelling", status="cancelled", error="cancelled by request"):
                return
            if db.transition(s, job_id, "running", status="failed", error=f"{how} before the job finished"):
                log.warning("job %s failed: %s", job_id, how)

    def _check_untracked(self, startup: bool) -> None:
        now = time.time()
        with self.sessions() as s:
            jobs = s.scalars(select(db.Job).where(db.Job.status.in_(db.ACTIVE))).all()
        for job in jobs:
            if self.executor.tracks(job.id):
                continue
            age = now - (job.heartbeat_at or 0)
            gone = job.worker_host == HOST and job.worker_pid and not pid_alive(job.worker_pid)
            if not gone and age <= self.settings.stale_after_seconds:
                continue  # a live worker from before a restart (or another replica's): it owns the job
            who = f"worker pid {job.worker_pid} on {job.worker_host}" if job.worker_pid else "its worker"
            why = "is no longer running" if gone else f"sent no heartbeat for {age:.0f} s"
            when = " (found when the service started)" if startup else ""
            self._orphaned(job, f"{who} {why}{when}")

    def _release_created(self) -> None:
        """A job recorded just before the service stopped never reached the queue: queue it now."""
        with self.sessions() as s:
            for job_id in s.scalars(select(db.Job.id).where(db.Job.status == "created")).all():
                db.transition(s, job_id, "created", status="pending")

    def _orphaned(self, job: db.Job, reason: str) -> None:
        with self.sessions() as s:
            if db.transition(s, job.id, "cancelling", status="cancelled", error="cancelled by request"):
                return
            if self.settings.on_orphan == "requeue" and job.attempts < self.settings.max_attempts:
                details = {**(job.status_details or {}), "requeued_because": reason}
                if db.transition(s, job.id, "running", status="pending", worker_pid=None, heartbeat_at=None,
                                 status_details=details):
                    log.warning("job %s re-queued: %s", job.id, reason)
                return
            if db.transition(s, job.id, "running", status="failed", error=reason):
                log.warning("job %s failed: %s", job.id, reason)

    def active_jobs(self) -> int:
        """Jobs running anywhere on this database: max_workers bounds them all."""
        with self.sessions() as s:
            return len(s.scalars(select(db.Job.id).where(db.Job.status.in_(db.ACTIVE))).all())

    def _start_pending(self) -> None:
        free = self.settings.max_workers - self.active_jobs()
        if free <= 0:
            return
        with self.sessions() as s:
            pending = s.scalars(select(db.Job).where(db.Job.status == "pending")
                                .order_by(db.Job.created_at).limit(free)).all()
        for job in pending:
            self._launch(job)

    def _launch(self, job: db.Job) -> None:
        with self.sessions() as s:
            claimed = db.transition(s, job.id, "pending", status="running", heartbeat_at=time.time(),
                                    worker_host=None, worker_pid=None, executor=self.executor.name,
                                    attempts=job.attempts + 1)
        if not claimed:
            return
        try:
            pid = self.executor.launch(job.id, job_log_path(self.settings, job.id))
        except Exception as exc:  # noqa: BLE001
            with self.sessions() as s:
                db.transition(s, job.id, "running", status="failed", error=f"could not start a worker: {exc}")
            return
        if pid is not None:
            with self.sessions() as s:
                # The worker records its own pid too; this covers the moment before it does.
                db.transition(s, job.id, "running", worker_pid=pid, worker_host=HOST)
        log.info("job %s started on %s executor", job.id, self.executor.name)

    def cancel(self, job_id: str) -> None:
        """Signal a cancelling job's worker; the worker (or the reaper) finishes the transition."""
        if self.executor.cancel(job_id):
            return
        with self.sessions() as s:
            job = s.get(db.Job, job_id)
        if job and job.worker_host == HOST and pid_alive(job.worker_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(job.worker_pid, 15)
        # Elsewhere (another host): the worker's heartbeat sees "cancelling" and stops itself.
