"""The platform service as users run it: a real `embedtune platform` process on 127.0.0.1, jobs in worker
processes, on a SQLite file and then on PostgreSQL (the job queue, the worker records and the restart recovery
live in the database). Covers a completed job, cancel, a worker killed with SIGKILL, and restarts of the
service with a job running (failed by default, re-queued by config, adopted when its worker survived)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from _platform_process import Service, pid_alive, wait_for, write_corpus
from embedtune.platform.client import PlatformAPIError, PlatformClient


@pytest.fixture(scope="module")
def service(tmp_path_factory, module_db_url):
    svc = Service(tmp_path_factory.mktemp("platform") / "data", db_url=module_db_url).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def workspace(service, tiny_bert_dir, tmp_path_factory):
    """A workspace with the tiny BERT registered as a base model and a small corpus uploaded."""
    pc = service.client("jobs")
    pc.ensure_workspace()
    pc.register_model("tiny", tiny_bert_dir)
    pc.upload_dataset("docs", write_corpus(tmp_path_factory.mktemp("docs") / "docs"))
    return pc


def corpus_job(pc: PlatformClient, **extra) -> dict:  # noqa: ANN003
    return pc.create_customization_job(model="tiny", dataset="docs", stages=["corpus"], **extra)


def wait_running_with_pid(pc: PlatformClient, job_id: str) -> dict:
    return wait_for(lambda: (j := pc.get_job(job_id))["status"] == "running" and j["worker"]["pid"] and j,
                    timeout=60, poll=0.05, what="job running")


def test_corpus_job_completes_with_stage_progress_and_logs(workspace):
    job = corpus_job(workspace, name="chunk-only")
    queued = corpus_job(workspace)  # max_workers=1: waits behind the first, and is cancelled while pending
    assert job["status"] == "pending" and job["stages"] == ["corpus"]
    assert workspace.cancel_job(queued["id"])["status"] == "cancelled"
    done = workspace.wait_job(job["id"], timeout=120, poll=0.3)
    assert done["status"] == "completed", done["error"]
    assert done["status_details"]["stages_completed"] == ["corpus"]
    assert done["result"]["stages"]["corpus"]["counts"]["chunks"] > 0
    assert done["output_model"] is None  # no finetune stage ran: no model
    chunks = Path(done["result"]["run_dir"]) / "corpus" / "chunks.jsonl"
    assert sum(1 for _ in chunks.open()) == done["result"]["stages"]["corpus"]["counts"]["chunks"]
    assert "=== stage corpus" in workspace.job_logs(job["id"])
    assert workspace.job_status(job["id"])["status"] == "completed"
    assert [j["id"] for j in workspace.list_jobs(status="completed")].count(job["id"]) == 1
    never_ran = workspace.get_job(queued["id"])
    assert never_ran["status"] == "cancelled" and never_ran["worker"]["pid"] is None


def test_job_request_errors_are_openai_shaped(workspace):
    with pytest.raises(PlatformAPIError) as err:
        workspace.create_customization_job(model="tiny", dataset="nope")
    assert err.value.status == 404 and err.value.error["param"] == "dataset"
    with pytest.raises(PlatformAPIError) as err:
        workspace.create_customization_job(model="tiny", dataset="docs", stages=["corpus", "prep"])
    assert err.value.status == 422 and "consecutive" in err.value.error["message"]
    with pytest.raises(PlatformAPIError) as err:
        workspace.create_customization_job(model="tiny", dataset="docs", stages=["corpus"],
                                           recipe={"corpus": {"chunk_tokes": 10}})
    assert err.value.status == 422 and "chunk_tokens" in err.value.error["message"]  # names the near key
    with pytest.raises(PlatformAPIError) as err:
        workspace.create_customization_job(model="tiny", dataset="docs", hyperparameters={"epochs": -1})
    assert err.value.status == 422 and err.value.error["param"] == "hyperparameters.epochs"


def test_cancel_running_job_stops_its_worker(workspace):
    # NeMo Platform v2's path for the same request
    job = workspace.request("POST", "/apis/customization/v2/workspaces/jobs/automodel/jobs",
                            json={"model": "tiny", "dataset": {"training": "docs"}, "stages": ["corpus"]})
    pid = wait_running_with_pid(workspace, job["id"])["worker"]["pid"]
    cancelled = workspace.cancel_job(job["id"])
    assert cancelled["status"] in ("cancelling", "cancelled")
    final = workspace.wait_job(job["id"], timeout=30, poll=0.1)
    assert final["status"] == "cancelled"
    wait_for(lambda: not pid_alive(pid), timeout=10, what="worker gone")
    with pytest.raises(PlatformAPIError) as err:
        workspace.cancel_job(job["id"])
    assert err.value.status == 409


def test_worker_killed_mid_job_fails_job_with_reason(workspace):
    # the older Customizer's path and body shape: the workspace is the dataset's namespace
    job = workspace.request("POST", "/v1/customization/jobs",
                            json={"config": "tiny", "dataset": {"namespace": "jobs", "name": "docs"},
                                  "hyperparameters": {"epochs": 1}, "stages": ["corpus"]})
    assert job["workspace"] == "jobs" and job["model"] == "tiny"
    pid = wait_running_with_pid(workspace, job["id"])["worker"]["pid"]
    os.kill(pid, signal.SIGKILL)
    final = workspace.wait_job(job["id"], timeout=30, poll=0.1)
    assert final["status"] == "failed"
    assert f"worker process {pid} was killed by signal SIGKILL" in final["error"]


def crash(svc: Service, kill_worker_pids: list[int]) -> None:
    """A machine crash as far as the platform can tell: the service and some workers die with SIGKILL."""
    svc.kill()
    for pid in kill_worker_pids:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda p=pid: not pid_alive(p), timeout=10, what="worker gone")


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, tiny_bert_dir, module_databases):
    """Service A runs two jobs and crashes; only the first job's worker dies with it. Service B starts on the
    same database and files."""
    root = tmp_path_factory.mktemp("restart")
    module_db_url = module_databases("restart")  # a service of its own: it writes the first admin key
    first = Service(root / "data", "--max-workers", "2", db_url=module_db_url).start()
    try:
        pc = first.client()
        pc.register_model("tiny", tiny_bert_dir)
        pc.upload_dataset("docs", write_corpus(root / "docs"))
        dead = pc.create_customization_job(model="tiny", dataset="docs", stages=["corpus"])
        alive = pc.create_customization_job(model="tiny", dataset="docs", stages=["corpus"])
        dead_pid = wait_running_with_pid(pc, dead["id"])["worker"]["pid"]
        alive_pid = wait_running_with_pid(pc, alive["id"])["worker"]["pid"]
        crash(first, [dead_pid])
    finally:
        first.stop_service_only()
    second = Service(root / "data", db_url=module_db_url).start()
    yield {"service": second, "dead": (dead["id"], dead_pid), "alive": (alive["id"], alive_pid), "root": root,
           "db_url": module_db_url}
    second.stop()


def test_restart_marks_job_of_dead_worker_failed(restarted):
    job_id, pid = restarted["dead"]
    job = restarted["service"].client().get_job(job_id)  # recovered before the first request was served
    assert job["status"] == "failed"
    assert f"worker pid {pid}" in job["error"] and "found when the service started" in job["error"]


def test_restart_adopts_job_whose_worker_survived(restarted):
    job_id, pid = restarted["alive"]
    job = restarted["service"].client().wait_job(job_id, timeout=120, poll=0.3)
    assert job["status"] == "completed", job["error"]
    assert job["worker"]["pid"] == pid and job["worker"]["attempts"] == 1


def test_restart_requeues_job_of_dead_worker_when_configured(restarted):
    second = restarted["service"]
    pc = second.client()
    pc.wait_job(restarted["alive"][0], timeout=120, poll=0.3)  # one job at a time from here
    job = pc.create_customization_job(model="tiny", dataset="docs", stages=["corpus"])
    pid = wait_running_with_pid(pc, job["id"])["worker"]["pid"]
    crash(second, [pid])
    third = Service(restarted["root"] / "data", "--on-orphan", "requeue", db_url=restarted["db_url"]).start()
    try:
        done = third.client().wait_job(job["id"], timeout=120, poll=0.3)
        assert done["status"] == "completed", done["error"]
        assert done["worker"]["attempts"] == 2 and done["worker"]["pid"] != pid
        assert f"worker pid {pid}" in done["status_details"]["requeued_because"]
    finally:
        third.stop()


def test_openapi_has_tags_and_response_models(service):
    spec = httpx.get(f"{service.url}/openapi.json").json()
    post = spec["paths"]["/v2/workspaces/{workspace}/customization/jobs"]["post"]
    assert post["tags"] == ["customization"]
    assert post["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobOut")
    assert "ErrorBody" in json.dumps(post["responses"]["422"])
    tags = {t for item in spec["paths"].values() for op in item.values() for t in op.get("tags", [])}
    assert {"datasets", "models", "customization", "evaluation", "deployments", "inference"} <= tags
