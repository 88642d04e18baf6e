"""The platform's job queue on SQLite and on a real PostgreSQL server: claims, leases and fencing.

Schedulers here are the service's own class on a real database; only the executor is a recorder (what it
launches is not under test here: tests/test_platform_replicas.py runs real services and workers).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from embedtune.platform import db
from embedtune.platform.scheduler import Scheduler
from embedtune.platform.settings import PlatformSettings
from embedtune.platform.worker import beat

SRC = Path(__file__).resolve().parents[1] / "src"


class RecordingExecutor:
    """Launches nothing: records which (job, attempt) it was asked to start; reports a live local pid."""

    name = "local"

    def __init__(self) -> None:
        self.launched: list[tuple[str, int | None]] = []

    def launch(self, job_id: str, log_path: Path, attempt: int | None = None) -> int:
        self.launched.append((job_id, attempt))
        return os.getpid()

    def finished(self) -> list[tuple[str, str]]:
        return []

    def tracks(self, job_id: str) -> bool:
        return False

    def cancel(self, job_id: str) -> bool:
        return False

    def shutdown(self) -> None:
        pass


@pytest.fixture
def queue(db_url, tmp_path):
    engine = db.make_engine(db_url)
    sessions = db.session_factory(engine)
    settings = PlatformSettings(db_url=db_url, data_dir=tmp_path / "data", max_workers=1000,
                                stale_after_seconds=5).prepare()
    yield settings, sessions
    engine.dispose()


def add_jobs(sessions, n: int, status: str = "pending", **values) -> list[str]:  # noqa: ANN001, ANN003
    ids = [f"job-{i:04d}" for i in range(n)]
    with sessions() as s:
        s.add(db.Workspace(name="default"))
        for i, job_id in enumerate(ids):
            s.add(db.Job(id=job_id, workspace="default", kind="customization", status=status,
                         created_at=db.datetime(2026, 1, 1, 0, 0, i % 60), **values))
        s.commit()
    return ids


def test_concurrent_replicas_claim_every_pending_job_exactly_once(queue):
    """Four schedulers (as four replicas) claim from one queue at once: no job twice, none left behind."""
    settings, sessions = queue
    ids = add_jobs(sessions, 60)
    replicas = [Scheduler(settings, sessions, RecordingExecutor()) for _ in range(4)]
    claims: dict[str, list[str]] = {r.replica_id: [] for r in replicas}
    start = threading.Barrier(len(replicas))

    def claim_all(replica: Scheduler) -> None:
        start.wait()
        while batch := replica._claim(3):
            claims[replica.replica_id] += [job.id for job in batch]

    threads = [threading.Thread(target=claim_all, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    claimed = [job_id for batch in claims.values() for job_id in batch]
    assert sorted(claimed) == ids  # each exactly once
    with sessions() as s:
        rows = s.scalars(select(db.Job)).all()
    owner = {job_id: replica for replica, batch in claims.items() for job_id in batch}
    assert all(r.status == "running" and r.attempts == 1 and r.claimed_by == owner[r.id] for r in rows)


@pytest.mark.postgres
def test_replicas_that_select_at_the_same_instant_each_claim_their_own_jobs(postgres_url, tmp_path):
    """Eight replicas select pending jobs at once (a barrier holds every claim between its SELECT and its UPDATE,
    so all selects run before any claim commits): each replica gets as many jobs as it asked for, none twice.

    Without ``FOR UPDATE SKIP LOCKED`` the replicas select the same oldest rows; the first UPDATE wins and the
    others come back with fewer jobs than they asked for (or, trusting the selected ids, with jobs another replica
    owns). The limits differ per replica so that those selections overlap only partly."""
    from sqlalchemy import event

    engine = db.make_engine(postgres_url)
    sessions = db.session_factory(engine)
    settings = PlatformSettings(db_url=postgres_url, data_dir=tmp_path / "data", max_workers=1000).prepare()
    limits = [2, 3, 4, 5, 2, 3, 4, 5]
    ids = add_jobs(sessions, sum(limits))
    replicas = [Scheduler(settings, sessions, RecordingExecutor()) for _ in limits]
    selected = threading.Barrier(len(replicas), timeout=30)

    @event.listens_for(engine, "after_cursor_execute")
    def hold_after_select(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        if statement.lstrip().startswith("SELECT jobs.id") and "jobs.status = " in statement:
            selected.wait()  # every replica has its candidate rows (and, with SKIP LOCKED, their locks)

    claims: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def claim(replica: Scheduler, limit: int) -> None:
        try:
            claims[replica.replica_id] = [job.id for job in replica._claim(limit)]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(r, n)) for r, n in zip(replicas, limits, strict=True)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        event.remove(engine, "after_cursor_execute", hold_after_select)
    assert not errors, errors
    assert [len(claims[r.replica_id]) for r in replicas] == limits  # nobody came back short
    claimed = [job_id for batch in claims.values() for job_id in batch]
    assert sorted(claimed) == ids  # each job exactly once
    with sessions() as s:
        owner = {job.id: job.claimed_by for job in s.scalars(select(db.Job))}
    assert all(owner[job_id] == replica for replica, batch in claims.items() for job_id in batch)
    engine.dispose()


def test_claim_takes_the_oldest_pending_jobs_first_and_skips_others(queue):
    settings, sessions = queue
    ids = add_jobs(sessions, 5)
    with sessions() as s:
        db.transition(s, ids[0], "pending", status="cancelled")
    replica = Scheduler(settings, sessions, RecordingExecutor())
    assert [j.id for j in replica._claim(2)] == ids[1:3]
    assert [j.attempts for j in replica._claim(10)] == [1, 1]


def test_max_workers_bounds_jobs_running_on_this_machine(queue):
    settings, sessions = queue
    settings.max_workers = 2
    add_jobs(sessions, 5)
    first, second = (Scheduler(settings, sessions, RecordingExecutor()) for _ in range(2))
    first._start_pending()
    second._start_pending()  # the same machine: the two slots are taken
    assert len(first.executor.launched) == 2 and second.executor.launched == []


def stale(sessions, job_id: str, **values) -> None:  # noqa: ANN001, ANN003
    with sessions() as s:
        s.execute(db.update(db.Job).where(db.Job.id == job_id).values(heartbeat_at=time.time() - 60, **values))
        s.commit()


def test_stale_lease_of_a_claim_never_launched_is_claimed_again_even_when_orphans_fail(queue):
    """A replica claimed the job and died before starting a worker: nothing ran, so another replica reruns it."""
    settings, sessions = queue
    settings.on_orphan = "fail"
    [job_id] = add_jobs(sessions, 1)
    Scheduler(settings, sessions, RecordingExecutor())._claim(1)
    stale(sessions, job_id)
    survivor = Scheduler(settings, sessions, RecordingExecutor())
    survivor.tick()
    assert survivor.executor.launched == [(job_id, 2)]
    with sessions() as s:
        job = s.get(db.Job, job_id)
    assert (job.status, job.attempts, job.claimed_by) == ("running", 2, survivor.replica_id)
    assert "sent no heartbeat" in job.status_details["requeued_because"]


@pytest.mark.parametrize("on_orphan", ["fail", "requeue"])
def test_stale_lease_of_a_worker_on_another_host_follows_the_orphan_policy(queue, on_orphan):
    settings, sessions = queue
    settings.on_orphan = on_orphan
    [job_id] = add_jobs(sessions, 1)
    Scheduler(settings, sessions, RecordingExecutor())._claim(1)
    stale(sessions, job_id, worker_pid=4242, worker_host="node-elsewhere", started_at=db.utcnow())
    survivor = Scheduler(settings, sessions, RecordingExecutor())
    survivor.tick()
    with sessions() as s:
        job = s.get(db.Job, job_id)
    if on_orphan == "fail":
        assert job.status == "failed" and survivor.executor.launched == []
        assert job.error == "worker pid 4242 on node-elsewhere sent no heartbeat for 60 s"
    else:
        assert (job.status, job.attempts, survivor.executor.launched) == ("running", 2, [(job_id, 2)])


def test_max_attempts_fails_a_job_whose_workers_keep_dying(queue):
    settings, sessions = queue
    settings.on_orphan, settings.max_attempts = "requeue", 2
    [job_id] = add_jobs(sessions, 1)
    survivor = Scheduler(settings, sessions, RecordingExecutor())
    for attempt in (1, 2):
        survivor._claim(1)
        stale(sessions, job_id, worker_pid=4242, worker_host="node-elsewhere", started_at=db.utcnow())
        survivor._check_untracked(startup=False)
        with sessions() as s:
            job = s.get(db.Job, job_id)
        assert (job.status, job.attempts) == (("pending", 1) if attempt == 1 else ("failed", 2))
    assert "sent no heartbeat" in job.error


def test_an_orphan_decision_on_an_old_read_changes_nothing(queue):
    """Two replicas saw the same stale job; one re-queued and claimed it again: the other's decision is void."""
    settings, sessions = queue
    settings.on_orphan = "requeue"
    [job_id] = add_jobs(sessions, 1)
    first, second = (Scheduler(settings, sessions, RecordingExecutor()) for _ in range(2))
    first._claim(1)
    stale(sessions, job_id, worker_pid=4242, worker_host="node-elsewhere", started_at=db.utcnow())
    with sessions() as s:
        seen_by_second = s.get(db.Job, job_id)
    first.tick()  # re-queues and claims attempt 2
    second._orphaned(seen_by_second, "decided on an old read")
    with sessions() as s:
        job = s.get(db.Job, job_id)
    assert (job.status, job.attempts, job.claimed_by) == ("running", 2, first.replica_id)


