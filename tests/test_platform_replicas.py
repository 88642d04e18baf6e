"""Several `embedtune platform` processes on one PostgreSQL database and one data folder, as behind a load balancer.

Real services, real worker processes, real corpus jobs (the cheapest stage that runs end to end): every job is
run by exactly one worker, a cancel sent to the replica that does not run the job reaches it, and a replica
killed with SIGKILL hands its jobs to the other without any job being run twice.
"""

from __future__ import annotations

import os
import signal

import pytest

from _platform_process import (
    Jobs,
    PlatformProcess,
    claimed_by_pid,
    job_log,
    pid_alive,
    stop_all,
    wait_for,
    write_corpus,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def started_by_worker(jobs: Jobs, job_id: str, svc: PlatformProcess):  # noqa: ANN201
    """The job row once its worker has recorded itself: pid and started_at in the row, then its 'started by
    worker pid' line in the job log. The worker writes the line just after its commit, so a test that stops or
    kills the worker as soon as the row says "running" could otherwise lose the line (CI saw exactly that)."""
    row = wait_for(lambda: (j := jobs.get(job_id)).started_at is not None and j.status == "running" and j,
                   timeout=120, poll=0.1, what=f"worker of {job_id} started")
    wait_for(lambda: f"started by worker pid {row.worker_pid}" in job_log(svc, job_id),
             timeout=120, poll=0.1, what=f"worker of {job_id} logged its start")
    return row


def runs_of(svc: PlatformProcess, job_id: str) -> int:
    """How many workers started the job: each writes one 'started by worker pid' line to the job's log."""
    return job_log(svc, job_id).count(" started by worker pid ")


@pytest.fixture(scope="module")
def replicas(postgres_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    url = postgres_server.create_database("replicas")
    args = ("--max-workers", "2", "--on-orphan", "requeue")
    a = PlatformProcess(root / "data", url, *args, stale_after=30).start()
    b = PlatformProcess(root / "data", url, *args, stale_after=30).start()
    a.client().upload_dataset("docs", write_corpus(root / "docs"))
    jobs = Jobs(url)
    yield a, b, jobs
    jobs.close()
    stop_all([a, b], url)


def corpus_job(svc: PlatformProcess) -> str:
    return svc.client().create_customization_job(model="default", dataset="docs", stages=["corpus"])["id"]


def test_every_queued_job_is_run_by_exactly_one_worker(replicas):
    a, b, jobs = replicas
    ids = [corpus_job(svc) for svc in (a, b, a, b, a, b)]  # requests spread over both, as a balancer would
    finals = [(a if i % 2 else b).client().wait_job(job_id, timeout=600, poll=0.5) for i, job_id in enumerate(ids)]
    assert [f["status"] for f in finals] == ["completed"] * len(ids), [f["error"] for f in finals]
    rows = [jobs.get(job_id) for job_id in ids]
    assert [r.attempts for r in rows] == [1] * len(ids)
    assert [runs_of(a, job_id) for job_id in ids] == [1] * len(ids)
    assert [job_log(a, job_id).count(f"job {job_id} completed") for job_id in ids] == [1] * len(ids)
    owners = [claimed_by_pid(r) for r in rows]
    assert set(owners) <= {a.pid, b.pid}
    assert set(owners) == {a.pid, b.pid}, f"one replica claimed every job: {owners}"


def test_a_cancel_sent_to_either_replica_reaches_the_job(replicas):
    a, b, jobs = replicas
    ids = [corpus_job(a), corpus_job(b)]
    for job_id in ids:
        row = started_by_worker(jobs, job_id, a)
        other = b if claimed_by_pid(row) == a.pid else a  # the replica that does not run it
        assert other.client().cancel_job(job_id)["status"] in ("cancelling", "cancelled")
        # Generous: under the full suite a worker may still be importing torch when the signal lands (on an
        # AVX2-only Zen 1 EPYC the job was still cancelling after 60 s).
        final = a.client().wait_job(job_id, timeout=180, poll=0.2)
        assert final["status"] == "cancelled" and final["error"] == "cancelled by request"
        wait_for(lambda p=row.worker_pid: not pid_alive(p), timeout=120, what="cancelled worker gone")
        assert runs_of(a, job_id) == 1 and "completed" not in job_log(a, job_id).splitlines()[-1]


def test_a_replica_killed_with_sigkill_hands_its_jobs_to_the_other(postgres_server, tmp_path_factory):
    """Replica A runs X and Y and holds Z in its queue; A dies with SIGKILL and so does X's worker (A's machine
    going down), Y's worker survives. Replica B: adopts Y without re-running it, re-claims X (attempt 2) and
    runs Z. Every job completes once; X's first attempt is the only one that did not."""
    root = tmp_path_factory.mktemp("handover")
    url = postgres_server.create_database("handover")
    args = ("--max-workers", "2", "--on-orphan", "requeue")
    a = PlatformProcess(root / "data", url, *args, stale_after=30).start()
    b = None
    jobs = Jobs(url)
    try:
        pc = a.client()
        pc.upload_dataset("docs", write_corpus(root / "docs"))
        x, y, z = (corpus_job(a) for _ in range(3))
        x_row = started_by_worker(jobs, x, a)
        os.kill(x_row.worker_pid, signal.SIGSTOP)  # hold X mid-run (no CPU) until A's machine "goes down"
        y_row = started_by_worker(jobs, y, a)
        assert jobs.get(z).status == "pending"  # max_workers=2 on this machine
        assert claimed_by_pid(x_row) == claimed_by_pid(y_row) == a.pid

        b = PlatformProcess(root / "data", url, *args, stale_after=30).start()
        a.kill()
        os.kill(x_row.worker_pid, signal.SIGKILL)

        finals = {job_id: b.client().wait_job(job_id, timeout=600, poll=0.5) for job_id in (x, y, z)}
        assert {k: f["status"] for k, f in finals.items()} == dict.fromkeys((x, y, z), "completed"), finals
        x_final, y_final, z_final = (jobs.get(job_id) for job_id in (x, y, z))
        # X: re-claimed by B after its worker died with A; the first attempt never finished
        assert (x_final.attempts, claimed_by_pid(x_final)) == (2, b.pid)
        assert f"worker pid {x_row.worker_pid}" in x_final.status_details["requeued_because"]
        assert runs_of(a, x) == 2 and job_log(a, x).count(f"job {x} completed") == 1
        # Y: its worker outlived A and finished the job; B did not run it again
        assert (y_final.attempts, y_final.worker_pid, claimed_by_pid(y_final)) == (1, y_row.worker_pid, a.pid)
        assert runs_of(a, y) == 1
        # Z: was queued; B claimed it
        assert (z_final.attempts, claimed_by_pid(z_final)) == (1, b.pid) and runs_of(a, z) == 1
    finally:
        jobs.close()
        stop_all([svc for svc in (a, b) if svc is not None], url)
