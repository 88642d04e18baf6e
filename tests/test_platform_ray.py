"""The Ray executor: the same worker as a Ray task on a local Ray instance started by the service."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray  # noqa: F401 - required (the platform extra, in requirements.lock): missing, this module fails

from _platform_process import Service, write_corpus
from test_platform_jobs import wait_running_with_pid

pytestmark = pytest.mark.slow  # ray.init() + a Ray worker importing torch: 32 s with setup on a quiet 2-core box


def test_ray_executor_runs_and_loses_jobs_honestly(tmp_path, tiny_bert_dir):
    svc = Service(tmp_path / "data", "--executor", "ray").start(timeout=180)
    try:
        pc = svc.client()
        pc.register_model("tiny", tiny_bert_dir)
        pc.upload_dataset("docs", write_corpus(tmp_path / "docs"))
        job = pc.create_customization_job(model="tiny", dataset="docs", stages=["corpus"])
        done = pc.wait_job(job["id"], timeout=300, poll=0.5)
        assert done["status"] == "completed", done["error"]
        assert done["worker"]["executor"] == "ray" and done["worker"]["pid"] != svc.proc.pid
        assert "=== stage corpus" in pc.job_logs(job["id"])

        # Idle for longer than the server's thread pool keeps an idle thread (10 s): Ray's GCS and raylet die
        # with the thread that started them (PR_SET_PDEATHSIG), so Ray must not be started on a pool thread.
        time.sleep(12)
        assert svc.proc.poll() is None, "the service died while idle"
        pc.get_job(job["id"])

        doomed = pc.create_customization_job(model="tiny", dataset="docs", stages=["corpus"])
        pid = wait_running_with_pid(pc, doomed["id"])["worker"]["pid"]
        os.kill(pid, signal.SIGKILL)
        failed = pc.wait_job(doomed["id"], timeout=120, poll=0.3)
        assert failed["status"] == "failed" and "ray task failed" in failed["error"]
    finally:
        svc.stop()