def test_a_worker_of_an_old_attempt_changes_nothing_and_stops(queue):
    settings, sessions = queue
    [job_id] = add_jobs(sessions, 1, status="running", attempts=2, heartbeat_at=123.0)
    assert beat(sessions, job_id, attempt=1) is None  # lost lease: the heartbeat thread ends the process
    with sessions() as s:
        assert s.get(db.Job, job_id).heartbeat_at == 123.0
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-m", "embedtune.platform.worker", job_id, "--attempt", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "not running for attempt 1: nothing to do" in done.stderr
    with sessions() as s:
        job = s.get(db.Job, job_id)
    assert (job.status, job.worker_pid, job.started_at, job.heartbeat_at) == ("running", None, None, 123.0)
    assert beat(sessions, job_id, attempt=2) == "running"


# ------------------------------------------------------------------ error paths with a real service and workers


@pytest.fixture(scope="module")
def service(module_db_url, tmp_path_factory):
    from _platform_process import PlatformProcess, stop_all, write_corpus

    root = tmp_path_factory.mktemp("service")
    svc = PlatformProcess(root / "data", module_db_url).start()
    svc.client().upload_dataset("docs", write_corpus(root / "docs"))
    yield svc
    stop_all([svc], module_db_url)


def in_stage(svc, job_id: str) -> int:  # noqa: ANN001
    """The worker's pid once it is inside its first stage (its signal handler and heartbeat are set up)."""
    from _platform_process import job_log, wait_for

    wait_for(lambda: "=== stage corpus" in job_log(svc, job_id), timeout=120, poll=0.1, what="stage started")
    return svc.client().get_job(job_id)["worker"]["pid"]


