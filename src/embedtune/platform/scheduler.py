"""The service's background loop: start pending jobs, notice dead workers, watch deployments.

It never runs a job itself. Each tick:
1. workers the executor saw end: a job still running is failed with how its worker ended (a cancelling
   job becomes cancelled);
2. leases: the job's ``heartbeat_at`` is its lease. The service renews it for workers it launched that
   have not started yet; from then on the worker's own heartbeat renews it. Cancel requests recorded in
   the database (by any replica) are passed on to the workers this service launched;
3. jobs running without a worker this service launched (adopted after a restart, or launched by
   another replica): if their pid is gone (same host) or their lease is stale, the job is an orphan
   and is failed with the reason, or re-queued when ``on_orphan=requeue`` (always when no worker was
   launched for it: nothing ran);
4. pending jobs are claimed and launched, up to ``max_workers`` on this machine;
5. deployments are health-checked.
The first tick runs before the service accepts requests, so no job is ever left "running" for a dead worker.

Several replicas may share one database. A claim takes rows no other replica holds (``SELECT ... FOR UPDATE
SKIP LOCKED`` on PostgreSQL; a conditional ``UPDATE ... WHERE status = 'pending'`` on SQLite) and counts an
attempt; every later write about the job, by the service or its worker, is fenced by that attempt number,
so a worker or replica that lost the job (its lease went stale and the job was failed or claimed again)
changes nothing in the database, and the worker stops at its next heartbeat. A live worker's lease does not
go stale (it beats every ``heartbeat_seconds``), so a job is re-claimed only from a worker that is gone or
was frozen for ``stale_after_seconds``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from embedtune.platform import db
from embedtune.platform.executors import Executor
from embedtune.platform.processes import HOST, pid_alive
from embedtune.platform.settings import PlatformSettings

log = logging.getLogger("embedtune.platform")
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
        self.replica_id = f"{HOST}/{os.getpid()}/{uuid.uuid4().hex[:8]}"  # recorded on the jobs it claims
        self.launched: dict[str, int] = {}  # job id -> the attempt this service launched a worker for
        self.cancels_sent: set[str] = set()

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
            self._renew_leases()
            self._pass_on_cancels()
            self._check_untracked(startup)
            self._start_pending()
            if self.deployments is not None:
                self.deployments.check(startup)

    # ------------------------------------------------------------------------------------------ jobs

    def _worker_ended(self, job_id: str, how: str) -> None:
        attempt = self.launched.pop(job_id, None)
        self.cancels_sent.discard(job_id)
        with self.sessions() as s:
            if db.transition(s, job_id, "cancelling", attempt=attempt, status="cancelled",
                             error="cancelled by request"):
                return
            if db.transition(s, job_id, "running", attempt=attempt, status="failed",
                             error=f"{how} before the job finished"):
                log.warning("job %s failed: %s", job_id, how)

    def _tracked(self) -> dict[str, int]:
        return {job_id: n for job_id, n in self.launched.items() if self.executor.tracks(job_id)}

    def _renew_leases(self) -> None:
        """Workers of ours still starting (no heartbeat of their own yet): their process is alive, so is the job."""
        tracked = self._tracked()
        if not tracked:
            return
        mine = or_(*(and_(db.Job.id == job_id, db.Job.attempts == n) for job_id, n in tracked.items()))
        with self.sessions() as s:
            s.execute(update(db.Job).where(mine, db.Job.status.in_(db.ACTIVE), db.Job.started_at.is_(None))
                      .values(heartbeat_at=time.time()))
            s.commit()

    def _pass_on_cancels(self) -> None:
        """A cancel sent to any replica is a status in the database: the replica that owns the worker acts on it."""
        waiting = [job_id for job_id in self._tracked() if job_id not in self.cancels_sent]
        if not waiting:
            return
        with self.sessions() as s:
            cancelling = s.scalars(select(db.Job.id).where(db.Job.id.in_(waiting),
                                                           db.Job.status == "cancelling")).all()
        for job_id in cancelling:
            self.cancels_sent.add(job_id)
            self.executor.cancel(job_id)

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
            if job.worker_pid:
                who = f"worker pid {job.worker_pid} on {job.worker_host or 'an unknown host'}"
            else:
                who = f"the worker of replica {job.claimed_by}" if job.claimed_by else "its worker"
            why = "is no longer running" if gone else f"sent no heartbeat for {age:.0f} s"
            when = " (found when the service started)" if startup else ""
            self._orphaned(job, f"{who} {why}{when}")

    def _release_created(self) -> None:
        """A job recorded just before the service stopped never reached the queue: queue it now."""
        with self.sessions() as s:
            for job_id in s.scalars(select(db.Job.id).where(db.Job.status == "created")).all():
                db.transition(s, job_id, "created", status="pending")

    def _orphaned(self, job: db.Job, reason: str) -> None:
        """Fail or re-queue a job whose worker is gone, unless its lease moved on since ``job`` was read."""
        # Claimed by a replica that died before it launched a worker: nothing ran, so it is always safe to rerun.
        never_launched = job.worker_pid is None and job.started_at is None
        requeue = (never_launched or self.settings.on_orphan == "requeue") and job.attempts < self.settings.max_attempts
        details = {**(job.status_details or {}), "requeued_because": reason}
        outcomes = (
            ("cancelling", {"status": "cancelled", "error": "cancelled by request"}),
            ("running", {"status": "pending", "worker_pid": None, "worker_host": None, "heartbeat_at": None,
                         "claimed_by": None, "started_at": None, "status_details": details} if requeue
             else {"status": "failed", "error": reason}),
        )
        with self.sessions() as s:
            for status, values in outcomes:
                if self._same_lease(s, job, status, values):
                    if status == "running":
                        log.warning("job %s %s: %s", job.id, "re-queued" if requeue else "failed", reason)
                    return

    @staticmethod
    def _same_lease(s: Session, job: db.Job, status: str, values: dict) -> bool:
        """Compare-and-set on status, attempt and heartbeat: a worker that beat meanwhile keeps its job."""
        beat = db.Job.heartbeat_at.is_(None) if job.heartbeat_at is None else db.Job.heartbeat_at == job.heartbeat_at
        stmt = (update(db.Job).where(db.Job.id == job.id, db.Job.status == status, db.Job.attempts == job.attempts,
                                     beat).values(updated_at=db.utcnow(), **values))
        if values.get("status") in db.TERMINAL:
            stmt = stmt.values(finished_at=db.utcnow())
        changed = s.execute(stmt).rowcount == 1
        s.commit()
        return changed

    def active_jobs(self) -> int:
        """Jobs running on this machine (by any replica on it) or claimed by this service: max_workers bounds them."""
        here = or_(db.Job.worker_host == HOST, db.Job.claimed_by == self.replica_id)
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(db.Job).where(db.Job.status.in_(db.ACTIVE), here))

    def _start_pending(self) -> None:
        free = self.settings.max_workers - self.active_jobs()
        if free <= 0:
            return
        for job in self._claim(free):
            self._launch(job)

    def _claim(self, limit: int) -> list[db.Job]:
        """Up to ``limit`` pending jobs, oldest first, that no other replica claims at the same time."""
        pending = select(db.Job.id).where(db.Job.status == "pending").order_by(db.Job.created_at).limit(limit)
        claim = (update(db.Job).where(db.Job.status == "pending")
                 .values(status="running", claimed_by=self.replica_id, attempts=db.Job.attempts + 1,
                         heartbeat_at=time.time(), worker_host=None, worker_pid=None, started_at=None,
                         executor=self.executor.name, updated_at=db.utcnow()))
        with self.sessions() as s:
            if s.get_bind().dialect.name == "postgresql":
                # Row locks: rows another replica is claiming right now are skipped, not waited for.
                ids = s.scalars(pending.with_for_update(skip_locked=True)).all()
                # RETURNING names the rows this UPDATE changed: only those are ours (a rowcount > 0 would
                # claim every selected row whenever any of them was still pending).
                claimed = list(s.scalars(claim.where(db.Job.id.in_(ids)).returning(db.Job.id)).all()) if ids else []
                s.commit()
            else:
                # SQLite has no row locks: each claim is a conditional UPDATE; a row another process took
                # first no longer says 'pending', so its UPDATE changes nothing.
                claimed = []
                for job_id in s.scalars(pending).all():
                    if s.execute(claim.where(db.Job.id == job_id)).rowcount == 1:
                        claimed.append(job_id)
                    s.commit()
            if not claimed:
                return []
            return list(s.scalars(select(db.Job).where(db.Job.id.in_(claimed)).order_by(db.Job.created_at)).all())

    def _launch(self, job: db.Job) -> None:
        self.launched[job.id] = job.attempts
        try:
            pid = self.executor.launch(job.id, job_log_path(self.settings, job.id), attempt=job.attempts)
        except Exception as exc:  # noqa: BLE001
            self.launched.pop(job.id, None)
            with self.sessions() as s:
                db.transition(s, job.id, "running", attempt=job.attempts, status="failed",
                              error=f"could not start a worker: {exc}")
            return
        if pid is not None:
            with self.sessions() as s:
                # The worker records its own pid too; this covers the moment before it does.
                db.transition(s, job.id, ("running", "cancelling"), attempt=job.attempts, worker_pid=pid,
                              worker_host=HOST)
        log.info("job %s (attempt %d) started on %s executor", job.id, job.attempts, self.executor.name)

    def cancel(self, job_id: str) -> None:
        """Signal a cancelling job's worker; the worker (or the reaper) finishes the transition."""
        if self.executor.cancel(job_id):
            self.cancels_sent.add(job_id)
            return
        with self.sessions() as s:
            job = s.get(db.Job, job_id)
        if job and job.worker_host == HOST and pid_alive(job.worker_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(job.worker_pid, 15)
        # Elsewhere (another host): the worker's heartbeat sees "cancelling" and stops itself.