def test_a_stage_raising_fails_the_job_with_its_reason(service):
    from _platform_process import job_log

    pc = service.client()
    job = pc.create_customization_job(model="default", dataset="docs", stages=["corpus"],
                                      recipe={"corpus": {"min_chars": 100000}})  # every document too short
    final = pc.wait_job(job["id"], timeout=120, poll=0.2)
    assert final["status"] == "failed" and final["worker"]["attempts"] == 1
    assert final["error"].startswith("ValueError: no usable documents in "), final["error"]
    assert "Traceback" in job_log(service, job["id"]) and final["finished_at"] is not None


def test_sigterm_to_a_worker_fails_its_job(service):
    from _platform_process import pid_alive, wait_for

    pc = service.client()
    job = pc.create_customization_job(model="default", dataset="docs", stages=["corpus"])
    pid = in_stage(service, job["id"])
    os.kill(pid, 15)
    final = pc.wait_job(job["id"], timeout=60, poll=0.1)
    assert (final["status"], final["error"]) == ("failed", "worker received SIGTERM")
    wait_for(lambda: not pid_alive(pid), timeout=30, what="worker gone")


@pytest.mark.slow
def test_a_worker_that_stops_beating_is_failed_and_cannot_finish_the_job_later(db_url, tmp_path):
    """Its service dies (SIGKILL) while the worker is frozen (SIGSTOP): the next service fails the job for the
    stale heartbeat; when the worker wakes up it finds it no longer holds the job and exits without a write."""
    from _platform_process import Jobs, PlatformProcess, job_log, pid_alive, stop_all, wait_for, write_corpus

    first = PlatformProcess(tmp_path / "data", db_url, stale_after=3).start()
    second = None
    jobs = Jobs(db_url)
    try:
        pc = first.client()
        pc.upload_dataset("docs", write_corpus(tmp_path / "docs"))
        job_id = pc.create_customization_job(model="default", dataset="docs", stages=["corpus"])["id"]
        pid = in_stage(first, job_id)
        os.kill(pid, 19)  # SIGSTOP
        first.kill()
        second = PlatformProcess(tmp_path / "data", db_url, stale_after=3).start()
        failed = second.client().wait_job(job_id, timeout=60, poll=0.2)
        assert failed["status"] == "failed"
        assert failed["error"].startswith(f"worker pid {pid} on ") and "sent no heartbeat for" in failed["error"]
        os.kill(pid, 18)  # SIGCONT
        wait_for(lambda: not pid_alive(pid), timeout=60, what="woken worker gone")
        assert "no longer holds the job" in job_log(second, job_id)
        after = jobs.get(job_id)
        assert (after.status, after.error, after.result) == ("failed", failed["error"], {})
    finally:
        jobs.close()
        stop_all([s for s in (first, second) if s is not None], db_url)
